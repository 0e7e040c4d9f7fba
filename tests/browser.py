"""A headless Chromium driven over the DevTools protocol through a pipe (``--remote-debugging-pipe``: the protocol's
JSON messages, each ended by a NUL byte, on the browser's file descriptors 3 (in) and 4 (out)), so the tests need no
Python package beyond the standard library and the system's chromium.

``load(path)`` opens a local HTML file, waits for its load event, runs a JavaScript expression on it, takes a
full-page screenshot and returns what the page logged: console messages, uncaught exceptions and the browser's own
log entries (a resource that failed to load, a blocked request, ...).
"""
from __future__ import annotations

import base64
import fcntl
import json
import os
import select
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

CANDIDATES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome")


def find_chromium() -> str | None:
    """The browser binary: $BDSAFETY_CHROMIUM, else the first of CANDIDATES on PATH."""
    env = os.environ.get("BDSAFETY_CHROMIUM")
    if env:
        return env if Path(env).is_file() else shutil.which(env)
    return next((p for p in map(shutil.which, CANDIDATES) if p), None)


@dataclass
class Page:
    value: object  # what the expression returned
    screenshot: bytes  # PNG
    console: list = field(default_factory=list)  # (level, text) of every console message and log entry
    exceptions: list = field(default_factory=list)  # uncaught exceptions' texts

    @property
    def errors(self) -> list:
        return [t for lvl, t in self.console if lvl in ("error", "assert")] + self.exceptions


class _Pipe:
    def __init__(self, proc, write_fd: int, read_fd: int):
        self.proc, self.w, self.r = proc, write_fd, read_fd
        self.buf = b""
        self.next_id = 0
        self.events: list = []

    def _read(self, deadline: float) -> dict:
        while b"\0" not in self.buf:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.r], [], [], left)[0]:
                raise TimeoutError("chromium did not answer in time")
            chunk = os.read(self.r, 1 << 16)
            if not chunk:
                raise RuntimeError(f"chromium closed the pipe (exit status {self.proc.poll()})")
            self.buf += chunk
        msg, self.buf = self.buf.split(b"\0", 1)
        return json.loads(msg)

    def send(self, method: str, params: dict | None = None, session: str | None = None, timeout: float = 60) -> dict:
        self.next_id += 1
        msg = {"id": self.next_id, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        os.write(self.w, json.dumps(msg).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            m = self._read(deadline)
            if m.get("id") == self.next_id:
                if "error" in m:
                    raise RuntimeError(f"{method}: {m['error']}")
                return m.get("result", {})
            self.events.append(m)

    def wait_event(self, method: str, timeout: float = 60) -> dict:
        deadline = time.monotonic() + timeout
        seen = [e for e in self.events if e.get("method") == method]
        while not seen:
            m = self._read(deadline)
            self.events.append(m)
            if m.get("method") == method:
                seen.append(m)
        return seen[0]


def _child_fds(to_browser: int, from_browser: int):
    """In the child before exec: the browser reads the protocol on fd 3 and writes it on fd 4."""
    def setup():
        a = fcntl.fcntl(to_browser, fcntl.F_DUPFD, 10)  # out of the way of 3 and 4 first
        b = fcntl.fcntl(from_browser, fcntl.F_DUPFD, 10)
        os.dup2(a, 3)
        os.dup2(b, 4)
    return setup


def load(path: Path, expression: str, width: int = 1600, height: int = 1000, timeout: float = 120) -> Page:
    """Open ``path`` in a fresh headless Chromium (its own profile folder) and evaluate ``expression`` after the
    load."""
    binary = find_chromium()
    if binary is None:
        raise FileNotFoundError(f"no chromium binary ({', '.join(CANDIDATES)}, or $BDSAFETY_CHROMIUM)")
    to_r, to_w = os.pipe()
    from_r, from_w = os.pipe()
    profile = tempfile.mkdtemp(prefix="bdsafety-chromium-")
    args = [binary, "--headless", "--remote-debugging-pipe", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
            "--no-first-run", "--no-default-browser-check", "--disable-extensions", "--mute-audio",
            f"--user-data-dir={profile}", f"--window-size={width},{height}", "about:blank"]
    proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            close_fds=False, preexec_fn=_child_fds(to_r, from_w))
    os.close(to_r)
    os.close(from_w)
    pipe = _Pipe(proc, to_w, from_r)
    try:
        target = pipe.send("Target.createTarget", {"url": "about:blank"}, timeout=timeout)["targetId"]
        sid = pipe.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        for domain in ("Page", "Runtime", "Log"):
            pipe.send(f"{domain}.enable", session=sid)
        pipe.send("Emulation.setDeviceMetricsOverride", {"width": width, "height": height, "deviceScaleFactor": 1,
                                                         "mobile": False}, session=sid)
        pipe.events.clear()
        pipe.send("Page.navigate", {"url": Path(path).resolve().as_uri()}, session=sid)
        pipe.wait_event("Page.loadEventFired", timeout=timeout)
        res = pipe.send("Runtime.evaluate", {"expression": expression, "returnByValue": True, "awaitPromise": True},
                        session=sid)
        if "exceptionDetails" in res:
            raise RuntimeError(f"the check script failed: {res['exceptionDetails']}")
        size = pipe.send("Page.getLayoutMetrics", session=sid)["cssContentSize"]
        shot = pipe.send("Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True, "clip": {
            "x": 0, "y": 0, "width": size["width"], "height": size["height"], "scale": 1}}, session=sid,
                         timeout=timeout)
        page = Page(res["result"].get("value"), base64.b64decode(shot["data"]))
        for e in pipe.events:
            p = e.get("params", {})
            if e.get("method") == "Runtime.consoleAPICalled":
                page.console.append((p.get("type"), " ".join(str(a.get("value", a.get("description", "")))
                                                             for a in p.get("args", []))))
            elif e.get("method") == "Log.entryAdded":
                entry = p.get("entry", {})
                page.console.append((entry.get("level"), f"{entry.get('text', '')} {entry.get('url', '')}".strip()))
            elif e.get("method") == "Runtime.exceptionThrown":
                d = p.get("exceptionDetails", {})
                page.exceptions.append(d.get("exception", {}).get("description") or d.get("text", ""))
        try:
            pipe.send("Browser.close", timeout=10)
        except (RuntimeError, TimeoutError):
            pass
        return page
    finally:
        os.close(to_w)
        os.close(from_r)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        shutil.rmtree(profile, ignore_errors=True)


def keep_screenshot(page: Page, path: Path) -> Path:
    """Write the page's screenshot to ``path``, and a copy into $BDSAFETY_TEST_ARTIFACTS when set (CI's artifacts)."""
    path = Path(path)
    path.write_bytes(page.screenshot)
    if os.environ.get("BDSAFETY_TEST_ARTIFACTS"):
        dst = Path(os.environ["BDSAFETY_TEST_ARTIFACTS"])
        dst.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, dst / path.name)
    return path
