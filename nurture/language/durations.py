"""Durations as marketers write them: ``30m``, ``1d12h``, ``2w``."""

from __future__ import annotations

import re

UNITS: dict[str, int] = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
_PART = re.compile(r"(\d+)([smhdw])")
_WHOLE = re.compile(r"^(?:\d+[smhdw])+$")


class DurationError(ValueError):
    """A duration string that cannot be read; the message says what is accepted."""


def parse_duration(text: str) -> int:
    """Seconds in ``text``; units s m h d w, combinable, at least one second."""
    compact = text.strip().replace(" ", "")
    if not _WHOLE.match(compact):
        raise DurationError(
            f"'{text}' is not a duration: use a number and a unit (s, m, h, d, w), "
            "combinable, e.g. 30m, 1d12h"
        )
    seconds = sum(int(n) * UNITS[u] for n, u in _PART.findall(compact))
    if seconds < 1:
        raise DurationError(f"'{text}' is too short: a duration is at least 1s")
    return seconds


def format_duration(seconds: int) -> str:
    """``seconds`` in days, hours, minutes and seconds: 93600 -> ``1d2h``, 2592000 -> ``30d``.

    For a duration nobody wrote (how long after the start an outcome happened). One a marketer
    wrote is shown as written, which is the only way ``2w`` stays ``2w`` and ``30d`` stays
    ``30d``; so weeks, which people rarely count in past two, are never chosen here.
    """
    if seconds <= 0:
        return "0s"
    out = []
    for unit in ("d", "h", "m", "s"):
        size = UNITS[unit]
        if seconds >= size:
            out.append(f"{seconds // size}{unit}")
            seconds %= size
    return "".join(out)


def parse_duration_range(text: str) -> tuple[int, int]:
    """The bounds in seconds of a range such as ``0..2h`` or ``30m..1h``; the low end may be 0."""
    low, separator, high = text.partition("..")
    if not separator:
        raise DurationError(f"'{text}' is not a range: write two durations with '..' between them, e.g. 0..2h")
    start = 0 if low.strip() in ("0", "0s") else parse_duration(low)
    end = parse_duration(high)
    if end <= start:
        raise DurationError(f"'{text}' is an empty range: the second duration must be longer than the first")
    return start, end


def parse_signed_duration(text: str) -> int:
    """Seconds in a duration with an optional sign: ``-3d`` (before), ``+12h`` or ``12h`` (after)."""
    compact = text.strip()
    sign = -1 if compact.startswith("-") else 1
    body = compact[1:] if compact[:1] in ("-", "+") else compact
    if body.strip() in ("0", "0s"):
        return 0
    try:
        return sign * parse_duration(body)
    except DurationError:
        raise DurationError(
            f"'{text}' is not an offset: a duration with an optional sign, e.g. -3d (before) or 12h (after)"
        ) from None


def parse_rate(text: str) -> tuple[int, int]:
    """``(count, seconds)`` of a send rate such as ``1000/h``, ``50/m`` or ``500/30m``."""
    count, separator, period = text.partition("/")
    problem = (
        f"'{text}' is not a rate: write how many sends per unit of time, e.g. 1000/h, 50/m or 500/30m"
    )
    if not separator or not count.strip().isdigit():
        raise DurationError(problem)
    period = period.strip()
    try:
        seconds = UNITS[period] if period in UNITS else parse_duration(period)
    except DurationError:
        raise DurationError(problem) from None
    if int(count) < 1:
        raise DurationError(f"'{text}' allows no sends at all: the count is at least 1")
    return int(count), seconds
