"""For the hostile-client tests: a raw HTTP client, an upstream that records what it got, `gateway serve`'s app.

httpx (like every well-behaved client) normalizes a URL before sending it, so hostile request targets
go out byte for byte over a plain socket here.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
from http_servers import serve_in_thread
from starlette.types import Receive, Scope, Send

from gateway.app import GatewayApp
from gateway.settings import Settings

ADMIN = "admin-secret-for-tests"

# The example catalog's shape: the Free plan lacks Flux HD, so `POST /v1/images` is a 403 for it.
CATALOG = """
[catalog]
default_plan = "free"
highlighted_plan = "pro"

[features]
api_access = "API access"
flux_hd_access = "Flux HD"

[operations.generate_image]
cost = 1

[operations.cheap]
cost = 2

[plans.free]
price = 0
rate_limit = { limit = 10000, per = "1s" }
allows = ["api_access"]
disallows = ["flux_hd_access"]
credits = 100000
limits.projects = { to = 100000 }

[plans.pro]
price = 29
rate_limit = { limit = 10000, per = "1s" }
allows = ["api_access", "flux_hd_access"]
credits = 100000
limits.projects = { to = 100000 }

[[routes]]
match = "POST /v1/images"
features = ["api_access", "flux_hd_access"]
spend = "generate_image"

[[routes]]
match = "POST /v1/cheap"
features = ["api_access"]
spend = "cheap"

[[routes]]
match = "POST /v1/projects"
features = ["api_access"]
limit = "projects"

[[routes]]
match = "GET /v1/status"
public = true

[[routes]]
match = "* /v1/*"
features = ["api_access"]
"""


# ---- a raw HTTP/1.1 client ---------------------------------------------------------------------------


@dataclass
class RawResponse:
    status: int
    headers: list[tuple[str, str]]
    body: bytes

    def header(self, name: str) -> str | None:
        return next((v for k, v in self.headers if k == name), None)

    def json(self) -> Any:
        return json.loads(self.body)


def raw_request(
    base: str, method: str, target: bytes, headers: Sequence[tuple[str, str]] = (), body: bytes = b""
) -> RawResponse:
    """Send `target` exactly as given (no normalization, no quoting) and read the answer to the end."""
    parts = urlsplit(base)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    lines = [method.encode() + b" " + target + b" HTTP/1.1", b"Connection: close"]
    if not any(k.lower() == "host" for k, _ in headers):
        lines.append(f"Host: {host}:{port}".encode())
    lines += [f"Content-Length: {len(body)}".encode()] if method not in ("GET", "HEAD", "OPTIONS") or body else []
    lines += [f"{k}: {v}".encode("latin-1") for k, v in headers]
    with socket.create_connection((host, port), timeout=10) as sock:
        sock.sendall(b"\r\n".join(lines) + b"\r\n\r\n" + body)
        received = bytearray()
        while data := sock.recv(65536):
            received += data
    head, _, rest = bytes(received).partition(b"\r\n\r\n")
    status_line, *header_lines = head.split(b"\r\n")
    parsed = [(k.strip().lower().decode("latin-1"), v.strip().decode("latin-1"))
              for k, _, v in (line.partition(b":") for line in header_lines)]
    answer = RawResponse(int(status_line.split()[1]), parsed, rest)
    if (answer.header("transfer-encoding") or "").lower() == "chunked":
        answer.body = _dechunk(rest)
    return answer


def _dechunk(data: bytes) -> bytes:
    out = bytearray()
    while data:
        size_line, _, data = data.partition(b"\r\n")
        size = int(size_line.split(b";")[0], 16)
        if size == 0:
            break
        out += data[:size]
        data = data[size + 2 :]
    return bytes(out)


def websocket_handshake(base: str, target: bytes, headers: Sequence[tuple[str, str]] = ()) -> int:
    """Open a WebSocket at `target` (sent byte for byte) and answer the handshake's status."""
    return websocket_refusal(base, target, headers)[0]


def websocket_refusal(base: str, target: bytes, headers: Sequence[tuple[str, str]] = ()) -> tuple[int, bytes]:
    """A WebSocket handshake's status and, when it was refused, the whole answer."""
    parts = urlsplit(base)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    lines = [b"GET " + target + b" HTTP/1.1", f"Host: {host}:{port}".encode(), b"Upgrade: websocket",
             b"Connection: Upgrade", b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==", b"Sec-WebSocket-Version: 13"]
    lines += [f"{k}: {v}".encode("latin-1") for k, v in headers]
    with socket.create_connection((host, port), timeout=10) as sock:
        sock.sendall(b"\r\n".join(lines) + b"\r\n\r\n")
        received = bytearray()
        while b"\r\n\r\n" not in received and (data := sock.recv(65536)):
            received += data
        status = int(bytes(received).split(b"\r\n", 1)[0].split()[1])
        while status != 101 and (data := sock.recv(65536)):
            received += data
    return status, bytes(received)


# ---- an upstream that records every request ----------------------------------------------------------


@dataclass
class Seen:
    """What the upstream received: one entry per request or WebSocket, in order."""

    requests: list[dict[str, Any]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def count(self) -> int:
        with self.lock:
            return len(self.requests)

    def since(self, mark: int) -> list[dict[str, Any]]:
        with self.lock:
            return self.requests[mark:]


def recording_upstream(seen: Seen) -> Any:
    """Answers every request with what it saw; `?location=URL` answers 302 with that Location (and
    Content-Location), `?sleep=S` waits first."""

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        entry = {
            "type": scope["type"],
            "method": scope.get("method", "GET"),
            "path": scope["path"],
            "raw_path": scope["raw_path"].decode("latin-1"),
            "query": scope["query_string"].decode("latin-1"),
            "headers": [[k.decode("latin-1"), v.decode("latin-1")] for k, v in scope["headers"]],
        }
        with seen.lock:
            seen.requests.append(entry)
        if scope["type"] == "websocket":
            await receive()
            await send({"type": "websocket.accept"})
            await send({"type": "websocket.close", "code": 1000})
            return
        while (await receive()).get("more_body", False):
            pass
        query = parse_qs(entry["query"])
        if "sleep" in query:
            await asyncio.sleep(float(query["sleep"][0]))
        headers = [(b"content-type", b"application/json")]
        status = 200
        if "location" in query:
            status = 302
            headers += [(b"location", query["location"][0].encode()), (b"content-location", query["location"][0].encode())]
        body = json.dumps(entry).encode()
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    return app


# ---- `gateway serve`'s app in front of it ------------------------------------------------------------


@dataclass
class Gateway:
    url: str
    upstream: str
    seen: Seen
    app: GatewayApp

    def admin(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {ADMIN}"}

    def key(self, plan: str = "free") -> tuple[str, str]:
        billable = f"org-{uuid.uuid4().hex[:10]}"
        r = httpx.post(f"{self.url}/_gateway/admin/keys", json={"billable": billable, "name": "t"}, headers=self.admin())
        assert r.status_code == 201, r.text
        if plan != "free":
            assert httpx.put(f"{self.url}/_gateway/admin/billables/{billable}/plan", json={"plan": plan},
                             headers=self.admin()).status_code == 200
        return billable, r.json()["key"]

    def status(self, billable: str) -> dict[str, Any]:
        r = httpx.get(f"{self.url}/_gateway/admin/billables/{billable}", headers=self.admin())
        assert r.status_code == 200, r.text
        body: dict[str, Any] = r.json()
        return body


@contextmanager
def gateway(tmp_path: Path, redis_url: str | None, catalog: str = CATALOG, **overrides: Any) -> Iterator[Gateway]:
    """uvicorn serving GatewayApp (run as `gateway serve` runs it) in front of a recording upstream."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    plans = tmp_path / "plans.toml"
    plans.write_text(catalog)
    seen = Seen()
    with serve_in_thread(recording_upstream(seen)) as upstream_url:
        overrides.setdefault("upstream", upstream_url)
        settings = Settings(plans=str(plans), redis_url=redis_url, database_url=f"sqlite:///{tmp_path}/gw.db",
                            admin_token=ADMIN, **overrides)
        app = GatewayApp(settings)
        with serve_in_thread(app, proxy_headers=settings.trust_forwarded) as url:
            yield Gateway(url=url, upstream=upstream_url, seen=seen, app=app)
