"""A running gateway for HTTP tests of the gateway's own rules: `gateway serve`'s app under uvicorn, a real
upstream that records what reached it, a private redis-server and a real database (SQLite or Postgres)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

import redis
import sqlalchemy as sa
from http_servers import serve_in_thread
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from gateway.app import GatewayApp
from gateway.settings import Settings
from gateway.store.db import Database

ADMIN = "bounds-admin-for-tests"
ADMIN_HEADERS = {"Authorization": f"Bearer {ADMIN}"}


@dataclass
class Served:
    url: str
    app: GatewayApp
    db_url: str
    redis_port: int
    upstream_saw: list[str] = field(default_factory=list)  # "METHOD path billable" of every forwarded request

    def redis(self) -> redis.Redis:
        return redis.Redis(port=self.redis_port, socket_timeout=5, decode_responses=True)

    def state(self, billable: str) -> dict[str, str]:
        """The billable's Redis state hash, read directly (not through the gateway)."""
        with self.redis() as client:
            found: dict[str, str] = client.hgetall(f"gw:{{{quote(billable, safe='')}}}")
            return found

    def billable_keys(self) -> list[str]:
        """Every per-billable key in Redis (global keys such as the reconciler's lease are not counted)."""
        with self.redis() as client:
            return sorted(client.scan_iter("gw:{*"))

    def query(self, sql: str, **params: Any) -> list[tuple[Any, ...]]:
        return asyncio.run(query(self.db_url, sql, **params))

    def snapshot(self, billable: str) -> dict[str, str]:
        """The billable's state as the record last saw it."""
        rows = self.query("select state from snapshots where billable = :b", b=billable)
        return json.loads(rows[0][0]) if rows else {}


async def query(db_url: str, sql: str, **params: Any) -> list[tuple[Any, ...]]:
    db = await Database.connect(db_url)
    try:
        async with db.engine.connect() as conn:
            return [tuple(row) for row in await conn.execute(sa.text(sql), params)]
    finally:
        await db.close()


async def _upgrade(db_url: str) -> None:
    db = await Database.connect(db_url)
    try:
        await db.upgrade()
    finally:
        await db.close()


def recording_upstream(saw: list[str]) -> Starlette:
    async def echo(request: Request) -> Response:
        saw.append(f"{request.method} {request.url.path} {request.headers.get('x-billable-id')}")
        await request.body()
        return JSONResponse({"path": request.url.path, "billable": request.headers.get("x-billable-id")})

    return Starlette(routes=[Route("/{rest:path}", echo, methods=["GET", "POST", "PUT", "DELETE"])])


@contextmanager
def serving(tmp_path: Path, catalog: str, *, redis_port: int, db_url: str, **overrides: Any) -> Iterator[Served]:
    """The gateway on `catalog`, deciding on the redis-server at `redis_port`, recording into `db_url`."""
    plans = tmp_path / "plans.toml"
    plans.write_text(catalog)
    asyncio.run(_upgrade(db_url))
    saw: list[str] = []
    with serve_in_thread(recording_upstream(saw)) as upstream:
        settings = Settings(
            plans=str(plans),
            upstream=upstream,
            redis_url=f"redis://127.0.0.1:{redis_port}/0",
            database_url=db_url,
            **{"admin_token": ADMIN, **overrides},
        )
        app = GatewayApp(settings)
        with serve_in_thread(app) as url:
            yield Served(url, app, db_url, redis_port, saw)
