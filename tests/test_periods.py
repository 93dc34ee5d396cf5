from __future__ import annotations

import io
import itertools
import re
import struct
from dataclasses import FrozenInstanceError
from datetime import date, datetime, time, timedelta
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway import periods
from gateway.periods import (
    Period,
    calendar_bounds,
    duration_window,
    parse_duration,
    parse_period,
    window_at,
)

pytestmark = pytest.mark.unit  # no service: `pytest -m unit` runs these in seconds


def _posix_zone(key: str, rule: str, std_offset: int, abbr: str) -> ZoneInfo:
    """A zone that follows only a POSIX TZ rule: a TZif v2 file with no transitions and a footer."""
    chars = abbr.encode() + b"\0"
    header = b"TZif2" + b"\0" * 15 + struct.pack(">6l", 0, 0, 0, 0, 1, len(chars))
    block = header + struct.pack(">lBB", std_offset, 0, 0) + chars
    return ZoneInfo.from_file(io.BytesIO(block + block + b"\n" + rule.encode() + b"\n"), key=key)


# Clocks jump from Sunday 23:30 to Monday 00:30, so Monday's midnight lies inside the gap; and fall
# back from Sunday 00:30 to Saturday 23:30, so Sunday's midnight happens twice.
GAP_AND_FOLD = _posix_zone("Test/GapAndFold", "XST3XDT,M3.5.0/23:30,M10.5.0/0:30", -3 * 3600, "XST")

UTC = ZoneInfo("UTC")
BERLIN = ZoneInfo("Europe/Berlin")
NEW_YORK = ZoneInfo("America/New_York")
LORD_HOWE = ZoneInfo("Australia/Lord_Howe")
SAO_PAULO = ZoneInfo("America/Sao_Paulo")
ZONES = [UTC, BERLIN, NEW_YORK, LORD_HOWE, SAO_PAULO, GAP_AND_FOLD]
KINDS = ["month", "week", "day", "billing_cycle"]

FIRST = 0  # 1970-01-01T00:00:00Z
LAST = 4102444799  # 2099-12-31T23:59:59Z


def _ts(
    tz: ZoneInfo, year: int, month: int, day: int, hour: int = 0, minute: int = 0, second: int = 0
) -> int:
    return int(datetime(year, month, day, hour, minute, second, tzinfo=tz).timestamp())


def _wall(instant: int, tz: ZoneInfo) -> datetime:
    return datetime.fromtimestamp(instant, tz).replace(tzinfo=None)


def _label(kind: str, start: int, tz: ZoneInfo) -> date:
    """The local first day of the window starting at `start`, checked to be a valid window start."""
    wall = _wall(start, tz)
    midnight = datetime.combine(wall.date(), time())
    # At local midnight, or just after it when midnight fell in a gap: the first instant at/after it.
    assert midnight <= wall < midnight + timedelta(hours=2)
    assert _wall(start - 1, tz) < midnight
    if kind == "week":
        assert wall.date().weekday() == 0
    if kind in ("month", "billing_cycle"):
        assert wall.day == 1
    return wall.date()


def _step(kind: str, first: date) -> date:
    if kind == "day":
        return first + timedelta(days=1)
    if kind == "week":
        return first + timedelta(days=7)
    return date(first.year + first.month // 12, first.month % 12 + 1, 1)


@st.composite
def instants(draw: st.DrawFn, tz: ZoneInfo) -> float:
    """Any instant in 1970..2100, or one within two hours of a local midnight (where windows turn)."""
    if draw(st.booleans()):
        whole = draw(st.integers(FIRST, LAST))
    else:
        day = draw(st.dates(date(1970, 1, 2), date(2099, 12, 30)))
        midnight = int(datetime.combine(day, time(), tzinfo=tz).timestamp())
        whole = midnight + draw(st.integers(-7200, 7200))
    return whole + draw(st.sampled_from([0.0, 0.25, 0.999]))


@st.composite
def cases(draw: st.DrawFn) -> tuple[str, ZoneInfo, float]:
    tz = draw(st.sampled_from(ZONES))
    return draw(st.sampled_from(KINDS)), tz, draw(instants(tz))


def test_parse_duration_reads_every_unit() -> None:
    """Each unit s, m, h, d, w converts to the right number of seconds."""
    assert parse_duration("10s") == 10
    assert parse_duration("15m") == 900
    assert parse_duration("1h") == 3600
    assert parse_duration("30d") == 2592000
    assert parse_duration("2w") == 1209600
    assert parse_duration("007s") == 7


@pytest.mark.parametrize(
    "text", ["fortnight", "", "10", "d", "1.5h", "-1d", "10 s", " 10s", "10s ", "10M", "1y", "1mo", "\u0661d"]
)
def test_parse_duration_rejects_with_a_message_a_user_can_act_on(text: str) -> None:
    """Anything but digits and one known unit is refused, and the message shows the right form."""
    message = f'unknown duration "{text}": use a number and a unit (s, m, h, d, w), e.g. "7d"'
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        parse_duration(text)


def test_parse_duration_rejects_zero() -> None:
    """A zero-length duration is refused with its own message rather than read as a 0-second window."""
    with pytest.raises(ValueError, match='duration "0d" is empty'):
        parse_duration("0d")


def test_parse_period_reads_calendar_kinds() -> None:
    """month, week, day and billing_cycle are calendar periods with their nominal lengths."""
    expected = {"month": 2592000, "week": 604800, "day": 86400, "billing_cycle": 2592000}
    for text, nominal in expected.items():
        period = parse_period(text)
        assert period == Period(kind=text, seconds=0, text=text)  # type: ignore[arg-type]
        assert period.is_calendar
        assert period.nominal_seconds == nominal


def test_parse_period_reads_durations() -> None:
    """A duration is a non-calendar period whose nominal length is the duration and text is kept."""
    period = parse_period("30d")
    assert period == Period(kind="duration", seconds=2592000, text="30d")
    assert not period.is_calendar
    assert period.nominal_seconds == 2592000
    assert parse_period("1d").kind == "duration"  # epoch-aligned, unlike "day"


@pytest.mark.parametrize("text", ["fortnight", "", "Month", "monthly", "year", " day", "1.5h"])
def test_parse_period_rejects_with_a_message_a_user_can_act_on(text: str) -> None:
    """An unknown period names the accepted forms."""
    message = f'unknown period "{text}": use month, week, day, billing_cycle or a duration like "30d"'
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        parse_period(text)


def test_parse_period_rejects_zero_duration() -> None:
    """A zero duration as a period says it is empty rather than unknown."""
    with pytest.raises(ValueError, match='duration "0s" is empty'):
        parse_period("0s")


def test_period_is_immutable_and_consistent() -> None:
    """A Period cannot be changed, and seconds is set exactly when the kind is a duration."""
    period = parse_period("month")
    with pytest.raises(FrozenInstanceError):
        period.text = "week"  # type: ignore[misc]
    with pytest.raises(ValueError, match="cannot have seconds=0"):
        Period(kind="duration", seconds=0, text="0s")
    with pytest.raises(ValueError, match="cannot have seconds=86400"):
        Period(kind="day", seconds=86400, text="day")


@given(cases())
def test_bounds_are_ordered_around_now(case: tuple[str, ZoneInfo, float]) -> None:
    """prev_start < cur_start <= now < next_start < next_end for any instant, kind and zone."""
    kind, tz, now = case
    prev, cur, nxt, end = calendar_bounds(kind, now, tz)
    assert all(isinstance(bound, int) for bound in (prev, cur, nxt, end))
    assert prev < cur <= now < nxt < end


@given(cases())
def test_every_bound_is_a_local_window_start(case: tuple[str, ZoneInfo, float]) -> None:
    """Each bound is local 00:00 (or the first instant after) of a 1st, Monday or day, one period apart."""
    kind, tz, now = case
    labels = [_label(kind, bound, tz) for bound in calendar_bounds(kind, now, tz)]
    for earlier, later in itertools.pairwise(labels):
        assert _step(kind, earlier) == later


@given(cases())
def test_windows_tile(case: tuple[str, ZoneInfo, float]) -> None:
    """The window after cur is the cur window of next_start; the one before, that of prev_start."""
    kind, tz, now = case
    prev, cur, nxt, end = calendar_bounds(kind, now, tz)
    assert calendar_bounds(kind, nxt, tz)[:3] == (cur, nxt, end)
    assert calendar_bounds(kind, nxt - 0.001, tz)[1:] == (cur, nxt, end)
    assert calendar_bounds(kind, prev, tz)[1:] == (prev, cur, nxt)
    assert calendar_bounds(kind, cur - 0.001, tz)[1:] == (prev, cur, nxt)


@given(cases())
def test_window_at_agrees_with_calendar_bounds(case: tuple[str, ZoneInfo, float]) -> None:
    """For an instant in any of the three windows, window_at picks the window calendar_bounds would."""
    kind, tz, now = case
    bounds = calendar_bounds(kind, now, tz)
    prev, cur, nxt, end = bounds
    for start, stop in ((prev, cur), (cur, nxt), (nxt, end)):
        for instant in (start, start + (stop - start) / 2, stop - 0.001):
            assert window_at(bounds, instant) == calendar_bounds(kind, instant, tz)[1:3] == (start, stop)


@given(st.sampled_from(ZONES), st.integers(FIRST, LAST))
def test_local_days_last_23_to_25_hours(tz: ZoneInfo, now: int) -> None:
    """A day window is 24 hours give or take a DST shift of 30 or 60 minutes."""
    _, cur, nxt, _ = calendar_bounds("day", now, tz)
    assert nxt - cur in {82800, 84600, 86400, 88200, 90000}


def test_utc_month_ends_and_year_end() -> None:
    """The last second of a month is in that month, the next second starts the next, across a year end."""
    last = _ts(UTC, 2024, 1, 31, 23, 59, 59)
    assert calendar_bounds("month", last, UTC) == (
        _ts(UTC, 2023, 12, 1),
        _ts(UTC, 2024, 1, 1),
        _ts(UTC, 2024, 2, 1),
        _ts(UTC, 2024, 3, 1),
    )
    assert calendar_bounds("month", last + 1, UTC)[1] == _ts(UTC, 2024, 2, 1)
    new_year = _ts(UTC, 2025, 1, 1)
    assert calendar_bounds("month", new_year - 0.5, UTC)[1:3] == (_ts(UTC, 2024, 12, 1), new_year)
    assert calendar_bounds("billing_cycle", new_year, UTC)[:3] == (
        _ts(UTC, 2024, 12, 1),
        new_year,
        _ts(UTC, 2025, 2, 1),
    )


@pytest.mark.parametrize(("year", "days"), [(2024, 29), (2023, 28), (2000, 29), (2100, 28)])
def test_february_length_follows_leap_years(year: int, days: int) -> None:
    """February has 29 days in 2024 and 2000 and 28 in 2023 and 2100 (not a leap year)."""
    _, cur, nxt, _ = calendar_bounds("month", _ts(UTC, year, 2, 15), UTC)
    assert (cur, nxt - cur) == (_ts(UTC, year, 2, 1), days * 86400)
    leap_day = _ts(UTC, 2024, 2, 29, 12)
    assert calendar_bounds("day", leap_day, UTC)[1:3] == (_ts(UTC, 2024, 2, 29), _ts(UTC, 2024, 3, 1))


def test_weeks_start_on_monday() -> None:
    """Sunday night belongs to the week that began the Monday before; Monday 00:00 starts a new one."""
    monday = _ts(UTC, 2024, 1, 1)  # a Monday
    assert calendar_bounds("week", _ts(UTC, 2024, 1, 7, 23, 59, 59), UTC) == (
        monday - 7 * 86400,
        monday,
        monday + 7 * 86400,
        monday + 14 * 86400,
    )
    assert calendar_bounds("week", monday + 7 * 86400, UTC)[1] == monday + 7 * 86400
    assert calendar_bounds("week", 0, UTC)[1] == _ts(UTC, 1969, 12, 29)  # 1970-01-01 was a Thursday


def test_dst_days_in_berlin_and_new_york() -> None:
    """Spring-forward days last 23 hours and fall-back days 25, starting at local midnight."""
    spring = calendar_bounds("day", _ts(BERLIN, 2024, 3, 31, 12), BERLIN)
    assert spring[1:3] == (_ts(BERLIN, 2024, 3, 31), _ts(BERLIN, 2024, 4, 1))
    assert spring[2] - spring[1] == 23 * 3600
    autumn = calendar_bounds("day", _ts(BERLIN, 2024, 10, 27, 12), BERLIN)
    assert autumn[2] - autumn[1] == 25 * 3600
    week = calendar_bounds("week", _ts(NEW_YORK, 2024, 3, 10, 12), NEW_YORK)
    assert week[1:3] == (_ts(NEW_YORK, 2024, 3, 4), _ts(NEW_YORK, 2024, 3, 11))
    assert week[2] - week[1] == 7 * 86400 - 3600
    month = calendar_bounds("month", _ts(NEW_YORK, 2024, 11, 15), NEW_YORK)
    assert month[1:3] == (1730433600, 1733029200)  # 00:00 EDT Nov 1, 00:00 EST Dec 1


def test_lord_howe_half_hour_shift() -> None:
    """Lord Howe's 30-minute DST makes its change days 23.5 and 24.5 hours long."""
    spring = calendar_bounds("day", _ts(LORD_HOWE, 2024, 10, 6, 12), LORD_HOWE)
    assert spring[2] - spring[1] == 23 * 3600 + 1800
    autumn = calendar_bounds("day", _ts(LORD_HOWE, 2024, 4, 7, 12), LORD_HOWE)
    assert autumn[2] - autumn[1] == 24 * 3600 + 1800


def test_sao_paulo_day_without_midnight_starts_at_the_jump() -> None:
    """When São Paulo skipped 00:00 (2018-11-04), that day starts at the jump, which reads 01:00 locally."""
    jump = 1541300400  # 2018-11-04T03:00:00Z: 00:00 -03 became 01:00 -02
    prev, cur, nxt, _ = calendar_bounds("day", jump + 3600, SAO_PAULO)
    assert cur == jump
    assert str(datetime.fromtimestamp(cur, SAO_PAULO)) == "2018-11-04 01:00:00-02:00"
    assert (cur - prev, nxt - cur) == (24 * 3600, 23 * 3600)
    assert calendar_bounds("day", jump - 1, SAO_PAULO)[1:3] == (prev, cur)
    assert calendar_bounds("month", jump, SAO_PAULO)[1] == _ts(SAO_PAULO, 2018, 11, 1)


def test_midnight_inside_a_gap_starts_at_the_jump() -> None:
    """When clocks jump from 23:30 to 00:30, the new day (and week) starts at the jump, local 00:30."""
    jump = _ts(GAP_AND_FOLD, 2024, 3, 31, 23, 30)  # Sunday 23:30 XST is Monday 00:30 XDT
    assert str(datetime.fromtimestamp(jump, GAP_AND_FOLD)) == "2024-04-01 00:30:00-02:00"
    assert calendar_bounds("day", jump - 0.001, GAP_AND_FOLD)[1:3] == (jump - 23 * 3600 - 1800, jump)
    assert calendar_bounds("day", jump, GAP_AND_FOLD)[1] == jump
    assert calendar_bounds("week", jump, GAP_AND_FOLD)[1] == jump
    assert calendar_bounds("month", jump, GAP_AND_FOLD)[1] == jump


def test_ambiguous_midnight_uses_the_first_one() -> None:
    """When clocks fall back from 00:30 to 23:30, the day starts at the first 00:00, and the repeated
    half hour before midnight belongs to the new day."""
    first = _ts(GAP_AND_FOLD, 2024, 10, 27)  # fold=0: 00:00 XDT
    second = int(datetime(2024, 10, 27, tzinfo=GAP_AND_FOLD, fold=1).timestamp())
    assert second - first == 3600
    repeated = first + 2700  # reads Saturday 23:45 XST, after the new day began
    assert _wall(repeated, GAP_AND_FOLD) == datetime(2024, 10, 26, 23, 45)
    _, cur, nxt, _ = calendar_bounds("day", repeated, GAP_AND_FOLD)
    assert (cur, nxt - cur) == (first, 25 * 3600)
    assert calendar_bounds("day", first - 1, GAP_AND_FOLD)[2] == first


def test_a_skipped_day_is_left_out() -> None:
    """Samoa skipped 2011-12-30; the window after the 29th is the 31st, never an empty one."""
    apia = ZoneInfo("Pacific/Apia")
    jump = 1325239200  # 2011-12-30T10:00:00Z: Thursday 24:00 -10 became Saturday 00:00 +14
    _, cur, nxt, end = calendar_bounds("day", jump - 1, apia)
    assert (cur, nxt) == (jump - 86400, jump)
    assert _wall(nxt, apia) == datetime(2011, 12, 31)
    assert end - nxt == 86400
    assert calendar_bounds("day", jump, apia)[:3] == (cur, nxt, end)


def test_window_at_follows_the_lua_rule() -> None:
    """Before cur_start picks the previous window, before next_start the current one, else the next."""
    bounds = (100, 200, 300, 400)
    assert window_at(bounds, 150) == (100, 200)
    assert window_at(bounds, 199.999) == (100, 200)
    assert window_at(bounds, 200) == (200, 300)
    assert window_at(bounds, 299.5) == (200, 300)
    assert window_at(bounds, 300) == (300, 400)


@given(st.integers(1, 10**7), st.floats(-(2.0**40), 2.0**40, allow_nan=False))
def test_duration_windows_are_epoch_aligned(seconds: int, now: float) -> None:
    """A duration window starts at a multiple of its length since the epoch and holds now."""
    start, end = duration_window(seconds, now)
    assert start % seconds == 0
    assert end - start == seconds
    assert start <= now < end


def test_duration_window_examples() -> None:
    """An hour window holds its hour; 30 days are counted from the epoch, not from a month."""
    assert duration_window(3600, 7199.5) == (3600, 7200)
    assert duration_window(3600, 7200) == (7200, 10800)
    assert duration_window(10, -0.5) == (-10, 0)
    assert duration_window(parse_duration("30d"), _ts(UTC, 2024, 2, 15))[0] == _ts(UTC, 2024, 1, 18)
    with pytest.raises(ValueError, match="longer than 0 seconds"):
        duration_window(0, 1.0)


def test_unknown_kinds_and_bad_instants_are_refused() -> None:
    """calendar_bounds refuses a duration kind or a typo, and an instant that is not finite."""
    with pytest.raises(ValueError, match="not a calendar period"):
        calendar_bounds("duration", 0, UTC)
    with pytest.raises(ValueError, match="not a calendar period"):
        calendar_bounds("fortnight", 0, UTC)
    with pytest.raises(ValueError, match="cannot place nan"):
        calendar_bounds("day", float("nan"), UTC)


def test_cache_never_returns_a_stale_window() -> None:
    """Crossing a boundary forwards or backwards recomputes, while the same window reuses the answer."""
    periods._cache.clear()
    boundary = _ts(BERLIN, 2024, 4, 1)
    march = calendar_bounds("month", boundary - 0.001, BERLIN)
    assert calendar_bounds("month", boundary - 86400, BERLIN) is march
    april = calendar_bounds("month", boundary, BERLIN)
    assert april[1] == boundary
    assert april != march
    assert calendar_bounds("month", boundary - 0.001, BERLIN) == march
    assert calendar_bounds("month", boundary - 0.001, UTC)[1] == _ts(UTC, 2024, 3, 1)  # zones kept apart
    assert calendar_bounds("day", boundary, BERLIN)[1] == boundary  # kinds kept apart


@given(st.lists(cases(), min_size=2, max_size=20))
def test_cached_answers_equal_fresh_ones(sequence: list[tuple[str, ZoneInfo, float]]) -> None:
    """Over any order of calls, a possibly cached answer equals one computed from an empty cache."""
    for kind, tz, now in sequence:
        remembered = calendar_bounds(kind, now, tz)
        periods._cache.clear()
        assert calendar_bounds(kind, now, tz) == remembered
        calendar_bounds(kind, now + 86400 * 40, tz)  # leave a neighbouring window in the cache
