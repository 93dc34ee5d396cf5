"""`gateway keys create | list | revoke` on the record, with running gateways: a key made by the CLI is
accepted, and a revocation from the CLI is refused by a running gateway well within its long trust (five
minutes while it hears the feed): on a real Redis through the feed, on the in-process emulation through
the record. Real `gateway` processes, real HTTP."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
from http_servers import serve_in_thread
from services import RedisServer, free_port
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from gateway.identity import LONG_TTL_S

CATALOG = '[plans.free]\nallows = ["api_access"]\n[[routes]]\nmatch = "* /v1/*"\nfeatures = ["api_access"]\n'
GATEWAY = str(Path(sys.executable).parent / "gateway")
DEADLINE = 15.0  # far below LONG_TTL_S: only the revocation itself can end the key's trust this soon
assert DEADLINE < LONG_TTL_S


async def echo(request: Request) -> Response:
    return JSONResponse({"billable": request.headers.get("x-billable-id")})


UPSTREAM = Starlette(routes=[Route("/{path:path}", echo)])


def cli(folder: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    return subprocess.run([GATEWAY, *args], cwd=folder, env=env, capture_output=True, text=True, timeout=120, check=True)


@contextmanager
def gateway(folder: Path, upstream: str, *flags: str) -> Iterator[str]:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    log = (folder / f"gateway-{port}.log").open("w")
    proc = subprocess.Popen([GATEWAY, "serve", "--upstream", upstream, "--port", str(port), *flags], cwd=folder,
                            env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None and time.monotonic() < deadline, (folder / log.name).read_text()
            try:
                httpx.get(f"{url}/_gateway/health", timeout=5)
                break
            except httpx.HTTPError:
                time.sleep(0.1)
        yield url
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=30)
        log.close()


def refused_soon(url: str, key: str) -> bool:
    deadline = time.monotonic() + DEADLINE
    while time.monotonic() < deadline:
        if httpx.get(f"{url}/v1/x", headers={"Authorization": f"Bearer {key}"}).status_code == 401:
            return True
        time.sleep(0.05)
    return False


def create_and_revoke(folder: Path, url: str, *revoke_flags: str) -> None:
    created = cli(folder, "keys", "create", "org_1", "--name", "ci")
    key = created.stdout.strip()
    key_id = key[3:15]
    assert created.stderr == f"key {key_id} for org_1 (ci): shown once, store it now\n"
    for _ in range(20):  # trusted, and (on Redis) while the feed is heard: for minutes
        r = httpx.get(f"{url}/v1/x", headers={"Authorization": f"Bearer {key}"})
        assert r.status_code == 200 and r.json() == {"billable": "org_1"}
    listed = cli(folder, "keys", "list", "org_1").stdout.splitlines()
    assert listed[0].split() == ["id", "name", "created", "last", "used", "revoked"]
    assert listed[1].startswith(f"{key_id}  ci  ") and listed[1].endswith("-")
    revoked = cli(folder, "keys", "revoke", key_id, *revoke_flags)
    assert revoked.stdout.startswith(f"revoked {key_id} (")
    assert refused_soon(url, key)
    # Its holder is told it was revoked, and when, by the proxy and by the client's own endpoints; a guessed
    # secret for the same id is told only that a valid key is required.
    for path in ("/v1/x", "/_gateway/usage"):
        told = httpx.get(f"{url}{path}", headers={"Authorization": f"Bearer {key}"})
        assert told.status_code == 401 and told.json()["detail"].startswith("This API key was revoked on 20"), told.text
        guessed = httpx.get(f"{url}{path}", headers={"Authorization": f"Bearer gw_{key_id}_{'A' * 32}"})
        assert guessed.status_code == 401 and "revoked" not in guessed.json()["detail"], guessed.text
    assert cli(folder, "keys", "list", "org_1").stdout.splitlines()[1].endswith("revoked")


def test_cli_keys_on_redis_announce_the_revocation(tmp_path: Path) -> None:
    """With --redis-url, `keys revoke` announces on the feed the gateway hears: refused at once."""
    (tmp_path / "plans.toml").write_text(CATALOG)
    with (
        RedisServer() as redis_server,
        serve_in_thread(UPSTREAM) as upstream,
        gateway(tmp_path, upstream, "--redis-url", redis_server.url) as url,
    ):
        create_and_revoke(tmp_path, url, "--redis-url", redis_server.url)


def test_cli_keys_on_the_emulation_reach_it_through_the_record(tmp_path: Path) -> None:
    """On the in-process emulation the CLI cannot reach the gateway's Redis: the gateway asks the record."""
    (tmp_path / "plans.toml").write_text(CATALOG)
    with serve_in_thread(UPSTREAM) as upstream, gateway(tmp_path, upstream) as url:
        create_and_revoke(tmp_path, url)
