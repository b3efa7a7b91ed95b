"""What the HTTP and SMTP adapters share: reading ``Retry-After``, logging a refusal, and telling a
transport failure before the request was written from one after it (``maybe_sent``).

Private to :mod:`channels`; :func:`channels.mask_in_text` is the public helper for free text.
"""

from __future__ import annotations

import http.client
import logging
import math
import socket
from collections.abc import Iterator, Mapping
from datetime import UTC, datetime
from email.message import Message
from email.utils import parsedate_to_datetime

from channels import DeliveryError, Envelope, TransientError, mask_address

__all__ = [
    "Headers",
    "exception_chain",
    "header",
    "log_failure",
    "parse_retry_after",
    "request_written",
    "retry_after",
    "transport_failure",
]

Headers = Mapping[str, str] | Message
"""Response headers: a mapping (``requests`` and ``httpx`` headers are ones), or the
``http.client`` message urllib hands over."""

# Failures that mean the request never got to the provider, whatever else is in the chain.
_UNSENT: tuple[type[BaseException], ...] = (ConnectionRefusedError, socket.gaierror)
# Failures while waiting for the answer: the whole request had been written. A reset is counted
# here too: it usually arrives while reading, and mistaking one during the write for "maybe sent"
# costs a reconciliation, while the opposite mistake costs a duplicate message.
_WRITTEN: tuple[type[BaseException], ...] = (
    ConnectionResetError,  # includes http.client.RemoteDisconnected
    http.client.BadStatusLine,
    http.client.IncompleteRead,
)


def header(headers: Headers | None, name: str) -> str | None:
    """The value of header ``name`` (any case), or ``None``."""
    if headers is None:
        return None
    if isinstance(headers, Message):
        value = headers.get(name)
        return str(value) if value is not None else None
    lowered = name.lower()
    return next((str(value) for key, value in headers.items() if key.lower() == lowered), None)


def parse_retry_after(value: str | None, *, now: datetime | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` value: delay seconds or an HTTP date (RFC 9110
    §10.2.3); ``None`` when absent or unreadable. A date in the past means "now" (0)."""
    value = (value or "").strip()
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        pass
    else:
        # float() also reads "nan" and "inf", which no scheduler can wait for.
        return max(seconds, 0.0) if math.isfinite(seconds) else None
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:  # HTTP dates are GMT; "-0000" parses as naive
        when = when.replace(tzinfo=UTC)
    return max((when - (now or datetime.now(UTC))).total_seconds(), 0.0)


def retry_after(headers: Headers | None) -> float | None:
    """Seconds from the ``Retry-After`` header of ``headers``, if it has a readable one."""
    return parse_retry_after(header(headers, "Retry-After"))


def log_failure(logger: logging.Logger, provider: str, failure: DeliveryError, envelope: Envelope) -> None:
    """Log a send ``provider`` did not confirm: a warning for a transient failure (someone may
    have to act if it lasts), info for a permanent one (the journey falls back on its own)."""
    level = logging.WARNING if isinstance(failure, TransientError) else logging.INFO
    verb = "may have taken" if isinstance(failure, TransientError) and failure.maybe_sent else "did not take"
    logger.log(
        level,
        "%s %s %s for %s: %s",
        provider,
        verb,
        envelope.idempotency_key,
        mask_address(envelope.address),
        failure,
    )


def exception_chain(error: BaseException) -> Iterator[BaseException]:
    """``error`` and every exception it wraps, depth first (see :func:`_wrapped`)."""
    seen: set[int] = set()
    stack = [error]
    while stack:
        current = stack.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        yield current
        stack.extend(reversed(_wrapped(current)))


def _wrapped(error: BaseException) -> list[BaseException]:
    """The exceptions ``error`` wraps, innermost line first: those held in ``reason`` or
    ``args`` (where urllib, urllib3 and requests keep the failure they wrap), then its explicit
    cause, or the exception being handled when it was raised unless that was suppressed."""
    linked: list[BaseException] = []
    reason = getattr(error, "reason", None)
    if isinstance(reason, BaseException):
        linked.append(reason)
    linked.extend(arg for arg in error.args if isinstance(arg, BaseException) and arg is not reason)
    if error.__cause__ is not None:
        linked.append(error.__cause__)
    elif error.__context__ is not None and not error.__suppress_context__:
        linked.append(error.__context__)
    return linked


def _innermost(error: BaseException) -> BaseException:
    """The failure at the bottom of ``error``'s main line of wrapping."""
    seen = {id(error)}
    while (inner := next((e for e in _wrapped(error) if id(e) not in seen), None)) is not None:
        seen.add(id(inner))
        error = inner
    return error


def request_written(
    error: BaseException,
    *,
    unsent: tuple[type[BaseException], ...] = (),
    written: tuple[type[BaseException], ...] = (),
) -> bool:
    """Whether a transport failure came after the whole request had been written, so the
    provider may have acted on it.

    ``unsent``/``written`` add the client library's own markers of either phase (a connect
    timeout, urllib's wrapper around send-phase errors; a read timeout) to the standard
    library's (refused, unknown host; reset, disconnected before the status line). A marker of
    the unsent phase anywhere in the chain wins; with no marker at all the answer is ``False``.
    """
    chain = list(exception_chain(error))
    if any(isinstance(link, _UNSENT + unsent) for link in chain):
        return False
    return any(isinstance(link, _WRITTEN + written) for link in chain)


def transport_failure(
    error: BaseException,
    *,
    peer: str,
    timeout: float,
    sent: bool,
    timeouts: tuple[type[BaseException], ...] = (),
) -> TransientError:
    """The :class:`TransientError` for a request to ``peer`` that got no answer: ``timeout``
    when a timeout (the built-in one, or one of ``timeouts``) is in the chain, else
    ``connection``; ``maybe_sent`` is ``sent``. The detail names the innermost failure, not the
    URL (some carry credentials in their query)."""
    chain = list(exception_chain(error))
    root = _innermost(error)
    cause = f"{type(root).__name__}: {root}" if str(root) else type(root).__name__
    when = " after the request was sent" if sent else ""
    if any(isinstance(link, (TimeoutError, *timeouts)) for link in chain):
        return TransientError("timeout", f"no answer from {peer} within {timeout}s{when}", maybe_sent=sent)
    where = f"connection to {peer} lost{when}" if sent else peer
    return TransientError("connection", f"{where}: {cause}", maybe_sent=sent)
