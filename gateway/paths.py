"""The canonical path (DESIGN §2): the path that is matched, charged and forwarded is one path.

`canonical(raw)` takes a request's raw path (ASGI `raw_path`: percent-encoded, no query string) and
answers None when it is already canonical (one regex scan in the common case), else the canonical raw
path with its decoded form, else raises `BadPath` naming the part that cannot be made canonical
without guessing what the upstream will do with it.

Made canonical: escapes of unreserved characters decoded (`%2e` is `.`, `%77` is `w`), repeated
slashes merged, `.` and `..` segments removed (RFC 3986 §5.2.4, after merging, as envoy and nginx do),
characters a path may not hold raw (`{`, `"`, UTF-8 bytes) percent-encoded. Other escapes (`%20`) stay
as they were sent. Refused: an encoded `/`, `\\`, `?`, `#` or `;` (the upstream may split on it or
not), a raw `\\` (some servers read it as `/`), `#`, `?` or `;` parameter, a control character raw or
encoded, a `%` without two hex digits, invalid or overlong UTF-8, a `..` above the root, and a path
that does not start with `/`.
"""

from __future__ import annotations

import re
from urllib.parse import quote

__all__ = ["RAW_PATH", "SEGMENT_TEXT", "BadPath", "canonical", "encoded"]

# A canonical path made only of characters it may hold raw, no empty segment but a final one, and no
# segment starting with a dot (maybe `.` or `..`; a dotfile's name only costs the slow path).
_PLAIN = re.compile(rb"(?:/[A-Za-z0-9\-_~!$&'()*+,=:@][A-Za-z0-9\-._~!$&'()*+,=:@]*)+/?|/").fullmatch
_HEX = frozenset(b"0123456789abcdefABCDEF")
_UNRESERVED = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
# Kept raw in a segment: unreserved, the sub-delims but ";", and ":" "@".
_RAW_OK = _UNRESERVED | frozenset(b"!$&'()*+,=:@")
# Octets whose escape is refused rather than kept: the upstream may decode them into delimiters.
_ENCODED_DELIMITERS = {0x2F: '"/"', 0x5C: '"\\"', 0x3F: '"?"', 0x23: '"#"', 0x3B: '";"'}
_RAW_REFUSED = {0x23: 'a raw "#"', 0x3F: 'a raw "?"', 0x5C: 'a raw "\\" (some servers read it as "/")',
                0x3B: 'a ";" parameter'}
_SHOWN = 64  # characters of a segment quoted in a refusal

# The same rules as regular expressions, for the OpenAPI document (tests/test_paths.py holds them to
# canonical()): RAW_PATH, an ASCII path as sent that canonical() takes (its non-ASCII escapes left out: UTF-8
# is more than a pattern should say); SEGMENT_TEXT, one decoded segment it keeps (not "..", no delimiter, no
# control character).
_CHAR = "[ !\"$&'()*+,\\-0-9:<=>@A-Z\\[\\]^_`a-z{|}~]"  # a raw octet but ".", "/", "%" and the refused ones
_ESCAPE = "%(?:2[0-24-9A-Da-d]|3[0-9ACDEacde]|[46][0-9A-Fa-f]|5[0-9ABD-Fabd-f]|7[0-9A-Ea-e])"  # but %2E, "." too
_DOT = "(?:\\.|%2[Ee])"
_UNIT = f"(?:{_CHAR}|{_ESCAPE}|{_DOT})"
_OTHER = f"(?:{_CHAR}|{_ESCAPE})"
_SEGMENT = f"(?:{_OTHER}{_UNIT}*|{_DOT}(?:{_OTHER}{_UNIT}*)?|{_DOT}{_DOT}{_UNIT}+)?"  # not ".." (nor "."... but alone)
RAW_PATH = f"(?:/{_SEGMENT})+"
_TEXT = "[^\\x00-\\x1f\\x7f-\\x9f/\\\\?#;]"
SEGMENT_TEXT = f"(?:[^.\\x00-\\x1f\\x7f-\\x9f/\\\\?#;]{_TEXT}*|\\.(?:[^.\\x00-\\x1f\\x7f-\\x9f/\\\\?#;]{_TEXT}*)?|\\.\\.{_TEXT}+)?"


class BadPath(ValueError):
    """A path that cannot be made canonical; `detail` is the sentence for the 400."""

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


def canonical(raw: bytes) -> tuple[bytes, str] | None:
    """None if `raw` is canonical already, else (canonical raw path, its decoded form); BadPath if neither."""
    if _PLAIN(raw) is not None:
        return None
    if raw[:1] != b"/":
        raise BadPath(f"The path {_show(raw)} cannot be made canonical: it must start with \"/\".")
    kept: list[bytes] = []
    decoded: list[str] = []
    parts = raw.split(b"/")[1:]
    trailing = False
    for index, part in enumerate(parts):
        segment, text = _segment(part)
        last = index == len(parts) - 1
        if segment in (b"", b"."):
            trailing = last
            continue
        if segment == b"..":
            if not kept:
                raise _refused('".." above the root', part)
            kept.pop()
            decoded.pop()
            trailing = last
            continue
        kept.append(segment)
        decoded.append(text)
        trailing = False
    end = "/" if trailing and kept else ""
    made = b"/" + b"/".join(kept) + end.encode()
    # Only escapes to keep (`%20`): the server's decoded path is this one's already.
    return None if made == raw else (made, "/" + "/".join(decoded) + end)


def encoded(path: str) -> bytes:
    """A decoded path percent-encoded again, for a server that gives no `raw_path`."""
    return quote(path, safe="/!$&'()*+,=:@~").encode("ascii")


def _segment(part: bytes) -> tuple[bytes, str]:
    """One segment's canonical raw form and its decoded text."""
    out = bytearray()
    octets = bytearray()
    i, n = 0, len(part)
    while i < n:
        byte = part[i]
        if byte == 0x25:  # "%"
            escape = part[i : i + 3]
            if len(escape) < 3 or escape[1] not in _HEX or escape[2] not in _HEX:
                raise _refused('a "%" not followed by two hex digits', part)
            octet = int(escape[1:], 16)
            if octet in _UNRESERVED:
                out.append(octet)
            elif octet in _ENCODED_DELIMITERS:
                raise _refused(f"an encoded {_ENCODED_DELIMITERS[octet]} ({escape.decode()})", part)
            elif octet < 0x20 or octet == 0x7F:
                raise _refused(f"an encoded control character ({escape.decode()})", part)
            else:
                out += escape
            octets.append(octet)
            i += 3
            continue
        if byte < 0x20 or byte == 0x7F:
            raise _refused(f"a control character (0x{byte:02X})", part)
        if byte in _RAW_REFUSED:
            raise _refused(_RAW_REFUSED[byte], part)
        if byte in _RAW_OK:
            out.append(byte)
        else:
            out += b"%%%02X" % byte
        octets.append(byte)
        i += 1
    try:
        text = octets.decode("utf-8")  # strict: overlong forms and surrogates are errors too
    except UnicodeDecodeError:
        raise _refused("invalid UTF-8", part) from None
    if any("\x80" <= ch <= "\x9f" for ch in text):
        raise _refused("a control character (C1)", part)
    return bytes(out), text


def _refused(problem: str, part: bytes) -> BadPath:
    return BadPath(f"The path cannot be made canonical: {problem} in the segment {_show(part)}.")


def _show(raw: bytes) -> str:
    text = raw[:_SHOWN].decode("latin-1").encode("unicode_escape").decode("ascii").replace('"', '\\"')
    return f'"{text}{"..." if len(raw) > _SHOWN else ""}"'
