"""The running service: the event API, routing of events to runs, provider webhooks, privacy,
settings from the environment, metrics and logs, the adapters built for the worker, and the
Python client of the API."""
