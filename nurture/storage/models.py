"""The tables: profiles (persons), identities, groups, events, runs, routes, messages, message
events, provider tokens, the nonces of signed webhook requests and the slots of send rates.

Columns the service queries are real columns with indexes; free-form data (traits, properties,
rendered content) is JSON, which SQLite and PostgreSQL both store natively.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import JSON, Column, DateTime, Index, Integer, Table, Text, TypeDecorator, text
from sqlmodel import Field, SQLModel

FEEDBACK: dict[str, tuple[str, ...]] = {
    "delivered": ("delivered",),
    "bounced": ("bounce", "dropped", "undelivered"),
    "opened": ("open", "read"),
    "clicked": ("click",),
    "unsubscribed": ("unsubscribe", "group_unsubscribe"),
    "spam": ("spamreport",),
}
"""Kinds of provider feedback (SendGrid, Twilio and WeChat events of each kind), in bit order."""


def feedback_bit(event: str) -> int:
    """The bit of ``messages.feedback`` a provider event sets (0 for one no kind counts)."""
    for index, events in enumerate(FEEDBACK.values()):
        if event in events:
            return 1 << index
    return 0


def utcnow() -> datetime:
    return datetime.now(UTC)


def core_table(model: type[SQLModel]) -> Table:
    """The Core table of a table model, for statements built once and run without the ORM."""
    found = getattr(model, "__table__", None)
    assert isinstance(found, Table), f"{model.__name__} is not a table model"
    return found


class UtcDateTime(TypeDecorator[datetime]):
    """A timestamp that reads back timezone-aware in UTC on every database (SQLite keeps none)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def _when(*, nullable: bool, default: Any = None, index: bool = False) -> Any:
    """A timezone-aware timestamp column; the default is pydantic's, so validated rows get it too."""
    column: Column[datetime] = Column(UtcDateTime(), nullable=nullable, index=index)
    if default is not None:
        return Field(default_factory=default, sa_column=column)
    if nullable:
        return Field(default=None, sa_column=column)
    return Field(sa_column=column)


PERSON_ID = 512
"""Characters a person id may have: ``<kind>:<value>`` for a person first seen by an address."""


class ProfileRecord(SQLModel, table=True):
    """A person: traits (identity fields mirrored into columns) and per-channel opt-outs.

    ``user_id`` is the person id (docs/identity.md). A person merged into another keeps its row,
    with ``merged_into`` naming the survivor, so its id keeps resolving."""

    __tablename__ = "profiles"

    user_id: str = Field(primary_key=True, max_length=PERSON_ID)
    traits: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    email: str | None = Field(default=None, max_length=320, index=True)
    phone: str | None = Field(default=None, max_length=32, index=True)
    wechat_openid: str | None = Field(default=None, max_length=128, index=True)
    opted_out: list[str] = Field(default_factory=list, sa_column=Column(JSON, nullable=False))
    created_at: datetime = _when(nullable=False, default=utcnow)
    updated_at: datetime = _when(nullable=False, default=utcnow)
    merged_into: str | None = Field(default=None, max_length=PERSON_ID, index=True)
    """The person this one was merged into (``None`` for a surviving person)."""
    trait_times: dict[str, str] = Field(
        default_factory=dict, sa_column=Column(JSON, nullable=False, server_default=text("'{}'"))
    )
    """Per trait, the time (ISO 8601, UTC) of the call that set it: a merge keeps the later."""
    group_id: str | None = Field(default=None, max_length=255)
    """The group of the person's latest ``group`` call."""


class IdentityRecord(SQLModel, table=True):
    """One identifier (``user_id``, ``anonymous_id``, ``email``, ``phone``, ``wechat_openid``) and
    the person it belongs to (always a surviving person: a merge re-points its identifiers)."""

    __tablename__ = "identities"

    kind: str = Field(primary_key=True, max_length=32)
    value: str = Field(primary_key=True, max_length=320)
    person_id: str = Field(max_length=PERSON_ID, index=True)
    created_at: datetime = _when(nullable=False, default=utcnow)


class GroupRecord(SQLModel, table=True):
    """An account (a ``group`` call's ``groupId``) and its traits, shared by its members."""

    __tablename__ = "groups"

    group_id: str = Field(primary_key=True, max_length=255)
    traits: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    updated_at: datetime = _when(nullable=False, default=utcnow)


class EventRecord(SQLModel, table=True):
    """Every accepted track or identify call; ``message_id`` de-duplicates retries."""

    __tablename__ = "events"
    __table_args__ = (Index("ix_events_user_id_name", "user_id", "name"),)  # one person's events of a name

    id: int | None = Field(default=None, primary_key=True)
    message_id: str = Field(max_length=255, unique=True)
    kind: str = Field(max_length=16)
    """``track``, ``identify``, ``alias`` or ``group``."""
    user_id: str = Field(max_length=PERSON_ID, index=True)
    """The person id (the survivor's, after a merge)."""
    anonymous_id: str | None = Field(default=None, max_length=255)
    """The call's ``anonymousId``, as sent."""
    name: str | None = Field(default=None, max_length=255)
    properties: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    timestamp: datetime = _when(nullable=False)
    received_at: datetime = _when(nullable=False, default=utcnow)
    routed_at: datetime | None = _when(nullable=True, index=True)
    """When routing a track event finished; ``None`` while it has not (a crash, a refused call):
    a retry of the call, or the API's next start, routes it again. Identity calls have it at once,
    unless they merged persons: then once the runs the merge ends have had their stop signal."""


@dataclass(slots=True)
class EventRow:
    """A call's event as the event API stores it: the columns of :class:`EventRecord` but its id
    and person, inserted as they are in the call's transaction. A plain record: building the
    table model (an ORM instance) cost about 95 us per call, some fifty times as much."""

    message_id: str
    kind: str
    """As :attr:`EventRecord.kind`."""
    timestamp: datetime
    name: str | None = None
    anonymous_id: str | None = None
    properties: dict[str, Any] = field(default_factory=dict)
    received_at: datetime = field(default_factory=utcnow)
    routed_at: datetime | None = None
    """As :attr:`EventRecord.routed_at`: set when there is nothing to route."""

    def values(self, user_id: str) -> dict[str, Any]:
        """The row's columns, for ``user_id``."""
        return {
            "message_id": self.message_id,
            "kind": self.kind,
            "user_id": user_id,
            "anonymous_id": self.anonymous_id,
            "name": self.name,
            "properties": self.properties,
            "timestamp": self.timestamp,
            "received_at": self.received_at,
            "routed_at": self.routed_at,
        }

class RunRecord(SQLModel, table=True):
    """One journey run (one workflow run), written by the workflow's own activities."""

    __tablename__ = "runs"
    __table_args__ = (
        Index("ix_runs_journey_entered_at", "journey", "entered_at"),
        # `nurture runs --counts` and the runs a migration moves: one version's active runs.
        Index("ix_runs_journey_version_status", "journey", "version", "status"),
        # A broadcast's progress: the runs of one occurrence (the occurrence is the run key).
        Index("ix_runs_journey_key", "journey", "key"),
    )

    run_id: str = Field(primary_key=True, max_length=255)
    workflow_id: str = Field(max_length=1000, index=True)
    journey: str = Field(max_length=128, index=True)
    version: str = Field(max_length=32)
    user_id: str = Field(max_length=PERSON_ID, index=True)
    key: str = Field(default="", sa_column=Column(Text, nullable=False))
    """The full run key (the workflow id may carry only its start and a hash)."""
    trigger_message_id: str | None = Field(default=None, max_length=255, index=True)
    """The ``messageId`` of the event that started the run: routing that event again skips it."""
    status: str = Field(default="active", max_length=16, index=True)
    """``active`` or ``ended``."""
    entered_at: datetime = _when(nullable=False)
    ended_at: datetime | None = _when(nullable=True)
    end_reason: str | None = Field(default=None, max_length=64)
    variants: dict[str, str] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    converted_at: datetime | None = _when(nullable=True)
    conversion_value: float | None = None
    """What the conversion was worth, when the journey's goal declares a ``value``."""
    step: str | None = Field(default=None, max_length=255)
    """The step the run waits at (a wait, a ``wait_for`` or a deferred send) while it is active."""
    last_message_at: datetime | None = _when(nullable=True)
    """When the run's latest message was sent: a goal may measure its window from it."""
    goal_until: datetime | None = _when(nullable=True, index=True)
    """Until when a goal event still converts this run once it has ended (``None``: no longer)."""
    holdout: bool = False
    """The user is in the project's holdout: the run sends no marketing message."""


class StepReach(SQLModel, table=True):
    """A step one run reached: one small row per step, written as runs go (both runtimes).

    Reports count reach per step from it (and assignment per variant, from a split's rows)
    without reading workflow histories.
    """

    __tablename__ = "step_reaches"
    __table_args__ = (
        Index("ix_step_reaches_journey_step", "journey", "step_id"),
        Index("ix_step_reaches_journey_step_at", "journey", "step_id", "reached_at"),
        # Few sends are ever held: reports sum their deferrals without reading every reach.
        Index(
            "ix_step_reaches_deferred",
            "journey",
            "step_id",
            postgresql_where=text("deferrals > 0"),
            sqlite_where=text("deferrals > 0"),
        ),
    )

    run_id: str = Field(primary_key=True, max_length=255)
    step_id: str = Field(primary_key=True, max_length=255)
    journey: str = Field(max_length=128)
    version: str = Field(max_length=32)
    variant: str | None = Field(default=None, max_length=64)
    """For a split: the variant the run was assigned."""
    reached_at: datetime = _when(nullable=False)
    deferrals: int = 0
    """For a send: how often it was held (quiet hours, a frequency cap) before it went out."""
    deferral_reason: str | None = Field(default=None, max_length=32)
    """The latest reason it was held: ``quiet_hours`` or ``frequency_cap``."""


class DateTriggerRecord(SQLModel, table=True):
    """A date trigger workflow the event API started for a person: what forgetting them ends
    (the workflow itself keeps no row anywhere else)."""

    __tablename__ = "date_triggers"

    workflow_id: str = Field(primary_key=True, max_length=1000)
    user_id: str = Field(max_length=PERSON_ID, index=True)
    journey: str = Field(max_length=128)
    updated_at: datetime = _when(nullable=False, default=utcnow)


class Route(SQLModel, table=True):
    """Where a user's events go: one row per (journey, user, key) workflow id.

    The event API writes it when it signals a trigger, so an event right behind a trigger (the
    next item of a batch) already finds the run; the workflow clears ``active`` when it ends.
    """

    __tablename__ = "routes"

    workflow_id: str = Field(primary_key=True, max_length=1000)
    user_id: str = Field(max_length=PERSON_ID, index=True)
    journey: str = Field(max_length=128)
    key: str = Field(default="", sa_column=Column(Text, nullable=False))
    listens: list[str] = Field(default_factory=list, sa_column=Column(JSON, nullable=False))
    active: bool = Field(default=True, index=True)
    updated_at: datetime = _when(nullable=False, default=utcnow)


class MessageRecord(SQLModel, table=True):
    """One send step's message and outcome; the idempotency key is unique per (run, step)."""

    __tablename__ = "messages"
    __table_args__ = (
        Index("ix_messages_journey_step", "journey", "step_id"),
        Index("ix_messages_user_sent", "user_id", "sent_at"),  # frequency caps count a user's sends
    )

    id: int | None = Field(default=None, primary_key=True)
    idempotency_key: str = Field(max_length=512, unique=True)
    run_id: str = Field(max_length=255, index=True)
    user_id: str = Field(default="", max_length=PERSON_ID, index=True)
    journey: str = Field(default="", max_length=128)
    step_id: str = Field(max_length=255)
    channel: str = Field(max_length=16)
    template: str = Field(max_length=255)
    provider: str | None = Field(default=None, max_length=32)
    provider_id: str | None = Field(default=None, max_length=255, index=True)
    status: str = Field(max_length=16)
    """``sending`` until the outcome is known, then ``sent``, ``skipped`` or ``failed``."""
    reason: str | None = Field(default=None, max_length=255)
    variant: str | None = Field(default=None, max_length=64)
    locale: str | None = Field(default=None, max_length=16)
    address: str | None = Field(default=None, max_length=320)
    subject: str | None = Field(default=None, sa_column=Column(Text, nullable=True))
    preview: str | None = Field(default=None, sa_column=Column(Text, nullable=True))
    content: dict[str, Any] | None = Field(default=None, sa_column=Column(JSON, nullable=True))
    """The rendered message as sent (RenderedMessage.to_dict())."""
    attempts: list[dict[str, Any]] = Field(default_factory=list, sa_column=Column(JSON, nullable=False))
    """One entry per channel tried, written *before* the provider call: ``channel``, ``provider``,
    ``state`` (``pending``, ``retry``, ``sent`` or ``failed``), ``reason``, ``provider_id``, ``at``."""
    category: str | None = Field(default=None, max_length=16)
    """``marketing`` or ``transactional``: frequency caps count marketing messages."""
    topic: str | None = Field(default=None, max_length=64)
    """The send's topic (``promotions``, ``newsletter``, ...), when it names one."""
    sent_at: datetime | None = _when(nullable=True)
    """When the provider accepted it, on the run's clock: what frequency caps count."""
    revision: int = Field(default=0)
    """Bumped by every change to ``attempts``: concurrent writers compare and set on it."""
    delivery_status: str | None = Field(default=None, max_length=32)
    """The latest provider feedback: ``delivered``, ``bounce``, ``open``, ``click``, ..."""
    feedback: int = Field(default=0, sa_column=Column(Integer, nullable=False, server_default=text("0")))
    """Every kind of feedback the message got, one bit per kind of :data:`FEEDBACK` (reports count
    them from the row itself, with no join to ``message_events``)."""
    created_at: datetime = _when(nullable=False, default=utcnow)
    updated_at: datetime | None = _when(nullable=True)


class MessageEvent(SQLModel, table=True):
    """Provider feedback about a message (delivered, bounce, open, click, unsubscribe, ...)."""

    __tablename__ = "message_events"

    id: int | None = Field(default=None, primary_key=True)
    provider: str = Field(max_length=32)
    event: str = Field(max_length=32, index=True)
    provider_event_id: str | None = Field(default=None, max_length=255, unique=True)
    """The provider's own id for the event (SendGrid ``sg_event_id``): repeats are ignored."""
    idempotency_key: str | None = Field(default=None, max_length=512, index=True)
    provider_id: str | None = Field(default=None, max_length=255, index=True)
    user_id: str | None = Field(default=None, max_length=PERSON_ID, index=True)
    at: datetime = _when(nullable=False)
    data: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    received_at: datetime = _when(nullable=False, default=utcnow)


class ProviderToken(SQLModel, table=True):
    """A provider access token shared by every worker (WeChat's expires every two hours)."""

    __tablename__ = "provider_tokens"

    name: str = Field(primary_key=True, max_length=128)
    """e.g. ``wechat:<app id>``."""
    token: str = Field(sa_column=Column(Text, nullable=False))
    expires_at: datetime = _when(nullable=False)
    updated_at: datetime = _when(nullable=False, default=utcnow)


class UsedNonce(SQLModel, table=True):
    """A signed webhook request already taken, kept while its signature is fresh enough to be
    accepted: WeChat signs only the query (timestamp and nonce), not the body, so the same query
    must not carry a second, different body."""

    __tablename__ = "used_nonces"

    key: str = Field(primary_key=True, max_length=255)
    """``wechat:<timestamp>:<nonce>``."""
    digest: str = Field(max_length=64)
    """SHA-256 (hex) of the body that came with it: the provider's own retry repeats that body."""
    expires_at: datetime = Field(sa_column=Column(DateTime(timezone=True), nullable=False, index=True))
    """When the signature becomes stale (refused by its timestamp); the row is pruned after."""


class SendRate(SQLModel, table=True):
    """Where a send rate (``rate: 1000/h``) stands: the next free slot of the sends sharing it,
    shared by every worker."""

    __tablename__ = "send_rates"

    key: str = Field(primary_key=True, max_length=512)
    """``<journey>`` for a journey's rate, ``<journey>/<step>`` for a step's own."""
    next_free: datetime = _when(nullable=False)
    """The first instant the next send may take; each send moves it one spacing on."""
class JourneyVersion(SQLModel, table=True):
    """The compiled form of one journey version, stored when a worker or the API starts with it.

    Runs in flight keep the version they entered with; to move them to a newer one, ``nurture
    migrate`` needs the older version's steps, which the journey files no longer hold.
    """

    __tablename__ = "journey_versions"

    journey: str = Field(primary_key=True, max_length=128)
    version: str = Field(primary_key=True, max_length=32)
    ir: dict[str, Any] = Field(sa_column=Column(JSON, nullable=False))
    """The intermediate form (:func:`nurture.language.ir.journey_to_dict`)."""
    source: str = Field(default="", sa_column=Column(Text, nullable=False, server_default=""))
    deployed_at: datetime = _when(nullable=False, default=utcnow)
    """When a process first started with this version."""


class AudienceMember(SQLModel, table=True):
    """A person in an audience now (``audiences/<id>.yaml``); leaving deletes the row."""

    __tablename__ = "audience_members"
    __table_args__ = (Index("ix_audience_members_person", "person"),)  # a person's audiences

    audience: str = Field(primary_key=True, max_length=128)
    person: str = Field(primary_key=True, max_length=PERSON_ID)
    entered_at: datetime = _when(nullable=False)


class AudienceChange(SQLModel, table=True):
    """Every entry and exit: who, which audience, when (``entered`` or ``exited``)."""

    __tablename__ = "audience_history"
    __table_args__ = (Index("ix_audience_history_audience_at", "audience", "at"),)

    id: int | None = Field(default=None, primary_key=True)
    audience: str = Field(max_length=128)
    person: str = Field(max_length=PERSON_ID, index=True)
    change: str = Field(max_length=8)
    at: datetime = _when(nullable=False)


class AudienceState(SQLModel, table=True):
    """What keeping one person's membership current needs: the tallies of
    :mod:`nurture.engine.audience` and the next moment it changes with no new input."""

    __tablename__ = "audience_state"
    __table_args__ = (Index("ix_audience_state_person", "person"),)

    audience: str = Field(primary_key=True, max_length=128)
    person: str = Field(primary_key=True, max_length=PERSON_ID)
    tallies: list[list[str]] = Field(default_factory=list, sa_column=Column(JSON, nullable=False))
    """Per clause, ISO 8601 UTC times, oldest first."""
    changes_at: datetime | None = _when(nullable=True, index=True)
    version: str = Field(default="", max_length=32, sa_column_kwargs={"server_default": ""})
    """The audience version the tallies were kept for: another version's are counted again."""


class AudienceVersion(SQLModel, table=True):
    """One audience version a process started with, and when its members were evaluated from
    scratch over the stored population (``None``: not yet)."""

    __tablename__ = "audience_versions"

    audience: str = Field(primary_key=True, max_length=128)
    version: str = Field(primary_key=True, max_length=32)
    definition: dict[str, Any] = Field(sa_column=Column(JSON, nullable=False))
    """The compiled form (:func:`nurture.language.audiences.audience_to_dict`)."""
    deployed_at: datetime = _when(nullable=False, default=utcnow)
    evaluated_at: datetime | None = _when(nullable=True)
    members: int | None = None
    """Members right after the evaluation."""


class AudiencePending(SQLModel, table=True):
    """A person whose traits or opt-outs changed outside the event API (a provider's unsubscribe,
    a journey's profile update): the next sweep brings their memberships up to date."""

    __tablename__ = "audience_pending"

    person: str = Field(primary_key=True, max_length=PERSON_ID)
    since: datetime = _when(nullable=False)


class BroadcastOccurrence(SQLModel, table=True):
    """One occurrence of a broadcast (``broadcasts/<id>.yaml``): what was started, how far the
    audience has been streamed, and which process drives it now.

    The row is the occurrence's idempotency: starting it again finds it and goes on from
    ``cursor`` (or does nothing once it is ``done`` or ``cancelled``), and the lease lets one
    process at a time start its runs.
    """

    __tablename__ = "broadcast_occurrences"

    broadcast: str = Field(primary_key=True, max_length=128)
    occurrence: str = Field(primary_key=True, max_length=64)
    """``once`` for a broadcast without a schedule, else the wall time it is scheduled for."""
    audience: str = Field(max_length=128)
    version: str = Field(max_length=32)
    journey: dict[str, Any] = Field(sa_column=Column(JSON, nullable=False))
    """The occurrence's intermediate form: a restart after a redeploy starts the same version."""
    status: str = Field(default="running", max_length=16)
    """``running``, ``done`` (every member was started) or ``cancelled``."""
    selected: int = 0
    """Members of the audience when the occurrence was first started."""
    started: int = 0
    """Runs this occurrence started."""
    existing: int = 0
    """Members whose run was already started (a restart going over the page it died in)."""
    cursor: str | None = Field(default=None, max_length=PERSON_ID)
    """The last member of the last page whose runs were all started (keyset paging on person)."""
    lease_owner: str | None = Field(default=None, max_length=128)
    lease_until: datetime | None = _when(nullable=True)
    created_at: datetime = _when(nullable=False, default=utcnow)
    updated_at: datetime = _when(nullable=False, default=utcnow)
    finished_at: datetime | None = _when(nullable=True)
