"""The marketer's console: server-rendered pages on the event API's own process, at ``/console``.

Pages read the database only (never Temporal): journeys with live numbers from the report, a
journey's map, funnel, experiments and versions, template previews, people and their timelines,
and the message log. Operators pause and resume journeys, end a person's run and forget a person,
each after a confirmation form and each written to the audit log; admins also reveal addresses.

Every page needs a console session (the event API's keys open none). Every form carries the
session's CSRF token; every answer carries a strict Content Security Policy (our own CSS and
JavaScript files only, no inline code), refuses framing and is not cached.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote, urlencode

import yaml
from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from jinja2 import FileSystemLoader, StrictUndefined, select_autoescape
from jinja2.sandbox import SandboxedEnvironment
from sqlalchemy import func
from sqlmodel import col, select
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from temporalio.client import Client

from channels.wechat import template_payload
from nurture.engine.identity import ADDRESS_KINDS
from nurture.engine.model import Event, Profile
from nurture.language.compiler import Project, compile_project
from nurture.language.diagnostics import format_all
from nurture.language.ir import ADDRESS_TRAITS, CHANNELS, Journey
from nurture.language.sms import sms_info
from nurture.reports.report import (
    JourneyCounts,
    JourneyReport,
    journey_counts,
    journey_report,
    parse_bound,
    walk_counts,
)
from nurture.service import api, privacy
from nurture.service.api import ApiError, Service
from nurture.service.observability import configure_logging
from nurture.service.preview import PreviewError, locale_line, preview_context, render_template
from nurture.service.settings import Settings
from nurture.storage.console import PausedJourneys
from nurture.storage.db import Database
from nurture.storage.models import MessageRecord, ProfileRecord, RunRecord

from . import accounts, charts, data
from .accounts import Account, Role

PREFIX = "/console"
HERE = Path(__file__).parent
COOKIE = "nurture_console"
FORM_COOKIE = "nurture_console_form"
"""A sign-in form's CSRF token before any session exists (double submit)."""
MAX_FORM = 16 * 1024

CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "form-action 'self'; frame-src 'self'; frame-ancestors 'none'; base-uri 'none'"
)
FRAME_CSP = (
    "default-src 'none'; style-src 'unsafe-inline'; img-src https: data:; font-src https: data:; "
    "frame-ancestors 'self'; base-uri 'none'; form-action 'none'; sandbox"
)
"""For a rendered email shown in the preview's frame: its own inline styles, no script (the
``sandbox`` directive keeps it sandboxed even when opened outside the frame)."""

REPORTS_KEPT = 64
"""Counts kept (reports of journeys times ranges times versions, the list's), the oldest dropped first."""

RANGES = {"today": timedelta(days=1), "7d": timedelta(days=7), "30d": timedelta(days=30), "90d": timedelta(days=90)}

SAMPLE_USER = {
    "first_name": "Ada",
    "email": "ada@example.com",
    "phone": "+15005550006",
    "wechat_openid": "o_sample_openid",
    "timezone": "Asia/Shanghai",
}


class ConsoleError(Exception):
    """An error page: 400 naming the field, 403 naming the role needed, 404, 429, 503."""

    def __init__(self, status: int, title: str, message: str) -> None:
        super().__init__(message)
        self.status, self.title, self.message = status, title, message


class SignInNeeded(Exception):
    """No session: the browser goes to the sign-in page."""


class SecurityHeaders:
    """Adds the console's security headers (and ``Server-Timing``) to every answer under ``/console``."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "") if scope["type"] == "http" else ""
        if not (path == PREFIX or path.startswith(PREFIX + "/")):
            await self.app(scope, receive, send)
            return
        framed = path.endswith("/frame")
        started = time.perf_counter()

        async def with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                # The server's own time for the page, as browsers' developer tools show it.
                took = (time.perf_counter() - started) * 1000
                headers = [(k, v) for k, v in message.get("headers", []) if k.lower() != b"content-security-policy"]
                headers += [
                    (b"content-security-policy", (FRAME_CSP if framed else CSP).encode()),
                    (b"x-frame-options", b"SAMEORIGIN" if framed else b"DENY"),
                    (b"x-content-type-options", b"nosniff"),
                    (b"referrer-policy", b"same-origin"),
                    (b"cross-origin-opener-policy", b"same-origin"),
                    (b"server-timing", f"app;dur={took:.1f}".encode()),
                ]
                if not path.startswith(PREFIX + "/static/"):
                    headers.append((b"cache-control", b"no-store"))
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, with_headers)


REPORT_FRESH = 30.0
"""Seconds a count (a journey's report, the journeys list's numbers) is shown as is; after that
the page shows it once more while a fresh one is counted in the background (a report over a
million runs takes seconds)."""


@dataclass
class Counted:
    value: Any
    at: float
    """``time.monotonic()`` when counting finished."""
    seconds: float
    """How long counting took."""


Key = tuple[Any, ...]


@dataclass
class Console:
    """What the console's pages share."""

    service: Service
    pages: SandboxedEnvironment
    secure: bool
    paused: PausedJourneys
    _compiled: tuple[float, dict[str, str]] | None = None
    _counts: dict[Key, Counted] = field(default_factory=dict)
    _counting: set[Key] = field(default_factory=set)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def report(
        self, journey: Journey, *, since: datetime | None, until: datetime | None, version: str | None
    ) -> Counted:
        """The journey's report (see :meth:`counted`). Ranges ending now are keyed by the minute
        (see :func:`_range`), so "the last 7 days" is shared by every viewer."""
        return self.counted(
            ("report", journey.id, journey.version, since, until, version),
            lambda: journey_report(self.db, journey, since=since, until=until, version=version),
        )

    def overview(self, ids: list[str]) -> Counted:
        """The journeys list's numbers: :func:`journey_counts` and every journey's runs."""

        def count() -> tuple[dict[str, JourneyCounts], dict[str, int]]:
            with self.db.session() as session:
                found = session.execute(
                    select(col(RunRecord.journey), func.count())
                    .where(col(RunRecord.journey).in_(ids))
                    .group_by(col(RunRecord.journey))
                )
                entered = {journey: int(total) for journey, total in found}
            return journey_counts(self.db, ids), entered

        return self.counted(("overview", *ids), count)

    def counted(self, key: Key, count: Callable[[], Any]) -> Counted:
        """``count()``'s value, counted at most :data:`REPORT_FRESH` seconds ago, or the last one
        while a fresh one is counted in the background; counted now when there is none."""
        with self._lock:
            known = self._counts.get(key)
            if known is not None and time.monotonic() - known.at < REPORT_FRESH:
                return known
            if known is not None:
                if key not in self._counting:
                    self._counting.add(key)
                    threading.Thread(target=self._count, args=(key, count), daemon=True).start()
                return known
        return self._count(key, count)

    def forget_counts(self) -> None:
        """Count everything afresh on the next view."""
        with self._lock:
            self._counts.clear()

    def _count(self, key: Key, count: Callable[[], Any]) -> Counted:
        try:
            started = time.monotonic()
            value = count()
            counted = Counted(value, time.monotonic(), time.monotonic() - started)
            with self._lock:
                self._counts[key] = counted
                if len(self._counts) > REPORTS_KEPT:
                    oldest = min(self._counts, key=lambda k: self._counts[k].at)
                    del self._counts[oldest]
            return counted
        finally:
            with self._lock:
                self._counting.discard(key)

    @property
    def db(self) -> Database:
        return self.service.db

    @property
    def project(self) -> Project:
        return self.service.project

    @property
    def settings(self) -> Settings:
        return self.service.settings

    def compile_result(self) -> dict[str, str]:
        """The journey files on disk compiled now, as ``nurture validate`` prints their errors,
        by journey id (the file's stem); recompiled when a file changed."""
        audiences = self.settings.audiences or self.settings.journeys.parent / "audiences"
        files = [self.settings.journeys, self.settings.templates, audiences]
        stamp = max(
            (p.stat().st_mtime for root in files if root.is_dir() for p in root.rglob("*") if p.is_file()),
            default=0.0,
        )
        if self._compiled is not None and self._compiled[0] == stamp:
            return self._compiled[1]
        result = compile_project(
            self.settings.journeys, self.settings.templates, self.settings.config, audiences_dir=self.settings.audiences
        )
        by_journey: dict[str, str] = {}
        for diagnostic in result.errors:
            stem = Path(diagnostic.path).stem
            by_journey[stem] = format_all([d for d in result.errors if Path(d.path).stem == stem])
        if result.errors and not by_journey:
            by_journey[""] = format_all(result.errors)
        self._compiled = (stamp, by_journey)
        return by_journey


def console_of(request: Request) -> Console:
    console: Console = request.app.state.console
    return console


def _client(request: Request) -> str:
    return request.client.host if request.client else "unknown"


def current(request: Request) -> Account | None:
    return accounts.session_account(console_of(request).db, request.cookies.get(COOKIE))


def signed_in(request: Request, role: Role = "viewer") -> Account:
    account = current(request)
    if account is None:
        raise SignInNeeded
    if not account.may(role):
        raise ConsoleError(
            403,
            "Not allowed",
            f"This needs the {role} role or above; your account ({account.email}) is a {account.role}.",
        )
    return account


async def form_of(request: Request, account: Account | None) -> dict[str, str]:
    """The posted form's fields, after the CSRF check (403 without the right token)."""
    chunks, size = [], 0
    async for chunk in request.stream():  # read no further than a form may be long
        size += len(chunk)
        if size > MAX_FORM:
            raise ConsoleError(413, "Form too large", "The form is larger than the console accepts.")
        chunks.append(chunk)
    body = b"".join(chunks)
    fields = {k: v[0] for k, v in parse_qs(body.decode("utf-8", "replace"), keep_blank_values=True).items()}
    expected = account.csrf if account is not None else request.cookies.get(FORM_COOKIE, "")
    if not expected or not accounts.csrf_ok(expected, fields.get("csrf")):
        raise ConsoleError(
            403, "Form expired", "The form's security token is missing or out of date: reload the page and try again."
        )
    return fields


def page(
    request: Request,
    template: str,
    account: Account | None,
    *,
    status: int = 200,
    title: str = "",
    **context: Any,
) -> HTMLResponse:
    console = console_of(request)
    html = console.pages.get_template(template).render(
        account=account,
        title=title,
        prefix=PREFIX,
        path=request.url.path,
        csrf=account.csrf if account else context.pop("form_csrf", ""),
        **context,
    )
    return HTMLResponse(html, status_code=status)


def redirect(to: str) -> RedirectResponse:
    return RedirectResponse(to, status_code=303)


def _cookie(response: Response, console: Console, name: str, value: str, max_age: int | None) -> None:
    response.set_cookie(
        name, value, max_age=max_age, path=PREFIX, httponly=True, samesite="strict", secure=console.secure
    )


def _query(**values: Any) -> str:
    return urlencode({k: v for k, v in values.items() if v not in (None, "")})


def _safe_next(target: str | None) -> str:
    # Only a path of the console itself: never another host (an open redirect).
    if target and target.startswith(PREFIX + "/") and not target.startswith("//") and "\\" not in target:
        return target
    return PREFIX + "/journeys"


router = APIRouter(prefix=PREFIX, include_in_schema=False)


# --- signing in ------------------------------------------------------------------------------------


@router.get("")
@router.get("/")
def home(request: Request) -> Response:
    signed_in(request)
    return redirect(PREFIX + "/journeys")


def _sign_in_page(request: Request, *, error: str = "", status: int = 200, email: str = "") -> HTMLResponse:
    token = request.cookies.get(FORM_COOKIE) or secrets.token_urlsafe(32)
    response = page(
        request,
        "sign_in.html",
        None,
        status=status,
        title="Sign in",
        form_csrf=token,
        error=error,
        email=email,
        next=_safe_next(request.query_params.get("next")),
    )
    _cookie(response, console_of(request), FORM_COOKIE, token, 3600)
    return response


@router.get("/sign-in")
def sign_in_form(request: Request) -> Response:
    if current(request) is not None:
        return redirect(PREFIX + "/journeys")
    return _sign_in_page(request)


@router.post("/sign-in")
async def sign_in(request: Request) -> Response:
    console = console_of(request)
    fields = await form_of(request, None)
    email, password = fields.get("email", ""), fields.get("password", "")
    try:
        found = await asyncio.to_thread(accounts.check_password, console.db, email, password, _client(request))
    except accounts.Throttled:
        minutes = int(accounts.THROTTLE_WINDOW.total_seconds() // 60)
        return _sign_in_page(
            request,
            error=f"Too many failed attempts. Try again in {minutes} minutes.",
            status=429,
            email=email,
        )
    if found is None:
        return _sign_in_page(request, error="The email or the password is not right.", status=401, email=email)
    return await asyncio.to_thread(_start, request, found, _safe_next(fields.get("next")))


def _start(request: Request, email: str, target: str) -> Response:
    console = console_of(request)
    accounts.end_session(console.db, request.cookies.get(COOKIE))  # a fresh session id on every sign-in
    token = accounts.start_session(console.db, email)
    response = redirect(target)
    _cookie(response, console, COOKIE, token, int(accounts.SESSION_LIFETIME.total_seconds()))
    response.delete_cookie(FORM_COOKIE, path=PREFIX)
    return response


@router.get("/link/{token}")
def sign_in_link(request: Request, token: str) -> Response:
    email = accounts.use_link(console_of(request).db, token)
    if email is None:
        raise ConsoleError(
            400,
            "Link not valid",
            "This sign-in link was used already or has expired. Ask for a new one "
            "(nurture console link EMAIL) or sign in with your password.",
        )
    return _start(request, email, PREFIX + "/account")


@router.post("/sign-out")
async def sign_out(request: Request) -> Response:
    account = await asyncio.to_thread(signed_in, request)
    await form_of(request, account)
    await asyncio.to_thread(accounts.end_session, console_of(request).db, request.cookies.get(COOKIE))
    response = redirect(PREFIX + "/sign-in")
    response.delete_cookie(COOKIE, path=PREFIX)
    return response


@router.get("/account")
def account_page(request: Request) -> Response:
    account = signed_in(request)
    has_password = accounts.has_password(console_of(request).db, account.email)
    return page(
        request, "account.html", account, title="Your account", saved=False, error="", has_password=has_password
    )


@router.post("/account")
async def set_password(request: Request) -> Response:
    account = await asyncio.to_thread(signed_in, request)
    fields = await form_of(request, account)
    password, again = fields.get("password", ""), fields.get("again", "")
    db = console_of(request).db
    has_password = await asyncio.to_thread(accounts.has_password, db, account.email)
    error = ""
    if has_password:
        # A password is changed by someone who knows it, not by whoever holds the session.
        try:
            known = await asyncio.to_thread(
                accounts.check_password, db, account.email, fields.get("current", ""), _client(request)
            )
        except accounts.Throttled:
            known = None
        if known is None:
            error = "current: the current password is not right."
    if not error and password != again:
        error = "again: the two new passwords differ."
    if not error:
        try:
            await asyncio.to_thread(accounts.set_password, db, account.email, password)
        except accounts.AccountError as exc:
            error = f"password: {exc}"
    return page(
        request,
        "account.html",
        account,
        status=400 if error else 200,
        title="Your account",
        saved=not error,
        error=error,
        has_password=has_password or not error,
    )


# --- journeys --------------------------------------------------------------------------------------


@router.get("/journeys")
def journeys_page(request: Request) -> Response:
    account = signed_in(request)
    console = console_of(request)
    project = console.project
    ids = sorted(project.journeys)
    counts, entered = console.overview(ids).value
    paused = console.paused.details()
    compiled = console.compile_result()
    rows = []
    for journey_id in ids:
        journey = project.journeys[journey_id]
        c = counts[journey_id]
        total = entered.get(journey_id, 0)
        written = journey.trigger.written_if
        trigger = journey.trigger.describe + (f" if {written}" if written else "")
        rows.append(
            {
                "id": journey_id,
                "name": journey.name or journey_id,
                "description": journey.description,
                "trigger": trigger,
                "version": journey.version,
                "paused": paused.get(journey_id),
                "counts": c,
                "rate": None if not total else c.converted / total,
                "compile": compiled.get(journey_id, ""),
            }
        )
    warnings = format_all(project.warnings) if project.warnings else ""
    return page(
        request,
        "journeys.html",
        account,
        title="Journeys",
        rows=rows,
        warnings=warnings,
        other_errors=compiled.get("", ""),
    )


def _journey(console: Console, journey_id: str) -> Any:
    journey = console.project.journeys.get(journey_id)
    if journey is None:
        raise ConsoleError(404, "No such journey", f"There is no journey {journey_id!r} in the deployed project.")
    return journey


def _range(params: Mapping[str, str]) -> tuple[datetime | None, datetime | None, str]:
    """(since, until, the preset chosen) from ``range``, ``since`` and ``until``."""
    preset = params.get("range", "") or ""
    if preset and preset not in RANGES and preset != "all":
        raise ConsoleError(400, "Bad time range", f"range: {preset!r} is not one of today, 7d, 30d, 90d, all")
    if preset in RANGES:
        now = datetime.now(UTC)
        # By the minute: every viewer of "the last 7 days" in one minute shares one counted report.
        now = now.replace(second=0, microsecond=0)
        start = now.replace(hour=0, minute=0) if preset == "today" else now - RANGES[preset]
        return start, None, preset
    bounds: list[datetime | None] = []
    for name in ("since", "until"):
        text = params.get(name) or ""
        try:
            bounds.append(parse_bound(text, end=name == "until") if text else None)
        except ValueError as exc:
            raise ConsoleError(400, "Bad time range", f"{name}: {exc}") from None
    return bounds[0], bounds[1], "custom" if any(bounds) else "all"


@router.get("/journeys/{journey_id}")
def journey_page(request: Request, journey_id: str) -> Response:
    account = signed_in(request)
    console = console_of(request)
    journey = _journey(console, journey_id)
    params = request.query_params
    since, until, preset = _range(params)
    version = params.get("version") or None
    counted = console.report(journey, since=since, until=until, version=version)
    report: JourneyReport = counted.value
    steps = {step.id: step for step in walk_counts(report.steps)}
    selected = params.get("step") or None
    if selected is not None and selected not in steps:
        raise ConsoleError(404, "No such step", f"step: journey {journey_id!r} has no step {selected!r}")
    keep = _query(range=params.get("range"), since=params.get("since"), until=params.get("until"), version=version)
    link = f"{PREFIX}/journeys/{quote(journey_id)}?{keep + '&' if keep else ''}step="
    detail = None
    if selected is not None:
        people = data.step_people(console.db, journey_id, selected)
        detail = {
            "step": steps[selected],
            "reaches": [
                {
                    "at": reach.reached_at,
                    "user": data.shown_user(run.user_id, reveal=False) if run else "",
                    "user_id": run.user_id if run else "",
                    "status": run.status if run else "",
                    "now_at": run.step if run and run.status == "active" else "",
                    "variant": reach.variant,
                    "deferrals": reach.deferrals,
                    "deferral_reason": reach.deferral_reason,
                }
                for reach, run in people.reaches
            ],
            "messages": [_message_row(m, reveal=False) for m in people.messages],
        }
    return page(
        request,
        "journey.html",
        account,
        title=report.name,
        journey=journey,
        report=report,
        paused=console.paused.details().get(journey_id),
        preset=preset,
        since=params.get("since", ""),
        until=params.get("until", ""),
        version=version or "",
        map=charts.journey_map(journey, steps, selected=selected, link=link, entered=report.totals.entered),
        funnel=charts.funnel_chart(report.funnel),
        detail=detail,
        counted_ms=round(counted.seconds * 1000),
        counted_ago=round(time.monotonic() - counted.at),
    )


def _message_row(message: MessageRecord, *, reveal: bool) -> dict[str, Any]:
    outcome = message.status + (f":{message.reason}" if message.reason else "")
    fallbacks = [a for a in message.attempts if a.get("state") == "failed"]
    return {
        "id": message.id,
        "at": message.sent_at or message.created_at,
        "journey": message.journey,
        "step": message.step_id,
        "channel": message.channel,
        "template": message.template,
        "status": message.status,
        "outcome": outcome,
        "tried": " → ".join(str(a.get("channel")) for a in message.attempts) if fallbacks else "",
        "user": data.shown_user(message.user_id, reveal=reveal),
        "user_id": message.user_id,
        "address": data.shown_address(message.address, reveal=reveal),
        "subject": message.subject or message.preview or "",
        "delivery": message.delivery_status or "",
        "provider": message.provider or "",
    }


async def _confirmed_journey_action(request: Request, journey_id: str, action: str) -> Response:
    account = await asyncio.to_thread(signed_in, request, "operator")
    console = console_of(request)
    _journey(console, journey_id)
    await form_of(request, account)
    if action == "pause":
        changed = await asyncio.to_thread(console.paused.pause, journey_id, account.actor)
    else:
        changed = await asyncio.to_thread(console.paused.resume, journey_id)
    if changed:
        await asyncio.to_thread(
            privacy.audit, console.db, "pause" if action == "pause" else "resume", actor=account.actor, journey=journey_id
        )
    return redirect(f"{PREFIX}/journeys/{quote(journey_id)}")


@router.get("/journeys/{journey_id}/pause")
@router.get("/journeys/{journey_id}/resume")
def confirm_journey_action(request: Request, journey_id: str) -> Response:
    account = signed_in(request, "operator")
    journey = _journey(console_of(request), journey_id)
    action = request.url.path.rsplit("/", 1)[1]
    return page(request, "confirm_journey.html", account, title=f"{action.capitalize()} {journey.id}", journey=journey, action=action)


@router.post("/journeys/{journey_id}/pause")
async def pause(request: Request, journey_id: str) -> Response:
    return await _confirmed_journey_action(request, journey_id, "pause")


@router.post("/journeys/{journey_id}/resume")
async def resume(request: Request, journey_id: str) -> Response:
    return await _confirmed_journey_action(request, journey_id, "resume")


# --- template preview ------------------------------------------------------------------------------


def _template_names(project: Project) -> list[str]:
    return sorted({name for channel in CHANNELS for name in project.templates.names(channel)})


def _sample(console: Console, params: Mapping[str, str]) -> tuple[Profile, dict[str, Any], str, str]:
    """The preview's user (a stored profile, or the sample), its event scope, and the form's texts."""
    user_id = (params.get("user") or "").strip()
    if user_id:
        with console.db.session() as session:
            row = session.get(ProfileRecord, user_id)
        if row is None:
            raise ConsoleError(404, "No such person", f"user: no profile for user id {user_id!r}")
        profile = Profile(row.user_id, dict(row.traits))
    else:
        profile = Profile("sample-user", dict(SAMPLE_USER))
    name = (params.get("event") or "").strip()
    text = params.get("properties") or ""
    properties: Any = {}
    if text.strip():
        try:
            properties = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ConsoleError(400, "Bad event", f"properties: not valid YAML or JSON ({exc})") from None
        if not isinstance(properties, dict):
            raise ConsoleError(400, "Bad event", "properties: must be a mapping, e.g. {order_id: o-1, total: 25}")
    scope = Event(name, datetime.now(UTC), json.loads(json.dumps(properties, default=str))).scope() if name else {}
    return profile, scope, name, text


def _variants(console: Console, name: str) -> list[tuple[str, str | None]]:
    store = console.project.templates
    found: list[tuple[str, str | None]] = []
    for channel in CHANNELS:
        if store.exists(channel, name):
            found.append((channel, None))
            found.extend((channel, locale) for locale in store.locales(channel, name))
    return found


@router.get("/preview")
def preview_page(request: Request) -> Response:
    account = signed_in(request)
    console = console_of(request)
    names = _template_names(console.project)
    params = request.query_params
    name = params.get("template") or (names[0] if names else "")
    if name and name not in names:
        raise ConsoleError(404, "No such template", f"template: there is no template {name!r}")
    profile, scope, event_name, properties = _sample(console, params)
    store = console.project.templates
    rendered = []
    for channel, locale in _variants(console, name):
        context = preview_context(profile, scope, channel, name, console.project.settings)
        entry: dict[str, Any] = {"channel": channel, "locale": locale or "base", "error": ""}
        try:
            message = render_template(store, channel, name, context, locale)
        except PreviewError as exc:
            entry["error"] = str(exc)
            rendered.append(entry)
            continue
        entry["file"] = locale_line(store, message, locale).replace(f"{store.root.parent}/", "")
        address = profile.traits.get(ADDRESS_TRAITS[channel])
        entry["to"] = data.shown_address(address if isinstance(address, str) else None, reveal=False)
        if channel == "email":
            entry["subject"] = message.subject or ""
            entry["preheader"] = message.preheader or ""
            entry["frame"] = f"{PREFIX}/preview/frame?" + _query(
                template=name,
                locale=locale,
                user=params.get("user"),
                event=params.get("event"),
                properties=params.get("properties"),
            )
        elif channel == "sms":
            info = sms_info(message.text or "")
            entry["text"] = message.text or ""
            entry["sms"] = info.describe()
            limit = console.project.settings.sms_max_segments
            entry["over"] = (
                f"{info.segments} segments is more than the project allows ({limit}, sms_max_segments)"
                if info.segments > limit
                else ""
            )
        else:
            entry["payload"] = json.dumps(template_payload(message, "o_sample_openid"), ensure_ascii=False, indent=2)
        rendered.append(entry)
    return page(
        request,
        "preview.html",
        account,
        title=f"Preview {name}",
        names=names,
        name=name,
        user=params.get("user", ""),
        event=event_name,
        properties=properties,
        rendered=rendered,
    )


@router.get("/preview/frame")
def preview_frame(request: Request) -> Response:
    signed_in(request)
    console = console_of(request)
    params = request.query_params
    name = params.get("template") or ""
    if name not in _template_names(console.project) or not console.project.templates.exists("email", name):
        raise ConsoleError(404, "No such template", f"template: there is no email template {name!r}")
    profile, scope, _, _ = _sample(console, params)
    context = preview_context(profile, scope, "email", name, console.project.settings)
    try:
        message = render_template(console.project.templates, "email", name, context, params.get("locale") or None)
    except PreviewError as exc:
        raise ConsoleError(400, "Template error", str(exc)) from None
    return HTMLResponse(message.html or "")


# --- people ----------------------------------------------------------------------------------------


@router.get("/people")
def people_page(request: Request) -> Response:
    account = signed_in(request)
    console = console_of(request)
    query = (request.query_params.get("q") or "").strip()
    found = data.find_people(console.db, query) if query else []
    if len(found) == 1:
        return redirect(f"{PREFIX}/person?{_query(id=found[0].user_id)}")
    return page(
        request,
        "people.html",
        account,
        title="People",
        query=query,
        found=[
            {"user_id": p.user_id, "shown": data.shown_user(p.user_id, reveal=False), "email": data.shown_address(p.email, reveal=False)}
            for p in found
        ],
    )


def _person_page(request: Request, account: Account, given: str, *, reveal: bool) -> HTMLResponse:
    console = console_of(request)
    user_id = data.person_id(console.db, given)
    found = data.person(console.db, user_id, reveal=reveal)
    if found.profile is None and not found.runs and not found.messages and not found.timeline:
        raise ConsoleError(404, "No such person", f"id: nothing is held about user {data.shown_user(user_id, reveal=False)!r}")
    profile = found.profile
    traits = data.masked_traits(profile.traits if profile else {}, list(ADDRESS_TRAITS.values()), reveal=reveal)
    topics = console.project.settings.topics
    opted = set(profile.opted_out) if profile else set()
    subscriptions = [
        {"name": name, "kind": "channel" if name in CHANNELS else "topic", "subscribed": name not in opted}
        for name in (*CHANNELS, *topics)
    ]
    return page(
        request,
        "person.html",
        account,
        title="Person",
        user_id=user_id,
        shown_user=data.shown_user(user_id, reveal=reveal),
        reveal=reveal,
        profile=profile,
        traits=traits,
        subscriptions=subscriptions,
        runs=found.runs,
        identifiers=[
            (ident.kind, ident.value if reveal or ident.kind not in ADDRESS_KINDS else data.shown_address(ident.value, reveal=False))
            for ident in data.identifiers(console.db, user_id)
        ],
        timeline=found.timeline,
        messages=[_message_row(m, reveal=reveal) for m in found.messages],
    )


@router.get("/person")
def person_page(request: Request) -> Response:
    account = signed_in(request)
    user_id = request.query_params.get("id") or ""
    if not user_id:
        raise ConsoleError(400, "Who?", "id: give a user id (or look a person up on the People page)")
    return _person_page(request, account, user_id, reveal=False)


@router.post("/person/reveal")
async def reveal(request: Request) -> Response:
    account = await asyncio.to_thread(signed_in, request, "admin")
    fields = await form_of(request, account)
    user_id = fields.get("id", "")
    if not user_id:
        raise ConsoleError(400, "Who?", "id: the form names no user")
    console = console_of(request)
    response = await asyncio.to_thread(_person_page, request, account, user_id, reveal=True)
    await asyncio.to_thread(
        privacy.audit, console.db, "reveal", actor=account.actor, secret=console.settings.secret, user_id=user_id
    )
    return response


def _run(console: Console, run_id: str) -> RunRecord:
    with console.db.session() as session:
        run = session.get(RunRecord, run_id)
    if run is None or not run.user_id:
        raise ConsoleError(404, "No such run", f"run: there is no run {run_id!r}")
    return run


@router.get("/person/end-run")
def confirm_end_run(request: Request) -> Response:
    account = signed_in(request, "operator")
    run = _run(console_of(request), request.query_params.get("run") or "")
    return page(
        request, "confirm_end_run.html", account, title="End a run", run=run, shown_user=data.shown_user(run.user_id, reveal=False)
    )


@router.post("/person/end-run")
async def end_run(request: Request) -> Response:
    account = await asyncio.to_thread(signed_in, request, "operator")
    fields = await form_of(request, account)
    console = console_of(request)
    run = await asyncio.to_thread(_run, console, fields.get("run", ""))
    if run.status != "active":
        raise ConsoleError(400, "Run already ended", f"run: this run ended already ({run.end_reason})")
    try:
        client = (await console.service.ingest()).client
        assert client is not None
        await privacy.end_run(console.db, client, run, actor=account.actor, secret=console.settings.secret)
    except (ApiError, privacy.TemporalUnavailable) as exc:
        raise ConsoleError(503, "Temporal unavailable", f"The run was not ended: {exc}. Try again.") from None
    return redirect(f"{PREFIX}/person?{_query(id=run.user_id)}")


@router.get("/person/forget")
def confirm_forget(request: Request) -> Response:
    account = signed_in(request, "operator")
    user_id = request.query_params.get("id") or ""
    if not user_id:
        raise ConsoleError(400, "Who?", "id: give a user id")
    return page(
        request, "confirm_forget.html", account, title="Forget a person", user_id=user_id,
        shown_user=data.shown_user(user_id, reveal=False),
    )


@router.post("/person/forget")
async def forget(request: Request) -> Response:
    account = await asyncio.to_thread(signed_in, request, "operator")
    fields = await form_of(request, account)
    user_id = fields.get("id", "")
    if not user_id:
        raise ConsoleError(400, "Who?", "id: the form names no user")
    console = console_of(request)
    try:
        client = (await console.service.ingest()).client
    except ApiError:
        client = None
    try:
        report = await privacy.forget(
            console.db, user_id, temporal=client, actor=account.actor, secret=console.settings.secret
        )
    except privacy.TemporalUnavailable as exc:
        raise ConsoleError(503, "Temporal unavailable", f"Nothing was forgotten: {exc}. Try again.") from None
    return page(
        request, "forgotten.html", account, title="Forgotten", shown_user=data.shown_user(user_id, reveal=False), report=report
    )


# --- messages --------------------------------------------------------------------------------------


@router.get("/messages")
def messages_page(request: Request) -> Response:
    account = signed_in(request)
    console = console_of(request)
    params = request.query_params
    journey = params.get("journey") or None
    if journey is not None and journey not in console.project.journeys:
        raise ConsoleError(400, "Bad filter", f"journey: there is no journey {journey!r}")
    channel = params.get("channel") or None
    if channel is not None and channel not in CHANNELS:
        raise ConsoleError(400, "Bad filter", f"channel: {channel!r} is not one of {', '.join(CHANNELS)}")
    status = params.get("status") or None
    if status is not None and status not in STATUSES:
        raise ConsoleError(400, "Bad filter", f"status: {status!r} is not one of {', '.join(STATUSES)}")
    since, until, _ = _range({"since": params.get("since", ""), "until": params.get("until", "")})
    before_text = params.get("before") or ""
    if before_text and not before_text.isdigit():
        raise ConsoleError(400, "Bad filter", "before: must be a message number")
    wanted = data.MessageFilter(
        journey=journey,
        channel=channel,
        status=status,
        outbox=params.get("view") == "outbox",
        since=since,
        until=until,
        before=int(before_text) if before_text else None,
    )
    rows = [_message_row(m, reveal=False) for m in data.message_log(console.db, wanted)]
    keep = {k: params.get(k) for k in ("journey", "channel", "status", "since", "until", "view")}
    more = f"{PREFIX}/messages?{_query(**keep, before=rows[-1]['id'])}" if len(rows) == data.PAGE_ROWS else ""
    return page(
        request,
        "messages.html",
        account,
        title="Messages",
        rows=rows,
        journeys=sorted(console.project.journeys),
        channels=CHANNELS,
        statuses=STATUSES,
        chosen=keep,
        more=more,
    )


STATUSES = ("sending", "sent", "skipped", "failed")


# --- errors and wiring ----------------------------------------------------------------------------


async def _on_console_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ConsoleError)
    try:
        account = await asyncio.to_thread(current, request)
    except Exception:  # the error page must not fail on a broken session
        account = None
    return page(request, "error.html", account, status=exc.status, title=exc.title, message=exc.message)


async def _on_sign_in_needed(request: Request, exc: Exception) -> Response:
    target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
    if request.method != "GET":
        target = PREFIX + "/journeys"
    return redirect(f"{PREFIX}/sign-in?{_query(next=target)}")


def _pages() -> SandboxedEnvironment:
    env = SandboxedEnvironment(
        loader=FileSystemLoader(HERE / "templates"),
        autoescape=select_autoescape(default=True, default_for_string=True),
        undefined=StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["when"] = _when
    env.filters["number"] = lambda value: f"{value:,}" if isinstance(value, int) else value
    env.filters["percent"] = lambda value: "—" if value is None else f"{value:.1%}"
    env.filters["q"] = lambda value: quote(str(value), safe="")
    return env


def _when(value: datetime | None) -> str:
    if value is None:
        return ""
    value = value if value.tzinfo else value.replace(tzinfo=UTC)
    return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M UTC")


def mount(app: FastAPI) -> None:
    """Serve the console on ``app`` (an event API built by :func:`nurture.service.api.create_app`)."""
    service: Service = app.state.nurture
    app.state.console = Console(
        service=service,
        pages=_pages(),
        secure=service.settings.public_url.startswith("https://"),
        paused=PausedJourneys(service.db),
    )
    app.include_router(router)
    app.mount(PREFIX + "/static", StaticFiles(directory=HERE / "static"), name="console-static")
    app.add_exception_handler(ConsoleError, _on_console_error)
    app.add_exception_handler(SignInNeeded, _on_sign_in_needed)
    app.add_middleware(SecurityHeaders)



def create_app(
    settings: Settings,
    *,
    project: Project | None = None,
    db: Database | None = None,
    client: Client | None = None,
) -> FastAPI:
    """The event API for ``settings`` (:func:`nurture.service.api.create_app`) with the console."""
    app = api.create_app(settings, project=project, db=db, client=client)
    mount(app)
    return app


def app_from_env() -> FastAPI:
    """ASGI factory: ``uvicorn nurture.console.app:app_from_env --factory``."""
    configure_logging()
    return create_app(Settings.from_env())
