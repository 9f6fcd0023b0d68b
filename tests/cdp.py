"""A headless chromium driven over the DevTools protocol (a websocket, aiohttp's client).

Just what the page tests need: open a URL, run JavaScript in it (clicks, reading the DOM), set
files on an input, take a screenshot, emulate a window size. Debian's chromium; nothing is
downloaded.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import json
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import aiohttp
from conftest import require_tool


class CdpError(Exception):
    """The browser answered a command with an error, or the script threw."""


class Browser:
    """One headless chromium with one page."""

    def __init__(self) -> None:
        self._proc: asyncio.subprocess.Process | None = None
        self._profile = tempfile.mkdtemp(prefix="cdp-chromium-")
        self._session: aiohttp.ClientSession | None = None
        self._ws: aiohttp.ClientWebSocketResponse | None = None
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._reader: asyncio.Task[None] | None = None
        self._drainer: asyncio.Task[None] | None = None
        self.console: list[str] = []

    async def start(self, width: int = 1280, height: int = 900) -> None:
        """Start chromium and attach to its page."""
        self._proc = await asyncio.create_subprocess_exec(
            require_tool("chromium"),
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--hide-scrollbars",
            f"--window-size={width},{height}",
            f"--user-data-dir={self._profile}",
            "--remote-debugging-port=0",
            "about:blank",
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
        )
        assert self._proc.stderr is not None
        port = None
        async with asyncio.timeout(30):
            while port is None:
                line = (await self._proc.stderr.readline()).decode()
                if not line:
                    raise CdpError("chromium exited before it listened")
                found = re.search(r"DevTools listening on ws://[^:]+:(\d+)/", line)
                port = int(found.group(1)) if found else None
        self._drainer = asyncio.create_task(self._drain(self._proc.stderr))
        self._session = aiohttp.ClientSession()
        async with self._session.get(f"http://127.0.0.1:{port}/json/list") as response:
            targets = await response.json(content_type=None)
        page = next(t for t in targets if t["type"] == "page")
        self._ws = await self._session.ws_connect(page["webSocketDebuggerUrl"], max_msg_size=0)
        self._reader = asyncio.create_task(self._read())
        await self.send("Page.enable")
        await self.send("Runtime.enable")

    @staticmethod
    async def _drain(stream: asyncio.StreamReader) -> None:
        while await stream.readline():
            pass

    async def _read(self) -> None:
        assert self._ws is not None
        async for message in self._ws:
            data = json.loads(message.data)
            if "id" in data and data["id"] in self._pending:
                self._pending.pop(data["id"]).set_result(data)
            elif data.get("method") == "Runtime.consoleAPICalled":
                args = data["params"]["args"]
                self.console.append(" ".join(str(a.get("value", "")) for a in args))
            elif data.get("method") == "Runtime.exceptionThrown":
                self.console.append(json.dumps(data["params"]["exceptionDetails"])[:500])

    async def send(self, method: str, **params: Any) -> dict[str, Any]:
        """One DevTools command; its result."""
        assert self._ws is not None
        ident = next(self._ids)
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._pending[ident] = future
        await self._ws.send_str(json.dumps({"id": ident, "method": method, "params": params}))
        answer = await asyncio.wait_for(future, 30)
        if "error" in answer:
            raise CdpError(f"{method}: {answer['error']}")
        return answer["result"]

    async def open(self, url: str) -> None:
        """Load ``url`` and wait until its scripts ran once."""
        await self.send("Page.navigate", url=url)
        await self.wait_for("document.readyState === 'complete'")

    async def eval(self, script: str) -> Any:
        """The value of a JavaScript expression (promises are awaited)."""
        result = await self.send(
            "Runtime.evaluate", expression=script, awaitPromise=True, returnByValue=True
        )
        if "exceptionDetails" in result:
            raise CdpError(json.dumps(result["exceptionDetails"])[:1000])
        return result["result"].get("value")

    async def wait_for(self, script: str, timeout: float = 10.0) -> Any:
        """Poll until the expression is truthy; its value."""
        async with asyncio.timeout(timeout):
            while True:
                with contextlib.suppress(CdpError):
                    value = await self.eval(script)
                    if value:
                        return value
                await asyncio.sleep(0.1)

    async def set_files(self, selector: str, paths: list[str]) -> None:
        """Choose files on an ``<input type=file>``."""
        document = await self.send("DOM.getDocument")
        node = await self.send(
            "DOM.querySelector", nodeId=document["root"]["nodeId"], selector=selector
        )
        await self.send("DOM.setFileInputFiles", files=paths, nodeId=node["nodeId"])

    async def size(self, width: int, height: int, mobile: bool = False) -> None:
        """Emulate a window (a phone with ``mobile``)."""
        await self.send(
            "Emulation.setDeviceMetricsOverride",
            width=width,
            height=height,
            deviceScaleFactor=1,
            mobile=mobile,
        )

    async def screenshot(self, path: Path, full: bool = True) -> None:
        """A PNG of the page (the whole page with ``full``)."""
        shot = await self.send("Page.captureScreenshot", format="png", captureBeyondViewport=full)
        path.write_bytes(base64.b64decode(shot["data"]))

    async def close(self) -> None:
        """Stop chromium and remove its profile."""
        if self._ws is not None:
            await self._ws.close()
        for task in (self._reader, self._drainer):
            if task is not None:
                task.cancel()
        if self._session is not None:
            await self._session.close()
        if self._proc is not None and self._proc.returncode is None:
            self._proc.terminate()
            try:
                await asyncio.wait_for(self._proc.wait(), 10)
            except TimeoutError:
                self._proc.kill()
                await self._proc.wait()
        shutil.rmtree(self._profile, ignore_errors=True)
