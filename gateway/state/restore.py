"""restore.lua's protocol: a saved state and the credit grants recorded after it, put back in one step."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from gateway.state.fields import grant_sequence


@dataclass(frozen=True, slots=True)
class Restored:
    """What the record gives back of a billable Redis lost: its last saved state (raw, as a Snapshot held
    it), every grant numbered after that state's, as (sequence, amount), in order, and the state hashes of
    its members saved with it (raw, per member)."""

    state: dict[str, str] = field(default_factory=dict)
    grants: tuple[tuple[int, int], ...] = ()
    members: dict[str, dict[str, str]] = field(default_factory=dict)

    @property
    def grant_sequence(self) -> int:
        return grant_sequence(self.state)

    def argv(self) -> list[str | int]:
        """{field count * 2, field, value, ..., then per member (in `members`' order, as the keys after the
        state hash): its field count * 2, field, value, ..., then sequence, amount, ...}."""
        out: list[str | int] = []
        for fields in (self.state, *self.members.values()):
            out.append(2 * len(fields))
            for name, value in fields.items():
                out += [name, value]
        for seq, amount in self.grants:
            out += [seq, amount]
        return out


@dataclass(frozen=True, slots=True)
class RestoreReply:
    restored: bool  # False: the state was present already (live, or another process's restore): it won
    last_sequence: int  # the last grant Redis holds now
    gap: bool  # Redis is behind the first grant given: the grants after last_sequence must be replayed

    @classmethod
    def parse(cls, raw: list[Any]) -> RestoreReply:
        return cls(bool(raw[0]), int(raw[1]), bool(raw[2]))
