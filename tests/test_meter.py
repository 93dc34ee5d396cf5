from __future__ import annotations

import gzip
import itertools
import json
import tracemalloc
import zlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.meter import (
    ResponseMeter,
    UnitsSource,
    header_units,
    json_path,
    parse_units_source,
)

pytestmark = pytest.mark.unit  # no service: `pytest -m unit` runs these in seconds

USAGE = UnitsSource("response.json", "usage.total_tokens")
JSON = "application/json"
SSE = "text/event-stream"


def meter_all(
    body: bytes,
    content_type: str = JSON,
    *,
    source: UnitsSource = USAGE,
    headers: list[tuple[bytes, bytes]] | None = None,
    chunk: int | None = None,
) -> float | None:
    meter = ResponseMeter(source, content_type, headers or [])
    size = chunk or len(body) or 1
    for start in range(0, len(body), size):
        meter.feed(body[start : start + size])
    return meter.finish()


def sse(*events: object, eol: str = "\n") -> bytes:
    lines = []
    for event in events:
        data = event if isinstance(event, str) else json.dumps(event)
        lines.append(f"data: {data}{eol}{eol}")
    return "".join(lines).encode()


def openai_stream(total: int = 57, eol: str = "\n") -> bytes:
    deltas: list[object] = [
        {"choices": [{"delta": {"content": word}}], "usage": None} for word in ["Hel", "lo", " wörld ✓"]
    ]
    final = {"choices": [], "usage": {"prompt_tokens": 12, "completion_tokens": 45, "total_tokens": total}}
    return b": keep-alive" + eol.encode() + sse(*deltas, final, "[DONE]", eol=eol)


@pytest.mark.parametrize(
    ("text", "where", "path"),
    [
        ("response.json:usage.total_tokens", "response.json", "usage.total_tokens"),
        ("response.header:X-Units", "response.header", "X-Units"),
        ("request.json:items.0.n", "request.json", "items.0.n"),
        (" request.header: X-Count ", "request.header", "X-Count"),
    ],
)
def test_parse_units_source_reads_every_documented_form(text: str, where: str, path: str) -> None:
    """Each of the four documented source kinds parses into its place and path."""
    assert parse_units_source(text) == UnitsSource(where, path)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("usage.total_tokens", "SOURCE:PATH"),
        ("response.body:usage", "response.json, response.header"),
        ("response.json:", "dotted JSON path"),
        ("response.json:usage..total", "dotted JSON path"),
        ("response.header:X Units", "not a header name"),
    ],
)
def test_parse_units_source_explains_what_is_wrong(text: str, message: str) -> None:
    """A malformed source raises ValueError naming the text and what a good one looks like."""
    with pytest.raises(ValueError, match=message) as caught:
        parse_units_source(text)
    assert repr(text) in str(caught.value)


def test_json_path_walks_objects_and_lists() -> None:
    """Dotted segments walk objects, numeric segments index lists, and ints and floats both count."""
    doc = {"usage": {"total_tokens": 7}, "items": [{"n": 1.5}, {"n": 2}]}
    assert json_path(doc, "usage.total_tokens") == 7.0
    assert json_path(doc, "items.1.n") == 2.0
    assert json_path(doc, "items.0.n") == 1.5
    assert json_path({"0": 3}, "0") == 3.0


@pytest.mark.parametrize(
    "doc",
    [
        {},
        {"usage": None},
        {"usage": {"total_tokens": True}},
        {"usage": {"total_tokens": -1}},
        {"usage": {"total_tokens": "7"}},
        {"usage": {"total_tokens": float("nan")}},
        {"usage": {"total_tokens": float("inf")}},
        {"usage": {"total_tokens": 10**400}},
        {"usage": [7]},
        [1, 2],
        "usage",
    ],
)
def test_json_path_is_none_unless_a_non_negative_number(doc: object) -> None:
    """Missing paths, booleans, negatives, strings, non-finite and overflowing numbers read as None."""
    assert json_path(doc, "usage.total_tokens") is None


def test_json_path_out_of_range_index_is_none() -> None:
    """An index past the end of a list, or a negative one, is missing rather than an error."""
    assert json_path({"a": [1]}, "a.1") is None
    assert json_path({"a": [1]}, "a.-1") is None


def test_header_units_is_case_insensitive_and_strict() -> None:
    """A header's decimal number is read whatever the name's case; anything else is None."""
    headers = [(b"x-units", b" 12.5 "), (b"Content-Type", b"application/json")]
    assert header_units(headers, "X-Units") == 12.5
    assert header_units(headers, "x-other") is None
    for bad in [b"-1", b"1e3", b"nan", b"1_000", b"", b"twelve"]:
        assert header_units([(b"X-Units", bad)], "x-units") is None


def test_meter_reads_a_json_body_in_one_chunk() -> None:
    """A JSON body fed at once reports the units at its path."""
    body = json.dumps({"id": "x", "usage": {"total_tokens": 321}}).encode()
    assert meter_all(body) == 321.0


def test_meter_reads_a_json_body_split_into_single_bytes() -> None:
    """A JSON body fed one byte at a time reports the same units, and only at the end."""
    body = json.dumps({"usage": {"total_tokens": 321}, "text": "ünïcode"}, ensure_ascii=False).encode()
    meter = ResponseMeter(USAGE, "application/json; charset=utf-8", [])
    for i in range(len(body)):
        meter.feed(body[i : i + 1])
        assert meter.seen is None
    assert meter.finish() == 321.0
    assert meter.seen == 321.0


def test_meter_accepts_suffixed_json_types() -> None:
    """A `+json` media type is parsed as JSON."""
    assert meter_all(b'{"usage": {"total_tokens": 4}}', "application/vnd.api+json") == 4.0


def test_meter_ignores_other_content_types() -> None:
    """An HTML or plain-text answer reports nothing, even when it looks like JSON."""
    body = b'{"usage": {"total_tokens": 4}}'
    assert meter_all(body, "text/html") is None
    assert meter_all(body, "text/plain") is None
    assert meter_all(body, "") is None


def test_meter_json_without_the_path_is_none() -> None:
    """A JSON answer that carries no usage reports None."""
    assert meter_all(b'{"id": "x", "usage": {"prompt_tokens": 3}}') is None


def test_meter_invalid_json_is_none() -> None:
    """A body that is not JSON (or is cut short) reports None instead of raising."""
    assert meter_all(b'{"usage": {"total_tokens": 3}') is None
    assert meter_all(b"\xff\xfe not json") is None
    assert meter_all(b"[" * 100_000 + b"]" * 100_000) is None


def test_meter_oversized_json_body_is_none_in_bounded_memory() -> None:
    """A body beyond the limit reports None, and the meter stops keeping it as soon as it is too big."""
    meter = ResponseMeter(USAGE, JSON, [])
    tracemalloc.start()
    try:
        meter.feed(b'{"usage": {"total_tokens": 3}, "pad": "')
        for _ in range(256):  # 16 MiB in 64 KiB chunks, each a fresh object
            meter.feed(b"x" * 65536)
        meter.feed(b'"}')
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert meter.finish() is None
    assert peak < 6 * 1024 * 1024


def test_meter_limit_is_configurable() -> None:
    """A smaller limit refuses a body one byte over it and accepts one exactly at it."""
    body = b'{"usage": {"total_tokens": 3}}'
    at = ResponseMeter(USAGE, JSON, [], limit=len(body))
    at.feed(body)
    over = ResponseMeter(USAGE, JSON, [], limit=len(body) - 1)
    over.feed(body)
    assert (at.finish(), over.finish()) == (3.0, None)


def test_meter_inflates_gzip_and_deflate_bodies() -> None:
    """A compressed answer is metered from its decoded body, in small chunks."""
    body = json.dumps({"usage": {"total_tokens": 99}}).encode()
    gz = [(b"Content-Encoding", b"gzip")]
    assert meter_all(gzip.compress(body), headers=gz, chunk=3) == 99.0
    assert meter_all(zlib.compress(body), headers=[(b"content-encoding", b"deflate")]) == 99.0
    assert meter_all(gzip.compress(openai_stream()), SSE, headers=gz, chunk=5) == 57.0


def test_meter_gzip_bomb_stays_bounded() -> None:
    """A small gzip body that inflates past the limit reports None without inflating it all."""
    bomb = gzip.compress(b'{"pad": "' + b"x" * (64 * 1024 * 1024))
    tracemalloc.start()
    try:
        result = meter_all(bomb, headers=[(b"content-encoding", b"gzip")])
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert result is None
    assert peak < 8 * 1024 * 1024


def test_meter_unknown_or_broken_encoding_is_none() -> None:
    """An encoding the meter cannot read, or a corrupt gzip stream, reports None."""
    body = b'{"usage": {"total_tokens": 3}}'
    assert meter_all(body, headers=[(b"content-encoding", b"br")]) is None
    assert meter_all(b"\x1f\x8bnot gzip at all", headers=[(b"content-encoding", b"gzip")]) is None


def test_meter_reads_a_header_source_at_once() -> None:
    """A header source is known before any body arrives, whatever the content type."""
    meter = ResponseMeter(UnitsSource("response.header", "X-Units"), "text/html", [(b"x-units", b"42")])
    assert meter.seen == 42.0
    meter.feed(b"<html>")
    assert meter.finish() == 42.0


def test_meter_missing_header_is_none() -> None:
    """A header source whose header is absent reports None."""
    assert meter_all(b"{}", source=UnitsSource("response.header", "X-Units")) is None


def test_meter_reads_a_request_body_the_same_way() -> None:
    """A request.json source meters a request body fed to it like a response."""
    source = parse_units_source("request.json:n")
    assert meter_all(b'{"prompt": "cat", "n": 4}', source=source, chunk=2) == 4.0


def test_sse_last_event_with_usage_wins() -> None:
    """In an LLM-style stream the final chunk's usage is what the answer reports."""
    assert meter_all(openai_stream(), SSE) == 57.0


def test_sse_later_usage_replaces_earlier_usage() -> None:
    """When several events carry the path the last one wins, the way Anthropic's message_delta does."""
    body = sse({"usage": {"total_tokens": 10}}, {"delta": "x"}, {"usage": {"total_tokens": 25}})
    assert meter_all(body, SSE) == 25.0


def test_sse_split_at_every_single_boundary() -> None:
    """Cutting the stream in two at any byte offset gives the same units."""
    body = openai_stream(eol="\r\n")
    for cut in range(len(body) + 1):
        meter = ResponseMeter(USAGE, SSE, [])
        meter.feed(body[:cut])
        meter.feed(body[cut:])
        assert meter.finish() == 57.0, cut


def test_sse_one_byte_at_a_time() -> None:
    """Feeding one byte per chunk gives the same units."""
    assert meter_all(openai_stream(eol="\r"), SSE, chunk=1) == 57.0


@given(
    cuts=st.lists(st.integers(min_value=0, max_value=2000), max_size=40),
    eol=st.sampled_from(["\n", "\r\n", "\r"]),
    total=st.integers(min_value=0, max_value=10**9),
)
def test_sse_any_chunking_and_line_ending_gives_the_same_units(cuts: list[int], eol: str, total: int) -> None:
    """However the stream is chunked, and whichever line ending it uses, the last usage is reported."""
    body = openai_stream(total, eol=eol)
    bounds = sorted({min(c, len(body)) for c in cuts} | {0, len(body)})
    meter = ResponseMeter(USAGE, SSE, [])
    for start, end in itertools.pairwise(bounds):
        meter.feed(body[start:end])
    assert meter.finish() == float(total)


def test_sse_crlf_line_endings() -> None:
    """Events separated with CRLF are read like LF ones."""
    body = b'event: message\r\ndata: {"usage": {"total_tokens": 8}}\r\n\r\ndata: [DONE]\r\n\r\n'
    assert meter_all(body, SSE) == 8.0


def test_sse_multi_line_data_is_joined() -> None:
    """Several data lines of one event join with newlines into one JSON document."""
    body = b'data: {"usage":\ndata:   {"total_tokens":\ndata:11}}\n\n'
    assert meter_all(body, SSE) == 11.0


def test_sse_comments_other_fields_and_bom_are_ignored() -> None:
    """Comments, event/id/retry fields, look-alike field names and a leading BOM do not disturb parsing."""
    body = (
        b"\xef\xbb\xbf: hello\nid: 1\nretry: 10\nevent: usage\ndatabase: x\n"
        b'data:{"usage": {"total_tokens": 5}}\n\n'
    )
    assert meter_all(body, SSE, chunk=2) == 5.0


def test_sse_without_usage_is_none() -> None:
    """A stream whose events never carry the path reports None."""
    assert meter_all(sse({"delta": "a"}, {"delta": "b"}, "[DONE]"), SSE) is None


def test_sse_invalid_json_events_are_skipped() -> None:
    """An event that is not JSON neither raises nor erases units seen earlier."""
    body = sse({"usage": {"total_tokens": 9}}, '{"usage": {"total_tokens": ', "not json at all")
    assert meter_all(body, SSE) == 9.0


def test_sse_usage_spelled_with_unicode_escapes_is_found() -> None:
    """A key written with \\u escapes is still found (the cheap pre-check does not skip it)."""
    assert meter_all(b'data: {"\\u0075sage": {"total_tokens": 6}}\n\n', SSE) == 6.0


def test_sse_seen_follows_the_stream_and_survives_a_cut() -> None:
    """`seen` reports units as soon as an event completes, for a stream that dies before its end."""
    meter = ResponseMeter(USAGE, SSE, [])
    meter.feed(b'data: {"usage": {"total_tokens": 3}}\n')
    assert meter.seen is None
    meter.feed(b'\ndata: {"usage": {"total_tokens": 4}')
    assert meter.seen == 3.0


def test_sse_last_event_without_blank_line_counts_at_finish() -> None:
    """A stream that ends right after its last data line still reports that event at finish."""
    assert meter_all(b'data: {"usage": {"total_tokens": 12}}', SSE) == 12.0


def test_sse_numeric_paths_work() -> None:
    """A path through a list index works in events too (no key to pre-check)."""
    source = UnitsSource("response.json", "0.n")
    assert meter_all(b'data: [{"n": 2}]\n\ndata: [{"n": 3}]\n\n', SSE, source=source) == 3.0


def test_sse_overlong_line_is_dropped_in_bounded_memory() -> None:
    """A line that never ends is not kept beyond the limit, and the events after it still count."""
    meter = ResponseMeter(USAGE, SSE, [], limit=1024)
    meter.feed(b'data: {"usage": {"total_tokens": 1}}\n\n')
    meter.feed(b"data: ")
    tracemalloc.start()
    try:
        for _ in range(160):  # 10 MiB of one line, in fresh 64 KiB chunks
            meter.feed(b"x" * 65536)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1024 * 1024
    meter.feed(b"\n\n")
    assert meter.seen == 1.0
    meter.feed(b'data: {"usage": {"total_tokens": 2}}\n\n')
    assert meter.finish() == 2.0


def test_sse_overlong_event_is_dropped() -> None:
    """An event whose data lines together pass the limit is skipped, not kept."""
    meter = ResponseMeter(USAGE, SSE, [], limit=100)
    meter.feed(b'data: {"usage": {"total_tokens": 1},\n')
    meter.feed(b'data: "pad": "' + b"x" * 80 + b'"}\n\n')
    assert meter.finish() is None


def test_finish_is_idempotent_and_feed_after_it_is_ignored() -> None:
    """Calling finish twice gives the same answer, and chunks after it change nothing."""
    meter = ResponseMeter(USAGE, SSE, [])
    meter.feed(b'data: {"usage": {"total_tokens": 1}}\n\n')
    assert meter.finish() == 1.0
    meter.feed(b'data: {"usage": {"total_tokens": 2}}\n\n')
    assert meter.finish() == 1.0
