"""A small typed client for the Nurture event API, blocking (:class:`Client`) or async (:class:`AsyncClient`).

    from .client import Client

    with Client("WRITE_KEY") as nurture:   # reads (profile, runs, messages, outbox) take a read key
        nurture.identify("u_1024", {"email": "li@example.com", "timezone": "Asia/Shanghai"})
        nurture.track("u_1024", "Cart Updated", {"cart_id": "c_77", "item_count": 2})

Every write carries a ``messageId`` (a fresh UUID unless you pass one), so the client's own
retries (connection errors, 5xx, 429; with exponential backoff) are de-duplicated by the server.
A 4xx is never retried: it raises :class:`NurtureError` with the server's field-level detail.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Iterable, Mapping
from datetime import datetime
from types import TracebackType
from typing import Any, Literal, NotRequired, Self, TypedDict, cast

import httpx

__all__ = [
    "Accepted",
    "AsyncClient",
    "BatchAccepted",
    "Client",
    "FieldDetail",
    "Message",
    "NurtureError",
    "OutboxMessage",
    "Profile",
    "RefusedItem",
    "Run",
]

DEFAULT_URL = "http://127.0.0.1:8000"


class FieldDetail(TypedDict):
    """One field at fault in a rejected call."""

    field: str
    message: str


class Accepted(TypedDict):
    """An accepted call and what it did."""

    success: bool
    type: Literal["track", "identify", "page", "screen", "group", "alias"]
    messageId: str
    person: str | None
    """The person id the call is about (docs/identity.md)."""
    duplicate: bool
    triggered: list[str]
    signalled: list[str]
    skipped: list[str]
    skip_reasons: NotRequired[dict[str, str]]
    """Why each skipped journey was skipped: ``re_entry_once`` or ``journey_paused``."""


class RefusedItem(TypedDict):
    """A batch item that was not applied: its index in the batch and the fields at fault."""

    index: int
    detail: list[FieldDetail]


class BatchAccepted(TypedDict):
    """What each valid item did, in order, and the refused ones; ``success`` when none was refused."""

    success: bool
    results: list[Accepted]
    refused: list[RefusedItem]


class Identifier(TypedDict):
    kind: str
    value: str


class Profile(TypedDict):
    user_id: str
    person_id: str
    identifiers: list[Identifier]
    group_id: str | None
    traits: dict[str, Any]
    opted_out: list[str]
    created_at: str
    updated_at: str


class Run(TypedDict):
    run_id: str
    workflow_id: str
    journey: str
    version: str
    key: str
    status: str
    entered_at: str
    ended_at: str | None
    end_reason: str | None
    variants: dict[str, str]
    converted_at: str | None


class Message(TypedDict):
    id: int
    run_id: str
    journey: str
    step_id: str
    channel: str
    template: str
    status: str
    reason: str | None
    provider: str | None
    variant: str | None
    locale: str | None
    subject: str | None
    preview: str | None
    created_at: str
    content: dict[str, Any] | None


class OutboxMessage(Message):
    user_id: str
    address: str | None


class Item(TypedDict):
    """A batch item in Segment's shape; ``messageId`` is filled in when missing."""

    type: Literal["track", "identify"]
    userId: str
    event: NotRequired[str]
    properties: NotRequired[Mapping[str, Any]]
    traits: NotRequired[Mapping[str, Any]]
    timestamp: NotRequired[str]
    messageId: NotRequired[str]


class NurtureError(Exception):
    """The API refused a call (4xx), kept failing (5xx), or could not be reached."""

    def __init__(
        self, status: int | None, detail: list[FieldDetail], *, error: str = "", message: str = ""
    ) -> None:
        self.status = status
        """The HTTP status; ``None`` when the server could not be reached."""
        self.detail = detail
        """The fields at fault, as the server named them (``batch[2].event``)."""
        self.error = error
        """The server's error code: ``invalid_request``, ``unauthorized``, ..."""
        self.message = message
        """The server's message, if any."""
        parts = [f"{status or 'unreachable'} {error}".strip()]
        if message:
            parts.append(message)
        parts.extend(f"{d['field']}: {d['message']}" for d in detail)
        super().__init__("; ".join(parts))


def _instant(value: datetime | str | None) -> str | None:
    return value.isoformat() if isinstance(value, datetime) else value


def _call(
    user_id: str | None,
    anonymous_id: str | None,
    timestamp: datetime | str | None,
    message_id: str | None,
    **fields: Any,
) -> dict[str, Any]:
    """A call's body: who (``userId``, ``anonymousId`` or both), ``fields``, a ``messageId``."""
    body: dict[str, Any] = {**fields, "messageId": message_id or str(uuid.uuid4())}
    if user_id is not None:
        body["userId"] = user_id
    if anonymous_id is not None:
        body["anonymousId"] = anonymous_id
    if timestamp is not None:
        body["timestamp"] = _instant(timestamp)
    return body


def _track(
    user_id: str | None,
    event: str,
    properties: Mapping[str, Any] | None,
    timestamp: datetime | str | None,
    message_id: str | None,
    anonymous_id: str | None = None,
) -> dict[str, Any]:
    return _call(user_id, anonymous_id, timestamp, message_id, event=event, properties=dict(properties or {}))


def _identify(
    user_id: str | None,
    traits: Mapping[str, Any],
    opt_outs: Mapping[str, Iterable[str] | None],
    timestamp: datetime | str | None,
    message_id: str | None,
    anonymous_id: str | None = None,
) -> dict[str, Any]:
    body = _call(user_id, anonymous_id, timestamp, message_id, traits=dict(traits))
    for name, names in opt_outs.items():  # opted_out, subscribe, unsubscribe: only those given
        if names is not None:
            body["traits"][name] = list(names)
    return body


def _batch(items: Iterable[Item | Mapping[str, Any]]) -> dict[str, Any]:
    batch = []
    for item in items:
        copy = dict(item)
        copy.setdefault("messageId", str(uuid.uuid4()))
        if isinstance(copy.get("timestamp"), datetime):
            copy["timestamp"] = copy["timestamp"].isoformat()
        batch.append(copy)
    return {"batch": batch}


def _user(user_id: str, **params: str) -> dict[str, str]:
    # The query form takes every id; in a path, a "/" in an id would read as a separator.
    return {"id": user_id, **params}


class _Base:
    """Settings and answer handling shared by both clients."""

    def __init__(self, *, retries: int, backoff: float, max_delay: float) -> None:
        if retries < 0:
            raise ValueError("retries must be 0 or more")
        self.retries = retries
        self.backoff = backoff
        self.max_delay = max_delay

    @staticmethod
    def _retryable(response: httpx.Response) -> bool:
        return response.status_code >= 500 or response.status_code == 429

    def _delay(self, attempt: int, response: httpx.Response | None) -> float:
        """Exponential backoff, or the server's ``Retry-After`` (seconds), within ``max_delay``."""
        delay: float = self.backoff * 2.0**attempt
        after = response.headers.get("retry-after", "") if response is not None else ""
        if after.isdigit():
            delay = float(after)
        return min(delay, self.max_delay)

    @staticmethod
    def _error(response: httpx.Response) -> NurtureError:
        try:
            body = response.json()
        except ValueError:
            body = None
        if not isinstance(body, dict):
            return NurtureError(response.status_code, [], error="http_error", message=response.text[:200])
        return NurtureError(
            response.status_code,
            list(body.get("detail") or []),
            error=str(body.get("error", "")),
            message=str(body.get("message") or ""),
        )

    @staticmethod
    def _unreachable(exc: httpx.TransportError, url: httpx.URL | str) -> NurtureError:
        return NurtureError(None, [], error="unreachable", message=f"{url}: {exc}")


class Client(_Base):
    """A blocking client for the Nurture event API."""

    def __init__(
        self,
        key: str,
        *,
        base_url: str = DEFAULT_URL,
        timeout: float = 10.0,
        retries: int = 3,
        backoff: float = 0.5,
        max_delay: float = 10.0,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        """``key``: a write key sends events, a read (or admin) key reads; ``retries``: further
        attempts after the first; ``backoff``: the first wait, in seconds,
        doubling each time up to ``max_delay``; ``transport``: an httpx transport (tests)."""
        super().__init__(retries=retries, backoff=backoff, max_delay=max_delay)
        self._http = httpx.Client(
            base_url=base_url.rstrip("/"), auth=(key, ""), timeout=timeout, transport=transport
        )

    def track(
        self,
        user_id: str | None,
        event: str,
        properties: Mapping[str, Any] | None = None,
        *,
        anonymous_id: str | None = None,
        timestamp: datetime | str | None = None,
        message_id: str | None = None,
    ) -> Accepted:
        """Record an event of a user (``user_id`` may be ``None`` for a visitor's
        ``anonymous_id``; both join the two)."""
        body = _track(user_id, event, properties, timestamp, message_id, anonymous_id)
        return cast(Accepted, self._request("POST", "/v1/track", json=body))

    def alias(self, previous_id: str, user_id: str, *, message_id: str | None = None) -> Accepted:
        """``previous_id`` (an earlier userId or anonymousId) and ``user_id`` are one person."""
        body = _call(user_id, None, None, message_id, previousId=previous_id)
        return cast(Accepted, self._request("POST", "/v1/alias", json=body))

    def group(
        self,
        user_id: str | None,
        group_id: str,
        traits: Mapping[str, Any] | None = None,
        *,
        anonymous_id: str | None = None,
        message_id: str | None = None,
    ) -> Accepted:
        """Make the person a member of the account ``group_id`` (``user.group``) and merge its traits."""
        body = _call(user_id, anonymous_id, None, message_id, groupId=group_id, traits=dict(traits or {}))
        return cast(Accepted, self._request("POST", "/v1/group", json=body))

    def identify(
        self,
        user_id: str | None,
        traits: Mapping[str, Any],
        *,
        anonymous_id: str | None = None,
        opted_out: Iterable[str] | None = None,
        subscribe: Iterable[str] | None = None,
        unsubscribe: Iterable[str] | None = None,
        timestamp: datetime | str | None = None,
        message_id: str | None = None,
    ) -> Accepted:
        """Merge traits into a user's profile; with ``anonymous_id`` too, the visitor and the user
        become one person.

        Opt-outs name channels (``email``, ``sms``, ``wechat``) and the project's topics:
        ``opted_out`` replaces them all; ``unsubscribe`` adds names and ``subscribe`` removes them,
        keeping the rest (applied atomically by the server, so no read-modify-write is needed).
        """
        opt_outs = {"opted_out": opted_out, "subscribe": subscribe, "unsubscribe": unsubscribe}
        body = _identify(user_id, traits, opt_outs, timestamp, message_id, anonymous_id)
        return cast(Accepted, self._request("POST", "/v1/identify", json=body))

    def batch(self, items: Iterable[Item | Mapping[str, Any]]) -> BatchAccepted:
        """Several calls in Segment's shape (``type``, ``userId``, ...), handled in order; an
        invalid one is refused alone (listed in ``refused``) and the others are applied."""
        return cast(BatchAccepted, self._request("POST", "/v1/batch", json=_batch(items)))

    def profile(self, user_id: str) -> Profile:
        return cast(Profile, self._request("GET", "/v1/user", params=_user(user_id)))

    def runs(self, user_id: str) -> list[Run]:
        return cast(list[Run], self._request("GET", "/v1/user/runs", params=_user(user_id)))

    def messages(self, user_id: str, *, content: bool = False) -> list[Message]:
        params = {"content": "true"} if content else {}
        return cast(list[Message], self._request("GET", "/v1/user/messages", params=_user(user_id, **params)))

    def outbox(self, limit: int = 20) -> list[OutboxMessage]:
        return cast(list[OutboxMessage], self._request("GET", "/v1/outbox", params={"limit": limit}))

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def _request(
        self, method: str, path: str, *, json: Any = None, params: Mapping[str, Any] | None = None
    ) -> Any:
        # The body (with its messageId) is built once: every attempt sends the same call.
        for attempt in range(self.retries + 1):
            response: httpx.Response | None = None
            try:
                response = self._http.request(method, path, json=json, params=params)
            except httpx.TransportError as exc:
                if attempt == self.retries:
                    raise self._unreachable(exc, self._http.base_url) from exc
            else:
                if response.is_success:
                    return response.json()
                if not self._retryable(response) or attempt == self.retries:
                    raise self._error(response)
            time.sleep(self._delay(attempt, response))
        raise AssertionError("unreachable")


class AsyncClient(_Base):
    """The same client for asyncio code."""

    def __init__(
        self,
        key: str,
        *,
        base_url: str = DEFAULT_URL,
        timeout: float = 10.0,
        retries: int = 3,
        backoff: float = 0.5,
        max_delay: float = 10.0,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        super().__init__(retries=retries, backoff=backoff, max_delay=max_delay)
        self._http = httpx.AsyncClient(
            base_url=base_url.rstrip("/"), auth=(key, ""), timeout=timeout, transport=transport
        )

    async def track(
        self,
        user_id: str | None,
        event: str,
        properties: Mapping[str, Any] | None = None,
        *,
        anonymous_id: str | None = None,
        timestamp: datetime | str | None = None,
        message_id: str | None = None,
    ) -> Accepted:
        body = _track(user_id, event, properties, timestamp, message_id, anonymous_id)
        return cast(Accepted, await self._request("POST", "/v1/track", json=body))

    async def alias(self, previous_id: str, user_id: str, *, message_id: str | None = None) -> Accepted:
        """As :meth:`Client.alias`."""
        body = _call(user_id, None, None, message_id, previousId=previous_id)
        return cast(Accepted, await self._request("POST", "/v1/alias", json=body))

    async def group(
        self,
        user_id: str | None,
        group_id: str,
        traits: Mapping[str, Any] | None = None,
        *,
        anonymous_id: str | None = None,
        message_id: str | None = None,
    ) -> Accepted:
        """As :meth:`Client.group`."""
        body = _call(user_id, anonymous_id, None, message_id, groupId=group_id, traits=dict(traits or {}))
        return cast(Accepted, await self._request("POST", "/v1/group", json=body))

    async def identify(
        self,
        user_id: str | None,
        traits: Mapping[str, Any],
        *,
        anonymous_id: str | None = None,
        opted_out: Iterable[str] | None = None,
        subscribe: Iterable[str] | None = None,
        unsubscribe: Iterable[str] | None = None,
        timestamp: datetime | str | None = None,
        message_id: str | None = None,
    ) -> Accepted:
        """As :meth:`Client.identify`."""
        opt_outs = {"opted_out": opted_out, "subscribe": subscribe, "unsubscribe": unsubscribe}
        body = _identify(user_id, traits, opt_outs, timestamp, message_id, anonymous_id)
        return cast(Accepted, await self._request("POST", "/v1/identify", json=body))

    async def batch(self, items: Iterable[Item | Mapping[str, Any]]) -> BatchAccepted:
        return cast(BatchAccepted, await self._request("POST", "/v1/batch", json=_batch(items)))

    async def profile(self, user_id: str) -> Profile:
        return cast(Profile, await self._request("GET", "/v1/user", params=_user(user_id)))

    async def runs(self, user_id: str) -> list[Run]:
        return cast(list[Run], await self._request("GET", "/v1/user/runs", params=_user(user_id)))

    async def messages(self, user_id: str, *, content: bool = False) -> list[Message]:
        params = {"content": "true"} if content else {}
        return cast(
            list[Message], await self._request("GET", "/v1/user/messages", params=_user(user_id, **params))
        )

    async def outbox(self, limit: int = 20) -> list[OutboxMessage]:
        return cast(list[OutboxMessage], await self._request("GET", "/v1/outbox", params={"limit": limit}))

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    async def _request(
        self, method: str, path: str, *, json: Any = None, params: Mapping[str, Any] | None = None
    ) -> Any:
        for attempt in range(self.retries + 1):
            response: httpx.Response | None = None
            try:
                response = await self._http.request(method, path, json=json, params=params)
            except httpx.TransportError as exc:
                if attempt == self.retries:
                    raise self._unreachable(exc, self._http.base_url) from exc
            else:
                if response.is_success:
                    return response.json()
                if not self._retryable(response) or attempt == self.retries:
                    raise self._error(response)
            await asyncio.sleep(self._delay(attempt, response))
        raise AssertionError("unreachable")
