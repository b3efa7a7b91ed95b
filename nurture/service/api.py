"""The event API: Segment-compatible ``track``, ``identify``, ``page``, ``screen``, ``group``,
``alias`` and ``batch``, person lookups by any identifier, the outbox.

    uvicorn nurture.service.api:app_from_env --factory      (or: nurture up)

Every call is validated in full before anything is written, so a bad call changes nothing; a batch
is checked item by item, and its valid items are applied while each bad one is refused alone. Accepted calls go to :class:`nurture.service.ingest.Ingest`, which stores
them once per ``messageId`` and routes them to journey workflows on Temporal.
"""

from __future__ import annotations

import asyncio
import hmac
import inspect
import json
import logging
import math
import re
import types
import uuid
import zlib
from collections.abc import AsyncIterator, Callable, Coroutine, Iterable, Iterator, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from importlib.metadata import version
from typing import Annotated, Any, ClassVar, Literal, NoReturn, TypeVar, cast
from urllib.parse import parse_qsl

import uvicorn
from fastapi import Depends, FastAPI, Path, Query, Request, Security
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.routing import APIRoute, APIRouter
from fastapi.security import HTTPAuthorizationCredentials, HTTPBasic, HTTPBasicCredentials, HTTPBearer
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Discriminator,
    Field,
    JsonValue,
    Tag,
    ValidationError,
    ValidatorFunctionWrapHandler,
    WrapValidator,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError
from sqlalchemy import text
from sqlalchemy.exc import OperationalError
from sqlmodel import Session, SQLModel, col, select
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import BaseRoute, Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from temporalio.client import Client
from temporalio.service import RPCError

from channels import mask_address, mask_user_id
from nurture.engine.clock import format_instant
from nurture.engine.identity import Identifier, alias_identifiers, call_identifiers
from nurture.engine.model import Event
from nurture.language.audiences import Audience
from nurture.language.compiler import Project, load_project
from nurture.language.diagnostics import did_you_mean
from nurture.language.ir import CHANNELS
from nurture.language.schema import WECHAT_FOLLOWED, properties_problems, traits_problems
from nurture.reports.report import JourneyCounts, JourneyReport, journey_counts, journey_report, parse_bound
from nurture.reports.runs import (
    PAGE_LIMIT,
    RunPage,
    State,
    UnknownFilter,
    VersionCount,
    check_filters,
    list_runs,
    version_counts,
)
from nurture.storage import audiences as audience_rows
from nurture.storage.audiences import describe_audience
from nurture.storage.db import Database
from nurture.storage.identities import DbIdentities
from nurture.storage.models import EventRow, MessageRecord, ProfileRecord, RunRecord
from nurture.storage.stores import OptOuts, store_versions

from . import privacy
from .broadcasts import Broadcaster, BroadcastError
from .ingest import ROUTING_GRACE, TRANSIENT, Ingest, NotRouted, Routed
from .observability import configure_logging, log_fields
from .privacy import ForgetReport, UserExport
from .settings import Settings
from .webhooks import BODY_LIMITS as WEBHOOK_LIMITS
from .webhooks import webhook_router

log = logging.getLogger("nurture.api")

CALL_LIMIT = 32 * 1024
"""Bytes per call (a track or identify body, or one batch item), as Segment allows."""
BATCH_LIMIT = 500 * 1024
"""Bytes per batch body, as Segment allows."""
CONNECT_TIMEOUT = 5.0
"""Seconds to wait for Temporal when the API connects on demand."""

DESCRIPTION = """\
Send your users' events to Nurture: **Segment-compatible** `track`, `identify`, `page`, `screen`,
`group`, `alias`, `batch` and `import` calls start journeys, reach running ones (a goal ends a
sleeping run at once) and update profiles. Segment's and RudderStack's libraries work unchanged,
gzip included.

**People.** Every call names `userId`, `anonymousId` or both (at least one), and resolves to one
person, whose stable **person id** answers as `person`: the `userId` of a person first seen signed
in, else `<kind>:<value>` (`anonymous_id:7f3c...`). Anonymous visitors are people too and enter
journeys. A call naming identifiers of two people merges them (docs/identity.md): `identify` or
`track` with both ids, an `identify` whose `email`, `phone` or `wechat_openid` trait is another
person's, and `alias` (`previousId`, `userId`). Two people who each have a `userId` are merged only
by `alias`. `group` (`groupId`, `traits`) makes the person a member of the account, read in
journeys as `user.group`.

**Authentication.** Every `/v1` endpoint takes a key, Segment style as the HTTP Basic user name
with an empty password (`curl -u KEY: ...`), as `Authorization: Bearer KEY`, or (a write key) as
`writeKey` in the body. There are three
kinds: a **write key** (`NURTURE_WRITE_KEYS`) sends events (`track`, `identify`, `page`, ...) and
nothing else; a **read key** (`NURTURE_READ_KEYS`) reads profiles, runs, messages, the outbox and journey reports;
an **admin key** (`NURTURE_ADMIN_KEYS`) reads too, and exports and forgets users. Each variable is
comma-separated. A missing or unknown key answers 401; a valid key of the wrong kind answers 403
naming the kind needed.

**Retries and duplicates.** A call with a `messageId` that was accepted before changes nothing and
answers `"duplicate": true`. Without one the API assigns a fresh id, so **a client that retries
must send its own `messageId`** (the same one on every attempt) to be de-duplicated. After a 503
(Temporal unreachable), retry with the same `messageId`: an event that was stored but not fully
routed is routed by the retry (`"rerouted": true`), or else by the API within a few minutes.

**Differences from Segment.** Identity is resolved here, as described above (Segment leaves it to
its destinations); `alias` needs `userId` and takes `previousId` as a userId when one is known,
else as an anonymousId. `page` and `screen` calls are kept as
the track events `Page Viewed` and `Screen Viewed` (their `properties` with `name` and `category`).
On identify, `context.traits` are merged under `traits` and `context.timezone` / `context.locale`
become the `timezone` / `locale` traits; otherwise `context` and `integrations` are ignored. A
`timestamp` without a UTC offset is read as UTC; it defaults to the time of receipt, and must lie
between 0001-01-02T00:00:00Z and 9999-12-30T23:59:59Z. With `sentAt` (on the call or the batch) it
is corrected for the client's clock, as Segment does: `timestamp + (received - sentAt)`.

**Opt-outs.** A user's opt-outs are one set of names: channels (`email`, `sms`, `wechat`) and the
project's subscription topics (`topics:` in nurture.yaml, e.g. `promotions`). A channel opt-out
stops marketing sends on that channel; a topic opt-out stops the sends that name the topic, on
every channel. An `identify` changes them with three traits, none kept as a trait: `opted_out`
replaces the whole set (`[]` opts back in to everything); `unsubscribe` adds names and `subscribe`
removes them, keeping the rest, so a client needs no read-modify-write. `opted_out` cannot be
combined with the other two; a name that is neither a channel nor a declared topic answers 400.

**User ids in URLs.** Each per-user route takes the id in the path (`/v1/users/{user_id}`,
percent-encoded; not an id with a `/`, nor `.` or `..`: a userId, else a person id) or in the query
(`/v1/user?id=`, which takes any id), where any one identifier also finds the person:
`?anonymous_id=`, `?email=`, `?phone=`, `?wechat_openid=` or `?person=`.

**Errors.** A bad call answers 400 with every field at fault,
`{"error": "invalid_request", "code": "invalid_request", "message": "...", "detail": [{"field":
"event", "message": "..."}]}`, and changes nothing. A batch answers 200 as Segment does: its valid
items are applied and each invalid one is listed in `refused` with its index and fields (an item
over 32 KB included); only a bad body refuses it whole. With `enforce_declarations: true` in
nurture.yaml, a call that contradicts the declared traits and events is refused the same way: a
declared property of the wrong type or a required one missing (`properties.total: expected a
number, got '12' (text)`), a declared trait of the wrong type (`traits.vip`). A body over 32 KB (500 KB for `batch` and
`import`), as sent or once gzip or deflate is undone, answers 413. A body
must be UTF-8 JSON nested at most 64 levels deep, with integers between -2^63 and 2^63-1, finite
numbers, and strings without NUL or unpaired surrogates (what every store can keep); anything else
answers 400 on `body`, saying which rule it breaks.
"""

EXAMPLE_TRACK: dict[str, JsonValue] = {
    "userId": "u_1024",
    "event": "Cart Updated",
    "properties": {"cart_id": "c_77", "item_count": 2},
    "timestamp": "2026-03-02T10:00:00+08:00",
    "messageId": "4d9f8a46-31a5-4a54-9d46-7a1c0f7c9e11",
}
EXAMPLE_IDENTIFY: dict[str, JsonValue] = {
    "userId": "u_1024",
    "traits": {
        "email": "li@example.com",
        "phone": "+8613800138000",
        "first_name": "Li",
        "timezone": "Asia/Shanghai",
        "opted_out": ["sms"],
    },
    "messageId": "0b7e61d4-0c5e-4b8e-8a07-5c0f5b5d8f2a",
}


# Requests ------------------------------------------------------------------------------------


EARLIEST = datetime(1, 1, 2, tzinfo=UTC)
LATEST = datetime(9999, 12, 30, 23, 59, 59, 999999, tzinfo=UTC)
"""The instants a call may carry: a day inside Python's (and the databases') years 1 to 9999, so
the instant can be shown in any zone without leaving that range."""


def _instant(value: Any) -> Any:
    """ISO 8601 text only (no epoch numbers); naive means UTC. Answers the instant in UTC, so nothing
    after the API converts a client's offset."""
    if isinstance(value, datetime):
        parsed = value
    else:
        try:
            parsed = datetime.fromisoformat(str(value).strip().replace("Z", "+00:00").replace("z", "+00:00"))
            if not isinstance(value, str):
                raise TypeError
        except (TypeError, ValueError):
            raise PydanticCustomError(
                "timestamp",
                "timestamp must be an ISO 8601 date-time such as 2026-03-02T10:00:00+08:00, got {value}",
                {"value": json.dumps(value)[:80]},
            ) from None
    try:
        instant = parsed.astimezone(UTC) if parsed.tzinfo is not None else parsed.replace(tzinfo=UTC)
    except OverflowError:  # the offset takes it past year 1 or 9999
        instant = None
    if instant is None or not EARLIEST <= instant <= LATEST:
        raise PydanticCustomError(
            "timestamp_range",
            "timestamp must be between {earliest} and {latest}, got {value}",
            {
                "earliest": format_instant(EARLIEST),
                "latest": format_instant(LATEST.replace(microsecond=0)),
                "value": json.dumps(value if isinstance(value, str) else str(value))[:80],
            },
        )
    return instant


Timestamp = Annotated[datetime, BeforeValidator(_instant)]
UserId = Annotated[
    str,
    Field(
        alias="userId",
        min_length=1,
        max_length=255,
        description="The user's id in your system.",
    ),
]
IdText = Annotated[str, Field(min_length=1, max_length=255)]


class Call(BaseModel):
    """Fields every Segment call shares; unknown top-level fields are accepted and ignored."""

    model_config = ConfigDict(extra="allow")

    user_id: IdText | None = Field(
        default=None,
        alias="userId",
        description="The user's id in your system (userId, anonymousId or both).",
    )
    anonymous_id: IdText | None = Field(
        default=None,
        alias="anonymousId",
        description="The visitor's device or browser id, before (and after) they sign in.",
    )
    timestamp: Timestamp | None = Field(
        default=None,
        description="When it happened, ISO 8601, between 0001-01-02T00:00:00Z and 9999-12-30T23:59:59Z "
        "(default: when the call is received).",
    )
    message_id: str | None = Field(
        default=None,
        alias="messageId",
        min_length=1,
        max_length=255,
        description="De-duplication key: send the same one on every retry (default: a fresh UUID).",
    )
    sent_at: Timestamp | None = Field(
        default=None,
        alias="sentAt",
        description="When the client sent the call; with `timestamp`, corrects the client's clock: "
        "the event is kept at timestamp + (time received - sentAt), as Segment does.",
    )
    context: Any = Field(
        default=None,
        description="On identify, `context.traits` are merged under `traits` and `context.timezone` and "
        "`context.locale` become the `timezone` and `locale` traits; otherwise ignored.",
    )
    integrations: Any = Field(default=None, description="Accepted and ignored.")
    write_key: str | None = Field(
        default=None, alias="writeKey", description="The write key, when not sent in Authorization."
    )

    @model_validator(mode="after")
    def _correct_clock(self) -> Call:
        if not call_identifiers(self.user_id, self.anonymous_id):
            raise PydanticCustomError(
                "identity_missing",
                "userId or anonymousId is required (at least one, not blank): who the call is about",
            )
        self.timestamp = _skew_corrected(self.timestamp, self.sent_at)
        return self

    def identifiers(self, traits: Mapping[str, Any] | None = None) -> list[Identifier]:
        """The identifiers the call names: its ids, and the address traits given."""
        return call_identifiers(self.user_id, self.anonymous_id, traits)


def _skew_corrected(timestamp: datetime | None, sent_at: datetime | None) -> datetime | None:
    """``timestamp`` moved by the client's clock error (time received - ``sent_at``), as Segment does."""
    if timestamp is None or sent_at is None:
        return timestamp
    try:
        corrected = timestamp + (datetime.now(UTC) - sent_at)
    except OverflowError:
        corrected = None
    if corrected is None or not EARLIEST <= corrected <= LATEST:
        raise PydanticCustomError(
            "timestamp_range",
            "timestamp corrected by sentAt ({timestamp} + now - {sent_at}) falls outside "
            "{earliest} to {latest}",
            {
                "timestamp": format_instant(timestamp),
                "sent_at": format_instant(sent_at),
                "earliest": format_instant(EARLIEST),
                "latest": format_instant(LATEST.replace(microsecond=0)),
            },
        )
    return corrected


class TrackCall(Call):
    """A track call: something the user did."""

    model_config = ConfigDict(json_schema_extra={"examples": [EXAMPLE_TRACK]})

    type: Literal["track"] = Field(default="track", description="In a batch: which call this is.")
    event: str = Field(min_length=1, max_length=255, description="The event name, e.g. `Order Completed`.")
    properties: dict[str, Any] | None = Field(
        default=None, description="The event's properties (a JSON object)."
    )


class Traits(BaseModel):
    """Profile traits; any keys, plus the opt-out fields ``opted_out``, ``subscribe`` and ``unsubscribe``."""

    model_config = ConfigDict(extra="allow")

    # Plain strings: the topics are the project's, so names are checked against it per call
    # (Service.check_opt_outs), which keeps each name's index for the error.
    opted_out: list[str] | None = Field(
        default=None,
        description=(
            "Channels (`email`, `sms`, `wechat`) and the project's topics the user opted out of; "
            "replaces the stored opt-outs, `[]` opts back in to everything."
        ),
        examples=[["sms", "promotions"]],
    )
    subscribe: list[str] | None = Field(
        default=None,
        description="Channels and topics to opt back in to; the other opt-outs are kept.",
        examples=[["sms"]],
    )
    unsubscribe: list[str] | None = Field(
        default=None,
        description="Channels and topics to opt out of; the other opt-outs are kept.",
        examples=[["promotions"]],
    )

    def opt_out_change(self) -> Callable[[set[str]], set[str]] | None:
        """``subscribe`` and ``unsubscribe`` as a function of the stored opt-outs; None without them."""
        if self.subscribe is None and self.unsubscribe is None:
            return None
        back, out = frozenset(self.subscribe or ()), frozenset(self.unsubscribe or ())
        return lambda current: (current - back) | out


def _opt_out_errors(traits: Traits | None, allowed: Sequence[str], where: str) -> list[dict[str, str]]:
    """The faults in ``traits``' opt-out fields, as ``detail`` entries under ``where``."""
    if traits is None:
        return []
    errors = []
    choices = ", ".join(allowed)
    if len(allowed) == len(CHANNELS):
        choices += " (declare topics under topics: in nurture.yaml)"
    for name in ("opted_out", "subscribe", "unsubscribe"):
        for index, value in enumerate(getattr(traits, name) or ()):
            if value not in allowed:
                errors.append(
                    {
                        "field": f"{where}.{name}[{index}]",
                        "message": f"{value!r} is not a channel or a topic of this project"
                        f"{did_you_mean(value, allowed)}; expected one of {choices}",
                    }
                )
    if traits.opted_out is not None and (traits.subscribe is not None or traits.unsubscribe is not None):
        errors.append(
            {
                "field": f"{where}.opted_out",
                "message": "opted_out replaces every opt-out, so it cannot be combined with subscribe or "
                "unsubscribe: send one or the other",
            }
        )
    both = set(traits.subscribe or ()) & set(traits.unsubscribe or ())
    for index, value in enumerate(traits.unsubscribe or ()):
        if value in both:
            errors.append(
                {"field": f"{where}.unsubscribe[{index}]", "message": f"{value!r} is also in subscribe"}
            )
    return errors


class IdentifyCall(Call):
    """An identify call: who the user is (traits are merged into the profile)."""

    model_config = ConfigDict(json_schema_extra={"examples": [EXAMPLE_IDENTIFY]})

    type: Literal["identify"] = Field(default="identify", description="In a batch: which call this is.")
    traits: Traits | None = Field(
        default=None,
        description="Traits to merge into the user's profile (with `context.traits`; these win).",
    )

    @model_validator(mode="before")
    @classmethod
    def _context_traits(cls, data: Any) -> Any:
        # RudderStack's libraries send identify traits in context.traits, and browsers send the
        # user's zone and language in context: all are the user's traits, checked like the others.
        if not isinstance(data, dict) or not isinstance(data.get("context"), dict):
            return data
        context, given = data["context"], data.get("traits")
        if given is not None and not isinstance(given, dict):
            return data
        merged = {
            **{name: context[name] for name in ("timezone", "locale") if context.get(name) is not None},
            **(context["traits"] if isinstance(context.get("traits"), dict) else {}),
            **(given or {}),
        }
        return {**data, "traits": merged} if merged else data


PAGE_EVENT = "Page Viewed"
SCREEN_EVENT = "Screen Viewed"


class PageCall(Call):
    """A page call: the user viewed a web page; kept as a `Page Viewed` track event."""

    EVENT: ClassVar[str] = PAGE_EVENT
    type: Literal["page"] = Field(default="page", description="In a batch: which call this is.")
    name: str | None = Field(default=None, max_length=255, description="The page's name, e.g. `Pricing`.")
    category: str | None = Field(default=None, max_length=255, description="The page's category.")
    properties: dict[str, Any] | None = Field(
        default=None, description="The page's properties, e.g. `url`, `path`, `title`, `referrer`."
    )

    def as_track(self) -> TrackCall:
        """The call as the track event journeys see: the properties, with `name` and `category`."""
        named = {k: v for k, v in (("name", self.name), ("category", self.category)) if v is not None}
        return TrackCall.model_construct(
            user_id=self.user_id,
            anonymous_id=self.anonymous_id,
            event=self.EVENT,
            properties={**(self.properties or {}), **named},
            timestamp=self.timestamp,
            message_id=self.message_id,
        )


class ScreenCall(PageCall):
    """A screen call: the user viewed a screen of a mobile app; kept as a `Screen Viewed` track event."""

    EVENT: ClassVar[str] = SCREEN_EVENT
    type: Literal["screen"] = Field(default="screen", description="In a batch: which call this is.")  # type: ignore[assignment]


class GroupCall(Call):
    """A group call: the account the user belongs to, and its traits (`user.group` in journeys)."""

    type: Literal["group"] = Field(default="group", description="In a batch: which call this is.")
    group_id: str = Field(
        alias="groupId", min_length=1, max_length=255, description="The account's id in your system."
    )
    traits: dict[str, Any] | None = Field(
        default=None, description="The account's traits, merged into those every member sees."
    )


class AliasCall(Call):
    """An alias call: `previousId` (an earlier userId or anonymousId) and `userId` are one person."""

    type: Literal["alias"] = Field(default="alias", description="In a batch: which call this is.")
    user_id: UserId
    previous_id: str = Field(
        alias="previousId",
        min_length=1,
        max_length=255,
        description="The earlier id: a userId, else an anonymousId (an unknown one is kept as an anonymousId).",
    )


def _call_type(value: Any) -> str | None:
    kind = value.get("type") if isinstance(value, dict) else getattr(value, "type", None)
    return kind if isinstance(kind, str) else None


def _call_size(value: Any) -> Any:
    if isinstance(value, dict):
        size = len(json.dumps(value, separators=(",", ":"), ensure_ascii=False, default=str).encode())
        if size > CALL_LIMIT:
            raise PydanticCustomError(
                "call_too_large",
                "this call is {size} bytes; a call may be at most {limit} bytes (32 KB)",
                {"size": size, "limit": CALL_LIMIT},
            )
    return value


Single = TrackCall | IdentifyCall | PageCall | ScreenCall | GroupCall | AliasCall


@dataclass(frozen=True)
class Refused:
    """A batch item that is not a valid call, with pydantic's errors about it."""

    errors: list[Any]


def _item_or_refusal(value: Any, handler: ValidatorFunctionWrapHandler) -> Any:
    # One bad item must not drop the others: the libraries retry or drop a refused batch whole.
    try:
        return handler(value)
    except ValidationError as exc:
        return Refused(list(exc.errors()))


BatchItem = Annotated[
    Annotated[
        Annotated[TrackCall, Tag("track")]
        | Annotated[IdentifyCall, Tag("identify")]
        | Annotated[PageCall, Tag("page")]
        | Annotated[ScreenCall, Tag("screen")]
        | Annotated[GroupCall, Tag("group")]
        | Annotated[AliasCall, Tag("alias")],
        Discriminator(_call_type, custom_error_type="call_type", custom_error_message="unknown call type"),
    ],
    BeforeValidator(_call_size),
    WrapValidator(_item_or_refusal),
]


def _batch_schema(schema: dict[str, Any]) -> None:
    schema["examples"] = [{"batch": [{"type": "identify", **EXAMPLE_IDENTIFY}, {"type": "track", **EXAMPLE_TRACK}]}]
    # Any item is taken (an invalid one is refused alone, in a 200), so the document says so.
    batch = schema["properties"]["batch"]
    batch["items"] = {
        "anyOf": [batch["items"], {"description": "Anything else: refused alone, listed in `refused`."}]
    }


class BatchCall(BaseModel):
    """Several calls, handled in order."""

    model_config = ConfigDict(extra="allow", json_schema_extra=_batch_schema)

    batch: list[BatchItem] = Field(
        description="The calls, each with `type` `track`, `identify`, `page`, `screen`, `group` or `alias`; each is "
        "checked on its own (an invalid one is listed in `refused` and changes nothing)."
    )
    sent_at: Timestamp | None = Field(
        default=None, alias="sentAt", description="When the client sent the batch: corrects each item's clock."
    )
    context: Any = Field(default=None, description="Accepted and ignored.")
    integrations: Any = Field(default=None, description="Accepted and ignored.")
    write_key: str | None = Field(
        default=None, alias="writeKey", description="The write key, when not sent in Authorization."
    )


# Bodies --------------------------------------------------------------------------------------

MAX_DEPTH = 64
"""Levels of nesting a body may have (the body itself is the first)."""
INTEGERS = range(-(2**63), 2**63)
"""The integers a body may carry: what a 64-bit column or client can hold."""
_UNSTORABLE = re.compile("[\x00\ud800-\udfff]")
"""NUL, which PostgreSQL's text cannot hold, and unpaired surrogates, which no encoder can write."""


def _refuse(message: str, doc: str = "", position: int = 0) -> NoReturn:
    # FastAPI answers a JSONDecodeError as a 400 on the body (see _message's json_invalid).
    raise json.JSONDecodeError(message, doc, position)


def _integer(text: str) -> int:
    # Checked on the text first: Python refuses to read integers of over 4300 digits.
    if len(text) > 20 or int(text) not in INTEGERS:
        _refuse(
            f"integer out of range: {text[:24]}{'...' if len(text) > 24 else ''} is not between "
            f"{INTEGERS.start} and {INTEGERS.stop - 1}; send larger numbers as strings"
        )
    return int(text)


def _number(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        _refuse(f"number out of range: {text[:24]} is too large for a 64-bit float")
    return value


def _constant(name: str) -> Any:
    _refuse(f"NaN and Infinity are not JSON, got {name}")


def strict_json(body: bytes) -> Any:
    """``body`` read as JSON that every store and client can keep, else a ``JSONDecodeError``
    saying why: UTF-8, at most ``MAX_DEPTH`` levels, 64-bit integers, finite numbers, and strings
    without NUL or unpaired surrogates."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        _refuse(f"the body is not UTF-8 (byte {exc.start})", position=exc.start)
    try:
        value = json.loads(text, parse_int=_integer, parse_float=_number, parse_constant=_constant)
    except RecursionError:
        _refuse(f"JSON nested deeper than {MAX_DEPTH} levels")
    pending: list[tuple[Any, int, str]] = [(value, 1, "")]
    while pending:  # iterative: the depth is what is being checked
        item, depth, where = pending.pop()
        strings: Iterable[str] = ()
        if isinstance(item, dict):
            children = [(v, f"{where}.{k}" if where else str(k)) for k, v in item.items()]
            strings = item.keys()
        elif isinstance(item, list):
            children = [(v, f"{where}[{i}]") for i, v in enumerate(item)]
        else:
            children = []
            strings = (item,) if isinstance(item, str) else ()
        if children and depth >= MAX_DEPTH:
            _refuse(f"JSON nested deeper than {MAX_DEPTH} levels (at {where or 'the body'})")
        for string in strings:
            found = _UNSTORABLE.search(string)
            if found is not None:
                what = "U+0000 (NUL)" if found.group() == "\x00" else "an unpaired surrogate"
                _refuse(f"a string at {where or 'the body'} contains {what}, which cannot be stored")
        pending.extend((child, depth + 1, path) for child, path in children)
    return value


class StrictJsonRequest(Request):
    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            self._json = strict_json(await self.body())
        return self._json


class StrictJsonRoute(APIRoute):
    """A route whose JSON body is read with :func:`strict_json`."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def strict(request: Request) -> Response:
            return await handler(StrictJsonRequest(request.scope, request.receive))

        return strict


# Answers -------------------------------------------------------------------------------------


class Accepted(BaseModel):
    """One accepted call and what it did."""

    success: bool = True
    type: Literal["track", "identify", "page", "screen", "group", "alias"]
    message_id: str = Field(serialization_alias="messageId", description="The call's messageId.")
    person: str | None = Field(
        default=None, description="The person id the call is about (absent on a duplicate identity call)."
    )
    duplicate: bool = Field(description="The messageId was accepted before: this call changed nothing.")
    rerouted: bool = Field(
        default=False,
        description=(
            "The messageId was accepted before but not fully routed (the service stopped, or "
            "answered 503, part-way): this call routed it."
        ),
    )
    triggered: list[str] = Field(
        default_factory=list, description="Workflow ids of runs the event started or re-triggered."
    )
    signalled: list[str] = Field(default_factory=list, description="Workflow ids of active runs it reached.")
    skipped: list[str] = Field(
        default_factory=list,
        description="Journeys it matched but could not enter (`re_entry: once`, or the journey is paused).",
    )
    skip_reasons: dict[str, str] = Field(
        default_factory=dict,
        description="Why each skipped journey was skipped: `re_entry_once` or `journey_paused`.",
    )


class FieldError(BaseModel):
    field: str = Field(description="Where: `event`, `properties.total`, `batch[2].type`, `body`.")
    message: str


class RefusedItem(BaseModel):
    """A batch item that was not applied, and why."""

    index: int = Field(description="Its position in `batch`, from 0.")
    detail: list[FieldError] = Field(description="The fields at fault.")


class BatchAccepted(BaseModel):
    """A batch's valid calls, applied in order, and its refused ones."""

    success: bool = Field(default=True, description="Every item was applied (none refused).")
    results: list[Accepted] = Field(description="What each valid item did, in order.")
    refused: list[RefusedItem] = Field(default_factory=list, description="The invalid items, in order.")


class ErrorBody(BaseModel):
    """Every error answer."""

    error: str = Field(description="`invalid_request`, `unauthorized`, `not_found`, `payload_too_large`, ...")
    code: str = Field(description="The same as `error` (RudderStack's clients read `code`).")
    message: str | None = None
    detail: list[FieldError] | None = Field(default=None, description="The fields at fault.")


class _Public(SQLModel):
    @field_validator("*", mode="after")
    @classmethod
    def _aware(cls, value: Any) -> Any:
        # SQLite hands back naive datetimes; every stored instant is UTC.
        if isinstance(value, datetime) and value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value


class IdentifierPublic(BaseModel):
    kind: str = Field(description="`user_id`, `anonymous_id`, `email`, `phone` or `wechat_openid`.")
    value: str


class ProfilePublic(_Public):
    """A person's profile."""

    user_id: str = Field(description="The person id (the same as `person_id`).")
    person_id: str = Field(
        default="", description="The person id: the userId of a person first seen signed in."
    )
    identifiers: list[IdentifierPublic] = Field(
        default_factory=list, description="Every identifier of the person, merged people's included."
    )
    group_id: str | None = Field(default=None, description="The account of the person's latest `group` call.")
    traits: dict[str, Any]
    opted_out: list[str] = Field(
        description=(
            "What the user opted out of: channels (`email`, `sms`, `wechat`: no marketing sends "
            "there) and topics (`promotions`: no sends naming the topic, on any channel)."
        )
    )
    created_at: datetime
    updated_at: datetime
    audiences: list[str] = Field(default_factory=list, description="The audiences the person is in now, by id.")


class RunPublic(_Public):
    """One journey run of a user."""

    run_id: str
    workflow_id: str
    journey: str
    version: str = Field(description="The journey version the run entered with.")
    key: str
    status: str = Field(description="`active` or `ended`.")
    entered_at: datetime
    ended_at: datetime | None
    end_reason: str | None = Field(
        description="`goal`, `completed`, `exit_on`, `restarted`, or an exit step's."
    )
    variants: dict[str, str] = Field(description="Split variants by experiment.")
    converted_at: datetime | None


class MessagePublic(_Public):
    """One send step's outcome (and, on request, the rendered message)."""

    id: int
    run_id: str
    journey: str
    step_id: str
    channel: str
    template: str
    status: str = Field(description="`sent`, `skipped` or `failed`.")
    reason: str | None
    provider: str | None
    variant: str | None
    locale: str | None
    subject: str | None
    preview: str | None
    created_at: datetime
    content: dict[str, Any] | None = Field(default=None, description="The rendered message, on request.")


class OutboxMessagePublic(MessagePublic):
    """A message delivered to the built-in outbox, rendered."""

    user_id: str
    address: str | None


class JourneyPublic(BaseModel):
    """A deployed journey and how many runs it has."""

    id: str
    name: str
    description: str
    version: str = Field(description="The version new runs enter with.")
    counts: JourneyCounts


class AudiencePublic(BaseModel):
    """An audience of the project and how many people are in it now."""

    id: str
    name: str
    description: str
    version: str = Field(description="A hash of the definition: a changed one is a new version.")
    size: int = Field(description="Members now.")
    definition: str = Field(default="", description="What membership needs, in words.")
    evaluated_at: datetime | None = Field(
        default=None, description="When this version was evaluated over the stored population (`null`: not yet)."
    )


class AudienceMemberPublic(BaseModel):
    person: str = Field(description="The person id.")
    entered_at: datetime


class AudienceMembers(BaseModel):
    """One page of an audience's members, by person id."""

    audience: str
    members: list[AudienceMemberPublic]
    next: str | None = Field(description="Pass as `after` for the next page; `null` on the last one.")


class Check(BaseModel):
    ok: bool
    error: str | None = None


class Health(BaseModel):
    ok: bool
    database: Check
    temporal: Check


# The service ---------------------------------------------------------------------------------


AUDIENCE_SWEEP = 60.0
"""Seconds between two time sweeps: how late, at most, someone leaves "ordered in the last 30
days" with no event (or takes a change made outside the API, a provider's unsubscribe)."""


class ApiError(Exception):
    """An error answer."""

    def __init__(
        self,
        status: int,
        error: str,
        message: str | None = None,
        *,
        detail: list[dict[str, str]] | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message or error)
        self.status = status
        self.error = error
        self.message = message
        self.detail = detail
        self.headers = dict(headers or {})


RETRY_LATER = {"Retry-After": "5"}
"""The headers of a 503: when a client should try again."""


def _unavailable(reason: str) -> ApiError:
    return ApiError(
        503,
        "unavailable",
        f"{reason}; nothing was lost: retry the call with the same messageId",
        headers=RETRY_LATER,
    )


@dataclass(frozen=True)
class LeftOver:
    """How an API process looks for events that a process which died left unrouted.

    At start-up it routes those received before it started; and since a deployment runs several
    API processes, and the one that died may never start again, it looks again every ``every``
    seconds for those received more than ``age`` seconds ago. Every API process looks: routing an
    event twice is harmless (see :mod:`nurture.service.ingest`), and ``age`` keeps the looks clear
    of events a live call is still routing."""

    every: float = 60.0
    age: float = 120.0


class Service:
    """What the endpoints share: the project, the database, the keys and (lazily) Temporal."""

    def __init__(
        self,
        settings: Settings,
        project: Project,
        db: Database,
        client: Client | None,
        left_over: LeftOver = LeftOver(),
    ) -> None:
        self.settings = settings
        self.left_over = left_over
        self.project = project
        self.db = db
        kinds: dict[KeyKind, Sequence[str]] = {
            "write": settings.require_write_keys(),
            "read": settings.read_keys,
            "admin": settings.admin_keys,
        }
        self.keys = tuple((kind, key.encode()) for kind, keys in kinds.items() for key in keys)
        self.opt_out_names = tuple(dict.fromkeys((*CHANNELS, *project.settings.topics)))
        """What an opt-out may name: the channels, then the project's topics."""
        self._ingest = None if client is None else self._router(client)
        self.identities = DbIdentities(db, secret=settings.secret)
        self._lock = asyncio.Lock()
        self.audience_sweep = AUDIENCE_SWEEP
        """Seconds between two time sweeps of the audiences."""
        self._broadcaster: Broadcaster | None = None

    async def broadcaster(self) -> Broadcaster:
        """The broadcasts' driver, on the router's Temporal client (one per process, so a second
        start of an occurrence this process drives is a no-op)."""
        if self._broadcaster is None or self._broadcaster.client is None:
            client = (await self.ingest()).client
            self._broadcaster = Broadcaster(self.project, self.db, client, self.settings.task_queue)
        return self._broadcaster

    async def run_schedules(self) -> None:
        """Start scheduled broadcasts as their occurrences fall due (once Temporal is reachable)."""
        while True:
            try:
                broadcaster = await self.broadcaster()
                break
            except ApiError:
                await asyncio.sleep(ROUTING_GRACE)
        await broadcaster.run_schedules()

    def _router(self, client: Client | None) -> Ingest:
        return Ingest(self.project, self.db, client, self.settings.task_queue, secret=self.settings.secret)

    async def ingest(self) -> Ingest:
        """The router, connecting to Temporal on first use (it may start after the API)."""
        if self._ingest is None:
            async with self._lock:
                if self._ingest is None:
                    try:
                        client = await asyncio.wait_for(self.settings.connect(), CONNECT_TIMEOUT)
                    except (RuntimeError, RPCError, OSError, TimeoutError) as exc:
                        log.warning("temporal at %s unreachable: %s", self.settings.temporal_address, exc)
                        raise _unavailable(
                            f"Temporal at {self.settings.temporal_address} is unreachable"
                        ) from exc
                    self._ingest = self._router(client)
                    log.info("connected to temporal at %s", self.settings.temporal_address)
        return self._ingest

    async def route_left_over(self, started: datetime) -> None:
        """Route the track events a process stored but did not finish routing (it died mid-call):
        those received before ``started``, once the requests that might still be routing them
        elsewhere are done; then, for as long as this process runs, those left behind since by
        any other (see :class:`LeftOver`)."""
        await asyncio.sleep(ROUTING_GRACE)
        while True:
            try:
                ingest = await self.ingest()
                break
            except ApiError:  # Temporal not up yet: the events wait for it
                await asyncio.sleep(ROUTING_GRACE)
        before = started
        while True:
            try:
                routed = await ingest.route_unrouted(before=before)
            except Exception:  # logged, and looked for again: this task lives as long as the process
                log.exception("routing left-over events failed")
                routed = 0
            if routed:
                log.info("routed %d events a process that died left unrouted", routed)
            await asyncio.sleep(self.left_over.every)
            before = datetime.now(UTC) - timedelta(seconds=self.left_over.age)

    async def keep_audiences(self) -> None:
        """Audience upkeep beyond single calls, for the life of the process: first the evaluation
        from scratch of every audience version not yet evaluated, then every
        :attr:`audience_sweep` seconds the time sweep, and the routing of audience events left
        unrouted (Temporal was down). The database alone keeps membership: without Temporal the
        entries wait, stored, for their routing."""
        if not self.project.audiences:
            return
        evaluated = False
        while True:
            router = self._ingest or self._router(None)
            try:
                if not evaluated:
                    await router.evaluate_audiences()
                    evaluated = True
                await router.sweep_audiences()
                if self._ingest is not None:
                    await self._ingest.route_audience_events()
            except TRANSIENT as exc:
                log.warning("audience upkeep postponed: %s", exc)
            await asyncio.sleep(self.audience_sweep)

    def kinds(self, key: str) -> set[KeyKind]:
        """What ``key`` is: a write, read or admin key (a key may be listed as several), or nothing."""
        given = key.encode()
        kinds: set[KeyKind] = set()
        for kind, expected in self.keys:  # no early exit: the time taken says nothing about the keys
            if hmac.compare_digest(given, expected):
                kinds.add(kind)
        return kinds

    async def handle(self, call: Single) -> Accepted:
        """Apply one valid call."""
        if isinstance(call, IdentifyCall):
            return await self.identify(call)
        if isinstance(call, GroupCall):
            return await self.group(call)
        if isinstance(call, AliasCall):
            return await self.alias(call)
        if isinstance(call, PageCall):
            return await self.track(call.as_track(), kind=call.type)
        return await self.track(call)

    def refusal(self, item: object, index: int, sent_at: datetime | None) -> list[dict[str, str]]:
        """What is wrong with batch item ``index``, with the batch's ``sent_at`` applied to a valid
        one; empty when it can be applied."""
        where = f"batch[{index}]"
        if isinstance(item, Refused):
            return _field_errors([{**e, "loc": ("body", "batch", index, *e["loc"])} for e in item.errors])
        assert isinstance(item, Single)
        if isinstance(item, IdentifyCall):
            detail = _opt_out_errors(item.traits, self.opt_out_names, f"{where}.traits")
            if detail:
                return detail
        detail = self.declaration_errors(item, f"{where}.")
        if detail:
            return detail
        if item.sent_at is None and sent_at is not None:
            try:
                item.timestamp = _skew_corrected(item.timestamp, sent_at)
            except PydanticCustomError as exc:
                return [{"field": f"{where}.timestamp", "message": exc.message()}]
        return []

    async def track(self, call: TrackCall, kind: Literal["track", "page", "screen"] = "track") -> Accepted:
        ingest = await self.ingest()
        message_id = call.message_id or str(uuid.uuid4())
        event = Event(
            name=call.event,
            timestamp=call.timestamp or datetime.now(UTC),
            properties=call.properties or {},
            message_id=message_id,
        )
        try:
            routed = await ingest.track(call.identifiers(), event, anonymous_id=call.anonymous_id)
        except NotRouted as exc:  # kept as unrouted: the retry we ask for routes it
            log.warning("track %s not routed (%s); asked the client to retry", message_id, exc.__cause__)
            raise _unavailable("Temporal or the database did not take the event") from exc
        _log_track(routed.person or "", event, routed)
        return Accepted(type=kind, message_id=message_id, **routed.to_dict())

    async def wechat_followed(self, openid: str, at: datetime) -> None:
        """A WeChat follow: the follower's person (created with the ``wechat_openid`` trait when
        the openid is new) gets the track event ``WeChat Followed``, which journeys can trigger
        on. Never raises: WeChat must get its answer; an event not routed now is routed later
        (see :class:`LeftOver`)."""
        follower = [Identifier("wechat_openid", openid)]
        message_id = f"wechat-follow:{openid}:{int(at.timestamp())}"
        event = Event(WECHAT_FOLLOWED, at, {}, message_id)
        try:
            if await asyncio.to_thread(self.identities.resolve, "wechat_openid", openid) is None:
                await asyncio.to_thread(self.identities.apply, follower, at=at, traits={"wechat_openid": openid})
            try:
                ingest = await self.ingest()
            except ApiError:  # Temporal is down: kept unrouted for the next start
                record = EventRow(message_id=message_id, kind="track", name=WECHAT_FOLLOWED, timestamp=at)
                await asyncio.to_thread(self.identities.apply, follower, at=at, record=record)
                return
            routed = await ingest.track(follower, event)
            _log_track(routed.person or "", event, routed)
        except (NotRouted, *TRANSIENT) as exc:
            log.warning("wechat follow %s kept unrouted: %s", message_id, exc)

    def declaration_errors(self, call: Single, prefix: str = "") -> list[dict[str, str]]:
        """What in ``call`` contradicts the declared traits and events, when nurture.yaml sets
        ``enforce_declarations``; field names start with ``prefix``."""
        declarations = self.project.settings.declarations
        if not declarations.enforce:
            return []
        if isinstance(call, IdentifyCall):
            traits = dict(call.traits.model_extra or {}) if call.traits is not None else {}
            return traits_problems(declarations, traits, f"{prefix}traits")
        if isinstance(call, GroupCall | AliasCall):  # no declared shape: group traits are the account's
            return []
        track = call.as_track() if isinstance(call, PageCall) else call
        return properties_problems(declarations, track.event, track.properties, f"{prefix}properties")

    def check_declared(self, call: Single) -> None:
        """400 naming every field of ``call`` that contradicts the declarations (when enforced)."""
        detail = self.declaration_errors(call)
        if detail:
            raise ApiError(400, "invalid_request", detail=detail)

    def check_opt_outs(self, calls: Iterable[tuple[str, IdentifyCall]]) -> None:
        """400 naming every opt-out fault in ``calls`` (each with where its traits are), before any
        call is handled: a batch with one bad name changes nothing."""
        detail = [e for where, call in calls for e in _opt_out_errors(call.traits, self.opt_out_names, where)]
        if detail:
            raise ApiError(400, "invalid_request", detail=detail)

    async def identify(self, call: IdentifyCall) -> Accepted:
        given = call.traits
        traits = dict(given.model_extra or {}) if given is not None else {}
        opted_out = None if given is None or given.opted_out is None else sorted(set(given.opted_out))
        change = None if given is None else given.opt_out_change()
        accepted = await self._identity_call(
            call,
            "identify",
            call.identifiers(traits),
            traits=traits,
            # subscribe/unsubscribe apply to the locked row, so a concurrent change to other names
            # (a STOP, a link) stays; they never come with opted_out (checked above).
            opted_out=opted_out if change is None else change,
        )
        _log_identify(accepted.person or "", accepted.message_id, traits, given, duplicate=accepted.duplicate)
        return accepted

    async def group(self, call: GroupCall) -> Accepted:
        return await self._identity_call(
            call, "group", call.identifiers(), group=(call.group_id, call.traits or {})
        )

    async def alias(self, call: AliasCall) -> Accepted:
        # previousId is a userId when one is known by it, else an anonymousId (known or not).
        named = await asyncio.to_thread(alias_identifiers, call.user_id, call.previous_id, self.identities.known)
        named = list(dict.fromkeys([*named, *call.identifiers()]))
        return await self._identity_call(call, "alias", named, explicit=True)

    async def _identity_call(
        self,
        call: Call,
        kind: Literal["identify", "group", "alias"],
        identifiers: list[Identifier],
        *,
        traits: Mapping[str, Any] | None = None,
        opted_out: OptOuts | None = None,
        explicit: bool = False,
        group: tuple[str, Mapping[str, Any]] | None = None,
    ) -> Accepted:
        """Apply an identity call. Persons live in the database only: these calls work while
        Temporal is unreachable, unless a merge has runs to end or a journey starts on a date in
        the traits (then 503, and the retry with the same messageId finishes the job)."""
        message_id = call.message_id or str(uuid.uuid4())
        timestamp = call.timestamp or datetime.now(UTC)
        values = dict(traits or {})
        options: dict[str, Any] = {
            "message_id": message_id,
            "event": Event(name=kind, timestamp=timestamp, properties=values, message_id=message_id),
            "opted_out": opted_out,
            "kind": kind,
            "anonymous_id": call.anonymous_id,
            "explicit": explicit,
            "group": group,
        }
        try:
            # A journey that starts on a date in the traits is told of changes on Temporal.
            dated = Ingest.plans_trait_dates(self.project)
            router = await self.ingest() if dated else self._ingest or self._router(None)
            applied = await router.identify(identifiers, values, **options)
        except NotRouted:  # stored; a merge has runs to end, or dates to tell, which takes Temporal
            try:
                # The same call again: stored already, so this ends the runs and marks it routed.
                await (await self.ingest()).identify(identifiers, values, **options)
            except NotRouted as exc:
                log.warning("%s %s merged people or changed dates, not told to Temporal: %s", kind, message_id, exc)
                raise _unavailable("Temporal did not take the end of runs this merge ends, or the dates of the traits") from exc
            person = await asyncio.to_thread(
                self.identities.resolve, identifiers[0].kind, identifiers[0].value
            )
            return Accepted(type=kind, message_id=message_id, duplicate=False, person=person)
        if applied is None:
            return Accepted(type=kind, message_id=message_id, duplicate=True)
        return Accepted(type=kind, message_id=message_id, duplicate=False, person=applied.person)

    def database_ok(self) -> Check:
        try:
            with self.db.session() as session:
                session.execute(text("SELECT 1"))
        except Exception as exc:  # reported, not raised: this is the health check
            log.warning("database check failed: %s", exc)
            return Check(ok=False, error=type(exc).__name__)
        return Check(ok=True)

    async def temporal_ok(self) -> Check:
        try:
            client = (await self.ingest()).client
            assert client is not None  # ingest() connects before returning
            serving = await client.service_client.check_health(timeout=timedelta(seconds=3))
        except ApiError:
            return Check(ok=False, error=f"unreachable at {self.settings.temporal_address}")
        except (RuntimeError, RPCError) as exc:
            return Check(ok=False, error=type(exc).__name__)
        return Check(ok=True) if serving else Check(ok=False, error="not serving")


def _log_track(user_id: str, event: Event, routed: Routed) -> None:
    fields = {
        "call": "track",
        "user": mask_user_id(user_id),
        "event": event.name,
        "message_id": event.message_id,
        "duplicate": routed.duplicate,
        "triggered": len(routed.triggered),
        "signalled": len(routed.signalled),
        "skipped": len(routed.skipped),
    }
    log_fields(log, fields)


def _log_identify(
    user_id: str,
    message_id: str,
    traits: Mapping[str, Any],
    given: Traits | None,
    *,
    duplicate: bool,
) -> None:
    fields = {
        "call": "identify",
        "user": mask_user_id(user_id),
        "message_id": message_id,
        "duplicate": duplicate,
        "traits": sorted(traits),  # names only: values may be addresses
        # Channel and topic names only, never addresses.
        "opted_out": None if given is None else given.opted_out,
        "subscribe": None if given is None else given.subscribe,
        "unsubscribe": None if given is None else given.unsubscribe,
    }
    log_fields(log, fields)


# Dependencies --------------------------------------------------------------------------------

KeyKind = Literal["write", "read", "admin"]
Access = Literal["write", "read", "admin"]
GRANTS: dict[KeyKind, frozenset[Access]] = {
    "write": frozenset({"write"}),
    "read": frozenset({"read"}),
    "admin": frozenset({"read", "admin"}),
}
"""What each kind of key may do: a write key sends events, a read key reads people and messages,
an admin key reads too and exports and forgets users."""
NEEDS: dict[Access, str] = {
    "write": "sending events needs a write key (NURTURE_WRITE_KEYS)",
    "read": "reading people and messages needs a read key (NURTURE_READ_KEYS) or an admin key",
    "admin": "exporting and forgetting users needs an admin key (NURTURE_ADMIN_KEYS)",
}


def _basic(kind: KeyKind, env: str, does: str) -> HTTPBasic:
    return HTTPBasic(
        auto_error=False,
        scheme_name=f"{kind.capitalize()}Key",
        realm="nurture",
        description=f"A {kind} key (`{env}`) as the user name, empty password (Segment style): {does}.",
    )


_write_basic = _basic("write", "NURTURE_WRITE_KEYS", "sends events")
_read_basic = _basic("read", "NURTURE_READ_KEYS", "reads profiles, runs, messages, the outbox and reports")
_admin_basic = _basic("admin", "NURTURE_ADMIN_KEYS", "reads, and exports and forgets users")
_bearer = HTTPBearer(
    auto_error=False,
    scheme_name="BearerKey",
    description="Any key as `Authorization: Bearer <key>`; it may do what its kind may.",
)
UNAUTHORIZED_HEADERS = {"WWW-Authenticate": 'Basic realm="nurture"'}
Basic = HTTPBasicCredentials | None
Bearer = HTTPAuthorizationCredentials | None


async def get_service(request: Request) -> Service:
    """The app's service; ``async`` so that FastAPI calls it on the event loop, not in a thread."""
    service: Service = request.app.state.nurture
    return service


ServiceDep = Annotated[Service, Depends(get_service)]


def _authorize(service: Service, needs: Access, basic: Basic, bearer: Bearer) -> str:
    """The key of the call (Basic user name or Bearer): 401 without a valid one, 403 when its
    kind may not do what the endpoint ``needs``."""
    key = basic.username if basic is not None else bearer.credentials if bearer is not None else None
    if key is None:
        raise ApiError(401, "unauthorized", "a key is required", headers=UNAUTHORIZED_HEADERS)
    kinds = service.kinds(key)
    if not kinds:
        raise ApiError(401, "unauthorized", "the key is not valid", headers=UNAUTHORIZED_HEADERS)
    if not any(needs in GRANTS[kind] for kind in kinds):
        given = " and ".join(sorted(kinds))
        raise ApiError(403, "forbidden", f"{NEEDS[needs]}; the key given is a {given} key")
    return key


async def write_access(
    request: Request,
    service: ServiceDep,
    basic: Annotated[Basic, Security(_write_basic)],
    bearer: Annotated[Bearer, Security(_bearer)],
) -> str:
    if basic is None and bearer is None:
        # Segment's batch format may carry the key in the body (read and checked before this runs);
        # a call with no body (starting a broadcast) has none.
        try:
            body = await request.json()
        except ValueError:
            body = None
        key = body.get("writeKey") if isinstance(body, dict) else None
        if isinstance(key, str):
            basic = HTTPBasicCredentials(username=key, password="")
    return _authorize(service, "write", basic, bearer)


def read_access(
    service: ServiceDep,
    basic: Annotated[Basic, Security(_read_basic)],
    admin: Annotated[Basic, Security(_admin_basic)],
    bearer: Annotated[Bearer, Security(_bearer)],
) -> str:
    return _authorize(service, "read", basic or admin, bearer)


def admin_access(
    service: ServiceDep,
    basic: Annotated[Basic, Security(_admin_basic)],
    bearer: Annotated[Bearer, Security(_bearer)],
) -> str:
    return _authorize(service, "admin", basic, bearer)


def get_session(service: ServiceDep) -> Iterator[Session]:
    with service.db.session() as session:
        yield session


SessionDep = Annotated[Session, Depends(get_session)]

ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorBody, "description": "Missing or unknown key."},
    403: {
        "model": ErrorBody,
        "description": "A valid key of a kind that may not do this; the message names the kind needed.",
    },
}
WRITE_ERRORS: dict[int | str, dict[str, Any]] = {
    **ERRORS,
    400: {
        "model": ErrorBody,
        "description": "Invalid call; `detail` names every field at fault. Nothing changed.",
    },
    413: {
        "model": ErrorBody,
        "description": "Body over 32 KB (500 KB for a batch or import), sent or decompressed.",
    },
    415: {"model": ErrorBody, "description": "A Content-Encoding other than gzip, deflate or identity."},
    503: {"model": ErrorBody, "description": "Temporal or the database unreachable; retry with the same messageId."},
}


# Endpoints -----------------------------------------------------------------------------------

v1 = APIRouter(prefix="/v1", route_class=StrictJsonRoute)
WRITE = [Depends(write_access)]
READ = [Depends(read_access)]


@v1.post("/track", response_model=Accepted, responses=WRITE_ERRORS, tags=["events"], dependencies=WRITE)
async def track(call: TrackCall, service: ServiceDep) -> Accepted:
    """Record what a user did: starts journeys it triggers and reaches the user's active runs."""
    service.check_declared(call)
    return await service.track(call)


@v1.post("/identify", response_model=Accepted, responses=WRITE_ERRORS, tags=["events"], dependencies=WRITE)
async def identify(call: IdentifyCall, service: ServiceDep) -> Accepted:
    """Merge traits into a user's profile; the traits `opted_out` (replace), `unsubscribe` (add) and
    `subscribe` (remove) change its channel and topic opt-outs."""
    service.check_opt_outs([("traits", call)])
    service.check_declared(call)
    return await service.identify(call)


@v1.post("/page", response_model=Accepted, responses=WRITE_ERRORS, tags=["events"], dependencies=WRITE)
async def page(call: PageCall, service: ServiceDep) -> Accepted:
    """A page view, kept as a `Page Viewed` track event (properties with `name` and `category`)."""
    service.check_declared(call)
    return await service.handle(call)


@v1.post("/screen", response_model=Accepted, responses=WRITE_ERRORS, tags=["events"], dependencies=WRITE)
async def screen(call: ScreenCall, service: ServiceDep) -> Accepted:
    """A screen view, kept as a `Screen Viewed` track event (properties with `name` and `category`)."""
    service.check_declared(call)
    return await service.handle(call)


@v1.post("/group", response_model=Accepted, responses=WRITE_ERRORS, tags=["events"], dependencies=WRITE)
async def group(call: GroupCall, service: ServiceDep) -> Accepted:
    """Make the person a member of the account `groupId` and merge its traits (read in journeys as
    `user.group`: `user.group.id`, `user.group.plan`, ...)."""
    return await service.group(call)


@v1.post("/alias", response_model=Accepted, responses=WRITE_ERRORS, tags=["events"], dependencies=WRITE)
async def alias(call: AliasCall, service: ServiceDep) -> Accepted:
    """`previousId` and `userId` are one person: merge them (even two known users; see
    docs/identity.md). A run of each for the same journey and key: the newer ends `merged`."""
    return await service.alias(call)


@v1.post("/batch", response_model=BatchAccepted, responses=WRITE_ERRORS, tags=["events"], dependencies=WRITE)
async def batch(call: BatchCall, service: ServiceDep) -> BatchAccepted:
    """Several calls, applied in order; each invalid one is listed in `refused` and changes nothing,
    and the others are applied (200, as Segment answers)."""
    results, refused = [], []
    for index, item in enumerate(call.batch):
        detail = service.refusal(item, index, call.sent_at)
        if detail:
            refused.append(RefusedItem(index=index, detail=[FieldError(**d) for d in detail]))
        else:
            results.append(await service.handle(item))
    return BatchAccepted(success=not refused, results=results, refused=refused)


v1.add_api_route(
    "/import",
    batch,
    methods=["POST"],
    response_model=BatchAccepted,
    responses=WRITE_ERRORS,
    tags=["events"],
    dependencies=WRITE,
    summary="Import",
    description="Historical events: the same as `/v1/batch`.",
)


# Per-user routes ------------------------------------------------------------------------------


def _storable_id(value: str | None) -> str | None:
    if value is not None and _UNSTORABLE.search(value):
        raise PydanticCustomError("user_id", "a user id cannot contain NUL or unpaired surrogates")
    return value


_ID_RULES = {"min_length": 1, "max_length": 255}
PathUserId = Annotated[
    str,
    Path(
        **_ID_RULES,
        pattern="^[^/]+$",
        description="The user id, percent-encoded; an id with a `/` goes in the query form, `?id=`.",
    ),
    AfterValidator(_storable_id),
]


_LOOKUP_RULES = {**_ID_RULES, "max_length": 320}
IdQuery = Annotated[
    str,
    Query(
        alias="id",
        **_ID_RULES,
        description="A userId (else a person id): any id the API accepts, percent-encoded.",
    ),
    AfterValidator(_storable_id),
]
AnonymousIdQuery = Annotated[
    str,
    Query(**_ID_RULES, description="An anonymousId the person was seen with."),
    AfterValidator(_storable_id),
]
EmailQuery = Annotated[
    str,
    Query(**_LOOKUP_RULES, description="One of the person's email addresses (any case)."),
    AfterValidator(_storable_id),
]
PhoneQuery = Annotated[
    str,
    Query(**_LOOKUP_RULES, description="One of the person's phone numbers (E.164, any punctuation)."),
    AfterValidator(_storable_id),
]
OpenidQuery = Annotated[
    str,
    Query(**_ID_RULES, description="The person's WeChat openid."),
    AfterValidator(_storable_id),
]
PersonQuery = Annotated[
    str,
    Query(min_length=1, max_length=512, description="A person id (a merged-away one finds the survivor)."),
    AfterValidator(_storable_id),
]


LOOKUPS = ("id", "anonymous_id", "email", "phone", "wechat_openid", "person")
"""The query form's ways to name a person, one per request."""


def _path_person(service: ServiceDep, user_id: PathUserId) -> str:
    """The person the path's id names: a userId, else a person id (else nobody: the id itself)."""
    return service.identities.lookup(user_id) or user_id


def _query_person(
    service: ServiceDep,
    user_id: IdQuery = "",
    anonymous_id: AnonymousIdQuery = "",
    email: EmailQuery = "",
    phone: PhoneQuery = "",
    wechat_openid: OpenidQuery = "",
    person: PersonQuery = "",
) -> str:
    """The person one identifier of the query names (nobody: a person id no one has)."""
    given = [
        (kind, value)
        for kind, value in zip(
            LOOKUPS, (user_id, anonymous_id, email, phone, wechat_openid, person), strict=True
        )
        if value  # not given (an empty one is refused by its minimum length)
    ]
    if len(given) != 1:
        raise ApiError(
            400,
            "invalid_request",
            detail=[
                {
                    "field": "id" if not given else given[1][0],
                    "message": f"name the person with exactly one of {', '.join(LOOKUPS)}"
                    + ("" if not given else f"; got {', '.join(k for k, _ in given)}"),
                }
            ],
        )
    [(kind, value)] = given
    if kind == "id":
        return service.identities.lookup(value) or value
    found = service.identities.resolve(kind, value)
    if found is not None:
        return found
    return value if kind == "person" else f"{kind}:{value}"


PersonOfPath = Annotated[str, Depends(_path_person)]
PersonOfQuery = Annotated[str, Depends(_query_person)]
F = TypeVar("F", bound=Callable[..., Any])


def _with_user_id(func: F, annotation: Any) -> F:
    """A copy of ``func`` whose ``user_id`` parameter FastAPI reads as ``annotation``."""
    copy = types.FunctionType(
        func.__code__, func.__globals__, func.__name__, func.__defaults__, func.__closure__
    )
    copy.__kwdefaults__ = func.__kwdefaults__
    copy.__doc__ = func.__doc__
    signature = inspect.signature(func, eval_str=True)
    copy.__signature__ = signature.replace(  # type: ignore[attr-defined]
        parameters=[
            p.replace(annotation=annotation) if p.name == "user_id" else p
            for p in signature.parameters.values()
        ]
    )
    return cast(F, copy)


def per_user(method: str, suffix: str, **options: Any) -> Callable[[F], F]:
    """Serve ``func(user_id, ...)`` at ``/v1/users/{user_id}{suffix}`` and ``/v1/user{suffix}?id=``
    (or any one identifier: ``?email=`` ...); ``func`` gets the person id they resolve to.

    A path segment cannot carry every id: routers and proxies decode ``%2F`` into a path separator,
    and clients drop ``.`` and ``..``; the query form carries any id.
    """

    def register(func: F) -> F:
        for path, annotation in (
            (f"/users/{{user_id}}{suffix}", PersonOfPath),
            (f"/user{suffix}", PersonOfQuery),
        ):
            v1.add_api_route(path, _with_user_id(func, annotation), methods=[method], **options)
        return func

    return register


USER_ERRORS: dict[int | str, dict[str, Any]] = {
    **ERRORS,
    400: {
        "model": ErrorBody,
        "description": "The user id is empty, too long, or has a `/` in the path form.",
    },
}


@per_user(
    "GET",
    "",
    response_model=ProfilePublic,
    tags=["users"],
    dependencies=READ,
    responses={**USER_ERRORS, 404: {"model": ErrorBody, "description": "No profile for this user."}},
)
def user_profile(user_id: str, session: SessionDep, service: ServiceDep) -> ProfilePublic:
    """The person's traits, opt-outs and identifiers."""
    row = session.get(ProfileRecord, user_id)
    if row is None:
        raise ApiError(404, "not_found", f"no profile for user {user_id!r} (identify the user first)")
    profile = ProfilePublic.model_validate(row, from_attributes=True)
    profile.person_id = row.user_id
    profile.audiences = audience_rows.audiences_of(session, row.user_id)
    profile.identifiers = [
        IdentifierPublic(kind=i.kind, value=i.value) for i in service.identities.identifiers_of(row.user_id)
    ]
    return profile


@per_user(
    "GET", "/runs", response_model=list[RunPublic], responses=USER_ERRORS, tags=["users"], dependencies=READ
)
def user_runs(user_id: str, session: SessionDep) -> list[RunPublic]:
    """The user's journey runs, oldest first."""
    rows = session.exec(
        select(RunRecord)
        .where(col(RunRecord.user_id) == user_id)
        .order_by(col(RunRecord.entered_at), col(RunRecord.run_id))
    ).all()
    return [RunPublic.model_validate(row, from_attributes=True) for row in rows]


@per_user(
    "GET",
    "/messages",
    response_model=list[MessagePublic],
    responses=USER_ERRORS,
    tags=["users"],
    dependencies=READ,
)
def user_messages(
    user_id: str,
    session: SessionDep,
    content: Annotated[bool, Query(description="Include each rendered message.")] = False,
) -> list[MessagePublic]:
    """The user's send outcomes, oldest first."""
    rows = session.exec(
        select(MessageRecord)
        .where(col(MessageRecord.user_id) == user_id)
        .order_by(col(MessageRecord.created_at), col(MessageRecord.id))
    ).all()
    messages = [MessagePublic.model_validate(row, from_attributes=True) for row in rows]
    if not content:
        for message in messages:
            message.content = None
    return messages


AdminKey = Annotated[str, Depends(admin_access)]


@per_user("GET", "/export", response_model=UserExport, responses=USER_ERRORS, tags=["privacy"])
async def export_user(user_id: str, service: ServiceDep, key: AdminKey) -> UserExport:
    """Everything held about the user, as JSON (a data subject access request).

    The profile, every event and identify call, runs, routes, messages with their addresses and
    rendered content, provider feedback, and the audit entries about this user id. A user with no
    data gets empty lists and `profile: null`, not a 404. Each export is written to the audit log.
    Temporal's run histories are not included (the database holds what they carry).
    """
    actor = privacy.key_fingerprint(key)
    return await asyncio.to_thread(
        privacy.export_user, service.db, user_id, actor=actor, secret=service.settings.secret
    )


@per_user(
    "DELETE",
    "",
    response_model=ForgetReport,
    responses={
        **USER_ERRORS,
        503: {
            "model": ErrorBody,
            "description": "The user has active runs and Temporal is unreachable; nothing changed: retry.",
        },
    },
    tags=["privacy"],
)
async def forget_user(user_id: str, service: ServiceDep, key: AdminKey) -> ForgetReport:
    """Forget the user (right to erasure): end their runs and erase what is held about them.

    Active runs get the workflow's `stop` signal and end with reason `forgotten` (runs that do not
    end within 10 s are terminated), and their Temporal histories are deleted. Then, in one
    transaction, the profile, events, routes and provider events about the user are deleted;
    messages and runs are kept for counts only, without user id, address, subject, content,
    workflow id or key. The request is written to the audit log under a hash of the user id.

    Idempotent: forgetting an unknown or already forgotten user answers 200 with zero counts, so
    a retried erasure request is safe. 503 when the user has active runs and Temporal cannot be
    reached; nothing changed then, and the call can be retried.
    """
    try:
        client = (await service.ingest()).client
    except ApiError:
        client = None  # enough for a user without active runs
    try:
        return await privacy.forget(
            service.db,
            user_id,
            temporal=client,
            actor=privacy.key_fingerprint(key),
            secret=service.settings.secret,
        )
    except privacy.TemporalUnavailable as exc:
        log.warning("forget refused, nothing changed: %s", exc)
        raise ApiError(
            503, "unavailable", f"{exc}; nothing was forgotten: retry the call", headers=RETRY_LATER
        ) from exc


@v1.get("/journeys", response_model=list[JourneyPublic], responses=ERRORS, tags=["reports"], dependencies=READ)
def journeys(service: ServiceDep) -> list[JourneyPublic]:
    """The project's journeys, by id, with their runs: active now, entered today (UTC) and in the
    last seven days, converted."""
    project = service.project.journeys
    counts = journey_counts(service.db, sorted(project))
    return [
        JourneyPublic(
            id=journey.id,
            name=journey.name or journey.id,
            description=journey.description,
            version=journey.version,
            counts=counts[journey.id],
        )
        for journey in (project[name] for name in sorted(project))
    ]


@v1.get(
    "/runs",
    response_model=RunPage,
    responses={
        **ERRORS,
        400: {
            "model": ErrorBody,
            "description": "`state` or `limit` is out of range, `after` is no cursor, or the journey has no "
            "such `version` or `step`.",
        },
        404: {"model": ErrorBody, "description": "No run or stored version of the `journey`."},
    },
    tags=["reports"],
    dependencies=READ,
)
def runs(
    service: ServiceDep,
    journey: Annotated[str | None, Query(description="Only runs of this journey.")] = None,
    version: Annotated[str | None, Query(description="Only runs at this journey version.")] = None,
    state: Annotated[State | None, Query(description="`active` or `ended`.")] = None,
    step: Annotated[str | None, Query(description="Only active runs waiting at this step id.")] = None,
    limit: Annotated[int, Query(ge=1, le=PAGE_LIMIT, description="Runs per page.")] = 100,
    after: Annotated[str | None, Query(description="The previous page's `next` cursor.")] = None,
) -> RunPage:
    """Runs by journey, version, state and step, oldest entry first, a page at a time (from the
    database: where each active run waits, which version it follows)."""
    if journey is not None:
        _check_runs_filters(service.db, journey, version=version, step=step)
    try:
        return list_runs(
            service.db, journey, version=version, state=state, step=step, limit=limit, after=after
        )
    except ValueError as exc:
        raise ApiError(400, "invalid_request", detail=[{"field": "after", "message": str(exc)}]) from None


@v1.get(
    "/runs/counts",
    response_model=list[VersionCount],
    responses={
        **ERRORS,
        400: {"model": ErrorBody, "description": "`journey` is missing."},
        404: {"model": ErrorBody, "description": "No run or stored version of the `journey`."},
    },
    tags=["reports"],
    dependencies=READ,
)
def run_counts(
    service: ServiceDep, journey: Annotated[str, Query(description="The journey's id.")]
) -> list[VersionCount]:
    """Per version of the journey, the version whose first run entered earliest first: active and
    ended runs, and active runs by the step they wait at (what a migration would move). It takes
    no other filter."""
    _check_runs_filters(service.db, journey)
    return version_counts(service.db, journey)


def _check_runs_filters(db: Database, journey: str, *, version: str | None = None, step: str | None = None) -> None:
    """404 for a journey no run or stored version has; 400 naming a version or step it lacks."""
    try:
        check_filters(db, journey, version=version, step=step)
    except UnknownFilter as exc:
        status = 404 if exc.field == "journey" else 400
        code = "not_found" if status == 404 else "invalid_request"
        raise ApiError(status, code, str(exc), detail=[{"field": exc.field, "message": str(exc)}]) from None


def _bound(name: str, text: str | None, *, end: bool) -> datetime | None:
    if text is None:
        return None
    try:
        return parse_bound(text, end=end)
    except ValueError as exc:
        raise ApiError(400, "invalid_request", detail=[{"field": name, "message": str(exc)}]) from None


@v1.get(
    "/journeys/{journey_id}/report",
    response_model=JourneyReport,
    responses={
        **ERRORS,
        400: {"model": ErrorBody, "description": "`since` or `until` is not a date or a date-time."},
        404: {"model": ErrorBody, "description": "No journey with this id."},
    },
    tags=["reports"],
    dependencies=READ,
)
def report(
    service: ServiceDep,
    journey_id: Annotated[str, Path(description="The journey's id.")],
    since: Annotated[
        str | None,
        Query(description="Runs that entered at or after this date (midnight UTC) or date-time (ISO 8601)."),
    ] = None,
    until: Annotated[
        str | None,
        Query(description="Runs that entered before this date-time, or up to the end of this date (UTC)."),
    ] = None,
    version: Annotated[str | None, Query(description="Only runs of this journey version.")] = None,
) -> JourneyReport:
    """The journey's report (schema `nurture.report/v1`, described in docs/results.md): the runs
    that entered in [since, until), with everything they did: entries, ends, step reach, messages,
    conversions, the funnel, experiments and the holdout."""
    try:
        [journey] = service.project.select([journey_id])
    except KeyError:
        names = service.project.journeys
        raise ApiError(404, "not_found", f"no journey {journey_id!r}{did_you_mean(journey_id, names)}") from None
    start, end = _bound("since", since, end=False), _bound("until", until, end=True)
    return journey_report(service.db, journey, since=start, until=end, version=version)


@v1.get(
    "/outbox",
    response_model=list[OutboxMessagePublic],
    responses={**ERRORS, 400: {"model": ErrorBody, "description": "`limit` is not 1 to 500."}},
    tags=["outbox"],
    dependencies=READ,
)
def outbox(
    session: SessionDep,
    limit: Annotated[int, Query(ge=1, le=500, description="How many messages.")] = 20,
) -> list[OutboxMessagePublic]:
    """The latest messages delivered to the built-in outbox, newest first, rendered, with addresses
    and address-like user ids masked as `nurture outbox` shows them (`l***@example.com`)."""
    rows = session.exec(
        select(MessageRecord)
        .where(col(MessageRecord.provider) == "outbox")
        .order_by(col(MessageRecord.created_at).desc(), col(MessageRecord.id).desc())
        .limit(limit)
    ).all()
    messages = [OutboxMessagePublic.model_validate(row, from_attributes=True) for row in rows]
    for message in messages:
        message.user_id = mask_user_id(message.user_id)
        message.address = None if message.address is None else mask_address(message.address)
    return messages


class BroadcastStatus(BaseModel):
    """An occurrence of a broadcast and its progress, counted from runs and messages."""

    broadcast: str
    occurrence: str = Field(description="`once`, or the wall time the occurrence is scheduled for.")
    status: Literal["running", "done", "cancelled"]
    selected: int = Field(description="Members of the audience when the occurrence was first started.")
    started: int = Field(description="Runs started.")
    runs: int = Field(description="Runs recorded (a run records itself as it begins).")
    active: int
    ended: dict[str, int] = Field(description="Ended runs by end reason (`broadcast_cancelled` after a cancel).")
    sent: int
    sending: int
    skipped: dict[str, int] = Field(description="Messages skipped, by reason (`frequency_cap`, `holdout`, ...).")
    failed: dict[str, int]
    deferred: dict[str, int] = Field(description="Sends held back at least once, by latest reason.")
    driving: bool = Field(description="A process is starting its runs now.")
    created_at: str | None
    finished_at: str | None
    stopped: int | None = Field(None, description="For a cancel: the runs in flight it stopped.")


BROADCAST_ERRORS: dict[int | str, dict[str, Any]] = {
    **ERRORS,
    404: {"model": ErrorBody, "description": "No broadcast with this id, or (status) none started yet."},
    409: {"model": ErrorBody, "description": "Another process is starting this occurrence now, or none is due."},
    503: {"model": ErrorBody, "description": "Temporal or the database unreachable."},
}


def _broadcast_status(broadcaster: Broadcaster, broadcast_id: str, occurrence: str | None, **extra: Any) -> BroadcastStatus:
    try:
        found = broadcaster.status(broadcast_id, occurrence)
    except BroadcastError as exc:
        raise ApiError(404, "not_found", str(exc)) from None
    return BroadcastStatus.model_validate({**found.to_dict(), **extra})


BroadcastId = Annotated[str, Path(description="The broadcast's id (its file name in broadcasts/).")]


@v1.post(
    "/broadcasts/{broadcast_id}/start",
    status_code=202,
    response_model=BroadcastStatus,
    responses=BROADCAST_ERRORS,
    tags=["broadcasts"],
    dependencies=WRITE,
)
async def start_broadcast(service: ServiceDep, broadcast_id: BroadcastId) -> BroadcastStatus:
    """Start the broadcast's occurrence due now, in the background: one run per member of its
    audience, paced. Idempotent: a started occurrence goes on where it stopped, or (done,
    cancelled) starts nothing. Watch it with `GET /v1/broadcasts/{id}`."""
    if broadcast_id not in service.project.broadcasts:
        names = service.project.broadcasts
        raise ApiError(404, "not_found", f"no broadcast {broadcast_id!r}{did_you_mean(broadcast_id, names)}")
    broadcaster = await service.broadcaster()
    try:
        broadcast = broadcaster.broadcast(broadcast_id)
        chosen = broadcaster.occurrence(broadcast)
        row = await asyncio.to_thread(broadcaster.open, broadcast, chosen)
    except BroadcastError as exc:
        raise ApiError(409, "not_due", str(exc)) from None
    if row.status == "running" and not broadcaster.drives(broadcast_id, row.occurrence):
        if await asyncio.to_thread(broadcaster.occurrences.held, broadcast_id, row.occurrence):
            raise ApiError(409, "busy", f"broadcast '{broadcast_id}' ({row.occurrence}) is being started by another process")
        broadcaster.spawn(broadcast_id, chosen)
    return _broadcast_status(broadcaster, broadcast_id, chosen.key)


@v1.post(
    "/broadcasts/{broadcast_id}/cancel",
    response_model=BroadcastStatus,
    responses=BROADCAST_ERRORS,
    tags=["broadcasts"],
    dependencies=WRITE,
)
async def cancel_broadcast(
    service: ServiceDep,
    broadcast_id: BroadcastId,
    occurrence: Annotated[str | None, Query(description="Which occurrence [default: the latest started].")] = None,
) -> BroadcastStatus:
    """Cancel the occurrence: no more runs start, and its runs in flight end with reason
    `broadcast_cancelled` (messages already sent stay sent). Answers once they were told."""
    broadcaster = await service.broadcaster()
    try:
        row, stopped = await broadcaster.cancel(broadcast_id, occurrence)
    except BroadcastError as exc:
        raise ApiError(404, "not_found", str(exc)) from None
    return _broadcast_status(broadcaster, broadcast_id, row.occurrence, stopped=stopped)


@v1.get(
    "/broadcasts/{broadcast_id}",
    response_model=BroadcastStatus,
    responses=BROADCAST_ERRORS,
    tags=["broadcasts"],
    dependencies=READ,
)
def broadcast_status(
    service: ServiceDep,
    broadcast_id: BroadcastId,
    occurrence: Annotated[str | None, Query(description="Which occurrence [default: the latest started].")] = None,
) -> BroadcastStatus:
    """An occurrence's progress: selected, started, runs by state and end reason, messages sent,
    skipped and failed by reason, and sends held back (quiet hours, caps, rates)."""
    return _broadcast_status(Broadcaster(service.project, service.db, None, service.settings.task_queue), broadcast_id, occurrence)


def _audience(service: Service, audience_id: str) -> Audience:
    audience = service.project.audiences.get(audience_id)
    if audience is None:
        names = service.project.audiences
        hint = did_you_mean(audience_id, names) if names else " (the project has no audiences)"
        raise ApiError(404, "not_found", f"no audience {audience_id!r}{hint}")
    return audience


def _audience_public(session: Session, audience: Audience, size: int) -> AudiencePublic:
    return AudiencePublic(
        id=audience.id,
        name=audience.name or audience.id,
        description=audience.description,
        version=audience.version,
        size=size,
        definition=describe_audience(audience),
        evaluated_at=audience_rows.evaluated_at(session, audience.id, audience.version),
    )


AUDIENCE_404: dict[int | str, dict[str, Any]] = {404: {"model": ErrorBody, "description": "No audience with this id."}}


@v1.get("/audiences", response_model=list[AudiencePublic], responses=ERRORS, tags=["audiences"], dependencies=READ)
def audiences(service: ServiceDep, session: SessionDep) -> list[AudiencePublic]:
    """The project's audiences, by id, with how many people are in each now."""
    deployed = service.project.audiences
    sizes = audience_rows.sizes(session, sorted(deployed))
    return [_audience_public(session, deployed[name], sizes[name]) for name in sorted(deployed)]


@v1.get(
    "/audiences/{audience_id}",
    response_model=AudiencePublic,
    responses={**ERRORS, **AUDIENCE_404},
    tags=["audiences"],
    dependencies=READ,
)
def audience(
    service: ServiceDep, session: SessionDep, audience_id: Annotated[str, Path(description="The audience's id.")]
) -> AudiencePublic:
    """One audience: its definition and how many people are in it now."""
    found = _audience(service, audience_id)
    return _audience_public(session, found, audience_rows.sizes(session, [found.id])[found.id])


@v1.get(
    "/audiences/{audience_id}/members",
    response_model=AudienceMembers,
    responses={
        **ERRORS,
        **AUDIENCE_404,
        400: {"model": ErrorBody, "description": "`limit` is not 1 to 500, or `after` is empty."},
    },
    tags=["audiences"],
    dependencies=READ,
)
def audience_members(
    service: ServiceDep,
    session: SessionDep,
    audience_id: Annotated[str, Path(description="The audience's id.")],
    after: Annotated[
        str | None, Query(min_length=1, max_length=512, description="The previous page's `next`: members after this person id.")
    ] = None,
    limit: Annotated[int, Query(ge=1, le=PAGE_LIMIT, description="Members per page.")] = 100,
) -> AudienceMembers:
    """The audience's members now, by person id, a page at a time (keyset paging on the person id:
    people entering or leaving meanwhile never shift a page)."""
    found = _audience(service, audience_id)
    rows = audience_rows.members(session, found.id, after=after, limit=limit)
    page = [AudienceMemberPublic(person=person, entered_at=entered) for person, entered in rows]
    return AudienceMembers(audience=found.id, members=page, next=page[-1].person if len(page) == limit else None)


meta = APIRouter()


@meta.get(
    "/healthz",
    response_model=Health,
    responses={503: {"model": Health, "description": "The database or Temporal is unreachable."}},
    tags=["health"],
)
async def healthz(service: ServiceDep) -> JSONResponse:
    """Whether the database and Temporal are reachable (no write key needed)."""
    database = await asyncio.to_thread(service.database_ok)
    temporal = await service.temporal_ok()
    health = Health(ok=database.ok and temporal.ok, database=database, temporal=temporal)
    return JSONResponse(health.model_dump(), status_code=200 if health.ok else 503)


# Errors --------------------------------------------------------------------------------------

_SOURCES = ("body", "query", "path", "header", "cookie")
_CALL_TAGS = ("track", "identify", "page", "screen", "group", "alias")
_OBJECT_ERRORS = ("dict_type", "model_type", "model_attributes_type")


def _field(loc: Sequence[str | int]) -> str:
    """``('body', 'batch', 2, 'track', 'properties')`` as ``batch[2].properties``."""
    parts = list(loc)
    source = parts.pop(0) if parts and parts[0] in _SOURCES else "body"
    path = ""
    after_index = False
    for part in parts:
        if isinstance(part, int):
            path += f"[{part}]"
            after_index = True
            continue
        if after_index and part in _CALL_TAGS:  # the discriminator's tag, not a field
            after_index = False
            continue
        path = f"{path}.{part}" if path else part
        after_index = False
    return path or str(source)


def _message(error: Mapping[str, Any], field: str) -> str:
    kind = error["type"]
    name = field.rsplit(".", 1)[-1]
    if kind == "missing":
        if field == "body":
            return "the body must be a JSON object"
        if name == "userId":
            return "userId is required for alias: the id previousId becomes one person with"
        if name == "event":
            return "event is required for track"
        return f"{name} is required"
    if kind == "json_invalid":
        return f"the body is not valid JSON: {error.get('ctx', {}).get('error', 'decode error')}"
    if kind in _OBJECT_ERRORS:
        if field == "body":
            return "the body must be a JSON object sent as Content-Type: application/json"
        return f"{name} must be a JSON object"
    if kind == "call_type":
        given = error.get("input", {}).get("type") if isinstance(error.get("input"), dict) else None
        if given is None:
            return 'type is required: "track", "identify", "page", "screen", "group" or "alias"'
        return (
            f'type {given!r} is not supported: a batch takes "track", "identify", "page", "screen", '
            '"group" and "alias" calls'
        )
    if kind == "literal_error":
        return f"{error['msg']}, got {error.get('input')!r}"
    return str(error["msg"])


def _field_errors(errors: Sequence[Any]) -> list[dict[str, str]]:
    detail = []
    for error in errors:
        loc = error["loc"]
        if error["type"] == "json_invalid":
            field = "body"
        else:
            field = _field(loc)
            if error["type"] == "call_type":
                field += ".type"
            if error["type"] == "identity_missing":  # the call as a whole: name the fields
                field = _field((*loc, "userId"))
        detail.append({"field": field, "message": _message(error, field)})
    return detail


def _error_response(
    status: int,
    error: str,
    message: str | None = None,
    detail: list[dict[str, str]] | None = None,
    headers: Mapping[str, str] | None = None,
) -> JSONResponse:
    body: dict[str, Any] = {"error": error, "code": error}
    if message is None and detail:  # RudderStack's clients read message as well as code
        message = "; ".join(f"{d['field']}: {d['message']}" for d in detail)
    if message is not None:
        body["message"] = message
    if detail is not None:
        body["detail"] = detail
    return JSONResponse(body, status_code=status, headers=dict(headers or {}))


async def _on_validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    errors = list(exc.errors())
    too_large = bool(errors) and all(e["type"] == "call_too_large" for e in errors)
    return _error_response(
        413 if too_large else 400,
        "payload_too_large" if too_large else "invalid_request",
        detail=_field_errors(errors),
    )


async def _on_api_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ApiError)
    return _error_response(exc.status, exc.error, exc.message, exc.detail, exc.headers)


async def _on_database_unavailable(request: Request, exc: Exception) -> JSONResponse:
    """The database did not answer, or dropped the connection (a restart): the statement's
    transaction rolled back, and a retry will help. An event stored before is kept and routed by
    the retry with the same messageId."""
    assert isinstance(exc, OperationalError)
    log.warning("%s %s: database unavailable: %s", request.method, request.url.path, type(exc.orig).__name__)
    return _error_response(
        503,
        "unavailable",
        "the database did not answer; nothing was lost: retry the call (an event with the same messageId)",
        headers=RETRY_LATER,
    )


_HTTP_ERRORS = {
    400: "invalid_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    413: "payload_too_large",
}


async def _on_http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    headers = dict(exc.headers or {})
    message = str(exc.detail)
    if exc.status_code == 401:  # from HTTPBasic: a Basic header that is not base64 of "key:"
        headers.update(UNAUTHORIZED_HEADERS)
        message = 'the Authorization header is not valid Basic credentials (base64 of "<key>:")'
    if exc.status_code == 405:
        # Starlette names the methods of the first route on the path only; a path can have several.
        allowed = _allowed_methods(request)
        headers["Allow"] = ", ".join(allowed)
        message = f"{request.method} is not allowed here; use {' or '.join(allowed)}"
    return _error_response(
        exc.status_code, _HTTP_ERRORS.get(exc.status_code, "http_error"), message, headers=headers
    )


_METHODS = ("DELETE", "GET", "HEAD", "OPTIONS", "PATCH", "POST", "PUT")


def _allowed_methods(request: Request) -> list[str]:
    routes: Iterable[BaseRoute] = request.app.routes
    return [
        method
        for method in _METHODS
        if any(route.matches({**request.scope, "method": method})[0] == Match.FULL for route in routes)
    ]


class EncodedSlash:
    """400 for a per-user path whose id holds an encoded ``/``: decoded (as routers and proxies do),
    ``X%2Fexport`` would be the export of ``X``. Such ids go in the query form."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            scope["type"] == "http"
            and scope["path"].startswith("/v1/users/")
            and b"%2f" in scope.get("raw_path", b"").lower()
        ):
            message = (
                "a user id with a / cannot go in the path, where it would read as a separator; send it "
                "in the query: /v1/user?id=ID (also /v1/user/runs, /v1/user/messages, /v1/user/export)"
            )
            await _error_response(400, "invalid_request", detail=[{"field": "user_id", "message": message}])(
                scope, receive, send
            )
            return
        await self.app(scope, receive, send)


class OneValueEach:
    """400 for a query parameter given more than once: every parameter of the API takes one value,
    and quietly keeping the last of several would answer a question that was not asked."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"].startswith("/v1/") and scope.get("query_string"):
            names = [name for name, _ in parse_qsl(scope["query_string"].decode("latin-1"), keep_blank_values=True)]
            repeated = sorted({name for name in names if names.count(name) > 1})
            if repeated:
                detail = [{"field": name, "message": "given more than once; send one value"} for name in repeated]
                await _error_response(400, "invalid_request", detail=detail)(scope, receive, send)
                return
        await self.app(scope, receive, send)


_WBITS = {"gzip": 16 + zlib.MAX_WBITS, "deflate": zlib.MAX_WBITS}
"""zlib's framing for each Content-Encoding the tracking libraries send."""


class BodyLimit:
    """413 for bodies over a path's limit, before any of it is parsed (Segment's limits); a gzip or
    deflate body is decompressed here, and its decompressed size is held to the same limit."""

    def __init__(self, app: ASGIApp, limits: Mapping[str, int]) -> None:
        self.app = app
        self.limits = dict(limits)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        limit = self.limits.get(scope["path"]) if scope["type"] == "http" else None
        if limit is None:
            await self.app(scope, receive, send)
            return
        declared = Headers(scope=scope).get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            await self._refuse(scope, receive, send, f"{declared} bytes", limit)
            return
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client went away
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                await self._refuse(scope, receive, send, f"over {limit} bytes", limit)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        encoding = Headers(scope=scope).get("content-encoding", "identity").strip().lower()
        if encoding != "identity":
            if encoding not in _WBITS:
                await _error_response(
                    415,
                    "unsupported_media_type",
                    detail=[
                        {
                            "field": "Content-Encoding",
                            "message": f"{encoding!r} is not supported; send gzip, deflate or identity",
                        }
                    ],
                )(scope, receive, send)
                return
            stream = zlib.decompressobj(_WBITS[encoding])
            try:
                body = stream.decompress(body, limit + 1)
            except zlib.error as exc:
                await _error_response(
                    400,
                    "invalid_request",
                    detail=[{"field": "body", "message": f"the body is not valid {encoding} data: {exc}"}],
                )(scope, receive, send)
                return
            if len(body) > limit:
                await self._refuse(scope, receive, send, f"over {limit} bytes decompressed", limit)
                return
            if not stream.eof:
                await _error_response(
                    400,
                    "invalid_request",
                    detail=[{"field": "body", "message": f"the body is truncated {encoding} data"}],
                )(scope, receive, send)
                return
            headers = [(k, v) for k, v in scope["headers"] if k not in (b"content-encoding", b"content-length")]
            scope = {**scope, "headers": [*headers, (b"content-length", str(len(body)).encode())]}
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)

    @staticmethod
    async def _refuse(scope: Scope, receive: Receive, send: Send, size: str, limit: int) -> None:
        response = _error_response(
            413,
            "payload_too_large",
            detail=[
                {
                    "field": "body",
                    "message": f"the body is {size}; {scope['path']} takes at most {limit} bytes ({limit // 1024} KB)",
                }
            ],
        )
        await response(scope, receive, send)


# The application -----------------------------------------------------------------------------


class NurtureAPI(FastAPI):
    """FastAPI whose OpenAPI document shows the 400 answers it gives instead of FastAPI's 422
    (every ``/v1/`` operation may answer 400: :class:`OneValueEach`)."""

    def openapi(self) -> dict[str, Any]:
        schema = super().openapi()
        refused = {
            "description": "Invalid request (a query parameter given more than once, for one).",
            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorBody"}}},
        }
        for path, operations in schema.get("paths", {}).items():
            for operation in operations.values():
                responses = operation.setdefault("responses", {})
                responses.pop("422", None)
                if path.startswith("/v1/"):  # OneValueEach answers any of them 400
                    responses.setdefault("400", refused)
        for name in ("HTTPValidationError", "ValidationError"):
            schema.get("components", {}).get("schemas", {}).pop(name, None)
        return schema


def create_app(
    settings: Settings,
    *,
    project: Project | None = None,
    db: Database | None = None,
    client: Client | None = None,
    left_over: LeftOver = LeftOver(),
) -> FastAPI:
    """The event API for ``settings``.

    Refuses to build without write keys. Compiles the project, and opens and migrates the
    database, unless given; without a ``client`` it connects to Temporal at start-up, or on the
    first call that needs it when Temporal is not up yet. ``left_over`` says how often it looks
    for events a process that died left unrouted.
    """
    if project is None:
        project = load_project(
            settings.journeys,
            settings.templates,
            settings.config,
            audiences_dir=settings.audiences,
            broadcasts_dir=settings.broadcasts,
        )
    owns_db = db is None
    if db is None:
        db = settings.open_database()
        db.migrate()
    store_versions(db, list(project.journeys.values()))  # what `nurture migrate` moves runs from
    service = Service(settings, project, db, client, left_over)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if client is None:
            try:
                await service.ingest()
            except ApiError:
                log.warning("starting without Temporal; calls will connect when it is reachable")
        sweeping = asyncio.create_task(service.route_left_over(datetime.now(UTC)))
        audiences = asyncio.create_task(service.keep_audiences())
        scheduled = any(b.schedule is not None for b in project.broadcasts.values())
        schedules = asyncio.create_task(service.run_schedules()) if scheduled else None
        yield
        sweeping.cancel()
        audiences.cancel()
        if schedules is not None:
            schedules.cancel()
        if owns_db:
            service.db.dispose()

    app = NurtureAPI(
        title="Nurture event API",
        version=version("nurture"),
        description=DESCRIPTION,
        lifespan=lifespan,
    )
    app.state.nurture = service
    app.include_router(v1)
    app.include_router(meta)
    app.include_router(webhook_router(settings, db, on_follow=service.wechat_followed))
    app.add_exception_handler(RequestValidationError, _on_validation_error)
    app.add_exception_handler(ApiError, _on_api_error)
    app.add_exception_handler(StarletteHTTPException, _on_http_error)
    app.add_exception_handler(OperationalError, _on_database_unavailable)
    app.add_middleware(EncodedSlash)
    app.add_middleware(OneValueEach)
    app.add_middleware(
        BodyLimit,
        limits={
            "/v1/track": CALL_LIMIT,
            "/v1/identify": CALL_LIMIT,
            "/v1/page": CALL_LIMIT,
            "/v1/screen": CALL_LIMIT,
            "/v1/group": CALL_LIMIT,
            "/v1/alias": CALL_LIMIT,
            "/v1/batch": BATCH_LIMIT,
            "/v1/import": BATCH_LIMIT,
            **WEBHOOK_LIMITS,
        },
    )
    log.info("event API for %d journeys: %s", len(project.journeys), ", ".join(sorted(project.journeys)))
    return app


def app_from_env() -> FastAPI:
    """ASGI factory: ``uvicorn nurture.service.api:app_from_env --factory``."""
    configure_logging()
    return create_app(Settings.from_env())


KEEP_ALIVE = 75
"""Seconds an idle keep-alive connection stays open. Longer than the idle time of clients' own
connection pools (httpx and Node's agents keep one 4 to 5 s), so the client always closes first:
with uvicorn's default of 5 s a server could close a connection just as a client sent a call on
it, and the client saw a dropped connection (``httpx.ReadError``) under load."""


async def serve(
    settings: Settings,
    host: str = "127.0.0.1",
    port: int = 8000,
    *,
    stop: asyncio.Event | None = None,
    app: FastAPI | None = None,
) -> None:
    """Serve the API with uvicorn until interrupted (or until ``stop`` is set)."""
    configure_logging()
    # uvicorn's loggers go through ours (masking, JSON), even when another server in this process
    # gave them handlers of their own and stopped them propagating.
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        uvicorn_log = logging.getLogger(name)
        uvicorn_log.handlers.clear()
        uvicorn_log.propagate = True
        uvicorn_log.setLevel(logging.NOTSET)
    config = uvicorn.Config(
        app or create_app(settings), host=host, port=port, log_config=None, timeout_keep_alive=KEEP_ALIVE
    )
    server = uvicorn.Server(config)

    async def watch(event: asyncio.Event) -> None:
        await event.wait()
        server.should_exit = True

    watcher = None if stop is None else asyncio.create_task(watch(stop))
    try:
        await server.serve()
    finally:
        if watcher is not None:
            watcher.cancel()
