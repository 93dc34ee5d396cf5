"""Window maths: durations, calendar windows in a timezone, and the window a given instant falls in.

Redis `TIME` is the one clock (DESIGN §6), but Lua has no timezone rules, so the caller computes the
candidate calendar boundaries here and the script picks among them with `window_at`'s rule.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from datetime import date, datetime, time, timedelta
from typing import Literal, get_args
from zoneinfo import ZoneInfo

__all__ = [
    "Bounds",
    "Period",
    "PeriodKind",
    "calendar_bounds",
    "duration_window",
    "parse_duration",
    "parse_period",
    "window_at",
]

PeriodKind = Literal["month", "week", "day", "billing_cycle", "duration"]
CalendarKind = Literal["month", "week", "day", "billing_cycle"]
Bounds = tuple[int, int, int, int]
"""(prev_start, cur_start, next_start, next_end) in integer Unix seconds."""

_CALENDAR_KINDS: dict[str, CalendarKind] = {kind: kind for kind in get_args(CalendarKind)}
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
# ASCII digits only: `\d` would let int() accept other scripts' digits.
_DURATION = re.compile(r"([0-9]+)([smhdw])")
MAX_DURATION = 100 * 366 * 86400  # a century: every window in ms stays far below 2^53
_NOMINAL_SECONDS = {"month": 2592000, "billing_cycle": 2592000, "week": 604800, "day": 86400}


def parse_duration(text: str) -> int:
    """`"10s"`, `"15m"`, `"1h"`, `"30d"`, `"2w"` → seconds (always > 0)."""
    match = _DURATION.fullmatch(text)
    if match is None:
        raise ValueError(f'unknown duration "{text}": use a number and a unit (s, m, h, d, w), e.g. "7d"')
    digits = match.group(1).lstrip("0")
    seconds = int(digits or "0") * _UNIT_SECONDS[match.group(2)] if len(digits) <= 12 else MAX_DURATION + 1
    if seconds <= 0:
        raise ValueError(f'duration "{text}" is empty: use a number above 0, e.g. "7d"')
    if seconds > MAX_DURATION:
        raise ValueError(f'duration "{text}" is over a century: use at most {MAX_DURATION // 86400}d')
    return seconds


@dataclass(frozen=True, slots=True)
class Period:
    """What a limit's `per` or a plan's `credits_per` means."""

    kind: PeriodKind
    seconds: int
    """The duration's length for kind == "duration"; 0 otherwise."""
    text: str
    """What the catalog said, e.g. "month" or "30d"."""

    def __post_init__(self) -> None:
        if (self.kind == "duration") != (self.seconds > 0):
            raise ValueError(f"a {self.kind} period cannot have seconds={self.seconds}")

    @property
    def nominal_seconds(self) -> int:
        """The window length of the spec: a duration's own; decide.lua answers a calendar window's true length."""
        if self.kind == "duration":
            return self.seconds
        return _NOMINAL_SECONDS[self.kind]

    @property
    def is_calendar(self) -> bool:
        """Whether windows follow the calendar (billing_cycle falls back to a calendar month)."""
        return self.kind != "duration"


def parse_period(text: str) -> Period:
    """`"month"`, `"week"`, `"day"`, `"billing_cycle"` or a duration → Period."""
    calendar = _CALENDAR_KINDS.get(text)
    if calendar is not None:
        return Period(kind=calendar, seconds=0, text=text)
    if _DURATION.fullmatch(text) is None:
        raise ValueError(
            f'unknown period "{text}": use month, week, day, billing_cycle or a duration like "30d"'
        )
    return Period(kind="duration", seconds=parse_duration(text), text=text)


def duration_window(seconds: int, now: float) -> tuple[int, int]:
    """The epoch-aligned window [start, end) of length `seconds` that contains `now`."""
    if seconds <= 0:
        raise ValueError(f"a window must be longer than 0 seconds, not {seconds}")
    start = math.floor(now) // seconds * seconds
    return start, start + seconds


def window_at(bounds: Bounds, now: float) -> tuple[int, int]:
    """The window of `bounds` that holds `now`: the same choice the Lua scripts make by Redis TIME."""
    prev_start, cur_start, next_start, next_end = bounds
    if now < cur_start:
        return prev_start, cur_start
    if now < next_start:
        return cur_start, next_start
    return next_start, next_end


# Keyed by the ZoneInfo object itself: ZoneInfo(key) is interned, and two uncached objects with the
# same key may hold different rules.
_cache: dict[tuple[str, ZoneInfo], Bounds] = {}
_CACHE_MAX = 256


def calendar_bounds(kind: str, now: float, tz: ZoneInfo) -> Bounds:
    """(prev_start, cur_start, next_start, next_end) around the calendar window holding `now` in `tz`.

    A window starts at the first instant at or after local 00:00 of its first day (the 1st for
    months and billing cycles, Monday for weeks); when midnight is ambiguous the earlier one counts.
    A window that a zone skipped entirely (Pacific/Apia lost 2011-12-30) is left out.
    """
    key = (kind, tz)
    cached = _cache.get(key)
    if cached is not None and cached[1] <= now < cached[2]:
        return cached
    if kind not in _CALENDAR_KINDS:
        raise ValueError(f'"{kind}" is not a calendar period: use month, week, day or billing_cycle')
    if not math.isfinite(now):
        raise ValueError(f"cannot place {now} in a window")

    label = _floor(kind, datetime.fromtimestamp(math.floor(now), tz).date())
    cur = _start(label, tz)
    while cur > now:  # defensive: a local date whose midnight comes later than `now`
        label = _prev(kind, label)
        cur = _start(label, tz)
    following = _next(kind, label)
    nxt = _start(following, tz)
    # A repeated hour that crosses midnight backwards, or a skipped window, puts `now` further on.
    while nxt <= now:
        label, cur = following, nxt
        following = _next(kind, following)
        nxt = _start(following, tz)

    before = _prev(kind, label)
    prev = _start(before, tz)
    while prev >= cur:
        before = _prev(kind, before)
        prev = _start(before, tz)
    after = _next(kind, following)
    end = _start(after, tz)
    while end <= nxt:
        after = _next(kind, after)
        end = _start(after, tz)

    bounds = (prev, cur, nxt, end)
    if len(_cache) >= _CACHE_MAX:
        _cache.clear()
    _cache[key] = bounds
    return bounds


def _floor(kind: str, day: date) -> date:
    if kind == "day":
        return day
    if kind == "week":
        return day - timedelta(days=day.weekday())
    return day.replace(day=1)


def _next(kind: str, first: date) -> date:
    if kind == "day":
        return first + timedelta(days=1)
    if kind == "week":
        return first + timedelta(days=7)
    return date(first.year + 1, 1, 1) if first.month == 12 else date(first.year, first.month + 1, 1)


def _prev(kind: str, first: date) -> date:
    if kind == "day":
        return first - timedelta(days=1)
    if kind == "week":
        return first - timedelta(days=7)
    return date(first.year - 1, 12, 1) if first.month == 1 else date(first.year, first.month - 1, 1)


def _start(day: date, tz: ZoneInfo) -> int:
    """The first instant at or after local 00:00 of `day` in `tz`, as Unix seconds."""
    midnight = datetime.combine(day, time(), tzinfo=tz)  # fold=0: the earlier of an ambiguous pair
    late = int(midnight.timestamp())
    wall = midnight.replace(tzinfo=None)
    if datetime.fromtimestamp(late, tz).replace(tzinfo=None) == wall:
        return late
    # Midnight falls in a gap. fold=0 read it with the offset before the jump, which lands after
    # the jump; fold=1 with the offset after, which lands before it. The answer is the jump itself:
    # the first instant whose wall clock reads at or after midnight.
    early = int(midnight.replace(fold=1).timestamp())
    while late - early > 1:
        mid = (early + late) // 2
        if datetime.fromtimestamp(mid, tz).replace(tzinfo=None) >= wall:
            late = mid
        else:
            early = mid
    return late
