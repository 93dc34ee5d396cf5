"""gateway/paths.py's patterns for the OpenAPI document say what canonical() says: a path they match is
taken, and a path taken (ASCII, no ".." segment) is one they match."""

from __future__ import annotations

import re
from urllib.parse import quote

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.paths import RAW_PATH, SEGMENT_TEXT, BadPath, canonical

pytestmark = pytest.mark.unit

_PIECES = ["/", ".", "..", "%2e", "%2F", "%20", "%25", "%00", "%7f", "%C3%A9", "%zz", "%", ";", "?", "#", "\\", " ", "a", "Z", "~", "-", "!", "@", "[", "\x01", "\x7f"]
_RAW = re.compile(RAW_PATH).fullmatch
_TEXT = re.compile(SEGMENT_TEXT).fullmatch


def _taken(raw: str) -> bool:
    try:
        canonical(raw.encode("latin-1"))
    except BadPath:
        return False
    return True


@given(st.lists(st.sampled_from(_PIECES), max_size=12).map(lambda parts: "/" + "".join(parts)))
def test_raw_path_is_what_canonical_takes(raw: str) -> None:
    dotted = any(part.lower().replace("%2e", ".") == ".." for part in raw.split("/"))
    non_ascii = re.search("%[89a-fA-F][0-9a-fA-F]", raw) is not None
    if _RAW(raw):
        assert _taken(raw), raw
    elif _taken(raw) and not dotted and not non_ascii:
        pytest.fail(f"canonical() takes {raw!r}; RAW_PATH does not match it")


@given(st.text(alphabet=st.sampled_from([".", "/", "?", "#", ";", "\\", "%", "a", " ", "é", "\x85", "\x00", "\u2028", "😀"]), max_size=6))
def test_segment_text_is_what_canonical_keeps(text: str) -> None:
    """A decoded segment, sent percent-encoded as a client sends a path parameter."""
    assert bool(_TEXT(text)) == _taken("/" + quote(text, safe="")), text
