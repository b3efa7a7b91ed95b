"""Nurture: declarative marketing journeys compiled to a typed form and run durably on Temporal."""

__version__ = "0.1.0"
