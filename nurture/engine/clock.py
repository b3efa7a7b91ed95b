"""Local-time arithmetic in the user's zone: next ``wait_until`` instant and quiet hours.

All instants are timezone-aware UTC datetimes. Local wall times that do not exist (the hour
skipped when clocks go forward) move forward by the gap; wall times that happen twice (clocks
go back) take the first occurrence. Both rules are what a person expects of "at 02:30".
"""

from __future__ import annotations

import functools
import re
from datetime import UTC, date, datetime, time, timedelta
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from nurture.language.ir import QuietHours


@functools.lru_cache(maxsize=512)
def zone(name: str | None, default: str = "UTC") -> ZoneInfo:
    """The user's zone, else ``default``; an unknown user zone also falls back to ``default``."""
    if name:
        try:
            return ZoneInfo(name)
        except (ZoneInfoNotFoundError, ValueError, OSError):  # a folder ("Europe"), a bad path
            pass
    return ZoneInfo(default)


def local_instant(day: date, minute: int, tz: ZoneInfo, *, fold: int = 0) -> datetime:
    """The UTC instant of ``day`` at ``minute`` after local midnight in ``tz``.

    A wall time inside a forward gap resolves with the offset before the gap, which lands after
    the gap once normalised; ``fold=1`` picks the second occurrence of a repeated wall time.
    """
    wall = datetime.combine(day, time(minute // 60, minute % 60, fold=fold), tzinfo=tz)
    return wall.astimezone(UTC)


def next_local_time(now: datetime, minute: int, days: tuple[int, ...], tz: ZoneInfo) -> datetime:
    """The first instant strictly after ``now`` that is ``minute`` local time on an allowed day."""
    local_today = now.astimezone(tz).date()
    for offset in range(0, 15):
        day = local_today + timedelta(days=offset)
        if days and day.weekday() not in days:
            continue
        candidate = local_instant(day, minute, tz)
        if candidate > now:
            return candidate
    raise ValueError("no allowed weekday within two weeks")  # unreachable: days is non-empty


_DAY = re.compile(r"^(\d{4})-(\d{2})-(\d{2})$")
_LEAP_DAY = re.compile(r"^(\d{4})-02-29(?=$|[T ])")


def read_date(value: Any) -> date | datetime | None:
    """A date a person or an event carries: ISO-8601 text, a calendar day or a date-time.

    ``2026-03-15`` is a calendar day; ``2026-03-15T09:30:00Z`` (or with an offset) an instant;
    ``2026-03-15T09:30:00`` a wall time in the person's zone. 29 February of a year without one
    is read as 28 February (a birthday on the 29th is kept on the last day of February). Anything
    else (no value, a number, text in another form, a day that does not exist) is ``None``.
    """
    if not isinstance(value, str):
        return None
    text = value.strip()
    leap = _LEAP_DAY.match(text)
    if leap is not None and not _is_leap(int(leap.group(1))):
        text = f"{leap.group(1)}-02-28{text[leap.end():]}"
    try:
        if _DAY.match(text):
            return date.fromisoformat(text)
        if len(text) < 11:  # a date-time needs a time after the day
            return None
        return datetime.fromisoformat(text.replace("z", "Z").replace("Z", "+00:00"))
    except ValueError:
        return None


def _is_leap(year: int) -> bool:
    return year % 4 == 0 and (year % 100 != 0 or year % 400 == 0)


def in_year(value: date | datetime, year: int) -> date | datetime:
    """The same day (and time) in ``year``; 29 February becomes 28 February in a common year."""
    if value.month == 2 and value.day == 29 and not _is_leap(year):
        return value.replace(year=year, day=28)
    return value.replace(year=year)


def date_instant(value: date | datetime, *, offset: int, minute: int | None, tz: ZoneInfo) -> datetime | None:
    """The instant of a date moved by ``offset`` seconds and set to ``minute`` local time.

    The offset moves the local wall clock (``-3d`` keeps the time of day across a daylight-saving
    change); ``minute`` then replaces the time of day on the day reached. A calendar day starts at
    local midnight, and a date-time without an offset is local time. ``None`` when the result
    falls outside the calendar (year 1 to 9999).
    """
    try:
        if isinstance(value, datetime) and value.tzinfo is not None and offset == 0 and minute is None:
            return value.astimezone(UTC)
        if isinstance(value, datetime):
            wall = value.astimezone(tz).replace(tzinfo=None) if value.tzinfo is not None else value
        else:
            wall = datetime.combine(value, time())
        wall += timedelta(seconds=offset)
        if minute is not None:
            wall = datetime.combine(wall.date(), time(minute // 60, minute % 60))
        return wall.replace(tzinfo=tz).astimezone(UTC)
    except OverflowError:
        return None


def in_quiet_hours(now: datetime, quiet: QuietHours, tz: ZoneInfo) -> datetime | None:
    """When ``now`` is inside the quiet window, the instant it ends; otherwise ``None``."""
    local = now.astimezone(tz)
    minute = local.hour * 60 + local.minute
    start, end = quiet.start, quiet.end
    if start < end:
        inside = start <= minute < end
        end_day = local.date()
    else:  # wraps midnight, e.g. 21:00-08:00
        inside = minute >= start or minute < end
        end_day = local.date() + timedelta(days=1) if minute >= start else local.date()
    if not inside:
        return None
    first = local_instant(end_day, end, tz)
    # Inside the repeated hour after clocks go back, the end's first occurrence may be past.
    return first if first > now else local_instant(end_day, end, tz, fold=1)


def parse_instant(text: str) -> datetime:
    """An ISO-8601 timestamp as an aware UTC datetime (naive means UTC)."""
    value = datetime.fromisoformat(text.replace("Z", "+00:00"))
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return value.astimezone(UTC)


def format_instant(value: datetime) -> str:
    return value.astimezone(UTC).isoformat().replace("+00:00", "Z")
