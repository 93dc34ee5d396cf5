from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from email.utils import formatdate

import httpx
import pytest
from hypothesis import given
from hypothesis import strategies as st
from multidict import CIMultiDict, CIMultiDictProxy

from gateway.client import (
    Limits,
    PolicyState,
    parse_limits,
    parse_structured_list,
    wait_and_retry,
    wait_and_retry_sync,
)

pytestmark = pytest.mark.unit  # no service: `pytest -m unit` runs these in seconds

GATEWAY_HEADERS = [
    (
        "RateLimit-Policy",
        '"rate";q=200;w=2, "projects";q=25, "custom_models";q=3;w=2592000, "credits";q=1000',
    ),
    ("RateLimit", '"rate";r=199;t=1, "projects";r=24, "custom_models";r=1;t=86400, "credits";r=800'),
    ("X-RateLimit-Limit", "3"),
    ("X-RateLimit-Remaining", "1"),
    ("X-RateLimit-Reset", "1767225600"),
    ("X-RateLimit-Resource", "custom_models"),
    ("X-Credits-Remaining", "800"),
]

EXPECTED = Limits(
    policies={
        "rate": PolicyState("rate", quota=200, window=2, remaining=199, reset=1),
        "projects": PolicyState("projects", quota=25, remaining=24),
        "custom_models": PolicyState("custom_models", quota=3, window=2592000, remaining=1, reset=86400),
        "credits": PolicyState("credits", quota=1000, remaining=800),
    },
    credits_remaining=800,
    limit=3,
    remaining=1,
    reset_at=1767225600,
    resource="custom_models",
)


def test_parses_an_httpx_response() -> None:
    """Every gateway header on an httpx.Response is read into Limits."""
    assert parse_limits(httpx.Response(200, headers=GATEWAY_HEADERS)) == EXPECTED


def test_parses_a_plain_dict_whatever_the_case() -> None:
    """A dict with names in any case reads the same as a response."""
    headers = {
        name.upper() if i % 2 else name.lower(): value for i, (name, value) in enumerate(GATEWAY_HEADERS)
    }
    assert parse_limits(headers) == EXPECTED


def test_parses_a_list_of_pairs_including_bytes() -> None:
    """(name, value) pairs of bytes, as in raw ASGI headers, read the same."""
    pairs = [(name.lower().encode(), value.encode()) for name, value in GATEWAY_HEADERS]
    assert parse_limits(pairs) == EXPECTED


def test_joins_a_list_split_over_several_fields() -> None:
    """RateLimit items sent on two header lines are combined, as RFC 9651 §3.1 allows."""
    pairs = [("RateLimit", '"rate";r=1;t=2'), ("ratelimit", '"credits";r=5')]
    limits = parse_limits(httpx.Response(200, headers=pairs))
    assert limits.policies == {
        "rate": PolicyState("rate", remaining=1, reset=2),
        "credits": PolicyState("credits", remaining=5),
    }


def test_parses_a_requests_response() -> None:
    """A requests.Response is read through its case-insensitive headers."""
    requests = pytest.importorskip("requests")
    response = requests.Response()
    response.status_code = 200
    response.headers = requests.structures.CaseInsensitiveDict(GATEWAY_HEADERS)
    assert parse_limits(response) == EXPECTED


@dataclass
class AiohttpLikeResponse:
    status: int
    headers: CIMultiDictProxy[str]


def aiohttp_response(status: int, headers: list[tuple[str, str]]) -> AiohttpLikeResponse:
    return AiohttpLikeResponse(status, CIMultiDictProxy(CIMultiDict(headers)))


def test_parses_an_aiohttp_style_response() -> None:
    """A response shaped like aiohttp's (`status`, a CIMultiDictProxy of headers) reads the same."""
    assert parse_limits(aiohttp_response(200, GATEWAY_HEADERS)) == EXPECTED


def test_tightest_is_the_least_remaining_relative_to_quota() -> None:
    """tightest() picks custom_models (1 of 3 left) over credits (80%) and rate (99.5%)."""
    assert EXPECTED.tightest() == EXPECTED.policies["custom_models"]


def test_tightest_prefers_the_longer_wait_on_a_tie() -> None:
    """Two empty policies tie on share, and the one that refills later is the tighter."""
    limits = parse_limits({"RateLimit": '"rate";r=0;t=1, "month";r=0;t=9000'})
    assert limits.tightest() == PolicyState("month", remaining=0, reset=9000)


def test_policy_only_in_ratelimit_policy_has_no_remaining() -> None:
    """A policy advertised without a RateLimit item is listed with remaining None and is never tightest."""
    limits = parse_limits({"RateLimit-Policy": '"rate";q=5;w=1'})
    assert limits.policies == {"rate": PolicyState("rate", quota=5, window=1)}
    assert limits.tightest() is None


def test_missing_headers_read_as_none() -> None:
    """A response without any gateway header gives empty policies and None everywhere."""
    limits = parse_limits(httpx.Response(200, headers={"Content-Type": "application/json"}))
    assert limits == Limits(policies={})
    assert limits.tightest() is None


def test_degraded_and_retry_after_and_debt() -> None:
    """X-Gateway-Degraded sets degraded, Retry-After reads as seconds, and a balance in debt is negative."""
    limits = parse_limits({"X-Gateway-Degraded": "redis", "Retry-After": "7", "X-Credits-Remaining": "-12"})
    assert (limits.degraded, limits.retry_after, limits.credits_remaining) == (True, 7, -12)


def test_retry_after_as_an_http_date() -> None:
    """A Retry-After given as an HTTP-date reads as the seconds from now until then."""
    limits = parse_limits({"Retry-After": formatdate(time.time() + 30, usegmt=True)})
    assert limits.retry_after is not None
    assert 28 <= limits.retry_after <= 31


@pytest.mark.parametrize(
    "headers",
    [
        {"RateLimit": "garbage;;,", "RateLimit-Policy": '"rate";q=', "Retry-After": "soon"},
        {"RateLimit": '"rate";r=-1;t=1.5', "RateLimit-Policy": '"rate";q=?1;w="2"', "Retry-After": "-3"},
        {"RateLimit": '("rate");r=1', "RateLimit-Policy": '"rate";Q=1', "Retry-After": "1.5"},
        {"X-RateLimit-Limit": "abc", "X-RateLimit-Remaining": "-1", "X-RateLimit-Reset": "1e9"},
        {"X-Credits-Remaining": "1e3", "X-RateLimit-Limit": "9" * 5000, "Retry-After": "Foo, 99 Bar"},
    ],
)
def test_garbage_headers_read_as_none_without_raising(headers: dict[str, str]) -> None:
    """Malformed fields are ignored, as the draft requires: no exception, and no value comes of them."""
    limits = parse_limits(headers)
    for policy in limits.policies.values():
        assert (policy.quota, policy.window, policy.remaining, policy.reset) == (None, None, None, None)
    assert (limits.retry_after, limits.credits_remaining) == (None, None)
    assert (limits.limit, limits.remaining, limits.reset_at) == (None, None, None)
    assert limits.tightest() is None


def test_structured_list_reads_the_drafts_examples() -> None:
    """The examples of draft-ietf-httpapi-ratelimit-headers-10 parse to names and parameters."""
    assert parse_structured_list('"burst";q=100;w=60,"daily";q=1000;w=86400') == [
        ("burst", {"q": 100, "w": 60}),
        ("daily", {"q": 1000, "w": 86400}),
    ]
    assert parse_structured_list('"peruser";q=65535;qu="content-bytes";w=10;pk=:cHJvamVjdA==:') == [
        ("peruser", {"q": 65535, "qu": "content-bytes", "w": 10, "pk": b"project"}),
    ]
    assert parse_structured_list('"default";r=50;t=30') == [("default", {"r": 50, "t": 30})]


def test_structured_list_reads_every_parameter_type() -> None:
    """Tokens, integers, decimals, strings with escapes, booleans, dates and display strings all parse."""
    value = 'rate;a=-7;b=1.25;c="say \\"hi\\" \\\\";d=?0;e;f=tok/en:1;g=@1700000000;h=%"caf%c3%a9"'
    assert parse_structured_list(value) == [
        (
            "rate",
            {
                "a": -7,
                "b": 1.25,
                "c": 'say "hi" \\',
                "d": False,
                "e": True,
                "f": "tok/en:1",
                "g": 1700000000,
                "h": "café",
            },
        ),
    ]


def test_structured_list_tolerates_whitespace() -> None:
    """Spaces and tabs around commas, around semicolons and at the ends are accepted."""
    assert parse_structured_list(' \t"a";r=1 ;  t=2 ,\t"b" ; r=3  ') == [
        ("a", {"r": 1, "t": 2}),
        ("b", {"r": 3}),
    ]
    assert parse_structured_list("   ") == []


@pytest.mark.parametrize(
    "value",
    [
        '"a";r=1,',
        '"a" "b"',
        '"a";R=1',
        '"a";r=',
        '"unterminated',
        '"a";r=1.',
        '"a";r=1.2345',
        '"a";r=1234567890123456',
        '"a";r=?2',
        '"a";r=:not base64!:',
        '"a";r=:abc',
        '"bad\\escape"',
        '"tab\there"',
        '("inner" "list")',
        "7;r=1",
        ",",
        '"a";r=%"%ZZ"',
    ],
)
def test_structured_list_raises_on_garbage(value: str) -> None:
    """Anything RFC 9651 does not allow raises ValueError that names the place."""
    with pytest.raises(ValueError, match="structured field"):
        parse_structured_list(value)


names = st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=12)
keys = st.from_regex(r"[a-z][a-z0-9_]{0,5}", fullmatch=True)
values = st.one_of(
    st.integers(min_value=-(10**15) + 1, max_value=10**15 - 1),
    st.integers(min_value=-(10**12) + 1, max_value=10**12 - 1).map(lambda n: n / 8),
    st.booleans(),
    names,
)


def serialize(value: float | bool | str) -> str:
    if isinstance(value, bool):
        return "?1" if value else "?0"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return f"{value:.3f}"
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


@given(st.lists(st.tuples(names, st.dictionaries(keys, values, max_size=4)), max_size=5))
def test_structured_list_round_trips(members: list[tuple[str, dict[str, int | float | bool | str]]]) -> None:
    """Whatever a serializer writes in the List syntax parses back to the same members."""
    text = ", ".join(
        serialize(name) + "".join(f";{k}={serialize(v)}" for k, v in params.items())
        for name, params in members
    )
    assert parse_structured_list(text) == members


def sequence(*statuses_and_headers: tuple[int, dict[str, str]]) -> list[httpx.Response]:
    return [httpx.Response(status, headers=headers) for status, headers in statuses_and_headers]


class Clock:
    """A fake sleep that records how long it was asked to wait."""

    def __init__(self) -> None:
        self.waits: list[float] = []

    def sleep(self, seconds: float) -> None:
        self.waits.append(seconds)

    async def async_sleep(self, seconds: float) -> None:
        self.waits.append(seconds)


def test_sync_waits_retry_after_then_succeeds() -> None:
    """A 429 with Retry-After: 3 is retried after exactly 3 seconds, and the 200 is returned."""
    answers = sequence((429, {"Retry-After": "3", "RateLimit": '"rate";r=0;t=1'}), (200, {}))
    clock = Clock()
    response = wait_and_retry_sync(lambda: answers.pop(0), sleep=clock.sleep)
    assert (response.status_code, clock.waits, answers) == (200, [3.0], [])


def test_async_waits_retry_after_then_succeeds() -> None:
    """The async helper waits Retry-After with the given sleep and returns the success."""
    answers = sequence((429, {"Retry-After": "2"}), (429, {"Retry-After": "5"}), (200, {}))
    clock = Clock()

    async def send() -> httpx.Response:
        return answers.pop(0)

    response = asyncio.run(wait_and_retry(send, sleep=clock.async_sleep))
    assert (response.status_code, clock.waits) == (200, [2.0, 5.0])


def test_without_retry_after_waits_for_the_empty_policy() -> None:
    """With no Retry-After the wait is the largest t among policies with nothing left."""
    answers = sequence(
        (429, {"RateLimit": '"rate";r=0;t=4, "burst";r=0;t=2, "month";r=90;t=2000000'}), (200, {})
    )
    clock = Clock()
    wait_and_retry_sync(lambda: answers.pop(0), sleep=clock.sleep)
    assert clock.waits == [4.0]


def test_without_any_hint_waits_one_second() -> None:
    """A bare 429 is retried after one second."""
    answers = sequence((429, {}), (200, {}))
    clock = Clock()
    wait_and_retry_sync(lambda: answers.pop(0), sleep=clock.sleep)
    assert clock.waits == [1.0]


def test_wait_is_capped_by_max_wait() -> None:
    """A Retry-After longer than max_wait waits max_wait."""
    answers = sequence((429, {"Retry-After": "3600"}), (200, {}))
    clock = Clock()
    wait_and_retry_sync(lambda: answers.pop(0), max_wait=10, sleep=clock.sleep)
    assert clock.waits == [10.0]


def test_gives_up_after_max_attempts_and_returns_the_last_answer() -> None:
    """After max_attempts sends the last 429 is returned, having slept only between attempts."""
    sent: list[int] = []
    clock = Clock()

    def send() -> httpx.Response:
        sent.append(1)
        return httpx.Response(429, headers={"Retry-After": str(len(sent))})

    response = wait_and_retry_sync(send, max_attempts=3, sleep=clock.sleep)
    assert (response.status_code, response.headers["Retry-After"]) == (429, "3")
    assert (len(sent), clock.waits) == (3, [1.0, 2.0])


def test_async_gives_up_after_max_attempts() -> None:
    """The async helper also stops after max_attempts."""
    clock = Clock()
    sent: list[int] = []

    async def send() -> httpx.Response:
        sent.append(1)
        return httpx.Response(429, headers={"Retry-After": "1"})

    response = asyncio.run(wait_and_retry(send, max_attempts=4, sleep=clock.async_sleep))
    assert (response.status_code, len(sent), clock.waits) == (429, 4, [1.0, 1.0, 1.0])


@pytest.mark.parametrize("status", [200, 201, 402, 403, 404, 500, 503])
def test_never_retries_anything_but_429(status: int) -> None:
    """A 402 or 403 (or any other status) is returned at once: waiting would not change it."""
    answers = sequence((status, {"Retry-After": "1"}), (200, {}))
    clock = Clock()
    response = wait_and_retry_sync(lambda: answers.pop(0), sleep=clock.sleep)
    assert (response.status_code, clock.waits, len(answers)) == (status, [], 1)

    async_answers = sequence((status, {"Retry-After": "1"}), (200, {}))

    async def send() -> httpx.Response:
        return async_answers.pop(0)

    response = asyncio.run(wait_and_retry(send, sleep=clock.async_sleep))
    assert (response.status_code, clock.waits) == (status, [])


def test_retries_aiohttp_style_responses() -> None:
    """A response that names its status `status` (aiohttp) is retried the same way."""
    answers = [aiohttp_response(429, [("Retry-After", "2")]), aiohttp_response(200, [])]
    clock = Clock()
    response = wait_and_retry_sync(lambda: answers.pop(0), sleep=clock.sleep)
    assert (response.status, clock.waits) == (200, [2.0])


def test_max_attempts_below_one_is_refused() -> None:
    """max_attempts=0 is a mistake, reported before anything is sent."""
    with pytest.raises(ValueError, match="max_attempts"):
        wait_and_retry_sync(lambda: httpx.Response(200), max_attempts=0)
