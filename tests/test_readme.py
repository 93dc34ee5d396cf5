"""The README as a user follows it: every fenced Python block runs as pasted, every documented request
answers as its comment says, and every `gateway` command line exits as documented.

What the tests change in the text, and only that: Redis URLs point at a private redis-server (a database
of its own per block), the Postgres URL at this run's database, and the ports at free ones. Everything
runs in a subprocess (the real `gateway` and `uvicorn` entry points) in a fresh folder with plans.toml.

A curl line's comment starts with the status it answers; then, where the comment has them, a JSON body
(`{"org":"org_1"}`: equal), the members of one (`{"id", "key"}`: exactly those keys), a quoted sentence
(in `detail`) and `with Header: value`.
"""

from __future__ import annotations

import ast
import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from itertools import pairwise
from pathlib import Path
from typing import Any

import httpx
import pytest
from billing_support import stripe_server
from services import RedisServer, free_port
from waiting import wait_until

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
BIN = Path(sys.executable).parent
DOCUMENTED_REDIS = "redis://127.0.0.1:6379/0"
DOCUMENTED_POSTGRES = "postgresql://me@127.0.0.1:5432/gw"
START_TIMEOUT = 60.0


@dataclass
class Block:
    lang: str
    text: str
    line: int  # where it starts in the README, for messages

    @property
    def lines(self) -> list[str]:
        return [line for line in self.text.splitlines() if line.strip()]


def readme_blocks() -> list[Block]:
    found: list[Block] = []
    lines = README.read_text().splitlines()
    i = 0
    while i < len(lines):
        opening = re.fullmatch(r"```(\w*)\s*", lines[i])
        if opening:
            j = i + 1
            while not lines[j].startswith("```"):
                j += 1
            found.append(Block(opening[1], "\n".join(lines[i + 1 : j]), i + 1))
            i = j
        i += 1
    return found


BLOCKS = readme_blocks()


def _app_blocks() -> list[tuple[Block, Block]]:
    """Each Python app block with the shell block after it that serves it (`uvicorn app:app ...`)."""
    pairs = []
    for first, second in pairwise(BLOCKS):
        if first.lang == "python" and second.lang == "sh" and "uvicorn app:app" in second.lines[0]:
            pairs.append((first, second))
    return pairs


APP_BLOCKS = _app_blocks()
CLIENT_BLOCKS = [b for b in BLOCKS if b.lang == "python" and "gateway.client" in b.text]
SERVED = {id(sh) for _, sh in APP_BLOCKS}


def split_comment(line: str) -> tuple[str, str]:
    """The command and its comment (a ` #` outside quotes)."""
    quote = ""
    for i, ch in enumerate(line):
        if quote:
            if ch == quote:
                quote = ""
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i].rstrip(), line[i + 1 :].strip()
    return line.rstrip(), ""


# ---- what a comment documents -------------------------------------------------------------------------


@dataclass
class Expected:
    status: int
    body: Any = None
    keys: set[str] | None = None  # the members of the object (of each item, for a list)
    listed: bool = False
    sentences: list[str] = field(default_factory=list)
    headers: list[tuple[str, str]] = field(default_factory=list)


def expected(comment: str) -> Expected | None:
    found = re.match(r"(\d{3})\b(.*)", comment)
    if not found:
        return None
    out, rest = Expected(int(found[1])), found[2]
    braces = re.search(r"\[?\{.*\}\]?", rest)
    if braces:
        rest = rest.replace(braces[0], "")
        try:
            out.body = json.loads(braces[0])
        except ValueError:
            shape = ast.literal_eval(braces[0])
            out.listed = isinstance(shape, list)
            out.keys = set(shape[0] if out.listed else shape)
    out.headers = re.findall(r"with ([A-Za-z-]+): (\S+)", rest)
    out.sentences = re.findall(r'"([^"]+)"', rest)
    return out


def check_answer(where: str, want: Expected, status: int, body: str, headers: dict[str, str]) -> None:
    assert status == want.status, f"{where}: answered {status}, documented {want.status}: {body[:300]}"
    if want.body is not None:
        assert json.loads(body) == want.body, f"{where}: {body}"
    if want.keys is not None:
        got = json.loads(body)
        items = got if want.listed else [got]
        assert items and all(set(item) == want.keys for item in items), f"{where}: {body}"
    for sentence in want.sentences:
        assert sentence in json.loads(body)["detail"], f"{where}: {body}"
    for name, value in want.headers:
        assert headers.get(name.lower()) == value, f"{where}: {name} is {headers.get(name.lower())!r}"


# ---- running shell lines --------------------------------------------------------------------------------


@dataclass
class Shell:
    """One user's shell: a folder, the environment, and the substitutions of this test run."""

    folder: Path
    env: dict[str, str]
    replace: dict[str, str]
    last_key_id: str = ""

    def text(self, line: str) -> str:
        for old, new in self.replace.items():
            line = line.replace(old, new)
        return line.replace("<id>", self.last_key_id)

    def run_block(self, block: Block, skip_first: bool = False) -> None:
        """Every line of a block, in one bash (so `export KEY=...` carries on), each checked as documented."""
        lines = block.lines[1:] if skip_first else block.lines
        script, checks = ["set -u"], []
        for n, raw in enumerate(lines):
            code, comment = split_comment(raw)
            code = self.text(code)
            want = expected(comment) if code.startswith("curl ") else None
            if want is not None:
                code += f" -D {self.folder}/headers{n} -w '\\n@@http %{{http_code}}'"
            script += [code, f'echo "@@end {n} $?"']
            checks.append((raw, want))
        done = subprocess.run(["bash", "-c", "\n".join(script)], cwd=self.folder, env=self.env, capture_output=True,
                              text=True, timeout=300, check=False)
        assert "Traceback" not in done.stdout + done.stderr, done.stdout + done.stderr
        outputs = re.split(r"@@end (\d+) (\d+)\n?", done.stdout)
        results = {int(outputs[i + 1]): (outputs[i], int(outputs[i + 2])) for i in range(0, len(outputs) - 2, 3)}
        for n, (raw, want) in enumerate(checks):
            where = f"README line {block.line + n + (2 if skip_first else 1)}: {raw.strip()}"
            assert n in results, f"{where}: did not run\n{done.stdout}\n{done.stderr}"
            output, code = results[n]
            assert code == 0, f"{where}: exited {code}\n{output}\n{done.stderr}"
            if want is not None:
                body, _, status = output.rpartition("@@http ")
                headers = _headers(self.folder / f"headers{n}")
                check_answer(where, want, int(status), body.strip(), headers)
                self._remember(body)

    def run_gateway(self, raw: str, line: int) -> None:
        """One `gateway ...` line: a one-shot command exits 0; a server starts, answers, and stops on Ctrl+C."""
        code, _ = split_comment(raw)
        code = self.text(code.split("&&")[-1].strip()).removeprefix(".venv/bin/")
        where = f"README line {line}: {raw.strip()}"
        if code.startswith(("gateway serve", "gateway demo")):
            with self.server(code, where):
                pass
            return
        done = subprocess.run(["bash", "-c", code], cwd=self.folder, env=self.env, capture_output=True, text=True,
                              timeout=120, check=False)
        output = done.stdout + done.stderr
        assert done.returncode == 0 and "Traceback" not in output, f"{where}: exited {done.returncode}\n{output}"
        self._remember(output)

    def _remember(self, output: str) -> None:
        """The id of the key just made (the CLI's line after the key, or the admin API's JSON)."""
        found = re.search(r"key (\w{12}) for", output) or re.search(r'"id":\s*"(\w{12})"', output)
        if found:
            self.last_key_id = found[1]

    @contextlib.contextmanager
    def server(self, command: str, where: str, port: int | None = None) -> Iterator[str]:
        port = port or free_port()
        env = {**self.env, "GATEWAY_PORT": str(port)}
        log = (self.folder / f"server-{port}.log").open("w+")
        # bash runs a lone command in its own place (exec), so the signal below reaches the server itself.
        proc = subprocess.Popen(["bash", "-c", command], cwd=self.folder, env=env, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
        base = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + START_TIMEOUT
            while True:
                assert proc.poll() is None, f"{where}: exited {proc.returncode}\n{_read(log)}"
                assert time.monotonic() < deadline, f"{where}: did not answer\n{_read(log)}"
                try:
                    httpx.get(f"{base}/_gateway/health", timeout=5)
                    break
                except httpx.HTTPError:
                    time.sleep(0.1)
            yield base
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGINT)  # Ctrl+C, to the group this test started
            code = proc.wait(timeout=30)
            output = _read(log)
            log.close()
        assert "Traceback" not in output, f"{where}:\n{output}"
        assert code in (0, 130), f"{where}: Ctrl+C ended it with {code}\n{output}"  # 130: the shell's SIGINT status


def _read(log: Any) -> str:
    log.flush()
    log.seek(0)
    return str(log.read())


def _headers(path: Path) -> dict[str, str]:
    if not path.exists():
        return {}
    found = {}
    for line in path.read_text(errors="replace").splitlines():
        name, sep, value = line.partition(":")
        if sep:
            found[name.strip().lower()] = value.strip()
    return found


# ---- fixtures -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def redis_server() -> Iterator[RedisServer]:
    with RedisServer() as server:
        yield server


def make_shell(folder: Path, redis_url: str, **env: str) -> Shell:
    shutil.copy(ROOT / "plans.toml", folder / "plans.toml")
    base = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    base["PATH"] = f"{BIN}{os.pathsep}{base.get('PATH', '')}"
    return Shell(folder, {**base, **env}, {DOCUMENTED_REDIS: redis_url})


# ---- the tests ------------------------------------------------------------------------------------------


def test_every_python_block_is_run_here() -> None:
    """Each Python block is an app served by the shell block after it, or the client example."""
    python = [b for b in BLOCKS if b.lang == "python"]
    assert python and len(python) == len(APP_BLOCKS) + len(CLIENT_BLOCKS), [b.line for b in python]
    assert len(APP_BLOCKS) == 3 and len(CLIENT_BLOCKS) == 1


@pytest.mark.parametrize("index", range(len(APP_BLOCKS)), ids=[f"line{py.line}" for py, _ in APP_BLOCKS])
def test_app_block_answers_as_documented(index: int, tmp_path: Path, redis_server: RedisServer) -> None:
    """The block saved as app.py, served by its uvicorn line, answers every curl line as documented."""
    python, sh = APP_BLOCKS[index]
    shell = make_shell(tmp_path, f"redis://127.0.0.1:{redis_server.port}/{index + 1}")
    (tmp_path / "app.py").write_text(shell.text(python.text) + "\n")
    port = free_port()
    command = re.sub(r"--port \d+", f"--port {port}", split_comment(sh.lines[0])[0])
    shell.replace["127.0.0.1:8000"] = f"127.0.0.1:{port}"
    with shell.server(command, f"README line {sh.line + 1}: {sh.lines[0]}", port=port):
        shell.run_block(sh, skip_first=True)


def test_gateway_command_lines_exit_as_documented(tmp_path: Path, redis_server: RedisServer, pg_url: str) -> None:
    """Every shell line that runs `gateway` (outside the quick start) exits 0, or serves and stops on Ctrl+C;
    the admin calls answer as documented against a `gateway serve` with an admin token."""
    redis_url = f"redis://127.0.0.1:{redis_server.port}/9"
    shell = make_shell(tmp_path, redis_url, GATEWAY_REDIS_URL=redis_url)
    shell.replace[DOCUMENTED_POSTGRES] = pg_url
    ran = 0
    with stripe_server() as (_, stripe_url):
        for block in BLOCKS:
            if block.lang != "sh" or id(block) in SERVED:
                continue
            if all(re.match(r"([A-Z_]+=\$\()?curl ", split_comment(line)[0]) for line in block.lines):
                port = free_port()
                shell.env["GATEWAY_ADMIN_TOKEN"] = "readme-admin-for-tests"
                shell.replace["127.0.0.1:8080"] = f"127.0.0.1:{port}"
                with shell.server("gateway serve --upstream http://127.0.0.1:9000", f"README line {block.line}", port=port):
                    shell.run_block(block)
                del shell.env["GATEWAY_ADMIN_TOKEN"]
                ran += len(block.lines)
                continue
            for n, line in enumerate(block.lines):
                code = split_comment(line)[0]
                if not re.match(r"(\.venv/bin/)?gateway ", code) or "gateway demo" in code:
                    continue  # not a gateway command, or the quick start (below)
                stripe = {"GATEWAY_STRIPE_API_KEY": "sk_test_readme", "GATEWAY_STRIPE_API_BASE": stripe_url}
                if code.startswith("gateway stripe"):
                    shell.env.update(stripe)
                shell.run_gateway(line, block.line + n + 1)
                for name in stripe:
                    shell.env.pop(name, None)
                ran += 1
    assert ran >= 14


def test_quick_start_demo_and_client(tmp_path: Path) -> None:
    """`gateway demo` prints one set of start lines, a key, and curl lines that answer as their comments say;
    the client example runs against it; Ctrl+C stops it cleanly; a second run starts afresh (the same answers)."""
    (quick,) = [b for b in BLOCKS if b.lang == "sh" and "gateway demo" in b.text]
    assert quick.lines[0].endswith(".venv/bin/gateway demo")
    shell = make_shell(tmp_path, "")
    for run in range(2):
        port = free_port()
        with shell.server("gateway demo", f"README line {quick.line + 1} (run {run + 1})", port=port) as base:
            log = tmp_path / f"server-{port}.log"
            deadline = time.monotonic() + START_TIMEOUT
            while "Ctrl+C" not in log.read_text() and time.monotonic() < deadline:
                time.sleep(0.1)
            printed = log.read_text()
            assert printed.count("The gateway is running at") == 1 and printed.count("Started server process") == 1, printed
            key, admin = re.search(r"export KEY=(\S+)", printed), re.search(r"export ADMIN=(\S+)", printed)
            assert key and admin, printed
            shell.env.update(KEY=key[1], ADMIN=admin[1])
            # Each curl line the demo prints, with the comment line above it.
            lines = [line.strip() for line in printed.splitlines() if line.strip().startswith(("# ", "curl "))]
            pairs = [f"{curl}  {comment}" for comment, curl in pairwise(lines)
                     if comment.startswith("# ") and curl.startswith("curl ")]
            assert len(pairs) == 6, printed
            shell.run_block(Block("sh", "\n".join(pairs), 0))
            if run == 0:
                (client,) = CLIENT_BLOCKS
                script = client.text.replace("127.0.0.1:8080", base.removeprefix("http://"))
                done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=shell.env, capture_output=True,
                                      text=True, timeout=120, check=False)
                assert done.returncode == 0, done.stderr
                assert done.stdout.splitlines()[-1] == "200", done.stdout


@pytest.mark.slow
def test_the_client_example_runs_in_a_fresh_venv_made_as_the_readme_says(tmp_path: Path) -> None:
    """A venv with only what the quick start installs cannot run the client example (`No module named 'httpx'`);
    with the README's install line before the example (the `client` extra) it runs as pasted against the demo."""
    (quick,) = [b for b in BLOCKS if b.lang == "sh" and "gateway demo" in b.text]
    (client,) = CLIENT_BLOCKS
    (install,) = [b for b, after in pairwise(BLOCKS) if after is client]
    venv = tmp_path / "venv"

    def pip_line(text: str) -> str:
        """A README line run here: its .venv is this test's, its checkout (`.`) this one."""
        return text.replace(".venv/", f"{venv}/").replace("-e .", f"-e {ROOT}").replace("'.[", f"'{ROOT}[")

    made = quick.lines[0].split(" && ")
    assert made[0] == "python3 -m venv .venv" and made[-1] == ".venv/bin/gateway demo", quick.lines[0]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GATEWAY_", "VIRTUAL_ENV", "PYTHON"))}
    env["PATH"] = f"{venv}/bin{os.pathsep}{env.get('PATH', '')}"

    def sh(line: str) -> None:
        done = subprocess.run(["bash", "-c", line], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600, check=False)
        assert done.returncode == 0, f"{line}\n{done.stdout}\n{done.stderr}"

    sh(f"{sys.executable} -m venv {venv} && " + pip_line(" && ".join(made[1:-1])))
    shell = Shell(tmp_path, env, {})
    shutil.copy(ROOT / "plans.toml", tmp_path / "plans.toml")

    def run_client(base: str) -> subprocess.CompletedProcess[str]:
        script = client.text.replace("127.0.0.1:8080", base.removeprefix("http://"))
        return subprocess.run([f"{venv}/bin/python", "-c", script], cwd=tmp_path, env=shell.env, capture_output=True,
                              text=True, timeout=120, check=False)  # fmt: skip

    with shell.server(f"{venv}/bin/gateway demo", "the quick start's demo, from the fresh venv") as base:
        log = next(tmp_path.glob("server-*.log"))
        key = wait_until(lambda: re.search(r"export KEY=(\S+)", log.read_text()), "the demo's key", START_TIMEOUT)
        shell.env["KEY"] = key[1]
        without = run_client(base)
        assert without.returncode == 1 and "No module named 'httpx'" in without.stderr, without.stderr
        (line,) = install.lines
        sh(pip_line(line))
        done = run_client(base)
        assert done.returncode == 0, done.stderr
        assert done.stdout.splitlines()[-1] == "200", done.stdout

