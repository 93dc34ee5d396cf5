"""A private nginx for tests: Debian's package, run by the test on a free loopback port with the README's own
`http` block (the gateway's and the API's addresses put in), never the system's service or its files."""

from __future__ import annotations

import re
import shutil
import socket
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from services import free_port
from waiting import wait_until

README = Path(__file__).resolve().parents[1] / "README.md"
DOCUMENTED_GATEWAY = "127.0.0.1:8080"
DOCUMENTED_API = "127.0.0.1:8000"

# Everything outside the README's `http` block: one process in the foreground, its files in its own folder.
_MAIN = """daemon off;
master_process off;
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {dir}/body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
{http}
}}
"""


def readme_nginx_block() -> str:
    """The one ```nginx block of the README, as written there."""
    (block,) = re.findall(r"^```nginx\n(.*?)^```$", README.read_text(), flags=re.MULTILINE | re.DOTALL)
    return str(block)


def _nginx() -> str:
    path = shutil.which("nginx") or next((p for p in ("/usr/sbin/nginx",) if Path(p).exists()), None)
    if path is None:
        raise RuntimeError("nginx is not installed; the forward-auth test runs one. .ci/run installs it (apt-get install nginx-light).")
    return path


@contextmanager
def nginx(directory: Path, gateway: str, api: str) -> Iterator[str]:
    """nginx with the README's block in front of `gateway` and `api` (host:port each); yields its base URL."""
    port = free_port()
    http = readme_nginx_block().replace(DOCUMENTED_GATEWAY, gateway).replace(DOCUMENTED_API, api)
    http = http.replace("listen 80;", f"listen 127.0.0.1:{port};")
    conf = directory / "nginx.conf"
    conf.write_text(_MAIN.format(dir=directory, http=http))
    log = directory / "error.log"
    proc = subprocess.Popen([_nginx(), "-p", str(directory), "-c", str(conf), "-e", str(log)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)  # fmt: skip
    try:
        wait_until(lambda: _listening(port) or proc.poll() is not None, f"nginx on port {port}", timeout=30)
        if proc.poll() is not None:
            raise RuntimeError(f"nginx exited with {proc.returncode}:\n{log.read_text(errors='replace') if log.exists() else ''}")
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def _listening(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False
