"""The protocols of what every process shares: the revocation feed (revoke.lua, revocations.lua), the
catalog's announcement (catalog.lua), a master's epoch (epoch.lua); and of the record's sweep of one
billable (forget.lua, ack.lua)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, slots=True)
class RevokeArgs:
    key_id: str
    keep: int  # revocations the feed keeps

    def argv(self) -> list[str | int]:
        return [self.key_id, self.keep]


@dataclass(frozen=True, slots=True)
class RevocationsReply:
    sequence: int  # the feed's sequence now
    reset: bool  # the caller cannot know what it missed: it forgets every key it trusts
    epoch: str  # the feed's master's epoch, read in the same script
    revoked: list[str]

    @classmethod
    def parse(cls, raw: list[Any]) -> RevocationsReply:
        """{sequence, "ok" | "reset", epoch, key ids...}."""
        return cls(int(raw[0]), raw[1] == "reset", str(raw[2]), [str(x) for x in raw[3:]])


def revocations_argv(seen: int) -> list[str | int]:
    """What revocations.lua reads: the last sequence applied (-1: none, only the current one wanted)."""
    return [seen]


def announce_argv(version: int) -> list[str | int]:
    """What catalog.lua reads: a version just published (raised, never lowered)."""
    return [version]


def forget_argv(counters: Mapping[str, str]) -> list[str | int]:
    """What forget.lua reads: each field and the value the record was given."""
    return [x for kv in counters.items() for x in kv]


@dataclass(frozen=True, slots=True)
class AckArgs:
    """Drop at most `count` pending events from the head, each at or before the mark (seq, time in ms)."""

    count: int
    through_seq: int
    through_ms: int

    def argv(self) -> list[str | int]:
        return [self.count, self.through_seq, self.through_ms]
