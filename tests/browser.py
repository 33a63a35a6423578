"""Headless Chromium driven as a person drives it: the DevTools protocol over a pipe (`--remote-debugging-pipe`,
fds 3 and 4, messages NUL-terminated JSON), standard library only. Clicks are real mouse events at the element's
centre, and a click that something else on the page would catch (a pop-up over the button) fails."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import time
from pathlib import Path


class Browser:
    def __init__(self, chromium: str, profile: Path, size: str = "1800,900") -> None:
        """A headless Chromium with its own profile dir (a later Browser on the same dir sees its localStorage)."""
        to_chrome, self._w = os.pipe()
        self._r, from_chrome = os.pipe()

        def pipe_fds() -> None:  # in the child: fds 3 and 4, inheritable (dup2 from fds above 4)
            r, w = os.dup(to_chrome), os.dup(from_chrome)
            os.dup2(r, 3)
            os.dup2(w, 4)

        self.proc = subprocess.Popen(
            [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
             "--remote-debugging-pipe", f"--user-data-dir={profile}", f"--window-size={size}", "about:blank"],
            preexec_fn=pipe_fds, close_fds=False, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        os.close(to_chrome)
        os.close(from_chrome)
        self._id, self._buf, self._session = 0, b"", None
        target = self.send("Target.createTarget", url="about:blank")["targetId"]
        self._session = self.send("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]

    def send(self, method: str, **params: object) -> dict:
        self._id += 1
        msg: dict[str, object] = {"id": self._id, "method": method, "params": params}
        if self._session:
            msg["sessionId"] = self._session
        os.write(self._w, json.dumps(msg).encode() + b"\0")
        while True:
            while b"\0" not in self._buf:
                chunk = os.read(self._r, 1 << 20)
                if not chunk:
                    raise RuntimeError(f"chromium closed its DevTools pipe (exit code {self.proc.poll()})")
                self._buf += chunk
            raw, self._buf = self._buf.split(b"\0", 1)
            reply = json.loads(raw)
            if reply.get("id") == self._id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})

    def js(self, expr: str) -> object:
        return self.send("Runtime.evaluate", expression=expr, returnByValue=True)["result"].get("value")

    def open(self, url: str) -> None:
        """A full page load of url (about:blank first: a change of the #fragment alone would not reload)."""
        self.send("Page.navigate", url="about:blank")
        self.send("Page.navigate", url=url)

    def text(self) -> str:
        return str(self.js("document.body ? document.body.innerText : ''"))

    def url(self) -> str:
        return str(self.js("location.href"))

    def wait_text(self, *needles: str, timeout: float = 60) -> str:
        """The page's text once it contains every one of needles."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                text = self.text()
            except RuntimeError:  # the page is between two documents
                text = ""
            if all(n in text for n in needles):
                return text
            if time.monotonic() > deadline:
                raise AssertionError(f"not all of {needles} on {self.url()} within {timeout} s:\n{text[:2000]}")
            time.sleep(0.25)

    def click(self, selector: str, text: str) -> None:
        """Press and release the mouse in the middle of the element matching selector whose text is text."""
        find = """((sel, text) => {
            const e = [...document.querySelectorAll(sel)].find(e => e.textContent.trim() === text);
            if (!e) return null;
            e.scrollIntoView({block: 'center'});
            const r = e.getBoundingClientRect(), x = r.x + r.width / 2, y = r.y + r.height / 2;
            return [x, y, e.contains(document.elementFromPoint(x, y))];
        })"""
        where = self.js(f"{find}({json.dumps(selector)}, {json.dumps(text)})")
        assert where, f"no {selector} reading {text!r} on {self.url()}"
        x, y, reachable = where
        assert reachable, f"{text!r} is covered by another element on {self.url()}"
        for kind in ("mouseMoved", "mousePressed", "mouseReleased"):
            self.send("Input.dispatchMouseEvent", type=kind, x=x, y=y, button="left", clickCount=1)

    def screenshot(self, path: Path) -> None:
        path.write_bytes(base64.b64decode(self.send("Page.captureScreenshot")["data"]))

    def close(self) -> None:
        try:
            self._session = None
            self.send("Browser.close")
        except (RuntimeError, OSError):
            pass
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        os.close(self._w)
        os.close(self._r)

    def __enter__(self) -> Browser:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
