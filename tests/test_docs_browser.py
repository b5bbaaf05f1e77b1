"""/docs and /redoc in a real browser (Debian's Chromium, driven by Playwright) with
every request to another host aborted, as on a machine without internet: the pages
must still show the API's operations."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from playwright.sync_api import Browser, ConsoleMessage, Page, Route, expect

from tests.harness import Harness, running_server


@pytest.fixture
def api(tmp_path: Path) -> Iterator[Harness]:
    with running_server(tmp_path, run_worker=False) as harness:
        yield harness


class Offline:
    """A page on which every request leaving the server's origin is aborted (and noted)."""

    def __init__(self, browser: Browser, origin: str) -> None:
        self.origin = origin
        self.aborted: list[str] = []
        self.errors: list[str] = []
        self.page: Page = browser.new_context().new_page()
        self.page.route("**/*", self._only_the_server)
        self.refused: list[str] = []  # what the pages' Content-Security-Policy kept from being tried
        self.page.on("pageerror", lambda error: self.errors.append(str(error)))
        self.page.on("console", self._note)

    def _note(self, message: ConsoleMessage) -> None:
        if message.type == "error":
            refused = "violates the following Content Security Policy" in message.text
            (self.refused if refused else self.errors).append(message.text)

    def _only_the_server(self, route: Route) -> None:
        url = route.request.url
        if url.startswith((self.origin + "/", "data:", "blob:")):
            route.continue_()
        else:
            self.aborted.append(url)
            route.abort("internetdisconnected")


def summaries(api: Harness) -> list[str]:
    paths = httpx.get(api.url + "/openapi.json").json()["paths"]
    return [operation["summary"] for operations in paths.values() for operation in operations.values()]


def test_swagger_ui_shows_every_operation_offline(browser: Browser, api: Harness) -> None:
    offline = Offline(browser, api.url)
    offline.page.goto(api.url + "/docs")
    operations = offline.page.locator(".opblock")
    expect(operations).to_have_count(len(summaries(api)), timeout=15_000)
    expect(offline.page.get_by_text("Create a prediction", exact=True).first).to_be_visible()
    assert offline.aborted == [] and offline.errors == [] and offline.refused == []


def test_redoc_shows_the_operations_offline(browser: Browser, api: Harness) -> None:
    offline = Offline(browser, api.url)
    offline.page.goto(api.url + "/redoc")
    # ReDoc gives each operation a heading: its summary.
    headings = offline.page.get_by_role("heading", level=2)
    expect(headings.filter(has_text="Create a prediction")).not_to_have_count(0, timeout=15_000)
    shown = set(headings.all_inner_texts())
    assert set(summaries(api)) <= shown, set(summaries(api)) - shown
    assert offline.aborted == [] and offline.errors == []
    # ReDoc's footer logo lives on its CDN: not even tried, and nothing else was.
    assert all("https://cdn.redoc.ly/" in refused for refused in offline.refused), offline.refused
