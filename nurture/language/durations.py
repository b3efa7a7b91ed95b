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
