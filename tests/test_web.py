"""The playground in a real browser: Debian's Chromium, driven by Playwright.

The server runs the fake model with slow steps (flat colours, 0.25 s a step), so
progress and cancel can be seen. Never a downloaded browser: /usr/bin/chromium.
"""

from __future__ import annotations

import base64
import io
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from PIL import Image
from playwright.sync_api import Browser, Page, expect, sync_playwright

from fluxredux.pipeline.fake import FakeModel
from tests.conftest import SAMPLE_IMAGE
from tests.harness import Harness, running_server

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]  # fmt: skip


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    assert Path(CHROMIUM).exists(), (
        "Debian chromium is missing: scripts/test installs it (apt-get install chromium)"
    )
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture
def api(tmp_path: Path) -> Iterator[Harness]:
    with running_server(tmp_path, model=FakeModel(step_seconds=0.25)) as harness:
        yield harness


class Watched:
    """A page whose console errors and outgoing requests are recorded."""

    def __init__(self, page: Page, origin: str) -> None:
        self.page = page
        self.errors: list[str] = []
        self.requests: list[str] = []
        self.origin = origin
        page.on("console", lambda m: self.errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: self.errors.append(str(e)))
        page.on("request", lambda r: self.requests.append(r.url))

    def foreign_requests(self) -> list[str]:
        return [u for u in self.requests if not u.startswith((self.origin, "data:", "blob:"))]


def open_page(browser: Browser, api: Harness, **context: Any) -> Watched:
    page = browser.new_context(accept_downloads=True, **context).new_page()
    watched = Watched(page, api.url)
    page.goto(api.url + "/")
    return watched


def enter_key(page: Page, key: str) -> None:
    page.get_by_label("API key", exact=True).fill(key)
    page.get_by_role("button", name="Save key").click()


def drop_file(page: Page, data: bytes, name: str, mime: str) -> None:
    page.evaluate(
        """([b64, name, mime]) => {
            const bytes = Uint8Array.from(atob(b64), c => c.charCodeAt(0));
            const transfer = new DataTransfer();
            transfer.items.add(new File([bytes], name, {type: mime}));
            const zone = document.getElementById('dropzone');
            const init = {dataTransfer: transfer, bubbles: true, cancelable: true};
            zone.dispatchEvent(new DragEvent('dragover', init));
            zone.dispatchEvent(new DragEvent('drop', init));
        }""",
        [base64.b64encode(data).decode(), name, mime],
    )


def test_run_watch_download_and_share(browser: Browser, api: Harness, tmp_path: Path) -> None:
    watched = open_page(browser, api)
    page = watched.page
    expect(page.get_by_text("Demo model: random weights")).to_be_visible()
    enter_key(page, api.key)
    drop_file(page, SAMPLE_IMAGE.read_bytes(), "sample.jpg", "image/jpeg")
    expect(page.locator("#reference-info")).to_contain_text("768\u00d7512")
    page.get_by_role("radio", name="16:9").check()
    page.get_by_label("Num Outputs").fill("2")
    page.get_by_role("button", name="Run", exact=True).click()
    expect(page.locator("#status-text")).to_contain_text("Step", timeout=10_000)
    expect(page.locator("#status-text")).to_contain_text("Done", timeout=15_000)

    images = page.get_by_role("img", name="Output")
    expect(images).to_have_count(2)
    for i in range(2):
        images.nth(i).evaluate("img => img.decode()")
        width, height = images.nth(i).evaluate("img => [img.naturalWidth, img.naturalHeight]")
        assert (width, height) == (1344, 768)
        box = images.nth(i).bounding_box()
        assert box is not None and abs(box["width"] / box["height"] - 1344 / 768) < 0.02  # shown at its ratio
    expect(page.locator("#summary")).to_contain_text("seed")

    with page.expect_download() as download_info:
        page.get_by_role("link", name="Download").first.click()
    download = download_info.value
    assert download.suggested_filename.endswith("-1.webp")
    saved = tmp_path / download.suggested_filename
    download.save_as(saved)
    assert Image.open(saved).format == "WEBP"

    # Share: a link with its own token (not the prediction id), outputs only by default.
    prediction_id = api.services.store.list_by_owner(api.services.keys.list()[0].id, 1)[0].id
    include_reference = page.get_by_role("checkbox", name="Include the reference image")
    expect(include_reference).to_be_visible()
    expect(include_reference).not_to_be_checked()
    page.get_by_role("button", name="Share", exact=True).click()
    link = page.locator("#share-link").get_attribute("href")
    assert link and "/p/" in link and prediction_id not in link
    share = api.services.shares.get(link.rsplit("/p/", 1)[1])
    assert share is not None and share.prediction_id == prediction_id and not share.include_reference
    sources = [images.nth(i).get_attribute("src") for i in range(2)]

    stranger = browser.new_context().new_page()  # no key, no local storage
    stranger.goto(link)
    shared = stranger.get_by_role("img", name="Output")
    expect(shared).to_have_count(2)
    assert [shared.nth(i).get_attribute("src") for i in range(2)] == sources
    expect(stranger.get_by_text("Done")).to_be_visible()
    expect(stranger.get_by_role("img", name="The reference image")).to_be_hidden()

    # Ticked, the reference image is shared too, under another link.
    include_reference.check()
    page.get_by_role("button", name="Share", exact=True).click()
    expect(page.locator("#share-link")).not_to_have_attribute("href", link)
    with_reference = page.locator("#share-link").get_attribute("href")
    assert with_reference and prediction_id not in with_reference
    second = browser.new_context().new_page()
    second.goto(with_reference)
    expect(second.get_by_role("img", name="Output")).to_have_count(2)
    reference = second.get_by_role("img", name="The reference image")
    expect(reference).to_be_visible()
    assert reference.evaluate("img => img.decode().then(() => img.naturalWidth)") == 768

    # Stop sharing the first link: the stranger's page now opens nothing.
    expect(page.locator(".share-link")).to_have_count(2)
    page.get_by_role("button", name="Stop sharing (outputs only)").click()
    expect(page.locator("#share-note")).to_contain_text("Sharing stopped")
    expect(page.locator(".share-link")).to_have_count(1)
    stranger.reload()
    expect(stranger.get_by_text("Nothing is shared at this link")).to_be_visible()
    expect(stranger.get_by_role("img", name="Output")).to_have_count(0)

    # History: a fresh page lists the prediction; a click brings back its inputs, outputs
    # and the link still shared.
    page.reload()
    page.get_by_role("button", name="Open prediction").click()
    expect(page.get_by_role("radio", name="16:9")).to_be_checked()
    expect(page.get_by_role("img", name="Output")).to_have_count(2)
    expect(page.locator("#reference-info")).to_contain_text("earlier input")
    expect(page.locator(".share-link")).to_have_text([with_reference])
    expect(page.get_by_role("checkbox", name="Include the reference image")).not_to_be_checked()
    # ...and running it again works: the earlier input is sent again as a fresh upload.
    with page.expect_response(
        lambda r: r.url.endswith("/v1/prediction/") and r.request.method == "POST"
    ) as created:
        page.get_by_role("button", name="Run", exact=True).click()
    assert created.value.status == 200, created.value.text()
    again = created.value.json()["predictionID"]
    expect(page.get_by_role("img", name="Output").first).to_have_attribute("src", re.compile(".+"))
    assert api.get(again, wait=20)["status"] == "success"
    assert watched.errors == []
    assert watched.foreign_requests() == []


def test_cancel_a_running_prediction_with_the_keyboard(browser: Browser, api: Harness) -> None:
    watched = open_page(browser, api)
    page = watched.page
    enter_key(page, api.key)
    page.get_by_label("…or an image URL").fill("")
    drop_file(page, SAMPLE_IMAGE.read_bytes(), "sample.jpg", "image/jpeg")
    page.keyboard.press("Control+Enter")
    expect(page.locator("#status-text")).to_contain_text("Step", timeout=10_000)
    page.get_by_role("button", name="Cancel", exact=True).click()
    expect(page.locator("#status-text")).to_have_text("Cancelled.", timeout=5_000)
    expect(page.get_by_role("button", name="Cancel", exact=True)).to_be_hidden()
    assert watched.errors == []


def test_a_bad_file_is_explained_and_sends_nothing(browser: Browser, api: Harness) -> None:
    watched = open_page(browser, api)
    page = watched.page
    enter_key(page, api.key)
    before = len(watched.requests)
    drop_file(page, b"just some notes, not a picture", "notes.txt", "text/plain")
    expect(page.locator("#error-redux_image")).to_have_text(
        "“notes.txt” is not a JPEG, PNG, WEBP or GIF image."
    )
    big = io.BytesIO()
    Image.new("RGB", (8, 8)).save(big, "PNG")
    drop_file(page, big.getvalue() + bytes(26 * 1024 * 1024), "huge.png", "image/png")
    expect(page.locator("#error-redux_image")).to_contain_text("the limit is 25.0 MB")
    assert [u for u in watched.requests[before:] if "/v1/" in u] == []


def test_api_errors_appear_next_to_their_field(browser: Browser, api: Harness) -> None:
    page = open_page(browser, api).page
    enter_key(page, api.key)
    page.get_by_label("…or an image URL").fill("http://127.0.0.1:9/private.png")
    page.get_by_role("button", name="Run", exact=True).click()
    expect(page.locator("#error-redux_image")).to_contain_text("loopback address")


def test_a_refused_key_brings_the_prompt_back(browser: Browser, api: Harness) -> None:
    page = open_page(browser, api).page
    enter_key(page, "fr_000000000000_not-a-real-key")
    expect(page.get_by_text("The server refused that API key")).to_be_visible()
    expect(page.get_by_label("API key", exact=True)).to_be_visible()


def test_every_control_has_a_name_and_the_phone_layout_fits(browser: Browser, api: Harness) -> None:
    page = open_page(browser, api, viewport={"width": 390, "height": 844}).page
    enter_key(page, api.key)
    nameless = page.evaluate(
        """() => [...document.querySelectorAll('button, a, input, select')]
              .filter(e => e.type !== 'hidden' && !e.hidden && e.offsetParent !== null)
              .filter(e => !(e.labels && e.labels.length) && !e.getAttribute('aria-label')
                           && !e.getAttribute('aria-labelledby') && !e.textContent.trim())
              .map(e => e.outerHTML.slice(0, 80))"""
    )
    assert nameless == []
    assert page.evaluate("document.documentElement.scrollWidth") <= 390
    for name in ("Run", "Change API key"):
        expect(page.get_by_role("button", name=name)).to_be_visible()


def test_advanced_controls_are_folded_and_reach_the_prediction(browser: Browser, api: Harness) -> None:
    """The controls beyond the hosted API come from the same input model, folded under
    "Advanced"; what is set there is what the prediction runs with."""
    watched = open_page(browser, api)
    page = watched.page
    enter_key(page, api.key)
    drop_file(page, SAMPLE_IMAGE.read_bytes(), "sample.jpg", "image/jpeg")
    strength = page.get_by_label("Redux Strength")
    expect(strength).to_be_hidden()  # folded until asked for
    page.get_by_text("Advanced", exact=True).click()
    expect(strength).to_be_visible()
    strength.fill("0.4")
    page.get_by_role("radio", name="center").check()
    page.get_by_role("radio", name="match_input").check()
    page.get_by_role("button", name="Run", exact=True).click()
    expect(page.locator("#status-text")).to_contain_text("Done", timeout=15_000)

    image = page.get_by_role("img", name="Output")
    image.evaluate("img => img.decode()")
    # The sample is 768x512 (3:2): match_input keeps that at about a megapixel.
    assert image.evaluate("img => [img.naturalWidth, img.naturalHeight]") == [1248, 832]
    job = api.services.store.list_by_owner(api.services.keys.list()[0].id, 1)[0]
    assert (job.input["redux_strength"], job.input["redux_image_crop"]) == (0.4, "center")
    assert watched.errors == []


def test_a_run_with_a_prompt_and_two_references(browser: Browser, api: Harness, tmp_path: Path) -> None:
    """Advanced: a second reference (a file of its own, uploaded when run) mixed with the
    main one by the weights set on the page, and a prompt."""
    second = tmp_path / "second.png"
    Image.new("RGB", (40, 60), (10, 200, 90)).save(second)
    watched = open_page(browser, api)
    page = watched.page
    enter_key(page, api.key)
    drop_file(page, SAMPLE_IMAGE.read_bytes(), "sample.jpg", "image/jpeg")
    page.get_by_text("Advanced", exact=True).click()
    prompt = page.get_by_label("Prompt")
    prompt.fill("a watercolour of a lighthouse at dusk")
    page.get_by_role("button", name="Add a reference").click()
    page.get_by_label("Reference 2 file").set_input_files(second)
    page.get_by_label("Weight of the main reference").fill("0.75")
    page.get_by_label("Weight of reference 2").fill("0.25")
    page.get_by_role("button", name="Run", exact=True).click()
    expect(page.locator("#status-text")).to_contain_text("Done", timeout=15_000)

    job = api.services.store.list_by_owner(api.services.keys.list()[0].id, 1)[0]
    assert job.input["redux_image"] is None
    assert [item["weight"] for item in job.input["redux_images"]] == [0.75, 0.25]
    assert job.input["prompt"] == "a watercolour of a lighthouse at dusk"
    assert len(job.input_files) == 2
    stored = [Image.open(api.services.settings.files_dir / name).size for name in job.input_files]
    assert stored == [(768, 512), (40, 60)]  # the main reference first, then the added one
    assert watched.errors == []
