"""Local-time arithmetic: the next ``wait_until`` instant, quiet hours, zones and instants."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from zoneinfo import ZoneInfo

import pytest

from nurture.engine.clock import format_instant, in_quiet_hours, next_local_time, parse_instant, zone
from nurture.language.ir import QuietHours

SHANGHAI = ZoneInfo("Asia/Shanghai")
NEW_YORK = ZoneInfo("America/New_York")
BERLIN = ZoneInfo("Europe/Berlin")
EVENING = QuietHours(start=21 * 60, end=8 * 60)
"""21:00-08:00, wrapping midnight."""
LUNCH = QuietHours(start=12 * 60, end=14 * 60)
WEEKDAYS = (0, 1, 2, 3, 4)


def local(text: str, tz: ZoneInfo) -> datetime:
    """A wall time in ``tz`` as a UTC instant (first occurrence when ambiguous)."""
    return datetime.fromisoformat(text).replace(tzinfo=tz).astimezone(UTC)


def utc(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).astimezone(UTC)


# --- next_local_time -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("now", "minute", "days", "expected"),
    [
        ("2026-03-02T09:00", 10 * 60, (), "2026-03-02T10:00"),
        ("2026-03-02T10:00", 10 * 60, (), "2026-03-03T10:00"),  # strictly after now
        ("2026-03-02T23:59", 0, (), "2026-03-03T00:00"),
        ("2026-03-06T11:00", 10 * 60, WEEKDAYS, "2026-03-09T10:00"),  # Friday -> Monday
        ("2026-03-07T09:00", 10 * 60, WEEKDAYS, "2026-03-09T10:00"),  # Saturday -> Monday
        ("2026-03-06T09:00", 10 * 60, WEEKDAYS, "2026-03-06T10:00"),
        ("2026-03-02T10:00", 10 * 60, (0,), "2026-03-09T10:00"),  # Monday only, a week on
        ("2026-03-02T18:30", 18 * 60 + 45, (6,), "2026-03-08T18:45"),
    ],
)
def test_next_local_time(now: str, minute: int, days: tuple[int, ...], expected: str) -> None:
    assert next_local_time(local(now, SHANGHAI), minute, days, SHANGHAI) == local(expected, SHANGHAI)


def test_next_local_time_uses_the_local_date_not_the_utc_date() -> None:
    # 2026-03-02T20:00Z is already Tuesday 04:00 in Shanghai: Tuesday 09:00 is next, not Monday's.
    now = utc("2026-03-02T20:00:00Z")
    assert next_local_time(now, 9 * 60, (), SHANGHAI) == local("2026-03-03T09:00", SHANGHAI)
    assert next_local_time(now, 9 * 60, (1,), SHANGHAI) == local("2026-03-03T09:00", SHANGHAI)
    assert next_local_time(now, 9 * 60, (0,), SHANGHAI) == local("2026-03-09T09:00", SHANGHAI)


@pytest.mark.parametrize(
    ("tz", "now", "minute", "expected"),
    [
        # 2026-03-08: New York skips 02:00-03:00; 02:30 moves forward by the gap to 03:30 EDT.
        (NEW_YORK, "2026-03-07T12:00:00Z", 2 * 60 + 30, "2026-03-08T07:30:00Z"),
        (NEW_YORK, "2026-03-08T07:00:00Z", 2 * 60 + 30, "2026-03-08T07:30:00Z"),  # 03:00 EDT
        (NEW_YORK, "2026-03-08T07:30:00Z", 2 * 60 + 30, "2026-03-09T06:30:00Z"),
        # 2026-11-01: 01:00-02:00 happens twice; the first (EDT) occurrence is taken.
        (NEW_YORK, "2026-10-31T12:00:00Z", 90, "2026-11-01T05:30:00Z"),
        (NEW_YORK, "2026-11-01T05:45:00Z", 90, "2026-11-02T06:30:00Z"),  # past the first: tomorrow
        # Berlin: forward on 2026-03-29 (02:00 -> 03:00), back on 2026-10-25 (03:00 -> 02:00).
        (BERLIN, "2026-03-28T12:00:00Z", 2 * 60 + 30, "2026-03-29T01:30:00Z"),
        (BERLIN, "2026-03-28T12:00:00Z", 10 * 60, "2026-03-29T08:00:00Z"),
        (BERLIN, "2026-10-24T12:00:00Z", 2 * 60 + 30, "2026-10-25T00:30:00Z"),
        (BERLIN, "2026-10-24T12:00:00Z", 10 * 60, "2026-10-25T09:00:00Z"),
    ],
)
def test_next_local_time_across_daylight_saving(tz: ZoneInfo, now: str, minute: int, expected: str) -> None:
    assert next_local_time(utc(now), minute, (), tz) == utc(expected)


def test_next_local_time_returns_an_aware_utc_instant() -> None:
    result = next_local_time(utc("2026-03-02T00:00:00Z"), 10 * 60, (), NEW_YORK)
    assert result.utcoffset() == timedelta(0)
    assert result == utc("2026-03-02T15:00:00Z")


# --- in_quiet_hours ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("now", "ends"),
    [
        ("2026-03-02T20:59", None),
        ("2026-03-02T21:00", "2026-03-03T08:00"),  # quiet from 21:00 to the next morning
        ("2026-03-02T23:59", "2026-03-03T08:00"),
        ("2026-03-03T00:00", "2026-03-03T08:00"),
        ("2026-03-03T07:59", "2026-03-03T08:00"),  # after midnight: ends the same day
        ("2026-03-03T08:00", None),
        ("2026-03-03T12:00", None),
    ],
)
def test_quiet_hours_wrapping_midnight(now: str, ends: str | None) -> None:
    expected = None if ends is None else local(ends, SHANGHAI)
    assert in_quiet_hours(local(now, SHANGHAI), EVENING, SHANGHAI) == expected


@pytest.mark.parametrize(
    ("now", "ends"),
    [
        ("2026-03-02T11:59", None),
        ("2026-03-02T12:00", "2026-03-02T14:00"),
        ("2026-03-02T13:59", "2026-03-02T14:00"),
        ("2026-03-02T14:00", None),
        ("2026-03-02T23:00", None),
        ("2026-03-02T01:00", None),
    ],
)
def test_quiet_hours_not_wrapping(now: str, ends: str | None) -> None:
    expected = None if ends is None else local(ends, SHANGHAI)
    assert in_quiet_hours(local(now, SHANGHAI), LUNCH, SHANGHAI) == expected


def test_quiet_hours_are_read_in_the_given_zone() -> None:
    now = utc("2026-03-02T14:00:00Z")  # 22:00 in Shanghai, 09:00 in New York

    assert in_quiet_hours(now, EVENING, SHANGHAI) == utc("2026-03-03T00:00:00Z")  # 08:00 +08:00
    assert in_quiet_hours(now, EVENING, NEW_YORK) is None
    later = utc("2026-03-03T02:30:00Z")  # 10:30 in Shanghai, 21:30 in New York
    assert in_quiet_hours(later, EVENING, SHANGHAI) is None
    assert in_quiet_hours(later, EVENING, NEW_YORK) == utc("2026-03-03T13:00:00Z")  # 08:00 EST


@pytest.mark.parametrize(
    ("tz", "now", "ends"),
    [
        # The night before New York springs forward ends at 08:00 EDT, an hour earlier in UTC...
        (NEW_YORK, "2026-03-07T03:00:00Z", "2026-03-07T13:00:00Z"),  # Fri 22:00 EST -> Sat 08:00 EST
        (NEW_YORK, "2026-03-08T03:00:00Z", "2026-03-08T12:00:00Z"),  # Sat 22:00 EST -> Sun 08:00 EDT
        # ... and the night it falls back ends at 08:00 EST, an hour later in UTC.
        (NEW_YORK, "2026-10-31T02:00:00Z", "2026-10-31T12:00:00Z"),  # Fri 22:00 EDT -> Sat 08:00 EDT
        (NEW_YORK, "2026-11-01T02:00:00Z", "2026-11-01T13:00:00Z"),  # Sat 22:00 EDT -> Sun 08:00 EST
        (BERLIN, "2026-03-28T21:00:00Z", "2026-03-29T06:00:00Z"),  # Sat 22:00 CET -> Sun 08:00 CEST
        (BERLIN, "2026-10-24T20:00:00Z", "2026-10-25T07:00:00Z"),  # Sat 22:00 CEST -> Sun 08:00 CET
    ],
)
def test_quiet_hours_end_at_local_eight_across_daylight_saving(tz: ZoneInfo, now: str, ends: str) -> None:
    result = in_quiet_hours(utc(now), EVENING, tz)
    assert result == utc(ends)
    assert result is not None and result.astimezone(tz).hour == 8


def test_quiet_hours_inside_the_repeated_hour() -> None:
    # 01:30 EST on 2026-11-01 (the second 01:30) is still quiet and ends at 08:00 EST that day.
    assert in_quiet_hours(utc("2026-11-01T06:30:00Z"), EVENING, NEW_YORK) == utc("2026-11-01T13:00:00Z")


@pytest.mark.parametrize(
    "quiet",
    [QuietHours(start=21 * 60, end=90), QuietHours(start=0, end=90)],
    ids=["21:00-01:30", "00:00-01:30"],
)
def test_a_quiet_window_ending_in_the_repeated_hour_ends_after_now(quiet: QuietHours) -> None:
    # 06:15Z on 2026-11-01 is 01:15 EST, the second 01:15 of the night in New York: the user's
    # clock is inside the window and reaches 01:30 at 06:30Z. The first 01:30 (05:30Z) is
    # already past; deferring to it would send the run into a deferral loop at the same instant.
    now = utc("2026-11-01T06:15:00Z")
    ends = in_quiet_hours(now, quiet, NEW_YORK)
    assert ends is not None
    assert ends > now
    assert ends == utc("2026-11-01T06:30:00Z")


# --- zone ----------------------------------------------------------------------------------------


def test_zone_prefers_the_user_zone() -> None:
    assert zone("America/New_York", "Asia/Shanghai") == NEW_YORK


@pytest.mark.parametrize(
    "name", [None, "", "Mars/Olympus_Mons", "not a zone", "../etc/passwd", "/etc/localtime"]
)
def test_zone_falls_back_for_a_missing_or_unknown_user_zone(name: str | None) -> None:
    assert zone(name, "Asia/Shanghai") == SHANGHAI


@pytest.mark.parametrize("name", ["America", "Europe", "Etc", "x" * 300])
def test_zone_falls_back_for_a_region_or_overlong_name(name: str) -> None:
    # Profiles do carry values like "Europe"; they are invalid zones like any other and must
    # fall back, not raise (IsADirectoryError / OSError from the zone database lookup).
    assert zone(name, "Asia/Shanghai") == SHANGHAI


def test_zone_defaults_to_utc() -> None:
    assert zone(None) == ZoneInfo("UTC")
    assert zone("Nowhere/Special") == ZoneInfo("UTC")


# --- instants ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2026-03-02T10:00:00Z", datetime(2026, 3, 2, 10, 0, tzinfo=UTC)),
        ("2026-03-02T10:00:00+08:00", datetime(2026, 3, 2, 2, 0, tzinfo=UTC)),
        ("2026-03-02T10:00:00", datetime(2026, 3, 2, 10, 0, tzinfo=UTC)),  # naive means UTC
        ("2026-03-01T22:30:00-05:00", datetime(2026, 3, 2, 3, 30, tzinfo=UTC)),
        ("2026-03-02T10:00:00.250Z", datetime(2026, 3, 2, 10, 0, 0, 250_000, tzinfo=UTC)),
    ],
)
def test_parse_instant(text: str, expected: datetime) -> None:
    parsed = parse_instant(text)
    assert parsed == expected
    assert parsed.utcoffset() == timedelta(0)


def test_format_instant_is_utc_with_a_z() -> None:
    shanghai_ten = datetime(2026, 3, 2, 10, 0, tzinfo=timezone(timedelta(hours=8)))
    assert format_instant(shanghai_ten) == "2026-03-02T02:00:00Z"
    assert format_instant(datetime(2026, 3, 2, 10, 0, tzinfo=UTC)) == "2026-03-02T10:00:00Z"


@pytest.mark.parametrize(
    "instant",
    [
        datetime(2026, 3, 2, 10, 0, tzinfo=UTC),
        datetime(2026, 11, 1, 5, 30, 15, 123456, tzinfo=UTC),
        datetime(2026, 3, 8, 3, 30, tzinfo=NEW_YORK),
    ],
)
def test_instants_round_trip(instant: datetime) -> None:
    assert parse_instant(format_instant(instant)) == instant
