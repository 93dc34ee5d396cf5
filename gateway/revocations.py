"""Revoked API keys, announced through Redis so that every gateway process drops them at once.

Without it a process must ask the record about every key it trusts once a second (the revocation bound
of DESIGN §3), a database read on the request path for each active key. With it, `KeyStore` trusts a key
for minutes as long as it heard the feed less than a second ago: a revocation reaches every process on
its next poll (every quarter second), and a process that cannot hear the feed falls back to asking the
record each second.

    feed = RevocationFeed(store)
    await feed.publish(key_id)              after the record has the revocation
    revoked, reset = await feed.poll()      ids revoked since the last poll; reset: forget every key
"""

from __future__ import annotations

from gateway.store.redis import RedisStore

KEEP = 10_000  # revocations kept in Redis; a process further behind than that forgets every key


class RevocationFeed:
    def __init__(self, store: RedisStore, *, prefix: str = "gw", interval: float = 0.25) -> None:
        self.store = store
        self.interval = interval  # seconds between polls
        # One hash tag, so both keys sit in one slot on a cluster; not `{prefix}:{...}`, which is a billable's.
        self.keys = [f"{prefix}:keyfeed:{{r}}:seq", f"{prefix}:keyfeed:{{r}}:ids"]
        self.seen = -1  # the last sequence number this process has applied (-1: none yet)

    async def publish(self, key_id: str) -> int:
        return int(await self.store.run("revoke", self.keys, [key_id, KEEP]))

    async def poll(self) -> tuple[list[str], bool]:
        """Key ids revoked since the last poll, and whether the caller must forget every key instead."""
        reply = await self.store.run("revocations", self.keys, [self.seen])
        first = self.seen < 0
        self.seen = int(reply[0])
        revoked, reset = [str(x) for x in reply[2:]], reply[1] == "reset"
        return revoked, reset and not first
