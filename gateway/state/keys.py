"""Where one billable's state lives: three keys under one hash tag, `<prefix>:{<billable>}`; and the few
keys every process shares (the catalog's announcement, the revocation feed).

    <prefix>:{b}        hash: the fields of gateway.state.fields
    <prefix>:{b}:ev     list: pending events, oldest first, until the record takes them
    <prefix>:{b}:holds  hash: metered holds awaiting their settle
    <prefix>:{b}:m:<m>  hash: the own state of member m of root b (a team, a key: gateway.members), under
                        the root's tag so that one script decides the root and its members
"""

from __future__ import annotations

import functools
from typing import NamedTuple
from urllib.parse import quote, unquote

PREFIX = "gw"  # what every key starts with unless a caller (a test, a second gateway on one Redis) says otherwise


class Keys(NamedTuple):
    """A billable's keys; the hash tag puts them on one node, so one script sees them all."""

    state: str
    events: str
    holds: str

    def only_state(self) -> list[str]:
        return [self.state]

    def only_events(self) -> list[str]:
        return [self.events]

    def all(self) -> list[str]:
        return [self.state, self.events, self.holds]


@functools.lru_cache(maxsize=65536)
def keys(prefix: str, billable: str) -> Keys:
    base = f"{prefix}:{{{_tag(billable)}}}"
    return Keys(base, base + ":ev", base + ":holds")


@functools.lru_cache(maxsize=65536)
def member_key(prefix: str, root: str, member: str) -> str:
    """The state hash of `member` of `root`, in the root's hash slot."""
    return f"{prefix}:{{{_tag(root)}}}:m:{_tag(member)}"


def catalog_key(prefix: str) -> str:
    """The published catalog's announcement (a hash; `v` the version), polled by every process."""
    return f"{prefix}:catalog"


def revocation_keys(prefix: str) -> list[str]:
    """The revoked API keys' feed: its sequence counter and the ids by sequence. One hash tag, so both sit in
    one slot on a cluster; not `{prefix}:{...}`, which is a billable's."""
    return [f"{prefix}:keyfeed:{{r}}:seq", f"{prefix}:keyfeed:{{r}}:ids"]


def probe_key(prefix: str) -> str:
    """A key nothing writes, read at start-up to see whether Redis answers this URL."""
    return f"{prefix}:{{start-up check}}"


def pattern(prefix: str) -> str:
    """What SCAN matches to find every billable's state hash."""
    return f"{prefix}:{{*}}"


def billable_of(prefix: str, state_key: str) -> str:
    """The billable a state hash (as `pattern` finds it) belongs to."""
    return unquote(state_key[len(prefix) + 2 : -1])


def _tag(billable: str) -> str:
    # Percent-encoding keeps `{`, `}` and `:` out of the tag, so no id can reach another's keys.
    return quote(billable, safe="")
