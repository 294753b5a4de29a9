"""Locators shared by the browser tests."""

from __future__ import annotations

import re

from playwright.async_api import Locator, Page


def whole(text: str, *, prefix: bool = False) -> re.Pattern[str]:
    """A pattern matching exactly ``text`` (or starting with it, with ``prefix``)."""
    # Playwright hands the pattern to the page as a /…/ literal: its slashes need escaping too.
    escaped = re.escape(text).replace("/", "\\/")
    return re.compile("^" + escaped + ("" if prefix else "$"))


def label(text: str) -> re.Pattern[str]:
    """A form label, with or without Django's trailing colon."""
    return re.compile("^" + re.escape(text) + ":?$")


def node(page: Page, name: str) -> Locator:
    """A step's node in the graph, found by its accessible name ``<name>: <status>``."""
    return page.locator("#live-dag").get_by_role("link", name=whole(f"{name}: ", prefix=True))
