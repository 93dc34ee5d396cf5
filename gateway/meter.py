"""Metered units read from an upstream's answer or a request: the `units` sources of DESIGN §2.

A source says where the number lives: `response.json:usage.total_tokens` is a dotted path into the JSON
body, or into the last server-sent event that carries it; `response.header:X-Units` is a header; the
`request.*` sources read the request the same way. `ResponseMeter` reads a body as it streams past, so
a proxy meters without holding the answer back.
"""

from __future__ import annotations

import json
import math
import re
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal, cast, get_args

from gateway.bounds import loads
from gateway.errors import BadRequest

Where = Literal["response.json", "response.header", "request.json", "request.header"]
WHERES: tuple[str, ...] = get_args(Where)
MAX_JSON = 4 * 1024 * 1024

_EXAMPLE = 'e.g. "response.json:usage.total_tokens" or "response.header:X-Units"'
_HEADER_NAME = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_HEADER_NUMBER = re.compile(rb"[ \t]*(\d{1,15}(?:\.\d*)?|\.\d+)[ \t]*")
_PLAIN_KEY = re.compile(r"[A-Za-z0-9_\- ]*[A-Za-z_\- ][A-Za-z0-9_\- ]*")
_EOL = re.compile(rb"\r\n?|\n")
_BOM = b"\xef\xbb\xbf"
_INFLATE_STEP = 64 * 1024


@dataclass(frozen=True)
class UnitsSource:
    """Where a route's units are read: a JSON path into a body, or a header name."""

    where: Where
    path: str

    def __str__(self) -> str:
        return f"{self.where}:{self.path}"


def parse_units_source(text: str) -> UnitsSource:
    """Parse `response.json:usage.total_tokens`, `response.header:X-Units`, `request.json:n` and so on."""
    where, colon, path = text.strip().partition(":")
    if not colon or where not in WHERES:
        raise ValueError(
            f"units {text!r}: expected SOURCE:PATH where SOURCE is one of {', '.join(WHERES)} ({_EXAMPLE})"
        )
    path = path.strip()
    if where.endswith(".header"):
        if not _HEADER_NAME.fullmatch(path):
            raise ValueError(f"units {text!r}: {path!r} is not a header name ({_EXAMPLE})")
    elif not path or "" in path.split("."):
        raise ValueError(f"units {text!r}: {path!r} is not a dotted JSON path like usage.total_tokens")
    return UnitsSource(cast(Where, where), path)


def json_path(doc: Any, path: str) -> float | None:
    """The non-negative number at `path` (numeric segments index lists), else None."""
    return _walk(doc, path.split("."))


def _walk(doc: Any, segments: Sequence[str]) -> float | None:
    for segment in segments:
        if isinstance(doc, dict):
            doc = doc.get(segment)
        elif isinstance(doc, list) and segment.isascii() and segment.isdigit() and int(segment) < len(doc):
            doc = doc[int(segment)]
        else:
            return None
    return _units(doc)


def _units(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    try:
        units = float(value)
    except OverflowError:
        return None
    return units if math.isfinite(units) and units >= 0 else None


def header_units(headers: list[tuple[bytes, bytes]], name: str) -> float | None:
    """The non-negative decimal number in the last header called `name` (any case), else None."""
    value = _header(headers, name.lower().encode("latin-1", "replace"))
    match = _HEADER_NUMBER.fullmatch(value) if value is not None else None
    return _units(float(match[1])) if match else None


def _header(headers: list[tuple[bytes, bytes]], lower_name: bytes) -> bytes | None:
    found = None
    for name, value in headers:
        if name.lower() == lower_name:
            found = value
    return found


class ResponseMeter:
    """Fed a body as it streams; remembers the latest units seen.

    A JSON body (`application/json`, `*/*+json`) is kept up to `limit` bytes and parsed once at the end;
    a larger one reports nothing. A `text/event-stream` body is parsed event by event as chunks arrive,
    whatever the chunk boundaries; the last event whose JSON carries the path wins, the way LLM APIs
    put `usage` in their final chunk. gzip and deflate bodies are inflated as they come; other encodings
    and other content types report nothing. A header source is read at once from `headers`. Request
    sources work the same way, fed the request's body and headers.
    """

    def __init__(
        self,
        source: UnitsSource,
        content_type: str,
        headers: list[tuple[bytes, bytes]],
        *,
        limit: int = MAX_JSON,
    ) -> None:
        self._segments = source.path.split(".")
        self._limit = limit
        self._seen: float | None = None
        self._mode: Literal["off", "json", "sse"] = "off"
        self._finished = False
        self._inflater: Any = None
        self._pending = bytearray()  # json: the body so far; sse: the line not yet ended
        self._overlong = False  # sse: the pending line outgrew the limit and is being skipped
        self._after_cr = False  # sse: a chunk ended in CR, so a leading LF in the next one is the same break
        self._first_line = True
        self._event: list[bytes] = []  # sse: the data lines of the event being read
        self._event_size = 0
        self._event_broken = False
        # An event whose data lacks one of these keys (and any \u escape that could spell one) cannot carry
        # the path, so it is not parsed: most events of an LLM stream are content deltas.
        self._needles = [json.dumps(s).encode() for s in self._segments if _PLAIN_KEY.fullmatch(s)]
        if source.where.endswith(".header"):
            self._seen = header_units(headers, source.path)
            return
        mime = content_type.partition(";")[0].strip().lower()
        if mime == "text/event-stream":
            mode: Literal["json", "sse"] = "sse"
        elif mime == "application/json" or mime.endswith("+json"):
            mode = "json"
        else:
            return
        encoding = (_header(headers, b"content-encoding") or b"").strip().lower()
        if encoding in (b"gzip", b"x-gzip", b"deflate"):
            self._inflater = zlib.decompressobj(wbits=47)  # 32 + 15: zlib or gzip, told by the header
        elif encoding not in (b"", b"identity"):
            return
        self._mode = mode

    @property
    def seen(self) -> float | None:
        """Units seen so far: what to charge for a stream cut short or a client that left."""
        return self._seen

    def feed(self, chunk: bytes) -> None:
        if self._mode == "off" or self._finished or not chunk:
            return
        if self._inflater is None:
            self._take(chunk)
            return
        try:
            # Inflate in bounded steps, so a small compressed chunk never becomes one huge buffer.
            data = self._inflater.decompress(chunk, _INFLATE_STEP)
            self._take(data)
            while self._inflater is not None and self._inflater.unconsumed_tail:  # None once stopped
                self._take(self._inflater.decompress(self._inflater.unconsumed_tail, _INFLATE_STEP))
        except zlib.error:
            self._stop()

    def finish(self) -> float | None:
        """Units reported by the whole answer, or None when it reported none."""
        if self._finished:
            return self._seen
        self._finished = True
        if self._inflater is not None and self._mode != "off":
            try:
                self._take(self._inflater.flush())
            except zlib.error:
                self._stop()
        if self._mode == "json":
            self._seen = self._parse(self._pending)
        elif self._mode == "sse":
            # Lenient at the very end: a last event without its blank line still counts.
            if self._pending or self._overlong:
                self._line(None if self._overlong else bytes(self._pending))
            self._dispatch()
        self._stop()
        return self._seen

    def _stop(self) -> None:
        self._mode = "off"
        self._inflater = None
        self._pending = bytearray()
        self._event = []

    def _take(self, data: bytes) -> None:
        if not data:
            return
        if self._mode == "json":
            if len(self._pending) + len(data) > self._limit:
                self._stop()
            else:
                self._pending += data
            return
        start = 1 if self._after_cr and data[:1] == b"\n" else 0
        for end in _EOL.finditer(data, start):
            piece = data[start : end.start()]
            if self._overlong:
                self._overlong = False
                self._pending.clear()
                self._line(None)
            elif self._pending:
                self._pending += piece
                line = bytes(self._pending)
                self._pending.clear()
                self._line(line)
            else:
                self._line(piece)
            start = end.end()
        self._after_cr = data.endswith(b"\r")
        rest = data[start:]
        if self._overlong or len(self._pending) + len(rest) > self._limit:
            self._overlong = True
            self._pending.clear()
        else:
            self._pending += rest

    def _line(self, line: bytes | None) -> None:
        if line is None:
            self._event_broken = True
            return
        if self._first_line:
            self._first_line = False
            line = line.removeprefix(_BOM)
        if not line:
            self._dispatch()
            return
        if not line.startswith(b"data"):
            return  # comments and the other fields (event, id, retry) carry no units
        value = line[4:]
        if value:
            if value[:1] != b":":
                return  # a field that only starts with "data"
            value = value[2:] if value[1:2] == b" " else value[1:]
        self._event_size += len(value) + 1
        if self._event_size > self._limit:
            self._event_broken = True
            self._event = []
        elif not self._event_broken:
            self._event.append(value)

    def _dispatch(self) -> None:
        lines, broken = self._event, self._event_broken
        self._event, self._event_size, self._event_broken = [], 0, False
        if broken or not lines:
            return
        data = lines[0] if len(lines) == 1 else b"\n".join(lines)
        if data == b"[DONE]":
            return
        if b"\\u" not in data and not all(needle in data for needle in self._needles):
            return
        units = self._parse(data)
        if units is not None:
            self._seen = units

    def _parse(self, data: bytes | bytearray) -> float | None:
        try:
            doc = loads(data)
        except BadRequest:  # not JSON, or nested deeper than any answer that reports units
            return None
        return _walk(doc, self._segments)
