"""Provider webhooks and unsubscribe links: what comes back after a message is sent.

- ``POST /webhooks/twilio/inbound``: inbound SMS; STOP-style keywords opt the number out of SMS,
  START-style keywords opt it back in.
- ``POST /webhooks/twilio/status``: SMS status callbacks, into ``messages.delivery_status``.
- ``POST /webhooks/sendgrid/events``: the SendGrid Event Webhook (delivered, bounce, open, ...);
  unsubscribes and spam reports opt the user out of email.
- ``GET``/``POST /webhooks/wechat``: a WeChat Official Account's server URL (plaintext mode): the
  verification handshake, then pushes; unfollowing opts the openid out of WeChat, following opts
  it back in.
- ``GET``/``POST /u/{token}``: signed one-click unsubscribe links (RFC 8058); a link made for a
  topic opts out of that topic only, otherwise out of its channel.

Every request is authenticated by the provider's signature (or the link's) before anything is
read into the database: a forged one answers 403 and changes nothing. A route whose secret is not
configured answers 503 naming the variable, so a missing setting is never mistaken for success.
"""

from __future__ import annotations

import asyncio
import binascii
import hashlib
import hmac
import json
import logging
import time
from collections.abc import Callable, Coroutine, Mapping
from datetime import UTC, datetime
from typing import Any
from urllib.parse import parse_qsl
from xml.etree import ElementTree

from cryptography.hazmat.primitives.asymmetric import ec
from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response
from jinja2 import Environment
from sendgrid.helpers.eventwebhook import (  # type: ignore[import-untyped, unused-ignore]
    EventWebhook,
    EventWebhookHeader,
)
from starlette.datastructures import ImmutableMultiDict
from twilio.request_validator import RequestValidator  # type: ignore[import-untyped, unused-ignore]

from channels import mask_address, mask_user_id
from nurture.delivery.links import InvalidLink, UnsubscribeLinks, UnsubscribeTarget
from nurture.engine.model import idempotency_key
from nurture.storage.db import Database
from nurture.storage.feedback import (
    STATUS_RANK,
    forget_event,
    record_event,
    set_opt_out,
    use_nonce,
    user_ids_by_email,
    user_ids_by_openid,
    user_ids_by_phone,
)
from nurture.storage.stores import DbProfiles

from .settings import Settings, SettingsError

log = logging.getLogger("nurture.webhooks")

TWILIO_INBOUND = "/webhooks/twilio/inbound"
TWILIO_STATUS = "/webhooks/twilio/status"
SENDGRID_EVENTS = "/webhooks/sendgrid/events"
WECHAT_EVENTS = "/webhooks/wechat"

BODY_LIMITS = {
    TWILIO_INBOUND: 64 * 1024,
    TWILIO_STATUS: 64 * 1024,
    SENDGRID_EVENTS: 8 * 1024 * 1024,
    WECHAT_EVENTS: 64 * 1024,
}
"""Bytes per webhook body, refused (413) before they are read: far above what providers send."""

STOP_WORDS = frozenset({"STOP", "STOPALL", "UNSUBSCRIBE", "CANCEL", "END", "QUIT", "OPTOUT", "REVOKE"})
"""Twilio's standard opt-out keywords: the whole message, trimmed, any case."""
START_WORDS = frozenset({"START", "YES", "UNSTOP", "OPTIN"})
"""Twilio's standard opt-in keywords."""

SENDGRID_MAX_AGE = 600
"""Seconds a signed SendGrid batch stays acceptable: an older (or replayed) one is refused."""
SENDGRID_OPT_OUTS = frozenset({"unsubscribe", "group_unsubscribe", "spamreport"})
"""SendGrid events that withdraw consent to email."""

WECHAT_MAX_AGE = 600
"""Seconds a signed WeChat push stays acceptable. In plaintext mode the signature covers only the
timestamp and nonce, not the body, so an old signed URL must not be reusable for long."""
WECHAT_NONCE_LIMIT = 128
"""Characters of a WeChat ``nonce``; a longer one is refused like a bad signature."""
WECHAT_FOLLOWS = {"unsubscribe": True, "subscribe": False}
"""WeChat follow events, each with whether it opts the follower out of WeChat."""

_RESPONSES: dict[int | str, dict[str, Any]] = {
    403: {"description": "Missing, forged or stale signature: nothing changed."},
    413: {"description": "Body too large."},
    503: {"description": "The secret this route needs is not configured (the message names it)."},
}

TWIML_EMPTY = '<?xml version="1.0" encoding="UTF-8"?><Response/>'

_CHANNEL_WORDS = {"email": "emails", "sms": "text messages", "wechat": "WeChat messages"}
_PAGE_HEADERS = {
    "Cache-Control": "no-store",
    # The token is in the URL: it must not leak to other sites through the Referer header.
    "Referrer-Policy": "no-referrer",
    "X-Robots-Tag": "noindex",
    "X-Content-Type-Options": "nosniff",
    "Content-Security-Policy": (
        "default-src 'none'; style-src 'unsafe-inline'; form-action 'self'; frame-ancestors 'none'"
    ),
}
_PAGES = Environment(autoescape=True)
_PAGE = _PAGES.from_string(
    """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="robots" content="noindex">
<title>{{ title }}</title>
<style>
body { font-family: system-ui, sans-serif; max-width: 32rem; margin: 4rem auto; padding: 0 1rem; color: #222; }
button { font-size: 1rem; padding: .6rem 1.4rem; cursor: pointer; }
</style>
</head>
<body>
<main>
<h1>{{ title }}</h1>
<p>{{ text }}</p>
{% if confirm %}<form method="post">
<input type="hidden" name="List-Unsubscribe" value="One-Click">
<button type="submit">Unsubscribe</button>
</form>{% endif %}
</main>
</body>
</html>
"""
)


# Responses -----------------------------------------------------------------------------------


def _refused(status: int, error: str, message: str) -> JSONResponse:
    """An error answer in the event API's shape."""
    return JSONResponse({"error": error, "code": error, "message": message}, status_code=status)


def _forbidden(message: str) -> JSONResponse:
    return _refused(403, "forbidden", message)


def _not_configured(variable: str, what: str) -> JSONResponse:
    return _refused(503, "not_configured", f"{variable} is not set: {what}")


def _page(title: str, text: str, *, status: int = 200, confirm: bool = False) -> HTMLResponse:
    body = _PAGE.render(title=title, text=text, confirm=confirm)
    return HTMLResponse(body, status_code=status, headers=_PAGE_HEADERS)


def _what(target: UnsubscribeTarget) -> str:
    """What the link unsubscribes from, in the page's words."""
    if target.topic:
        # A topic opt-out holds on every channel, so the page says so rather than naming the link's.
        return f"messages about {target.topic} on any channel"
    return "our " + _CHANNEL_WORDS.get(target.channel, f"{target.channel} messages")


# Signatures ----------------------------------------------------------------------------------


def sendgrid_verifier(public_key: str) -> EventWebhook:
    """SendGrid's verifier for the key shown in its settings (base64, or PEM with its header lines)."""
    body = "".join(line for line in public_key.strip().splitlines() if not line.startswith("-----"))
    try:
        verifier = EventWebhook(body.replace(" ", ""))
    except (ValueError, TypeError) as exc:
        raise SettingsError(
            "SENDGRID_WEBHOOK_PUBLIC_KEY is not a public key: paste the verification key SendGrid "
            f"shows under Mail Settings > Event Webhook > Signature Verification ({exc})"
        ) from None
    if not isinstance(verifier.public_key, ec.EllipticCurvePublicKey):
        raise SettingsError("SENDGRID_WEBHOOK_PUBLIC_KEY is not an elliptic-curve (ECDSA) public key")
    return verifier


def _sendgrid_signed(verifier: EventWebhook, body: bytes, signature: str, timestamp: str) -> bool:
    try:
        # The helper signs timestamp + payload as UTF-8; strict decoding keeps that equal to the
        # raw bytes received (a body that is not UTF-8 cannot have been signed by SendGrid).
        payload = body.decode("utf-8")
        return bool(verifier.verify_signature(payload, signature, timestamp))
    except (UnicodeDecodeError, binascii.Error, ValueError):
        return False


def wechat_signature(token: str, timestamp: str, nonce: str) -> str:
    """WeChat's ``signature``: SHA-1 (hex) of the token, timestamp and nonce, sorted and joined."""
    # SHA-1 is WeChat's choice, not ours: the Official Account platform signs nothing else.
    return hashlib.sha1("".join(sorted((token, timestamp, nonce))).encode()).hexdigest()


def _wechat_signed(token: str, query: Mapping[str, str], *, max_age: int | None) -> bool:
    """Whether the query carries WeChat's signature (from the last ``max_age`` seconds, if given)."""
    signature, timestamp, nonce = (query.get(name, "") for name in ("signature", "timestamp", "nonce"))
    if not (signature and timestamp.isascii() and timestamp.isdigit() and len(timestamp) <= 12):
        return False
    if not 0 < len(nonce) <= WECHAT_NONCE_LIMIT:  # WeChat's are ten digits; the key column has a limit
        return False
    if max_age is not None and abs(time.time() - int(timestamp)) > max_age:
        return False
    # As bytes: compare_digest refuses non-ASCII text, and the query is not ours.
    return hmac.compare_digest(signature.lower().encode(), wechat_signature(token, timestamp, nonce).encode())


def _wechat_push(body: bytes) -> dict[str, str] | None:
    """The top-level fields of a WeChat push (``<xml><Event>..</Event>..</xml>``); None if it isn't one.

    ElementTree never loads external entities or DTDs (an undeclared entity is a parse error) and
    the bundled expat refuses entity-expansion bombs; the body is at most 64 KB (BODY_LIMITS).
    """
    try:
        root = ElementTree.fromstring(body)
    except ElementTree.ParseError:
        return None
    if root.tag != "xml":
        return None
    return {child.tag: (child.text or "").strip() for child in root}


def _public_url(settings: Settings, path: str, request: Request) -> str:
    # Twilio signs the URL it was configured with; behind a proxy the request's own URL differs.
    query = request.scope.get("query_string", b"").decode("latin-1")
    return settings.public_url.rstrip("/") + path + (f"?{query}" if query else "")


def _form(body: bytes) -> ImmutableMultiDict[str, str]:
    """A form-encoded body, every value of repeated fields kept (Twilio signs them all)."""
    return ImmutableMultiDict(parse_qsl(body.decode("latin-1"), keep_blank_values=True, max_num_fields=500))


def _text(value: Any, limit: int = 255) -> str | None:
    """A provider field as bounded text (columns have limits; payloads are not ours)."""
    if value is None or isinstance(value, dict | list):
        return None
    text = str(value).strip()
    return text[:limit] or None


def _instant(value: Any) -> datetime:
    """A provider's Unix timestamp; the time of receipt when it has none (or a bad one)."""
    try:
        return datetime.fromtimestamp(int(value), UTC)
    except (TypeError, ValueError, OverflowError, OSError):
        return datetime.now(UTC)


# The routes ----------------------------------------------------------------------------------


FollowHandler = Callable[[str, datetime], Coroutine[Any, Any, None]]
"""What a WeChat follow also does (the event API's: the follower's person and `WeChat Followed`)."""


def webhook_router(settings: Settings, db: Database, *, on_follow: FollowHandler | None = None) -> APIRouter:
    """The webhook and unsubscribe routes for ``settings``, writing to ``db``; ``on_follow`` is
    called with the openid and time of each new WeChat follow.

    Raises :class:`SettingsError` when ``SENDGRID_WEBHOOK_PUBLIC_KEY`` is set but not a key.
    """
    twilio = RequestValidator(settings.twilio_auth_token) if settings.twilio_auth_token else None
    sendgrid = (
        sendgrid_verifier(settings.sendgrid_webhook_public_key)
        if settings.sendgrid_webhook_public_key
        else None
    )
    links = settings.unsubscribe_links()
    unset = [
        name
        for name, value in (("NURTURE_SECRET", settings.secret), ("NURTURE_PUBLIC_URL", settings.public_url))
        if not value
    ]
    router = APIRouter(tags=["webhooks"])
    following: set[asyncio.Task[None]] = set()

    async def twilio_form(request: Request, path: str) -> ImmutableMultiDict[str, str] | Response:
        """The signed form of a Twilio webhook, or the answer refusing it."""
        if twilio is None:
            return _not_configured("TWILIO_AUTH_TOKEN", "Twilio webhooks cannot be verified")
        if not settings.public_url:
            return _not_configured(
                "NURTURE_PUBLIC_URL", "Twilio signs the public URL, so webhooks cannot be verified"
            )
        signature = request.headers.get("X-Twilio-Signature", "")
        body = await request.body()
        form = _form(body)
        if not signature or not twilio.validate(_public_url(settings, path, request), form, signature):
            log.warning("twilio webhook %s refused: bad or missing X-Twilio-Signature", path)
            return _forbidden(
                "X-Twilio-Signature is missing or does not match (is NURTURE_PUBLIC_URL the URL "
                "configured in Twilio?)"
            )
        return form

    @router.post(TWILIO_INBOUND, responses=_RESPONSES)
    async def twilio_inbound(request: Request) -> Response:
        """An SMS to one of your numbers: STOP-style keywords opt out of SMS, START-style opt in."""
        form = await twilio_form(request, TWILIO_INBOUND)
        if isinstance(form, Response):
            return form
        phone = form.get("From", "")
        text = form.get("Body", "")
        keyword = text.strip().upper()
        # Twilio's Advanced Opt-Out names the keyword's type, which covers custom keywords too.
        kind = form.get("OptOutType", "").upper()
        opt_out: bool | None = None
        if kind == "STOP" or keyword in STOP_WORDS:
            opt_out = True
        elif kind == "START" or keyword in START_WORDS:
            opt_out = False
        sid = _text(form.get("MessageSid"))
        users = await asyncio.to_thread(user_ids_by_phone, db, phone)
        event = {
            "provider": "twilio",
            "event": "inbound" if opt_out is None else "opt_out" if opt_out else "opt_in",
            "at": datetime.now(UTC),
            "provider_event_id": sid,
            "provider_id": sid,
            "user_id": users[0] if len(users) == 1 else None,
            "data": {"from": phone, "to": form.get("To", ""), "body": text[:1600], "users": users},
        }
        new = await asyncio.to_thread(_record_opt_in_or_out, db, event, users, "sms", opt_out)
        if new and opt_out is not None:
            log.info(
                "sms %s from %s: %d profile(s)",
                "opt-out" if opt_out else "opt-in",
                mask_address(phone),
                len(users),
            )
        # Empty TwiML: Twilio answers STOP and START itself; we add no reply of our own.
        return Response(TWIML_EMPTY, media_type="text/xml")

    @router.post(TWILIO_STATUS, responses=_RESPONSES)
    async def twilio_status(request: Request) -> Response:
        """A message status callback (``?key=`` carries the send's idempotency key)."""
        form = await twilio_form(request, TWILIO_STATUS)
        if isinstance(form, Response):
            return form
        sid = _text(form.get("MessageSid") or form.get("SmsSid"))
        status = (_text(form.get("MessageStatus") or form.get("SmsStatus"), 32) or "unknown").lower()
        key = _text(request.query_params.get("key"), 512)
        recorded = await asyncio.to_thread(
            lambda: record_event(
                db,
                provider="twilio",
                event=status,
                at=datetime.now(UTC),
                # One callback per (message, status); Twilio retries repeat it.
                provider_event_id=f"{sid}:{status}" if sid else None,
                idempotency_key=key,
                provider_id=sid,
                data={"status": status, "error_code": _text(form.get("ErrorCode"))},
                status=status if status in STATUS_RANK else None,
            )
        )
        log.debug("twilio status %s for %s (new: %s)", status, sid, recorded.new)
        return Response(TWIML_EMPTY, media_type="text/xml")

    @router.post(
        SENDGRID_EVENTS, responses={**_RESPONSES, 400: {"description": "The body is not a JSON array."}}
    )
    async def sendgrid_events(request: Request) -> Response:
        """A batch of SendGrid events, each recorded once (by ``sg_event_id``)."""
        if sendgrid is None:
            return _not_configured(
                "SENDGRID_WEBHOOK_PUBLIC_KEY", "SendGrid's Event Webhook signature cannot be verified"
            )
        signature = request.headers.get(EventWebhookHeader.SIGNATURE, "")
        timestamp = request.headers.get(EventWebhookHeader.TIMESTAMP, "")
        body = await request.body()
        if not signature or not (timestamp.isascii() and timestamp.isdigit() and len(timestamp) <= 12):
            return _forbidden("the SendGrid signature headers are missing or malformed")
        if abs(time.time() - int(timestamp)) > SENDGRID_MAX_AGE:
            # Signed batches are replayable as they are: only recent ones are taken.
            return _forbidden(f"the SendGrid signature is not from the last {SENDGRID_MAX_AGE} seconds")
        if not await asyncio.to_thread(_sendgrid_signed, sendgrid, body, signature, timestamp):
            log.warning("sendgrid webhook refused: signature does not match")
            return _forbidden("the SendGrid signature does not match (is SENDGRID_WEBHOOK_PUBLIC_KEY right?)")
        try:
            events = json.loads(body)
        except ValueError:
            return _refused(400, "invalid_request", "the body is not JSON")
        if not isinstance(events, list):
            return _refused(400, "invalid_request", "the body must be a JSON array of events")
        counts = await asyncio.to_thread(_sendgrid_batch, db, events)
        log.info("sendgrid events: %s", " ".join(f"{k}={v}" for k, v in counts.items()))
        return JSONResponse(counts)

    @router.get(
        WECHAT_EVENTS,
        response_class=PlainTextResponse,
        responses={**_RESPONSES, 200: {"description": "`echostr`, as text.", "content": {"text/plain": {}}}},
    )
    async def wechat_verify(request: Request) -> Response:
        """WeChat's server verification (``signature``, ``timestamp``, ``nonce``, ``echostr``): answers
        ``echostr`` when the signature is made with ``WECHAT_TOKEN``."""
        if not settings.wechat_token:
            return _not_configured("WECHAT_TOKEN", "WeChat's server signature cannot be verified")
        query = request.query_params
        # No freshness check here: the handshake only echoes a value back and changes nothing.
        if not _wechat_signed(settings.wechat_token, query, max_age=None):
            log.warning("wechat verification refused: bad or missing signature")
            return _forbidden(
                "the WeChat signature is missing or does not match (is WECHAT_TOKEN the Token?)"
            )
        return PlainTextResponse(query.get("echostr", ""), headers={"X-Content-Type-Options": "nosniff"})

    @router.post(
        WECHAT_EVENTS,
        response_class=PlainTextResponse,
        responses={
            **_RESPONSES,
            200: {"description": "`success`, as text.", "content": {"text/plain": {}}},
            400: {"description": "The body is not a WeChat XML push."},
        },
    )
    async def wechat_events(request: Request) -> Response:
        """A WeChat push (XML, signed in the query): ``unsubscribe`` (unfollow) opts every profile
        with that ``wechat_openid`` out of WeChat, ``subscribe`` (follow) opts them back in and is
        the track event ``WeChat Followed`` of the follower's person; the rest is ignored."""
        if not settings.wechat_token:
            return _not_configured("WECHAT_TOKEN", "WeChat's pushes cannot be verified")
        query = request.query_params
        if not _wechat_signed(settings.wechat_token, query, max_age=WECHAT_MAX_AGE):
            log.warning("wechat push refused: bad, missing or stale signature")
            return _forbidden(
                f"the WeChat signature is missing, does not match or is not from the last {WECHAT_MAX_AGE} "
                "seconds (is WECHAT_TOKEN the Token?)"
            )
        body = await request.body()
        timestamp = query["timestamp"]
        fresh = await asyncio.to_thread(
            use_nonce,
            db,
            f"wechat:{timestamp}:{query['nonce']}",
            hashlib.sha256(body).hexdigest(),
            # Until the timestamp itself is refused: only then can the key be forgotten.
            datetime.fromtimestamp(int(timestamp) + WECHAT_MAX_AGE, UTC),
        )
        if not fresh:
            log.warning("wechat push refused: its signed query was already used with another body")
            return _forbidden(
                "this signature (timestamp and nonce) was already used with another body: a replay"
            )
        push = _wechat_push(body)
        if push is None:
            return _refused(400, "invalid_request", "the body is not a WeChat XML push (<xml>...</xml>)")
        name = push.get("Event", "").lower()
        if push.get("MsgType") != "event" or name not in WECHAT_FOLLOWS:
            # Messages, menu clicks, location reports...: not about consent, and not ours to keep.
            return PlainTextResponse("success")
        openid = _text(push.get("FromUserName"), 128)
        created = push.get("CreateTime", "")
        if openid is None or not (created.isascii() and created.isdigit() and len(created) <= 12):
            return _refused(400, "invalid_request", "a follow event needs FromUserName and CreateTime")
        opt_out = WECHAT_FOLLOWS[name]
        users = await asyncio.to_thread(user_ids_by_openid, db, openid)
        event = {
            "provider": "wechat",
            "event": name,
            "at": _instant(created),
            # WeChat's pushes have no id; its retries repeat the follower, the time and the event.
            "provider_event_id": f"wechat:{openid}:{created}:{name}",
            "user_id": users[0] if len(users) == 1 else None,
            "data": {
                "openid": openid,
                "to": _text(push.get("ToUserName")),
                "event_key": _text(push.get("EventKey")),
                "users": users,
            },
        }
        if await asyncio.to_thread(_record_opt_in_or_out, db, event, users, "wechat", opt_out):
            log.info("wechat %s by %s: %d profile(s)", name, mask_address(openid), len(users))
        if not opt_out and on_follow is not None:
            # In the background: WeChat wants its answer within 5 seconds, whatever Temporal does.
            # The event's messageId comes from the follower and time: WeChat's retry adds nothing.
            task = asyncio.create_task(on_follow(openid, _instant(created)))
            following.add(task)
            task.add_done_callback(following.discard)
        # WeChat wants "success" (or an empty body): anything else shows the follower an error.
        return PlainTextResponse("success")

    @router.get("/u/{token}", response_class=HTMLResponse, include_in_schema=False)
    async def unsubscribe_page(token: str) -> Response:
        """The confirmation page. It changes nothing: mail scanners open links before people do."""
        target = _target(links, unset, token)
        if isinstance(target, Response):
            return target
        return _page("Unsubscribe", f"Stop receiving {_what(target)}?", confirm=True)

    @router.post("/u/{token}", response_class=HTMLResponse, include_in_schema=False)
    async def unsubscribe(token: str) -> Response:
        """One-click unsubscribe (RFC 8058), from a mail client or the confirmation page."""
        # The signed token is the authority; the body (List-Unsubscribe=One-Click, form- or
        # multipart-encoded depending on the client) adds nothing, so it is not required.
        target = _target(links, unset, token)
        if isinstance(target, Response):
            return target
        name = await asyncio.to_thread(_unsubscribe, db, target)
        log.info("unsubscribed %s from %s (link for %s)", mask_user_id(target.user_id), name, target.channel)
        return _page("You are unsubscribed", f"You will no longer receive {_what(target)}.")

    return router


def _target(links: UnsubscribeLinks | None, unset: list[str], token: str) -> UnsubscribeTarget | Response:
    """Whom the link unsubscribes, or the page refusing it."""
    if links is None:
        return _page(
            "Unsubscribe is unavailable",
            f"{' and '.join(unset)} not set: unsubscribe links cannot be checked.",
            status=503,
        )
    try:
        return links.verify(token)
    except InvalidLink:
        return _page(
            "Invalid link", "This unsubscribe link is not valid. Use the link from the message.", status=403
        )


def _unsubscribe(db: Database, target: UnsubscribeTarget) -> str:
    """Opt the link's user out of its topic, else its channel; the name opted out of.

    Idempotent: the opt-out is recorded only when it changes the user's opt-outs, so a second
    click (or a mail client posting twice) records nothing, while a click after opting back in does.
    """
    # A topic link was sent for one kind of message: the user keeps the channel for the rest.
    name = target.opts_out_of
    added = False

    def opt_out(current: set[str]) -> set[str]:
        nonlocal added
        added = name not in current  # judged on the locked row: concurrent clicks add it once
        return current | {name}

    DbProfiles(db).merge(target.user_id, {}, opt_out)
    if not added:
        return name
    record_event(
        db,
        provider="nurture",
        event="unsubscribe",
        at=datetime.now(UTC),
        user_id=target.user_id,
        data={"channel": target.channel, "topic": target.topic, "opted_out": name, "via": "link"},
    )
    return name


def _record_opt_in_or_out(
    db: Database, event: Mapping[str, Any], users: list[str], name: str, opt_out: bool | None
) -> bool:
    """Record a provider event (``record_event``'s arguments) and, the first time it is seen, opt
    ``users`` out of ``name`` (or back in; ``None``: neither); whether it was new."""
    recorded = record_event(db, **event)
    if recorded.new and opt_out is not None:
        try:
            set_opt_out(db, users, name, opt_out)
        except Exception:
            if event.get("provider_event_id") is not None:  # so the provider's retry applies it
                forget_event(db, event["provider_event_id"])
            raise
    return recorded.new


def _sendgrid_batch(db: Database, events: list[Any]) -> dict[str, int]:
    """Record each event once; opt out on unsubscribes and spam reports."""
    counts = {"received": len(events), "recorded": 0, "duplicates": 0, "ignored": 0}
    for event in events:
        if not isinstance(event, dict) or not _text(event.get("event"), 32):
            counts["ignored"] += 1
            continue
        new = _sendgrid_event(db, event)
        counts["recorded" if new else "duplicates"] += 1
    return counts


def _event_digest(event: Mapping[str, Any]) -> str:
    """``sha256:`` and the SHA-256 of the event as canonical JSON (sorted keys, no spaces)."""
    canonical = json.dumps(event, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return "sha256:" + hashlib.sha256(canonical.encode()).hexdigest()


def _sendgrid_event(db: Database, event: Mapping[str, Any]) -> bool:
    name = (_text(event.get("event"), 32) or "").lower()
    # Without SendGrid's id, the event itself is its identity: a replayed batch repeats it exactly.
    event_id = _text(event.get("sg_event_id")) or _event_digest(event)
    # The sending adapter adds these as custom_args; SendGrid returns them as top-level fields.
    key = _text(event.get("idempotency_key"), 512)
    run_id, step_id = _text(event.get("run_id")), _text(event.get("step_id"))
    if key is None and run_id and step_id:
        key = idempotency_key(run_id, step_id)
    message_id = _text(event.get("sg_message_id"))
    # sg_message_id is the X-Message-Id the send returned, plus a per-recipient suffix.
    provider_id = message_id.split(".", 1)[0] if message_id else None
    recorded = record_event(
        db,
        provider="sendgrid",
        event=name,
        at=_instant(event.get("timestamp")),
        provider_event_id=event_id,
        idempotency_key=key,
        provider_id=provider_id,
        user_id=_text(event.get("user_id")),
        data=dict(event),
        status=name if name in STATUS_RANK else None,
    )
    # A bounce is recorded but never opts out: a dead or full mailbox says nothing about consent,
    # and suppressing bounced addresses is the provider's job (it drops later sends itself).
    if recorded.new and name in SENDGRID_OPT_OUTS:
        email = _text(event.get("email"), 320)
        try:
            users = [recorded.user_id] if recorded.user_id else user_ids_by_email(db, email or "")
            set_opt_out(db, users, "email", True)
        except Exception:
            forget_event(db, event_id)  # so SendGrid's retry applies it
            raise
        log.info("email opt-out (%s) for %s: %d profile(s)", name, mask_address(email or "?"), len(users))
    return recorded.new
