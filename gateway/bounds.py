"""Bounds on the data clients and operators send (DESIGN §3): JSON size and depth, whole numbers.

    loads(raw)                      JSON (UTF-8), at most MAX_DEPTH levels deep, else BadRequest (once_each=True:
                                    and no key twice in one object, for the gateway's own endpoints)
    integer(body, "amount", low=1)  a JSON whole number within ±MAX_INT, else BadRequest naming the field
    unrecordable(doc)               the place of a string in a JSON document the record cannot keep, or None
    toml_too_deep(text)             whether a TOML text (a catalog) nests deeper than MAX_DEPTH

`json.loads` recurses in C, so a document nested a thousand levels raises RecursionError (or worse):
the depth is counted on the text first, without recursion, and only a document within it is parsed.
`tomllib` recurses in Python for arrays and inline tables, and takes quadratic time on a long dotted key
(`a.a.a...`): a TOML text is counted the same way before it is parsed.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any

from gateway.errors import BadRequest

MAX_DEPTH = 64
MAX_BODY = 1 << 20  # the JSON bodies of the gateway's own endpoints
MAX_INT = 2**53 - 1  # every number Redis scripts, JSON clients and doubles hold exactly

# A string, or an unterminated one up to the end (a pattern that could fail would be retried from every
# later quote: quadratic on a body of escaped quotes).
_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*(?:"|\\?\Z)', re.DOTALL)
_NOT_BRACKET = re.compile(r"[^\[\]{}]+")
_OPENS = str.maketrans("[{", "((")


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _once_each(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    found = dict(pairs)
    if len(found) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise BadRequest(f"{key[:80]!r} is given twice in one object: send each key once.")
            seen.add(key)
    return found


_DECODER = json.JSONDecoder(parse_constant=_no_constants)  # one decoder: json.loads(**kw) builds one per call
_STRICT = json.JSONDecoder(parse_constant=_no_constants, object_pairs_hook=_once_each)


def too_deep(text: str) -> bool:
    """Whether arrays and objects nest deeper than MAX_DEPTH in a JSON text, counted without recursion."""
    if text.count("[") + text.count("{") <= MAX_DEPTH:
        return False  # the common case: too few brackets to nest that deep, in strings or not
    # Strings out, then only the brackets: at worst about as long as json.loads takes on the same text.
    level = 0
    for c in _NOT_BRACKET.sub("", _STRING.sub("", text)).translate(_OPENS):
        if c == "(":
            level += 1
            if level > MAX_DEPTH:
                return True
        else:
            level -= 1
    return False


def loads(raw: bytes | bytearray | str, *, once_each: bool = False) -> Any:
    """The JSON document in `raw`; BadRequest when it is not UTF-8 JSON or nests deeper than MAX_DEPTH (and,
    `once_each`, when an object names a key twice: which one counts is no parser's guess to make)."""
    try:
        text = raw if isinstance(raw, str) else bytes(raw).decode("utf-8-sig")
    except UnicodeDecodeError:
        raise BadRequest("The body is not UTF-8 JSON.") from None
    if too_deep(text):
        raise BadRequest(f"The JSON is nested deeper than {MAX_DEPTH} levels.")
    try:
        return (_STRICT if once_each else _DECODER).decode(text)
    except RecursionError:  # only if the count above was fooled: never a 500
        raise BadRequest(f"The JSON is nested deeper than {MAX_DEPTH} levels.") from None
    except ValueError:
        raise BadRequest("The body is not JSON.") from None


# What a Postgres text column cannot hold: NUL, and a surrogate without its pair (JSON's "\ud800" alone),
# which is no character UTF-8 can encode.
_NOT_TEXT = re.compile("[\x00\ud800-\udfff]")


def unrecordable(doc: Any) -> str | None:
    """The place (`reason`, `limits.exports.grace`, `allows[0]`) of the first string in `doc`, key or value, that
    the record cannot keep, else None."""
    pending: list[tuple[Any, str]] = [(doc, "")]
    while pending:
        value, place = pending.pop()
        if isinstance(value, str):
            if _NOT_TEXT.search(value):
                return place or "the body"
        elif isinstance(value, dict):
            for key, item in value.items():
                inner = f"{place}.{key}" if place else key
                if _NOT_TEXT.search(key):
                    return ascii(inner)[1:-1]
                pending.append((item, inner))
        elif isinstance(value, list):
            pending.extend((item, f"{place}[{i}]") for i, item in enumerate(value))
    return None


def integer(body: Mapping[str, Any], name: str, *, low: int = -MAX_INT, high: int = MAX_INT) -> int:
    """The whole number at `body[name]` within [low, high]: BadRequest naming `name` when it is missing."""
    if name not in body:
        raise BadRequest(f"{name} must be a whole number from {low} to {high}, missing.")
    return whole(body[name], name, low=low, high=high)


def whole(value: Any, name: str, *, low: int = -MAX_INT, high: int = MAX_INT) -> int:
    """`value` as a whole number within [low, high]. A float with nothing after the point (10.0, as a JSON
    encoder may write 10) is that number; 1.5, a bool, a string or a number out of range is a BadRequest."""
    if isinstance(value, int) and not isinstance(value, bool):
        if low <= value <= high:
            return value
    elif isinstance(value, float) and value.is_integer() and low <= value <= high:
        return int(value)
    if isinstance(value, dict | list):
        shown = f"not {'an object' if isinstance(value, dict) else 'an array'}"
    else:
        shown = f"not {json.dumps(value)[:40]}"
    raise BadRequest(f"{name} must be a whole number from {low} to {high}, {shown}.")


# What a TOML scan stops at: a string or comment to skip, or a character that opens, closes or dots.
_TOML_STOP = re.compile(r"[\"'#\[\]{}=,.\n]")
_TOML_SKIP = {  # from just after the opening quote(s) to just after the closing ones; None: unterminated
    '"""': re.compile(r'(?:[^"\\]|\\.|"(?!""))*"""', re.DOTALL),
    "'''": re.compile(r"(?:[^']|'(?!''))*'''"),
    '"': re.compile(r'(?:[^"\\\n]|\\.)*"'),
    "'": re.compile(r"[^'\n]*'"),
}


def toml_too_deep(text: str) -> bool:
    """Whether a TOML text nests tables, arrays and dotted keys deeper than MAX_DEPTH levels, counted in one
    pass without recursion. Strings and comments are skipped; a text that is not TOML is left to the parser."""
    opened: list[tuple[str, int]] = []  # the arrays and inline tables the scan is in, each with its depth
    table = base = dots = level = 0  # the header's depth, where the key being read starts, its dots, a value's depth
    key, header = True, False  # reading a key (else a value); the key is a table header
    pos = 0
    while (stop := _TOML_STOP.search(text, pos)) is not None:
        c, pos = stop[0], stop.end()
        if c in "\"'":
            quote = c * 3 if text.startswith(c * 3, stop.start()) else c
            end = _TOML_SKIP[quote].match(text, stop.start() + len(quote))
            if end is None:
                return False  # unterminated: not TOML
            pos = end.end()
        elif c == "#":
            newline = text.find("\n", pos)
            pos = len(text) if newline < 0 else newline
        elif c == "\n":
            if not opened:
                key, header, base, dots = True, False, table, 0
        elif c == ".":
            if key:
                dots += 1
                if base + dots >= MAX_DEPTH:
                    return True
        elif c == "=":
            key, level, dots = False, base + dots + 1, 0
        elif c == "[" and key and not opened:
            header, base, dots = True, 0, 0
        elif c == "]" and header:
            header, key, table = False, False, dots + 1
        elif c in "[{":
            if level >= MAX_DEPTH:
                return True
            opened.append((c, level))
            if c == "[":
                level += 1
            else:
                key, base, dots = True, level, 0
        elif c in "]}" or c == ",":
            if c != "," and opened:
                opened.pop()
            key = False
            if opened:
                inside, depth = opened[-1]
                if inside == "[":
                    level = depth + 1
                elif c == ",":
                    key, base, dots = True, depth, 0
    return False
