"""Headless Chromium for tests that read a page the way a person sees it (DevTools protocol over a WebSocket)."""

from __future__ import annotations

import asyncio
import itertools
import json
import shutil
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import aiohttp

FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--hide-scrollbars",
    "--remote-debugging-port=0",
]


def chromium_path() -> str | None:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None and Path("/usr/bin/chromium").exists():
        found = "/usr/bin/chromium"
    return found


@contextmanager
def chromium(profile: Path) -> Iterator[str]:
    """A headless Chromium with a fresh profile; yields its DevTools base URL."""
    binary = chromium_path()
    if binary is None:
        raise RuntimeError("chromium is not installed: apt-get install -y chromium")
    proc = subprocess.Popen(
        [binary, *FLAGS, f"--user-data-dir={profile}", "about:blank"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        port_file = profile / "DevToolsActivePort"
        deadline = time.monotonic() + 20
        while not (port_file.exists() and port_file.read_text().strip()):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("chromium did not open its DevTools port")
            time.sleep(0.02)
        yield f"http://127.0.0.1:{port_file.read_text().split()[0]}"
    finally:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


# What a person sees: the rendered text (innerText skips what CSS hides), and where things are on screen.
SEEN = """(() => {
  const box = el => { const r = el.getBoundingClientRect(); return {left: r.left, right: r.right, top: r.top, bottom: r.bottom}; };
  return {
    text: document.body.innerText,
    title: document.title,
    innerWidth: window.innerWidth,
    scrollWidth: document.documentElement.scrollWidth,
    fontSize: parseFloat(getComputedStyle(document.body).fontSize),
    cards: [...document.querySelectorAll('article')].map(el => ({
      text: el.innerText, box: box(el),
      border: getComputedStyle(el).borderTopColor, borderWidth: parseFloat(getComputedStyle(el).borderTopWidth),
      amountSize: el.querySelector('.amount') && parseFloat(getComputedStyle(el.querySelector('.amount')).fontSize),
      titleSize: el.querySelector('h2') && parseFloat(getComputedStyle(el.querySelector('h2')).fontSize),
    })),
  };
})()"""


async def look(
    devtools: str, url: str, *, width: int, height: int, mobile: bool, screenshot: Path | None = None,
    scripts: tuple[str, ...] = (), expression: str | None = None,
) -> dict[str, Any]:
    """Load `url` in a viewport of that size and answer what is seen (see SEEN); optionally save a screenshot.
    `scripts` run in the loaded page first (a library such as axe-core); `expression`'s value (a promise is
    awaited) is answered as "extra"."""
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{devtools}/json/list") as r:
            page = next(t for t in await r.json() if t["type"] == "page")
        async with http.ws_connect(page["webSocketDebuggerUrl"], max_msg_size=0) as ws:
            ids = itertools.count(1)

            async def call(method: str, **params: Any) -> dict[str, Any]:
                call_id = next(ids)
                await ws.send_json({"id": call_id, "method": method, "params": params})
                async for message in ws:
                    data = json.loads(message.data)
                    if data.get("id") == call_id:
                        if "error" in data:
                            raise RuntimeError(f"{method}: {data['error']}")
                        result: dict[str, Any] = data["result"]
                        return result
                raise RuntimeError("the DevTools connection closed")

            await call("Emulation.setDeviceMetricsOverride", width=width, height=height, deviceScaleFactor=1, mobile=mobile)
            await call("Page.navigate", url=url)
            for _ in range(200):
                state = await call("Runtime.evaluate", expression="document.readyState", returnByValue=True)
                if state["result"]["value"] == "complete" and (await call(
                    "Runtime.evaluate", expression="location.href", returnByValue=True
                ))["result"]["value"] == url:
                    break
                await asyncio.sleep(0.05)
            seen = await call("Runtime.evaluate", expression=SEEN, returnByValue=True)
            for script in scripts:
                await call("Runtime.evaluate", expression=script)
            if expression is not None:
                extra = await call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
                if "exceptionDetails" in extra:
                    raise RuntimeError(f"the page's expression failed: {extra['exceptionDetails']}")
                seen["result"]["value"]["extra"] = extra["result"].get("value")
            if screenshot is not None:
                import base64

                shot = await call("Page.captureScreenshot", format="png", captureBeyondViewport=True)
                screenshot.write_bytes(base64.b64decode(shot["data"]))
            value: dict[str, Any] = seen["result"]["value"]
            return value
