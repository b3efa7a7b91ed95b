"""Temporal workflow and activities: the durable runtime of journeys."""
