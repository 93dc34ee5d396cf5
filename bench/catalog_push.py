"""Time from `gateway catalog push` to the last process deciding with the new version, with `--workers 2`.

A private redis-server and a SQLite record; `gateway serve --workers 2` in front of a tiny upstream; a load
loop of fresh connections (so both workers answer) asks `GET /_gateway/admin/catalog` (what the answering
process runs) while `gateway catalog push` publishes a new version. The times are from the push's start and
from its exit (the version is announced just before) to the first of 100 answers in a row that all name the
new version; every request answered is counted.

    .venv/bin/python bench/catalog_push.py [--rounds 5]
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

ADMIN = "bench-admin-for-benches"
PLANS = """
[catalog]
default_plan = "free"

[plans.free]
price = 0
rate_limit = "{rate}/second"

[[routes]]
match = "* /*"
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(url: str, deadline_s: float = 30) -> None:
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        try:
            httpx.get(url, timeout=1)
            return
        except httpx.HTTPError:
            time.sleep(0.05)
    raise SystemExit(f"{url} did not answer within {deadline_s:g}s")


def upstream(port: int) -> subprocess.Popen[bytes]:
    code = (
        "import uvicorn\n"
        "async def app(scope, receive, send):\n"
        "    if scope['type'] != 'http': return\n"
        "    await send({'type': 'http.response.start', 'status': 200, 'headers': []})\n"
        "    await send({'type': 'http.response.body', 'body': b'ok'})\n"
        f"uvicorn.run(app, host='127.0.0.1', port={port}, log_level='error')\n"
    )
    return subprocess.Popen([sys.executable, "-c", code])


def one_round(gateway: str, env: dict[str, str], folder: Path, url: str, rate: int) -> tuple[float, float, int, int]:
    new = folder / f"plans-{rate}.toml"
    new.write_text(PLANS.format(rate=rate))
    version_before = httpx.get(f"{url}/_gateway/admin/catalog", headers={"Authorization": f"Bearer {ADMIN}"}).json()["version"]
    answered = failed = 0
    seen: list[tuple[float, int]] = []
    stop = threading.Event()

    def load() -> None:
        nonlocal answered, failed
        while not stop.is_set():
            try:
                r = httpx.get(f"{url}/_gateway/admin/catalog", headers={"Authorization": f"Bearer {ADMIN}", "Connection": "close"}, timeout=5)
                seen.append((time.monotonic(), r.json()["version"]))
                answered += 1
            except httpx.HTTPError:
                failed += 1

    threads = [threading.Thread(target=load) for _ in range(4)]
    for t in threads:
        t.start()
    time.sleep(0.5)
    started = time.monotonic()
    subprocess.run([gateway, "catalog", "push", str(new)], env=env, check=True, capture_output=True)
    pushed = time.monotonic()  # the version is recorded and announced just before the command exits
    deadline = started + 30
    switched: float | None = None
    while time.monotonic() < deadline and switched is None:
        time.sleep(0.05)
        after = [(at, v) for at, v in list(seen) if at >= started]
        for i in range(len(after)):
            window = after[i : i + 100]
            if len(window) == 100 and all(v > version_before for _, v in window):
                switched = window[0][0]
                break
    stop.set()
    for t in threads:
        t.join()
    if switched is None:
        raise SystemExit("the workers did not all switch within 30 s")
    return switched - started, switched - pushed, answered, failed


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    gateway = shutil.which("gateway") or str(Path(sys.executable).with_name("gateway"))
    folder = Path(tempfile.mkdtemp(prefix="gw-push-"))
    redis_port, up_port, port = free_port(), free_port(), free_port()
    redis = subprocess.Popen(["redis-server", "--port", str(redis_port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"], stdout=subprocess.DEVNULL)
    up = upstream(up_port)
    plans = folder / "plans.toml"
    plans.write_text(PLANS.format(rate=1000))
    env = {
        **os.environ,
        "GATEWAY_REDIS_URL": f"redis://127.0.0.1:{redis_port}/0",
        "GATEWAY_DATABASE_URL": f"sqlite:///{folder}/gateway.db",
        "GATEWAY_ADMIN_TOKEN": ADMIN,
    }
    serve = subprocess.Popen(
        [gateway, "serve", "--plans", str(plans), "--upstream", f"http://127.0.0.1:{up_port}", "--port", str(port),
         "--workers", "2", "--billable-header", "X-Org"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(f"{url}/_gateway/health")
        times, afters = [], []
        for i in range(args.rounds):
            took, after, answered, failed = one_round(gateway, env, folder, url, 2000 + i)
            times.append(took)
            afters.append(after)
            print(
                f"round {i + 1}: every worker on the new version {took * 1000:.0f} ms after `gateway catalog push` started, "
                f"{after * 1000:.0f} ms after it exited; {answered} answered, {failed} failed"
            )
        print(
            f"median {statistics.median(times) * 1000:.0f} ms from the command's start (max {max(times) * 1000:.0f}), "
            f"{statistics.median(afters) * 1000:.0f} ms from its exit (max {max(afters) * 1000:.0f}) over {args.rounds} pushes"
        )
    finally:
        for proc in (serve, up, redis):
            proc.terminate()
            proc.wait(10)
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
