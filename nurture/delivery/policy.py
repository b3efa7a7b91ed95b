"""The delivery policy at send time: channel order for ``send: auto`` and frequency caps.

Pure functions of the send, the profile, the time and the user's recent sends, so the simulator,
the scenario runner and the service decide alike. Caps count marketing messages in the user's own
calendar: ``per_day`` the local calendar day, ``per_week`` the seven local calendar days ending
today. Transactional sends are never counted or held.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from datetime import date, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

from nurture.engine.clock import local_instant
from nurture.language.ir import Cap, Policy

WEEK_DAYS = 7


def channel_order(channels: tuple[str, ...], policy: Policy, traits: dict[str, Any] | Any) -> tuple[str, ...]:
    """The channels a send tries, in order: the step's own, or for ``auto`` (no channels) the
    user's ``preferred_channel`` when it is in the channel order, then the rest of the order."""
    if channels:
        return channels
    preferred = traits.get("preferred_channel")
    order = policy.channel_order
    if isinstance(preferred, str) and preferred in order:
        return (preferred, *(channel for channel in order if channel != preferred))
    return order


def history_start(now: datetime, tz: ZoneInfo) -> datetime:
    """The earliest send a cap can count at ``now``: local midnight six days before today."""
    return local_instant(now.astimezone(tz).date() - timedelta(days=WEEK_DAYS - 1), 0, tz)


def cap_free_at(
    now: datetime,
    tz: ZoneInfo,
    caps: Sequence[Cap],
    sent: Sequence[tuple[datetime, str]],
    channel: str,
) -> datetime | None:
    """``None`` when a marketing send on ``channel`` at ``now`` stays within every cap that
    applies to it; otherwise the first local midnight from which it would.

    ``sent`` holds the user's marketing sends as ``(instant, channel)``.
    """
    relevant = [cap for cap in caps if cap.scope in ("all", channel)]
    if not relevant:
        return None
    counts = {
        cap.scope: Counter(at.astimezone(tz).date() for at, used in sent if cap.scope in ("all", used))
        for cap in relevant
    }
    today = now.astimezone(tz).date()
    for offset in range(WEEK_DAYS + 1):
        day = today + timedelta(days=offset)
        if all(_within(cap, counts[cap.scope], day) for cap in relevant):
            return None if offset == 0 else local_instant(day, 0, tz)
    raise AssertionError("a week after the last counted send every cap is free")  # pragma: no cover


def _within(cap: Cap, per_day: Counter[date], day: date) -> bool:
    if cap.per_day is not None and per_day[day] >= cap.per_day:
        return False
    if cap.per_week is not None:
        week = sum(per_day[day - timedelta(days=back)] for back in range(WEEK_DAYS))
        if week >= cap.per_week:
            return False
    return True
