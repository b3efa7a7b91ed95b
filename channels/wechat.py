"""WeChat Official Account template messages, through a small async HTTP client.

Two documented calls are used::

    GET  /cgi-bin/token?grant_type=client_credential&appid=APPID&secret=APPSECRET
         -> {"access_token": "...", "expires_in": 7200}
    POST /cgi-bin/message/template/send?access_token=TOKEN
         {"touser", "template_id", "url"?, "miniprogram"?, "client_msg_id"?, "data": {f: {"value"}}}
         -> {"errcode": 0, "errmsg": "ok", "msgid": 200228332}

The access token lives two hours and fetching one is rate-limited per day, so it is shared: a
:class:`TokenStore` holds it (:class:`MemoryTokens` in one process,
``nurture.storage.tokens.DbTokens`` across workers), it is reused until :data:`REFRESH_MARGIN`
before it expires, and an asyncio lock per token name makes concurrent sends in a process fetch
it once. A send refused because the token expired or was replaced discards that token, fetches a
new one and is retried once.

Each send carries a ``client_msg_id`` derived from the idempotency key. WeChat sends one message
per openid and ``client_msg_id`` (for about ten minutes), so a retry after an answer was lost on
the way back does not reach the user twice: unlike the other adapters, a transport failure here
never says ``maybe_sent``.

WeChat answers errors with HTTP 200 and an ``errcode``; :data:`ERRCODES` maps the documented
global codes to :class:`~channels.PermanentError` or :class:`~channels.TransientError`.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import weakref
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol

import httpx

from channels import (
    DeliveryError,
    DeliveryResult,
    Envelope,
    PermanentError,
    TransientError,
    mask_address,
)
from channels._common import retry_after, transport_failure
from nurture.language.templates import RenderedMessage

__all__ = [
    "DEFAULT_URL",
    "ERRCODES",
    "REFRESH_MARGIN",
    "TOKEN_ERRCODES",
    "MemoryTokens",
    "TokenStore",
    "WeChatTemplate",
    "classify",
    "client_msg_id",
    "template_payload",
]

log = logging.getLogger(__name__)

PROVIDER = "wechat"

DEFAULT_URL = "https://api.weixin.qq.com"
"""WeChat's API host; ``base_url`` replaces it for a proxy or a test server."""

REFRESH_MARGIN = timedelta(minutes=5)
"""A stored token is replaced this long before it expires, so no send races its expiry."""

TOKEN_ERRCODES = frozenset({40001, 40014, 41001, 42001})
"""Invalid, malformed, missing or expired access token: refresh it and retry the send once."""

ERRCODES: dict[int, tuple[type[DeliveryError], str]] = {
    -1: (TransientError, "busy"),
    45009: (TransientError, "rate_limited"),
    45011: (TransientError, "rate_limited"),
    40003: (PermanentError, "invalid_openid"),
    43004: (PermanentError, "not_following"),
    43101: (PermanentError, "refused"),
    40037: (PermanentError, "invalid_template"),
    47001: (PermanentError, "bad_request"),
    47003: (PermanentError, "bad_request"),
    # Configuration an operator can fix: the messages wait for the fix instead of being dropped.
    40013: (TransientError, "auth"),
    40125: (TransientError, "auth"),
    40164: (TransientError, "auth"),
    48001: (TransientError, "auth"),
    # Still refused after a fresh token: another worker is refreshing, or the clock is off.
    40001: (TransientError, "token"),
    40014: (TransientError, "token"),
    41001: (TransientError, "token"),
    42001: (TransientError, "token"),
}
"""WeChat global return code -> (error class, reason). Any other non-zero code is permanent
``rejected``."""

# WeChat treats a repeated client_msg_id for the same openid as the same message; this code
# ("clientmsgid exist") therefore means an earlier attempt of this send was already accepted.
_DUPLICATE_CLIENT_MSG_ID = 45065

_SENSITIVE_PARAMS = ("access_token", "secret")

# httpx's timeouts do not always wrap the built-in TimeoutError.
_TIMEOUTS = (httpx.TimeoutException,)


class TokenStore(Protocol):
    """Where access tokens are kept, so every sender reuses the same one."""

    async def get(self, name: str) -> tuple[str, datetime] | None:
        """The stored token and when it expires (timezone-aware), or ``None``."""
        ...

    async def put(self, name: str, token: str, expires_at: datetime) -> None:
        """Store ``token`` under ``name``, replacing what was there."""
        ...

    async def discard(self, name: str, token: str) -> None:
        """Delete ``name`` only while it still holds ``token``, keeping a newer one intact."""
        ...


class MemoryTokens:
    """A :class:`TokenStore` in this process's memory."""

    def __init__(self) -> None:
        self._tokens: dict[str, tuple[str, datetime]] = {}

    async def get(self, name: str) -> tuple[str, datetime] | None:
        """The stored token and its expiry, or ``None``."""
        return self._tokens.get(name)

    async def put(self, name: str, token: str, expires_at: datetime) -> None:
        """Store ``token`` under ``name``."""
        self._tokens[name] = (token, expires_at.astimezone(UTC))

    async def discard(self, name: str, token: str) -> None:
        """Delete ``name`` if it still holds ``token``."""
        stored = self._tokens.get(name)
        if stored is not None and stored[0] == token:
            del self._tokens[name]


def template_payload(
    message: RenderedMessage, openid: str, *, client_msg_id: str | None = None
) -> dict[str, Any]:
    """The JSON body of ``/cgi-bin/message/template/send`` for ``message`` to ``openid``.

    ``url`` and ``miniprogram`` are left out when the message has none (WeChat opens the mini
    program when both are given and falls back to the url on clients without one).
    """
    if not message.template_id:
        raise ValueError(f"wechat message {message.template!r} has no template_id")
    payload: dict[str, Any] = {"touser": openid, "template_id": message.template_id}
    if message.url:
        payload["url"] = message.url
    if message.miniprogram:
        payload["miniprogram"] = {key: str(value) for key, value in message.miniprogram.items()}
    if client_msg_id:
        payload["client_msg_id"] = client_msg_id
    payload["data"] = {field: {"value": str(value)} for field, value in (message.data or {}).items()}
    return payload


def client_msg_id(idempotency_key: str) -> str:
    """WeChat's de-duplication id for a send: stable per key and within its 64-byte limit."""
    return hashlib.sha256(idempotency_key.encode("utf-8")).hexdigest()[:32]


def classify(errcode: int, errmsg: str) -> DeliveryError:
    """The error for a non-zero WeChat ``errcode`` (see :data:`ERRCODES`)."""
    detail = f"errcode {errcode}: {errmsg}" if errmsg else f"errcode {errcode}"
    kind, reason = ERRCODES.get(errcode, (PermanentError, "rejected"))
    return kind(reason, detail)


class _StaleToken(Exception):
    """The send was refused because of the access token; carries the provider's error."""

    def __init__(self, error: DeliveryError) -> None:
        super().__init__(str(error))
        self.error = error


# One lock per (event loop, token name) for the whole process, so separate WeChatTemplate
# instances for the same app also fetch a token once. Keyed by loop because an asyncio.Lock
# belongs to the loop that first waits on it.
_LOCKS: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[str, asyncio.Lock]] = (
    weakref.WeakKeyDictionary()
)


def _token_lock(name: str) -> asyncio.Lock:
    locks = _LOCKS.setdefault(asyncio.get_running_loop(), {})
    return locks.setdefault(name, asyncio.Lock())


class WeChatTemplate:
    """A :class:`channels.Channel` sending WeChat Official Account template messages."""

    provider = PROVIDER

    def __init__(
        self,
        *,
        app_id: str,
        app_secret: str,
        tokens: TokenStore,
        base_url: str = DEFAULT_URL,
        timeout: float = 10.0,
        http: httpx.AsyncClient | None = None,
    ) -> None:
        """``tokens`` is shared by every sender of the app; ``http`` is an optional client this
        instance will use but not close."""
        self.app_id = app_id
        self._app_secret = app_secret
        self.tokens = tokens
        self.base_url = base_url.rstrip("/")
        self.token_name = f"wechat:{app_id}"
        self._own_http = http is None
        self._http = http or httpx.AsyncClient(timeout=timeout)
        self._timeout = timeout

    def __repr__(self) -> str:
        return f"WeChatTemplate(app_id={self.app_id!r}, base_url={self.base_url!r})"

    async def aclose(self) -> None:
        """Close the HTTP client, unless it was handed in."""
        if self._own_http:
            await self._http.aclose()

    async def __aenter__(self) -> WeChatTemplate:
        return self

    async def __aexit__(self, *_exc: object) -> None:
        await self.aclose()

    async def deliver(self, message: RenderedMessage, envelope: Envelope) -> DeliveryResult:
        """Send ``message`` to the openid in ``envelope.address``."""
        try:
            payload = template_payload(
                message, envelope.address, client_msg_id=client_msg_id(envelope.idempotency_key)
            )
        except ValueError as exc:
            raise PermanentError("bad_request", str(exc)) from None
        token = await self._token()
        try:
            msgid = await self._send(token, payload)
        except _StaleToken as stale:
            log.info(
                "wechat access token for %s refused (%s); refreshing once", self.app_id, stale.error.detail
            )
            await self.tokens.discard(self.token_name, token)
            token = await self._token()
            try:
                msgid = await self._send(token, payload)
            except _StaleToken as again:
                raise again.error from None
        log.info(
            "wechat template %s sent to %s (msgid %s)",
            message.template_id,
            mask_address(envelope.address),
            msgid,
        )
        return DeliveryResult(provider=PROVIDER, provider_id=msgid)

    async def _token(self) -> str:
        """A token valid for a while yet: the stored one, else a fresh one (fetched once)."""
        token = await self._stored_token()
        if token is not None:
            return token
        async with _token_lock(self.token_name):
            # Whoever held the lock before us (or another worker) may have stored one meanwhile.
            token = await self._stored_token()
            if token is not None:
                return token
            token, expires_at = await self._fetch_token()
            await self.tokens.put(self.token_name, token, expires_at)
            return token

    async def _stored_token(self) -> str | None:
        stored = await self.tokens.get(self.token_name)
        if stored is None:
            return None
        token, expires_at = stored
        if expires_at - REFRESH_MARGIN <= datetime.now(UTC):
            return None
        return token

    async def _fetch_token(self) -> tuple[str, datetime]:
        params = {"grant_type": "client_credential", "appid": self.app_id, "secret": self._app_secret}
        body = await self._call("GET", "/cgi-bin/token", params=params)
        errcode = _errcode(body)
        if errcode:
            raise classify(errcode, _hide(str(body.get("errmsg", "")), self._app_secret))
        token = body.get("access_token")
        expires_in = body.get("expires_in")
        if not isinstance(token, str) or not token or not isinstance(expires_in, int | float):
            raise TransientError("bad_response", "token response without access_token and expires_in")
        log.info("fetched a wechat access token for %s (expires in %ss)", self.app_id, expires_in)
        return token, datetime.now(UTC) + timedelta(seconds=float(expires_in))

    async def _send(self, token: str, payload: dict[str, Any]) -> str | None:
        """The provider's msgid; raises :class:`_StaleToken` when the token was refused."""
        body = await self._call(
            "POST",
            "/cgi-bin/message/template/send",
            params={"access_token": token},
            content=json.dumps(payload, ensure_ascii=False).encode("utf-8"),
        )
        errcode = _errcode(body)
        msgid = body.get("msgid")
        provider_id = None if msgid is None else str(msgid)
        if errcode in (0, _DUPLICATE_CLIENT_MSG_ID):
            return provider_id
        error = classify(errcode, _hide(str(body.get("errmsg", "")), token))
        if errcode in TOKEN_ERRCODES:
            raise _StaleToken(error)
        raise error

    async def _call(
        self, method: str, path: str, *, params: dict[str, str], content: bytes | None = None
    ) -> dict[str, Any]:
        """One request; transport failures and non-JSON answers become :class:`TransientError`.

        Error details never include the URL: it carries the access token or the app secret.
        """
        headers = {"Content-Type": "application/json; charset=utf-8"} if content is not None else None
        try:
            response = await self._http.request(
                method,
                self.base_url + path,
                params=params,
                content=content,
                headers=headers,
                timeout=self._timeout,
            )
        except httpx.TransportError as exc:
            # Never maybe_sent, even when the request was written: the send carries its
            # client_msg_id, so WeChat drops a retry of a message it already took (the token call
            # changes nothing). The detail names the failure, never the URL with its credentials.
            raise transport_failure(
                exc, peer=f"WeChat {path}", timeout=self._timeout, sent=False, timeouts=_TIMEOUTS
            ) from None
        if response.status_code == 429:
            raise TransientError(
                "rate_limited", f"{path}: HTTP 429", retry_after=retry_after(response.headers)
            )
        if response.status_code >= 500:
            raise TransientError(
                "server_error",
                f"{path}: HTTP {response.status_code}",
                retry_after=retry_after(response.headers),
            )
        if response.status_code != 200:
            # WeChat answers every API error with 200; anything else is a proxy or a wrong base_url.
            raise TransientError("http_error", f"{path}: HTTP {response.status_code}")
        try:
            body = json.loads(response.content)
        except ValueError:
            raise TransientError("bad_response", f"{path}: response is not JSON") from None
        if not isinstance(body, dict):
            raise TransientError("bad_response", f"{path}: response is not a JSON object")
        return body


def _errcode(body: dict[str, Any]) -> int:
    value = body.get("errcode", 0)
    try:
        return int(value)
    except (TypeError, ValueError):
        raise TransientError("bad_response", f"errcode {value!r} is not a number") from None


def _hide(text: str, secret: str) -> str:
    return text.replace(secret, "***") if secret else text


def _redact(url: httpx.URL) -> httpx.URL:
    if not any(name in url.params for name in _SENSITIVE_PARAMS):
        return url
    params = url.params
    for name in _SENSITIVE_PARAMS:
        if name in params:
            params = params.set(name, "***")
    return url.copy_with(params=params)


class _RedactUrls(logging.Filter):
    """httpx logs each request's URL at INFO: hide the access token and app secret in it."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple) and any(isinstance(arg, httpx.URL) for arg in record.args):
            record.args = tuple(_redact(arg) if isinstance(arg, httpx.URL) else arg for arg in record.args)
        return True


_httpx_log = logging.getLogger("httpx")
if not any(isinstance(existing, _RedactUrls) for existing in _httpx_log.filters):
    _httpx_log.addFilter(_RedactUrls())
