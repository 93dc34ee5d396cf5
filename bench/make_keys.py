"""Create N API keys for N billables in a record; print the keys, one per line (for bench/proxy_keys.sh)."""

from __future__ import annotations

import asyncio
import sys

from gateway.identity import KeyStore
from gateway.store.db import Database


async def main(url: str, count: int) -> None:
    db = await Database.connect(url, auto_upgrade=True)
    keys = KeyStore(db)
    for i in range(count):
        print((await keys.create(f"bench-{i}", "bench")).key)
    await keys.close()
    await db.close()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], int(sys.argv[2])))
