"""Storage: SQLModel tables on SQLite (default) or PostgreSQL (``DATABASE_URL``)."""

from .db import Database, database_url
from .models import EventRecord, MessageRecord, ProfileRecord, Route, RunRecord

__all__ = ["Database", "EventRecord", "MessageRecord", "ProfileRecord", "Route", "RunRecord", "database_url"]
