"""Browser check: render a page in headless Chromium and fail on a page error or a missing item.

Chromium is driven over its DevTools protocol through `--remote-debugging-pipe` (NUL-separated JSON on
file descriptors 3 and 4), so this needs nothing but the standard library and a Chromium binary.

A page's errors are what the DevTools console would show for it:
- uncaught exceptions and unhandled promise rejections (`Runtime.exceptionThrown`),
- `console.error` / failed `console.assert` calls (`Runtime.consoleAPICalled`),
- errors the browser itself logs for the page (`Log.entryAdded`, level error: a sub-resource that failed
  to load, a blocked request, ...), but for the /favicon.ico Chromium guesses on its own for an http(s)
  page that declares no icon,
- a main document that failed to load (`Page.navigate`'s errorText, or an HTTP status >= 400).
Chromium's stderr is never read for this (it only appears in a start-up failure's message). Errors of the
page's workers (their own targets) are not collected.

MLflow's UI: `check_mlflow_runs_view` serves a store with `mlflow server`, renders an experiment's runs table,
then the UI's compare view of its runs, where each run is a column headed by its name and each metric a
row by its key; expected texts must be cells there (the runs table shows no metric columns by default).

CLI:
    python -m spo.evaluation.browser_check report PATH --expect-model base --expect-model spo --screenshot OUT.png
    python -m spo.evaluation.browser_check mlflow --tracking-uri URI --experiment NAME --expect TEXT ... \
        --screenshot OUT.png
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import fcntl
import json
import os
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")

# Headless, as root in a container (no sandbox, no GPU, a small /dev/shm), offline and quiet.
CHROMIUM_FLAGS = (
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--no-first-run",
    "--no-default-browser-check",
    "--disable-extensions",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-default-apps",
    "--disable-sync",
    "--metrics-recording-only",
    "--password-store=basic",
    "--use-mock-keychain",
    "--mute-audio",
    "--hide-scrollbars",
    "--remote-debugging-pipe",
)

COMMAND_TIMEOUT_S = 20.0  # one DevTools command (a screenshot of a long page included)
SETTLE_S = 0.5  # after the page is ready: time for late errors (a timer, a failed fetch) to show up

# MLflow 3.17's UI (react-router hash routes; ROUTES in mlflow/server/js/build/static/js/main.*.js).
MLFLOW_RUNS_ROUTE = "#/experiments/{id}/runs"  # an experiment's runs table ("Training runs")
MLFLOW_COMPARE_ROUTE = "#/compare-runs?runs={runs}&experiments={experiments}"  # JSON lists, as the UI writes them
MLFLOW_RUNS_ROW = ".ag-center-cols-container [role=row]"  # a runs-table row (ag-grid), there once runs loaded
MLFLOW_COMPARE_TABLE = "table.mlflow-compare-run-table"  # the compare view's run-details table
MLFLOW_COMPARE_MAX_RUNS = 50  # the most recent runs compared (one column each)
# The compare view's cells, each table's rows rendered in turn: its run-details and params tables are plain
# tables; its metrics table is a react-virtualized grid 300px high (only the rows in view are in the DOM), so
# each grid is scrolled through, half a height at a time, like a user would, collecting what it renders.
MLFLOW_COMPARE_CELLS_JS = """(async () => {
  const cells = new Set();
  const grab = () => {
    for (const el of document.querySelectorAll("table.mlflow-compare-run-table th, "
        + "table.mlflow-compare-run-table td, .ReactVirtualized__Grid [role=rowgroup] > div")) {
      const text = el.innerText.trim();
      if (text) cells.add(text);
    }
  };
  const rendered = () => new Promise(resolve => setTimeout(resolve, 60));
  grab();
  for (const grid of document.querySelectorAll(".ReactVirtualized__Grid")) {
    const step = Math.max(20, grid.clientHeight / 2);
    for (let top = step; top - step + grid.clientHeight < grid.scrollHeight; top += step) {
      grid.scrollTop = top;
      grid.dispatchEvent(new Event("scroll"));
      await rendered();
      grab();
    }
  }
  return [...cells];
})()"""
MLFLOW_VIEWPORT = (1400, 1600)  # tall: the UI scrolls inside the viewport, so a screenshot shows just that
# MLflow's own UI errors that say nothing about the runs, when served by a plain `mlflow server`:
# - the UI asks who the current user is (GET ajax-api/2.0/mlflow/users/current, retry off); without the
#   basic-auth app (`--app-name basic-auth`) that endpoint does not exist, and Chromium logs the 404.
MLFLOW_BENIGN_ERRORS = (
    re.compile(r"network error: Failed to load resource: the server responded with a status of 404 \(Not Found\)"
               r" \(http://127\.0\.0\.1:\d+/ajax-api/2\.0/mlflow/users/current\)"),
)


class BrowserError(RuntimeError):
    """Chromium (or the MLflow server) could not be found, started or driven: no verdict on the page."""


@dataclass(frozen=True)
class PageCheck:
    url: str
    errors: list[str]  # uncaught exceptions + console errors (+ failed load)
    missing: list[str]  # expected texts / selectors not found in the rendered DOM
    screenshot: Path | None

    @property
    def ok(self) -> bool:
        return not self.errors and not self.missing

    def verdict(self) -> str:
        """One line: OK/FAIL, the URL, the counts."""
        word = "OK" if self.ok else "FAIL"
        return f"{word} {self.url}: {len(self.errors)} error(s), {len(self.missing)} missing"

    def report(self) -> str:
        """The verdict, then one indented line per error and per missing item, then the screenshot."""
        lines = [self.verdict()]
        lines += [f"  error: {e}" for e in self.errors]
        lines += [f"  missing: {m}" for m in self.missing]
        if self.screenshot is not None:
            lines.append(f"  screenshot: {self.screenshot}")
        return "\n".join(lines)


def find_chromium() -> str | None:
    """$SPO_CHROMIUM (a path or a name on PATH), then chromium / chromium-browser / google-chrome on PATH."""
    env = os.environ.get("SPO_CHROMIUM")
    if env:
        return shutil.which(env) or (env if os.access(env, os.X_OK) else None)
    for name in CHROMIUM_NAMES:
        path = shutil.which(name)
        if path:
            return path
    return None


def _as_url(url: str | os.PathLike) -> str:
    """A URL as is; a file path (existing or not) as a file:// URL of its absolute path."""
    url = os.fspath(url)
    if urllib.parse.urlsplit(url).scheme in ("http", "https", "file", "about", "data"):
        return url
    return Path(url).expanduser().resolve().as_uri()


# ----------------------------------------------------------------------------------------------------
# the DevTools protocol over a pipe


def _high_fd(fd: int) -> int:
    """A close-on-exec copy of fd numbered >= 10 (so dup2 onto 3 and 4 in the child cannot clobber it)."""
    copy = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10)
    os.close(fd)
    return copy


def _kill_group(proc: subprocess.Popen, grace_s: float) -> None:
    """SIGTERM the process group of proc (started with start_new_session), SIGKILL what is left after grace_s."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        pass
    # children (Chromium's renderers, uvicorn's workers) may outlive the leader: kill the whole group
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=5)


def _tail(path: Path, chars: int = 2000) -> str:
    try:
        return path.read_text(errors="replace")[-chars:].strip()
    except OSError:
        return ""


class _Browser:
    """One headless Chromium process and its DevTools pipe; events go to `on_event`."""

    def __init__(self, executable: str) -> None:
        self.executable = executable
        self.events: list[dict] = []
        self._next_id = 0
        self._buffer = b""
        self._proc: subprocess.Popen | None = None
        self._tmp = Path(tempfile.mkdtemp(prefix="spo-chromium-"))
        self._to_browser = self._from_browser = -1

    def __enter__(self) -> _Browser:
        try:
            self._start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _start(self) -> None:
        child_in, self._to_browser = os.pipe()  # Chromium reads commands on fd 3
        self._from_browser, child_out = os.pipe()  # and writes replies and events on fd 4
        child_in, child_out = _high_fd(child_in), _high_fd(child_out)
        self._to_browser, self._from_browser = _high_fd(self._to_browser), _high_fd(self._from_browser)

        def onto_3_and_4() -> None:  # in the child, between fork and exec: dup2 clears close-on-exec
            os.dup2(child_in, 3)
            os.dup2(child_out, 4)

        args = [self.executable, *CHROMIUM_FLAGS, f"--user-data-dir={self._tmp / 'profile'}", "about:blank"]
        self._log = self._tmp / "chromium.log"
        try:
            with self._log.open("wb") as log:
                self._proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                              close_fds=False, preexec_fn=onto_3_and_4, start_new_session=True)
        except OSError as err:
            raise BrowserError(f"cannot start {self.executable}: {err}") from err
        finally:
            os.close(child_in)
            os.close(child_out)
        self.send("Browser.getVersion", timeout_s=COMMAND_TIMEOUT_S)  # the pipe is up

    def close(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            with contextlib.suppress(BrowserError, OSError):
                self._write({"id": -1, "method": "Browser.close"})
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._proc.wait(timeout=3)
        if self._proc is not None:
            _kill_group(self._proc, grace_s=2)  # renderer and helper processes too, also after a timeout
        for fd in (self._to_browser, self._from_browser):
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self._to_browser = self._from_browser = -1
        shutil.rmtree(self._tmp, ignore_errors=True)

    def _fail(self, what: str) -> BrowserError:
        code = self._proc.poll() if self._proc else None
        status = f" (Chromium exited with {code})" if code is not None else ""
        log = _tail(self._log) if hasattr(self, "_log") else ""
        return BrowserError(f"{what}{status}" + (f"\nChromium's output:\n{log}" if log else ""))

    def _write(self, message: dict) -> None:
        data = json.dumps(message).encode() + b"\0"
        try:
            while data:
                data = data[os.write(self._to_browser, data):]
        except OSError as err:
            raise self._fail(f"DevTools pipe closed: {err}") from err

    def _read(self, until: float) -> list[dict]:
        """The messages that arrive before `until` (monotonic), at least one unless time runs out."""
        while True:
            if b"\0" in self._buffer:
                *messages, self._buffer = self._buffer.split(b"\0")
                return [json.loads(m) for m in messages if m]
            left = until - time.monotonic()
            if left <= 0:
                return []
            ready, _, _ = select.select([self._from_browser], [], [], left)
            if not ready:
                return []
            chunk = os.read(self._from_browser, 1 << 20)
            if not chunk:
                raise self._fail("Chromium closed the DevTools pipe")
            self._buffer += chunk

    def send(self, method: str, params: dict | None = None, session: str | None = None, *,
             timeout_s: float = COMMAND_TIMEOUT_S) -> dict:
        """Send a command and wait for its result; events that arrive meanwhile are kept in order."""
        self._next_id += 1
        message: dict[str, Any] = {"id": self._next_id, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = session
        self._write(message)
        until = time.monotonic() + timeout_s
        while True:
            messages = self._read(until)
            if not messages and time.monotonic() >= until:
                if self._proc is not None and self._proc.poll() is None:
                    raise _CommandTimeout(f"no reply to {method} within {timeout_s:.0f}s")
                raise self._fail(f"no reply to {method} within {timeout_s:.0f}s")
            for m in messages:
                if m.get("id") == self._next_id:
                    if "error" in m:
                        raise _CommandError(method, m["error"])
                    return m.get("result", {})
                if "method" in m:
                    self.events.append(m)

    def pump(self, seconds: float) -> None:
        """Collect events for `seconds`."""
        until = time.monotonic() + seconds
        while time.monotonic() < until:
            for m in self._read(until):
                if "method" in m:
                    self.events.append(m)


class _CommandTimeout(BrowserError):
    """Chromium runs but did not answer: in a page's session, the page's main thread is stuck (a busy loop)."""


class _CommandError(BrowserError):
    def __init__(self, method: str, error: dict) -> None:
        super().__init__(f"{method}: {error.get('message', error)}")
        self.error = error


# ----------------------------------------------------------------------------------------------------
# one page


def _remote_text(obj: dict) -> str:
    """A console argument (a RemoteObject) as text, like the console prints it."""
    if "value" in obj:
        value = obj["value"]
        return value if isinstance(value, str) else json.dumps(value)
    return str(obj.get("unserializableValue") or obj.get("description") or obj.get("type", "?"))


def _where(url: str | None, line: int | None) -> str:
    if not url:
        return ""
    return f" ({url}:{line + 1})" if line is not None else f" ({url})"


def _page_errors(events: list[dict], session: str, frame_id: str, implicit_favicon: str | None = None) -> list[str]:
    """The errors among a page session's events, in the order they happened. `implicit_favicon`: the URL
    of the /favicon.ico Chromium fetches on its own for a page that declares no icon; its failure is not
    the page's (a declared icon that fails to load still counts)."""
    errors: list[str] = []
    for event in events:
        if event.get("sessionId") != session:
            continue
        method, p = event["method"], event.get("params", {})
        if method == "Runtime.exceptionThrown":
            d = p["exceptionDetails"]
            text = (d.get("exception") or {}).get("description") or d.get("text", "exception")
            if d.get("text", "").startswith("Uncaught") and not text.startswith("Uncaught"):
                text = f"{d['text']} {text}"  # "Uncaught (in promise)" tells a rejection from a throw
            errors.append(f"uncaught exception: {text.splitlines()[0]}" + _where(d.get("url"), d.get("lineNumber")))
        elif method == "Runtime.consoleAPICalled" and p.get("type") in ("error", "assert"):
            text = " ".join(_remote_text(a) for a in p.get("args", []))
            frames = (p.get("stackTrace") or {}).get("callFrames") or [{}]
            errors.append(f"console.{p['type']}: {text}" + _where(frames[0].get("url"), frames[0].get("lineNumber")))
        elif method == "Log.entryAdded" and p["entry"].get("level") == "error":
            entry = p["entry"]
            if implicit_favicon and entry.get("source") == "network" and entry.get("url") == implicit_favicon:
                continue
            errors.append(f"{entry.get('source', 'browser')} error: {entry.get('text', '')}"
                          + _where(entry.get("url"), entry.get("lineNumber")))
        elif (method == "Network.responseReceived" and p.get("type") == "Document"
              and p.get("frameId") == frame_id and p["response"].get("status", 0) >= 400):
            r = p["response"]
            errors.append(f"failed load: HTTP {r['status']} {r.get('statusText', '')}".rstrip() + f" {r['url']}")
    return errors


class _Page:
    """One tab of a _Browser, width x height CSS pixels, its console and network watched from the start."""

    def __init__(self, browser: _Browser, width: int, height: int) -> None:
        self.browser = browser
        target = browser.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        self.session = browser.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        for domain in ("Page", "Runtime", "Log", "Network"):
            browser.send(f"{domain}.enable", session=self.session)
        browser.send("Emulation.setDeviceMetricsOverride",
                     {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False}, self.session)
        self.frame_id = ""
        self.implicit_favicon: str | None = None
        self._answered: set[int] = set()
        browser.events.clear()  # about:blank's

    def send(self, method: str, params: dict | None = None) -> dict:
        return self.browser.send(method, params, self.session)

    def evaluate(self, expression: str, *, await_promise: bool = False) -> Any:
        result = self.send("Runtime.evaluate",
                           {"expression": expression, "returnByValue": True, "awaitPromise": await_promise})
        if "exceptionDetails" in result:
            d = result["exceptionDetails"]
            raise _CommandError("Runtime.evaluate", {"message": (d.get("exception") or {}).get("description", d)})
        return result["result"].get("value")

    def pump(self, seconds: float) -> None:
        """Collect events for `seconds`; accept alert/confirm/prompt dialogs (a page waiting on one hangs)."""
        self.browser.pump(seconds)
        for i, event in enumerate(self.browser.events):
            if i not in self._answered and event["method"] == "Page.javascriptDialogOpening" \
                    and event.get("sessionId") == self.session:
                self._answered.add(i)
                with contextlib.suppress(_CommandError):
                    self.send("Page.handleJavaScriptDialog", {"accept": True})

    def goto(self, url: str, deadline: float) -> list[str]:
        """Navigate and wait for the load event until `deadline` (monotonic); the load's errors, if any."""
        nav = self.send("Page.navigate", {"url": url})
        self.frame_id = self.frame_id or nav.get("frameId", "")
        if nav.get("errorText"):
            return [f"failed load: {nav['errorText']} {url}"]
        start = time.monotonic()
        while not any(e["method"] == "Page.loadEventFired" and e.get("sessionId") == self.session
                      for e in self.browser.events):
            if time.monotonic() >= deadline:
                return [f"page did not finish loading within {time.monotonic() - start:.0f}s: {url}"]
            self.pump(min(0.1, max(0.0, deadline - time.monotonic())))
        return []

    def has(self, selector: str) -> bool:
        """document.querySelector(selector) matches (an invalid selector raises _CommandError)."""
        return bool(self.evaluate(f"!!document.querySelector({json.dumps(selector)})"))

    def wait_for(self, selector: str, deadline: float) -> bool:
        """Whether `selector` matched before `deadline` (monotonic)."""
        while not self.has(selector):
            if time.monotonic() >= deadline:
                return False
            self.pump(min(0.2, max(0.0, deadline - time.monotonic())))
        return True

    def text(self) -> str:
        """The rendered text: document.body.innerText."""
        return self.evaluate("document.body ? document.body.innerText : ''") or ""

    def screenshot(self, path: Path) -> Path:
        """A PNG of the whole page (beyond the viewport), written to path."""
        size = self.send("Page.getLayoutMetrics")["cssContentSize"]
        clip = {"x": 0, "y": 0, "width": max(1, size["width"]), "height": max(1, size["height"]), "scale": 1}
        shot = self.send("Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True, "clip": clip})
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(shot["data"]))
        return path

    def note_implicit_favicon(self) -> None:
        """An http(s) page that declares no icon: Chromium guesses <origin>/favicon.ico itself (see _page_errors)."""
        location = urllib.parse.urlsplit(self.evaluate("location.href") or "")
        if location.scheme in ("http", "https") and not self.has('link[rel~="icon" i]'):
            self.implicit_favicon = f"{location.scheme}://{location.netloc}/favicon.ico"

    def errors(self) -> list[str]:
        return _page_errors(self.browser.events, self.session, self.frame_id, self.implicit_favicon)


def _executable(chromium: str | None) -> str:
    executable = chromium or find_chromium()
    if executable is None:
        raise BrowserError("no Chromium found: set $SPO_CHROMIUM or install chromium (see .ci/install_chromium)")
    return executable


def _missing_selectors(page: _Page, selectors: Sequence[str]) -> list[str]:
    missing = []
    for selector in selectors:
        try:
            if not page.has(selector):
                missing.append(f"selector {selector}")
        except _CommandError as err:
            missing.append(f"selector {selector} (invalid: {err})")
    return missing


def check_page(url: str, *, expect_texts: Sequence[str] = (), expect_selectors: Sequence[str] = (),
               screenshot: Path | None = None, wait_for: str | None = None, timeout_s: float = 30.0,
               width: int = 1400, height: int = 1000, chromium: str | None = None) -> PageCheck:
    """Render `url` (a URL, or a file path turned into file://) in headless Chromium and check it.

    Waits for the load event, then until `wait_for` (a CSS selector) is in the DOM, both within timeout_s
    (a page that never loads is an error; a `wait_for` that never appears is missing). Then, after a short
    settle for late errors: every text of `expect_texts` must be in document.body.innerText (the rendered,
    visible text) and every selector of `expect_selectors` must match (document.querySelector). A full-page
    PNG goes to `screenshot`. Raises BrowserError when Chromium cannot be found or driven.
    """
    executable = _executable(chromium)
    url = _as_url(url)
    deadline = time.monotonic() + timeout_s
    load_errors: list[str] = []
    hung: list[str] = []
    missing: list[str] = []
    shot: Path | None = None
    with _Browser(executable) as browser:
        page = _Page(browser, width, height)
        try:
            load_errors = page.goto(url, deadline)
            if wait_for and not load_errors and not page.wait_for(wait_for, deadline):
                missing.append(f"selector {wait_for} (waited {timeout_s:g}s for it)")
            page.pump(SETTLE_S)
            page.note_implicit_favicon()
            body = page.text()
            missing += [f"text {t!r}" for t in expect_texts if t not in body]
            missing += _missing_selectors(page, expect_selectors)
            shot = page.screenshot(screenshot) if screenshot is not None else None
        except _CommandTimeout as err:  # the page hangs (a busy loop): a failed page, not a broken browser
            hung = [f"page unresponsive: {err}"]
            missing = [f"text {t!r} (not checked)" for t in expect_texts]
            missing += [f"selector {s} (not checked)" for s in expect_selectors]
        errors = load_errors + page.errors() + hung
    return PageCheck(url=url, errors=errors, missing=missing, screenshot=shot)


def model_selector(name: str) -> str:
    """The CSS selector of a report's column header for model `name`: th[data-model="NAME"]."""
    return f"th[data-model={json.dumps(name)}]"


# ----------------------------------------------------------------------------------------------------
# MLflow's UI


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _request(url: str, body: dict | None = None, timeout_s: float = 10.0) -> bytes:
    """GET url, or POST body as JSON."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"} if data else {})
    with urllib.request.urlopen(request, timeout=timeout_s) as response:  # our own server on 127.0.0.1
        return response.read()


@contextlib.contextmanager
def mlflow_server(tracking_uri: str, *, timeout_s: float = 60.0) -> Iterator[str]:
    """`mlflow server` on a free local port, healthy (GET /health); yields its base URL; stops its process group."""
    tmp = Path(tempfile.mkdtemp(prefix="spo-mlflow-ui-"))
    port = _free_port()
    args = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", tracking_uri,
            "--artifacts-destination", str(tmp / "artifacts"), "--host", "127.0.0.1", "--port", str(port),
            "--workers", "1"]
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true"}
    log_path = tmp / "server.log"
    proc = None
    try:
        with log_path.open("wb") as log:
            proc = subprocess.Popen(args, cwd=tmp, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                    start_new_session=True)
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + timeout_s
        while True:
            if proc.poll() is not None:
                raise BrowserError(f"mlflow server exited with {proc.returncode}:\n{_tail(log_path)}")
            with contextlib.suppress(OSError):
                if _request(f"{base}/health", timeout_s=2).strip() == b"OK":
                    break
            if time.monotonic() >= deadline:
                raise BrowserError(f"mlflow server not healthy within {timeout_s:g}s:\n{_tail(log_path)}")
            time.sleep(0.25)
        yield base
    finally:
        if proc is not None:
            _kill_group(proc, grace_s=5)  # uvicorn's worker too
        shutil.rmtree(tmp, ignore_errors=True)


def _experiment_id(base: str, name: str) -> str | None:
    """The id of experiment `name` on the server (its REST API), None if there is none."""
    query = urllib.parse.urlencode({"experiment_name": name})
    try:
        data = json.loads(_request(f"{base}/api/2.0/mlflow/experiments/get-by-name?{query}"))
    except urllib.error.HTTPError as err:
        if err.code == 404:
            return None
        raise
    return data["experiment"]["experiment_id"]


def _recent_run_ids(base: str, experiment_id: str, limit: int) -> list[str]:
    """The ids of the experiment's `limit` most recently started active runs, nested ones included."""
    body = {"experiment_ids": [experiment_id], "max_results": limit, "run_view_type": "ACTIVE_ONLY",
            "order_by": ["attributes.start_time DESC"]}
    data = json.loads(_request(f"{base}/api/2.0/mlflow/runs/search", body))
    return [run["info"]["run_id"] for run in data.get("runs", [])]


def _benign_mlflow_error(error: str) -> bool:
    return any(pattern.fullmatch(error) for pattern in MLFLOW_BENIGN_ERRORS)


def check_mlflow_runs_view(tracking_uri: str, experiment: str, *, expect_texts: Sequence[str],
                           screenshot: Path | None = None, timeout_s: float = 90.0) -> PageCheck:
    """MLflow's UI shows experiment `experiment` of `tracking_uri`: its runs table, then its runs compared.

    Serves the store with `mlflow server`, opens the experiment's runs view (MLFLOW_RUNS_ROUTE) and waits for
    a row of the runs table; then, in the same tab, follows the UI's own compare route (MLFLOW_COMPARE_ROUTE,
    what the table's Compare button opens) for the MLFLOW_COMPARE_MAX_RUNS most recent runs, nested ones
    included, and waits for its table. Each of `expect_texts` must be the whole text of a cell there
    (MLFLOW_COMPARE_CELLS_JS): the view has one column per run, the run name in its "Run Name:" row, and one
    row per param and per metric key, so "spo" and "spo.pickscore" mean a run named spo and a logged metric
    spo.pickscore (a substring of the page, like the experiment "spo-demo" in the breadcrumbs, does not
    count). The runs table is not used for texts: MLflow 3.17 shows no metric columns by default (Source,
    Models, Dataset) and nested runs are collapsed under their parent.

    Page errors of both views count, except MLFLOW_BENIGN_ERRORS. `screenshot` gets the compare view; the runs
    table goes next to it as NAME.runs.png. Raises BrowserError when the server or Chromium fails.
    """
    executable = _executable(None)
    deadline = time.monotonic() + timeout_s
    # Chromium first: it starts up while the server boots (seconds of imports)
    with _Browser(executable) as browser, mlflow_server(tracking_uri, timeout_s=timeout_s) as base:
        page = _Page(browser, *MLFLOW_VIEWPORT)
        experiment_id = _experiment_id(base, experiment)
        if experiment_id is None:
            return PageCheck(url=f"{base} ({tracking_uri})", errors=[f"no experiment named {experiment!r}"],
                             missing=[f"text {t!r}" for t in expect_texts], screenshot=None)
        run_ids = _recent_run_ids(base, experiment_id, MLFLOW_COMPARE_MAX_RUNS)
        url = f"{base}/{MLFLOW_RUNS_ROUTE.format(id=experiment_id)}"
        load_errors: list[str] = []
        hung: list[str] = []
        missing: list[str] = []
        shot = None
        try:
            load_errors = page.goto(url, deadline)
            if not load_errors and not page.wait_for(MLFLOW_RUNS_ROW, deadline):
                missing.append(f"runs table rows (selector {MLFLOW_RUNS_ROW})")
            page.pump(SETTLE_S)
            if screenshot is not None:
                screenshot = Path(screenshot)
                page.screenshot(screenshot.with_name(f"{screenshot.stem}.runs{screenshot.suffix or '.png'}"))
            page.note_implicit_favicon()  # (MLflow's UI declares its favicon: this finds none to ignore)
            if load_errors or not run_ids:
                why = "the experiment has no runs" if not run_ids else "not checked"
                missing += [f"text {t!r} ({why})" for t in expect_texts]
            else:
                route = MLFLOW_COMPARE_ROUTE.format(runs=json.dumps(run_ids), experiments=json.dumps([experiment_id]))
                page.evaluate(f"location.hash = {json.dumps(route)}")  # the SPA's own route change, no reload
                if not page.wait_for(MLFLOW_COMPARE_TABLE, deadline):
                    missing.append(f"compare-runs table (selector {MLFLOW_COMPARE_TABLE})")
                page.pump(SETTLE_S)
                cells = set(page.evaluate(MLFLOW_COMPARE_CELLS_JS, await_promise=True) or ())
                missing += [f"text {t!r} (no such cell in the compare view of {len(run_ids)} runs)"
                            for t in expect_texts if t not in cells]
            if screenshot is not None:
                shot = page.screenshot(screenshot)
        except _CommandTimeout as err:
            hung = [f"page unresponsive: {err}"]
            missing = [f"text {t!r} (not checked)" for t in expect_texts]
        errors = load_errors + [e for e in page.errors() if not _benign_mlflow_error(e)] + hung
    return PageCheck(url=url, errors=errors, missing=missing, screenshot=shot)


# ----------------------------------------------------------------------------------------------------
# CLI


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m spo.evaluation.browser_check", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="mode", required=True)
    report = sub.add_parser("report", help="an HTML report: renders without errors, holds every model column")
    report.add_argument("path")
    report.add_argument("--expect-model", action="append", default=[], metavar="NAME",
                        help='a model that must be a column (th[data-model="NAME"] and the text NAME); repeatable')
    report.add_argument("--expect", action="append", default=[], metavar="TEXT", help="a text that must show")
    ui = sub.add_parser("mlflow", help="MLflow UI's runs view of an experiment: renders, shows the expected texts")
    ui.add_argument("--tracking-uri", required=True)
    ui.add_argument("--experiment", required=True)
    ui.add_argument("--expect", nargs="+", action="extend", default=[], metavar="TEXT",
                    help="texts the runs view must show (run names, metric columns)")
    for p in (report, ui):
        p.add_argument("--screenshot", type=Path, metavar="OUT.png")
        p.add_argument("--timeout", type=float, default=None, metavar="SECONDS")
    args = parser.parse_args(argv)
    try:
        if args.mode == "report":
            models = args.expect_model
            check = check_page(args.path, expect_texts=[*models, *args.expect],
                               expect_selectors=[model_selector(m) for m in models], screenshot=args.screenshot,
                               timeout_s=args.timeout or 30.0)
        else:
            check = check_mlflow_runs_view(args.tracking_uri, args.experiment, expect_texts=args.expect,
                                           screenshot=args.screenshot, timeout_s=args.timeout or 90.0)
    except BrowserError as err:
        print(f"FAIL (no verdict): {err}", file=sys.stderr)
        return 1
    print(check.report())
    return 0 if check.ok else 1


if __name__ == "__main__":
    sys.exit(main())
