"""Metrics and logs for the running service: Prometheus counters, JSON lines, masked addresses.

The worker counts what happens where it happens without touching the engine: the recorder the
workflow's activities write through is wrapped by :class:`InstrumentedRecorder` (sends, run
starts and ends, conversions), and a worker interceptor, :class:`ActivityMetrics`, times every
activity. Logs are JSON lines on stderr; :class:`MaskingFilter` masks every email address and
phone number in them (message, arguments, extra fields and tracebacks) with the channels' one
rule (:func:`channels.mask_in_text`), so a log line never carries a full address, and replaces
unsubscribe tokens and callback keys in URLs (uvicorn's access log) by ``***``.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
import time
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import IO, Any
from urllib.parse import quote, unquote

from prometheus_client import Counter, Gauge, Histogram
from temporalio import activity
from temporalio.worker import ActivityInboundInterceptor, ExecuteActivityInput, Interceptor

from channels import mask_in_text
from nurture.engine.model import Recorder, SendOutcome, SendRequest

log = logging.getLogger("nurture.runs")

SENDS = Counter(
    "nurture_sends",
    "Send steps by outcome: one per send step of a run (sent, skipped or failed).",
    ["journey", "channel", "status"],
)
DEFERRALS = Counter(
    "nurture_send_deferrals",
    "Marketing sends deferred: to the end of the user's quiet hours, or until a frequency cap frees.",
    ["journey", "reason"],
)
RUNS_STARTED = Counter("nurture_runs_started", "Journey runs started.", ["journey"])
RUNS_ENDED = Counter(
    "nurture_runs_ended",
    "Journey runs ended, by reason (completed, goal, exit_on, restarted or an exit step's reason).",
    ["journey", "reason"],
)
CONVERSIONS = Counter(
    "nurture_conversions",
    "Runs converted (goal events inside the window), once per experiment the run is in and its variant.",
    ["journey", "experiment", "variant"],
)
STEPS_REACHED = Counter("nurture_step_reached", "Steps reached by runs.", ["journey", "step"])
ACTIVITY_SECONDS = Histogram(
    "nurture_activity_duration_seconds",
    "Time spent in each journey activity (sends, profile reads and writes, run records).",
    ["activity", "outcome"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0),
)
JOURNEYS = Gauge(
    "nurture_journey_info",
    "The journeys this worker compiled at start-up (value 1), with their versions.",
    ["journey", "version"],
)
METRIC_NAMES = (
    "nurture_sends_total",
    "nurture_send_deferrals_total",
    "nurture_runs_started_total",
    "nurture_runs_ended_total",
    "nurture_conversions_total",
    "nurture_step_reached_total",
    "nurture_activity_duration_seconds",
    "nurture_journey_info",
)
"""The names the metrics endpoint serves, as Prometheus sees them."""


class InstrumentedRecorder:
    """A :class:`~workflows.activities.Recorder` that counts and logs, then is the wrapped one.

    Counters move only after the wrapped recorder succeeded. An activity retried after a crash
    records again (the database de-duplicates), so counts are at-least-once.
    """

    def __init__(self, inner: Recorder) -> None:
        self.inner = inner

    async def send(self, request: SendRequest, outcome: SendOutcome, then: Mapping[str, Any] | None = None) -> None:
        await self.inner.send(request, outcome, then)
        SENDS.labels(request.journey, outcome.channel, outcome.status).inc()
        if then is not None:  # the run's next record, written with the message
            (self._stepped if then["kind"] == "steps" else self._ended)(then["record"])

    async def start(self, record: Mapping[str, Any]) -> None:
        await self.inner.start(record)
        RUNS_STARTED.labels(record["journey"]).inc()
        log.info(
            "run started: %s for %s",
            record["journey"],
            record["user_id"],
            extra=_fields(record, "journey", "version", "user_id", "key", "run_id", "workflow_id"),
        )

    async def end(self, record: Mapping[str, Any]) -> None:
        await self.inner.end(record)
        self._ended(record)

    def _ended(self, record: Mapping[str, Any]) -> None:
        RUNS_ENDED.labels(record["journey"], record["reason"]).inc()
        log.info(
            "run ended: %s for %s (%s)",
            record["journey"],
            record["user_id"],
            record["reason"],
            extra=_fields(record, "journey", "user_id", "key", "run_id", "reason"),
        )

    async def conversion(self, record: Mapping[str, Any]) -> None:
        await self.inner.conversion(record)
        count_conversion(record)
        log.info(
            "conversion: %s for %s on %s",
            record["journey"],
            record["user_id"],
            record["event"],
            extra=_fields(record, "journey", "user_id", "run_id", "event", "variant"),
        )


    async def steps(self, record: Mapping[str, Any]) -> None:
        await self.inner.steps(record)
        self._stepped(record)

    @staticmethod
    def _stepped(record: Mapping[str, Any]) -> None:
        for reach in record.get("reached") or ():
            STEPS_REACHED.labels(record["journey"], reach["step_id"]).inc()


def count_conversion(record: Mapping[str, Any]) -> None:
    """One conversion (a conversion record) in the metrics: once per experiment the run is in."""
    for experiment, variant in (record.get("variants") or {"": ""}).items():
        CONVERSIONS.labels(record["journey"], experiment, variant).inc()


def _fields(record: Mapping[str, Any], *names: str) -> dict[str, Any]:
    # ``extra`` keys become LogRecord attributes; prefixing avoids clashes with built-in ones.
    return {("user" if name == "user_id" else name): record.get(name) for name in names}


class ActivityMetrics(Interceptor):
    """Worker interceptor: times every activity, counts quiet-hour deferrals of sends."""

    def intercept_activity(self, next: ActivityInboundInterceptor) -> ActivityInboundInterceptor:
        return _TimedActivity(next)


class _TimedActivity(ActivityInboundInterceptor):
    async def execute_activity(self, input: ExecuteActivityInput) -> Any:
        name = activity.info().activity_type
        started = time.perf_counter()
        outcome = "error"
        try:
            result = await super().execute_activity(input)
            outcome = "ok"
        finally:
            ACTIVITY_SECONDS.labels(name, outcome).observe(time.perf_counter() - started)
        if name == "nurture.send" and isinstance(result, dict) and result.get("defer_until"):
            request = input.args[0].get("request", {}) if input.args else {}
            DEFERRALS.labels(str(request.get("journey", "")), str(result.get("defer_reason", "quiet_hours"))).inc()
        return result


# What a URL in a log line must not show: an unsubscribe link's token (it unsubscribes its user)
# and a status callback's ``key`` (the send's idempotency key).
_URL_SECRET = re.compile(r"(/u/|[?&]key=)[^\s?&#\"'<>]+")
# A percent-encoded piece of a URL or an id (user ids are quoted inside workflow ids and paths).
_ENCODED = re.compile(r"(?:[\w.~*+()-]|%[0-9A-Fa-f]{2})*%[0-9A-Fa-f]{2}(?:[\w.~*+()-]|%[0-9A-Fa-f]{2})*")


def mask_text(text: str) -> str:
    """``text`` with link tokens and callback keys in URLs replaced by ``***``, and every email
    address and phone number masked by :func:`channels.mask_in_text`, percent-encoded ones too."""
    text = _URL_SECRET.sub(lambda match: match.group(1) + "***", text)
    return mask_in_text(_ENCODED.sub(_mask_encoded, text))


def _mask_encoded(match: re.Match[str]) -> str:
    found = match.group(0)
    plain = unquote(found)
    masked = mask_in_text(plain)
    return found if masked == plain else quote(masked, safe="*")


def mask_value(value: Any) -> Any:
    """Strings masked, containers masked recursively, anything else as is."""
    if isinstance(value, str):
        return mask_text(value)
    if isinstance(value, Mapping):
        return {key: mask_value(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [mask_value(item) for item in value]
    return value


def log_fields(logger: logging.Logger, fields: Mapping[str, Any]) -> None:
    """Log ``fields`` at INFO as ``name=<json>`` pairs, and as the record's ``nurture`` extra.

    Masked here, once, as :class:`MaskingFilter` would mask them: the filter then passes the
    record as it is, instead of masking the message and every field again (the event API logs
    each call this way; masking twice was a tenth of a quiet call's CPU)."""
    if not logger.isEnabledFor(logging.INFO):
        return
    masked = {name: mask_value(value) for name, value in fields.items()}
    message = " ".join(f"{name}={json.dumps(value)}" for name, value in masked.items())
    logger.info(message, extra={"nurture": masked, "_nurture_masked": True})


_STANDARD = frozenset(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {"message", "asctime"}
_SKIPPED = frozenset({"temporal_log", "color_message"})
"""Extras never written: Core's raw log object (its fields are in the message already) and
uvicorn's ANSI-coloured duplicate of the message."""


class MaskingFilter(logging.Filter):
    """Masks email addresses, phone numbers and URL secrets in a record before any handler formats it.

    The message is formatted with its arguments first, so an address inside a dict or an
    exception passed as an argument is masked too; string extras and tracebacks are masked.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "_nurture_masked", False):
            return True
        record.msg = mask_text(record.getMessage())
        record.args = None
        for name, value in list(record.__dict__.items()):
            if name not in _STANDARD and name not in _SKIPPED:
                setattr(record, name, mask_value(value))
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = mask_text(record.exc_text)
        if record.stack_info:
            record.stack_info = mask_text(record.stack_info)
        record._nurture_masked = True
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, then the record's extra fields."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for name, value in record.__dict__.items():
            if name not in _STANDARD and name not in _SKIPPED and not name.startswith("_"):
                line.setdefault(name, value)
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            line["exception"] = record.exc_text
        if record.stack_info:
            line["stack"] = record.stack_info
        return json.dumps(line, ensure_ascii=False, default=str)


TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s %(message)s"


def configure_logging(
    *,
    level: str | None = None,
    format: str | None = None,
    stream: IO[str] | None = None,
    env: Mapping[str, str] | None = None,
) -> logging.Handler:
    """Send every log record (and every warning) to ``stream`` (stderr) as masked JSON lines.

    ``NURTURE_LOG_LEVEL`` (default ``INFO``) and ``NURTURE_LOG_FORMAT`` (``json``, the default,
    or ``text``) apply unless given here. Addresses are masked in both formats. Calling it again
    replaces the handler it installed before; the handler is returned.
    """
    env = os.environ if env is None else env
    level = (level or env.get("NURTURE_LOG_LEVEL") or "INFO").upper()
    format = (format or env.get("NURTURE_LOG_FORMAT") or "json").lower()
    if format not in ("json", "text"):
        from .settings import SettingsError

        raise SettingsError(f"NURTURE_LOG_FORMAT must be 'json' or 'text', got {format!r}")
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.addFilter(MaskingFilter())
    handler.setFormatter(JsonFormatter() if format == "json" else logging.Formatter(TEXT_FORMAT))
    handler.set_name("nurture")
    root = logging.getLogger()
    for existing in list(root.handlers):
        if existing.get_name() == "nurture":
            root.removeHandler(existing)
    root.addHandler(handler)
    root.setLevel(level)
    logging.captureWarnings(True)  # warnings.warn output becomes JSON lines too ("py.warnings")
    for name in UVICORN_LOGGERS:
        # The uvicorn CLI gives its loggers their own plain handlers (access lines carry client
        # addresses and query strings): send them through ours, masked, instead.
        logger = logging.getLogger(name)
        for existing in list(logger.handlers):
            logger.removeHandler(existing)
        logger.propagate = True
    return handler


UVICORN_LOGGERS = ("uvicorn", "uvicorn.error", "uvicorn.access")
