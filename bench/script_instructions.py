"""What decide.lua costs inside Redis, in CPU instructions: repeatable whatever else the machine is doing
(a loaded machine inflates `INFO commandstats` usec_per_call, never an instruction count).

    .venv/bin/python bench/script_instructions.py              # 500 decisions of bench/plans.toml's GET /hello
    .venv/bin/python bench/script_instructions.py --calls 2000

Runs a private redis-server under valgrind's callgrind, decides GET /hello (a rate limit, a monthly
allowance and a credit spend) for 100 billables through the engine, and counts the server's instructions
over the timed calls only (callgrind_control zeroes and dumps around them); then the same number of calls
of the empty script (`_ping`), the cost of any EVALSHA's round trip through Redis. Prints instructions per
call of each and their difference: what the decision itself costs. Compare counts as ratios (issue 22's
20 µs is 0.3x the 67 µs `usec_per_call` measured at 5da24e6, where this counts 504k).
"""

from __future__ import annotations

import argparse
import asyncio
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import redis

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from services import free_port

from gateway.catalog import load_catalog
from gateway.engine import Engine
from gateway.store.redis import open_redis


def counted(pid: int, out: Path) -> int:
    """Instructions since the last zero: callgrind_control dumps them to a file of its own."""
    before = set(out.parent.glob(out.name + "*"))
    subprocess.run(["callgrind_control", "--dump", str(pid)], check=True, capture_output=True)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        for dump in set(out.parent.glob(out.name + "*")) - before:
            found = re.search(r"^(?:summary|totals): (\d+)", dump.read_text(), re.MULTILINE)
            if found:
                return int(found.group(1))
        time.sleep(0.1)
    raise SystemExit("callgrind wrote no dump within 60 s")


async def measure(port: int, pid: int, out: Path, calls: int) -> None:
    bench = load_catalog(ROOT / "bench" / "plans.toml")
    store = open_redis(f"redis://127.0.0.1:{port}/0")
    engine = Engine(store, bench)
    route = bench.route_for("GET", "/hello")

    async def timed(one: Callable[[int], Awaitable[object]]) -> int:
        for i in range(100):
            await one(i)
        await asyncio.to_thread(subprocess.run, ["callgrind_control", "--zero", str(pid)], check=True, capture_output=True)
        for i in range(calls):
            await one(i)
        return await asyncio.to_thread(counted, pid, out) // calls

    decide = await timed(lambda i: engine.decide(f"b{i % 100}", route))
    ping = await timed(lambda i: store.run("_ping", ["k:{a}"], ["x"]))
    print(f"redis-server instructions per call ({calls} calls each, callgrind):")
    print(f"  decide.lua (GET /hello)  {decide:>9,}")
    print(f"  _ping.lua (empty script) {ping:>9,}")
    print(f"  the decision itself      {decide - ping:>9,}")
    await store.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--calls", type=int, default=500)
    calls = parser.parse_args().calls
    port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "callgrind.out"
        server = subprocess.Popen(
            ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", "redis-server", "--port", str(port),
             "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", tmp],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        try:
            deadline = time.monotonic() + 120
            while True:
                try:
                    redis.Redis(port=port, socket_timeout=30).ping()
                    break
                except redis.ConnectionError:
                    if time.monotonic() > deadline:
                        raise SystemExit("redis-server under valgrind did not answer within 120 s") from None
                    time.sleep(0.2)
            asyncio.run(measure(port, server.pid, out, calls))
        finally:
            server.terminate()
            try:
                server.wait(timeout=60)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()


if __name__ == "__main__":
    main()
