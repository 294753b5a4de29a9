"""Fixtures of the browser tests: a real makima (daphne + a fresh database,
from :func:`tests.e2e.stack.running_stack`), Debian's chromium driven by
Playwright's async API, and a protocol-speaking test daemon running in the
test's event loop.

Every page is watched: a JavaScript dialog, an uncaught page error, a server
error or any write to ``window.__xss`` fails the test. Screenshots go to
``artifacts/screenshots/``; a failed test also leaves a screenshot, a
Playwright trace (``artifacts/traces/``) and the server log (``artifacts/logs/``)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from playwright.async_api import Browser, Dialog, Page, Response, async_playwright, expect

from tests.e2e.fake_daemon import Behaviour, FakeDaemon, api
from tests.e2e.stack import ROOT, Stack, running_stack

ARTIFACTS = ROOT / "artifacts"
SCREENSHOTS = ARTIFACTS / "screenshots"
DEFAULT_CHROMIUM = "/usr/bin/chromium"
USERNAME = "alice"
PASSWORD = "e2e-password-not-secret"  # made by running_stack
TIMEOUT_MS = 20_000

expect.set_options(timeout=TIMEOUT_MS)

# Any write to window.__xss, on any page of the test, is reported to Python
# through an exposed binding, so a payload that fires and is then covered up
# (or fires on a page the test has already left) is still caught.
XSS_TRAP = """
(() => {
  let value;
  Object.defineProperty(window, "__xss", {
    configurable: false,
    get() { return value; },
    set(v) { value = v; window.__makimaXssFired(String(location.href)); },
  });
})();
"""


def chromium_path() -> str:
    """Debian's chromium (or ``MAKIMA_CHROMIUM``); never a downloaded browser.
    A missing browser fails the test loudly: CI must run these."""
    wanted = os.environ.get("MAKIMA_CHROMIUM") or DEFAULT_CHROMIUM
    found = shutil.which(wanted)
    if found is None:
        pytest.fail(
            f"chromium not found at {wanted!r}: install Debian's chromium (`apt-get install chromium`) "
            "or set MAKIMA_CHROMIUM to a chromium binary. The browser tests never download a browser.",
            pytrace=False,
        )
    return found


def _slug(node: pytest.Item) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", node.name)


def _failed(node: pytest.Item) -> bool:
    report = getattr(node, "report_call", None)
    return report is None or report.failed


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    # Fixtures look at the outcome to decide whether to keep a trace and the server log.
    report = yield
    setattr(item, f"report_{report.when}", report)
    return report


@pytest.fixture
def stack(request: pytest.FixtureRequest) -> Iterator[Stack]:
    """A fresh makima for one test: alice (a superuser) with an API key and a daemon token."""
    with running_stack() as running:
        yield running
        if _failed(request.node):
            logs = ARTIFACTS / "logs"
            logs.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(running.log, logs / f"{_slug(request.node)}-daphne.log")


@pytest.fixture
def rest(stack: Stack) -> Callable[..., Awaitable[Any]]:
    """``await rest(method, path, body)``: alice's REST API, off the event loop."""

    async def call(method: str, path: str, body: Any = None) -> Any:
        return await asyncio.to_thread(api, stack.base_url, method, path, stack.api_key, body)

    return call


@pytest.fixture
async def start_daemon(stack: Stack) -> AsyncIterator[Callable[..., Awaitable[FakeDaemon]]]:
    """``await start_daemon(behaviour)``: a test daemon connected to the stack and welcomed."""
    runners: list[asyncio.Task[None]] = []

    async def start(behaviour: Behaviour, *, name: str = "browser-daemon") -> FakeDaemon:
        daemon = FakeDaemon(ws_url=stack.ws_url, token=stack.daemon_token, behaviour=behaviour, name=name)
        runner = asyncio.create_task(daemon.run())
        runners.append(runner)
        deadline = time.monotonic() + 15
        while daemon.welcome is None:
            if runner.done():
                runner.result()  # raises what stopped it
                raise AssertionError("the test daemon disconnected before its welcome")
            if time.monotonic() > deadline:
                raise AssertionError("the test daemon was not welcomed within 15 s")
            await asyncio.sleep(0.05)
        return daemon

    yield start
    for runner in runners:
        runner.cancel()
    for runner in runners:
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await runner


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    executable = chromium_path()
    async with async_playwright() as playwright:
        launched = await playwright.chromium.launch(executable_path=executable, headless=True, args=["--no-sandbox"])
        try:
            yield launched
        finally:
            await launched.close()


@dataclass
class Dashboard:
    """One browser tab on the stack, and everything that went wrong in it."""

    page: Page
    stack: Stack
    dialogs: list[str] = field(default_factory=list)
    page_errors: list[str] = field(default_factory=list)
    server_errors: list[str] = field(default_factory=list)
    xss: list[str] = field(default_factory=list)

    def url(self, path: str) -> str:
        return self.stack.base_url + path

    async def sign_in(self, username: str = USERNAME, password: str = PASSWORD) -> None:
        """Through the sign-in form, as a person would; lands on the directives list."""
        page = self.page
        await page.goto("/")
        await expect(page).to_have_url(re.compile(r"/accounts/login/"))
        await page.get_by_label("Username").fill(username)
        await page.get_by_label("Password").fill(password)
        await page.get_by_role("button", name="Sign in").click()
        await expect(page).to_have_url(self.url("/"))

    async def screenshot(self, name: str) -> Path:
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        path = SCREENSHOTS / name
        await self.page.screenshot(path=str(path), full_page=True)
        return path

    async def set_marker(self) -> None:
        """Mark the loaded document; :meth:`assert_not_reloaded` proves it is still the same one."""
        await self.page.evaluate("window.__marker = 42")

    async def assert_not_reloaded(self) -> None:
        assert await self.page.evaluate("window.__marker") == 42, "the page was reloaded"

    async def assert_clean(self) -> None:
        assert await self.page.evaluate("window.__xss") is None, "window.__xss was set"
        assert not self.xss, f"an XSS payload ran on {self.xss}"
        assert not self.dialogs, f"JavaScript dialogs opened: {self.dialogs}"
        assert not self.page_errors, f"uncaught errors in the page: {self.page_errors}"
        assert not self.server_errors, f"server errors: {self.server_errors}"


@pytest.fixture
async def dashboard(browser: Browser, stack: Stack, request: pytest.FixtureRequest) -> AsyncIterator[Dashboard]:
    slug = _slug(request.node)
    # What an earlier failure of this test left behind would only mislead.
    for stale in (
        SCREENSHOTS / f"failure-{slug}.png",
        ARTIFACTS / "traces" / f"{slug}.zip",
        ARTIFACTS / "logs" / f"{slug}-daphne.log",
    ):
        stale.unlink(missing_ok=True)
    context = await browser.new_context(base_url=stack.base_url, viewport={"width": 1440, "height": 1000})
    context.set_default_timeout(TIMEOUT_MS)
    await context.tracing.start(snapshots=True, screenshots=False)
    page = await context.new_page()
    board = Dashboard(page=page, stack=stack)

    def on_xss(where: str) -> None:
        board.xss.append(where)

    await context.expose_function("__makimaXssFired", on_xss)
    await context.add_init_script(XSS_TRAP)

    async def on_dialog(dialog: Dialog) -> None:
        board.dialogs.append(f"{dialog.type}: {dialog.message}")
        await dialog.dismiss()

    def on_response(response: Response) -> None:
        if response.status >= 500 or (response.status >= 400 and "/static/" in response.url):
            board.server_errors.append(f"{response.status} {response.request.method} {response.url}")

    page.on("dialog", on_dialog)
    page.on("pageerror", lambda error: board.page_errors.append(str(error)))
    page.on("response", on_response)
    try:
        yield board
    finally:
        if _failed(request.node):
            with contextlib.suppress(Exception):
                await board.screenshot(f"failure-{slug}.png")
            traces = ARTIFACTS / "traces"
            traces.mkdir(parents=True, exist_ok=True)
            await context.tracing.stop(path=str(traces / f"{slug}.zip"))
        else:
            await context.tracing.stop()
        await context.close()
