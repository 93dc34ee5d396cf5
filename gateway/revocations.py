"""Revoked API keys, announced through Redis so that every gateway process drops them at once.

Without it a process must ask the record about every key it trusts once a second (the revocation bound
of DESIGN §3), a database read on the request path for each active key. With it, `KeyStore` trusts a key
for minutes as long as it heard the feed less than a second ago: a revocation reaches every process on
its next poll (every quarter second), and a process that cannot hear the feed falls back to asking the
record each second.

Redis may lose the feed's last entries: a restart empties it and its sequence starts again at 0, and a
promoted replica may lack the last revocations while its sequence looks current. So each poll also reads
the epoch of the feed's master (lua/lib/epoch.lua, DESIGN §5), in the same script: a new one means every
key must be checked against the record again, like a feed that lost track.

    feed = RevocationFeed(store)
    await feed.publish(key_id)              after the record has the revocation
    revoked, reset = await feed.poll()      ids revoked since the last poll; reset: forget every key
"""

from __future__ import annotations

import logging

from gateway import state
from gateway.store.redis import RedisStore

log = logging.getLogger(__name__)

KEEP = 10_000  # revocations kept in Redis; a process further behind than that forgets every key


class RevocationFeed:
    def __init__(self, store: RedisStore, *, prefix: str = state.PREFIX, interval: float = 0.25) -> None:
        self.store = store
        self.interval = interval  # seconds between polls
        self.keys = state.revocation_keys(prefix)
        self.seen = -1  # the last sequence number this process has applied (-1: none yet)
        self.epoch: str | None = None  # the epoch of the feed's master at the last poll that answered

    async def publish(self, key_id: str) -> int:
        return int(await self.store.run("revoke", self.keys, state.RevokeArgs(key_id, KEEP).argv()))

    async def poll(self) -> tuple[list[str], bool]:
        """Key ids revoked since the last poll, and whether the caller must forget every key it trusts
        instead: on the first poll (what came before it is not told), when the feed lost track, and when
        the feed's master has a new epoch."""
        reply = state.RevocationsReply.parse(await self.store.run("revocations", self.keys, state.revocations_argv(self.seen)))
        epoch = reply.epoch
        moved = self.epoch is not None and epoch != self.epoch
        if moved:
            log.warning(
                "Redis at %s has a new epoch (it restarted or a replica took over) and may have lost the last "
                "API key revocations: every key is checked against the record again", self.store.url
            )
        first = self.epoch is None
        self.seen, self.epoch = reply.sequence, epoch
        if first or moved or reply.reset:
            return [], True
        return reply.revoked, False
