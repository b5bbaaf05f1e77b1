"""The playground in a real browser: Debian's Chromium, driven by Playwright.

The server runs the fake model with slow steps (flat colours, 0.25 s a step), so
progress and cancel can be seen. Never a downloaded browser: /usr/bin/chromium.
"""

from __future__ import annotations

import base64
import io
import itertools
import re
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from PIL import Image
from playwright.sync_api import Browser, Page, expect

from fluxredux.pipeline.fake import FakeModel
from tests.conftest import SAMPLE_IMAGE
from tests.harness import Harness, running_server
from tests.loras import tiny_lora


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
        images.nth(i).scroll_into_view_if_needed()  # lazy: an image out of view never loads
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


def test_the_footer_says_what_runs_the_predictions(browser: Browser, api: Harness) -> None:
    """The model's description as its worker gives it (on a GPU: the memory profile it chose)."""
    watched = open_page(browser, api)
    expect(watched.page.locator("#model-footer")).to_have_text("Model: FAKE model (test worker thread)")
    assert watched.errors == []


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
    image.scroll_into_view_if_needed()  # lazy: an image out of view never loads
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


# --- what a running prediction does after its last step; its times; the share page ---------

PHASE_TEXTS = [
    "Decoding the images…",
    "Running the safety check…",
    "Encoding the images…",
    "Storing the images…",
]


def record_statuses(page: Page) -> None:
    """Keep every text the status line shows: a phase may last less than one of expect's
    retries, though several of the page's own polls."""
    page.evaluate(
        """() => {
            window.shownStatuses = [];
            const node = document.getElementById('status-text');
            new MutationObserver(() => window.shownStatuses.push(node.textContent))
                .observe(node, {childList: true, characterData: true, subtree: true});
        }"""
    )


def shown_statuses(page: Page) -> list[str]:
    texts: list[str] = page.evaluate("window.shownStatuses")
    return [text for text, _ in itertools.groupby(texts)]


def format_seconds(page: Page, seconds: float) -> str:
    """The page's own rendering of a duration (common.js), to compare texts exactly."""
    return str(page.evaluate("async (s) => (await import('/static/common.js')).formatSeconds(s)", seconds))


def test_after_the_last_step_the_page_says_what_the_prediction_does(browser: Browser, tmp_path: Path) -> None:
    # The decode takes 0.48 s (a fifth of 4 x 0.6 s), the safety check 1.5 s (the fake's
    # CPU time): each lasts more than two of the page's polls (0.2 s apart).
    with running_server(tmp_path, model=FakeModel(step_seconds=0.6, cpu_seconds=1.5)) as api:
        watched = open_page(browser, api)
        page = watched.page
        enter_key(page, api.key)
        drop_file(page, SAMPLE_IMAGE.read_bytes(), "sample.jpg", "image/jpeg")
        record_statuses(page)
        page.get_by_role("button", name="Run", exact=True).click()
        expect(page.locator("#status-text")).to_contain_text("Done", timeout=20_000)
        shown = shown_statuses(page)
    assert {"Decoding the images…", "Running the safety check…"} <= set(shown), shown
    phases = [text for text in shown if text in PHASE_TEXTS]
    assert phases == [text for text in PHASE_TEXTS if text in phases], shown  # in their order
    first_phase = shown.index(phases[0])
    assert any(text.startswith("Step") for text in shown[:first_phase]), shown  # after the steps...
    assert not any(text.startswith("Step") for text in shown[first_phase:]), shown  # ...instead of it
    assert shown[-1].startswith("Done"), shown
    assert watched.errors == []


def test_the_clock_counts_the_prediction_s_own_time_and_the_result_labels_its_times(
    browser: Browser, tmp_path: Path
) -> None:
    with running_server(tmp_path, model=FakeModel(step_seconds=0.5)) as api:
        watched = open_page(browser, api)
        page = watched.page
        enter_key(page, api.key)
        # Made elsewhere (a script, another tab), then opened from the history while it runs.
        prediction_id = api.create_id(num_inference_steps=4)
        deadline = time.monotonic() + 20
        while (running := api.get(prediction_id))["progress"]["step"] < 2:
            assert time.monotonic() < deadline, running
            time.sleep(0.02)
        created = datetime.fromisoformat(running["created_at"].replace("Z", "+00:00")).timestamp()
        page.get_by_role("button", name="Refresh").click()
        age_when_opened = time.time() - created
        page.get_by_role("button", name="Open prediction").click()
        expect(page.locator("#elapsed")).to_have_text(re.compile(r"\d"))
        # Its age, not the time since this page began to watch it.
        first = float(str(page.locator("#elapsed").text_content()).split()[0])
        assert first >= age_when_opened - 0.05, (first, age_when_opened)

        expect(page.locator("#status-text")).to_contain_text("Done", timeout=20_000)
        metrics = api.get(prediction_id)["metrics"]
        total = format_seconds(page, metrics["total_time"])
        model = format_seconds(page, metrics["predict_time"])
        # Stopped at its end, on the server's count from created to completed.
        expect(page.locator("#elapsed")).to_have_text(total)
        expect(page.locator("#summary")).to_contain_text(f"total {total} · model {model}")
    assert watched.errors == []


def shown_settings(browser: Browser, api: Harness, prediction: dict[str, Any]) -> dict[str, str]:
    """The settings rows of a new share link's page, and that page's status line."""
    link = api.http.post(f"/v1/prediction/{prediction['id']}/share").json()["url"]
    page = browser.new_context().new_page()
    page.goto(link)
    expect(page.locator("#status")).to_contain_text("Done")
    rows = page.evaluate(
        """() => [...document.querySelectorAll('#inputs dt')]
              .map(dt => [dt.textContent, dt.nextElementSibling.textContent])"""
    )
    return {**dict(rows), "(status)": str(page.locator("#status").text_content())}


def test_the_share_page_shows_only_the_settings_that_were_set(browser: Browser, api: Harness) -> None:
    unset = api.get(api.create_id(output_format="png"), wait=20)  # no prompt, no seed
    given = api.get(api.create_id(seed=42, prompt="a lighthouse at dusk", output_quality=55), wait=20)
    assert unset["status"] == given["status"] == "success"

    rows = shown_settings(browser, api, unset)
    assert "prompt" not in rows and "seed" not in rows, rows  # none was given
    assert "random" not in rows.values(), rows
    assert rows["seed used (random)"] == str(unset["seed"]), rows
    assert "output quality" not in rows, rows  # ignored for PNG
    assert (rows["output format"], rows["num outputs"], rows["safety checker"]) == ("png", "1", "on")
    assert "total " in rows["(status)"] and "model " in rows["(status)"], rows

    rows = shown_settings(browser, api, given)
    assert (rows["seed"], rows["prompt"], rows["output quality"]) == ("42", "a lighthouse at dusk", "55")
    assert "seed used (random)" not in rows, rows


# --- issue 22: a custom size, a prompt alone, and finals from drafts -------------------------


def created_input(page: Page, click: Any) -> dict[str, Any]:
    """The ``input`` the page sends when ``click`` runs a create."""
    with page.expect_request(lambda r: r.url.endswith("/v1/prediction/") and r.method == "POST") as sent:
        click()
    body: dict[str, Any] = sent.value.post_data_json
    return dict(body["input"])


def natural_size(page: Page, nth: int = 0) -> list[int]:
    image = page.get_by_role("img", name="Output").nth(nth)
    image.scroll_into_view_if_needed()  # lazy: an image out of view never loads
    image.evaluate("img => img.decode()")
    return list(image.evaluate("img => [img.naturalWidth, img.naturalHeight]"))


def test_a_custom_size_sends_width_and_height(browser: Browser, api: Harness) -> None:
    watched = open_page(browser, api)
    page = watched.page
    enter_key(page, api.key)
    drop_file(page, SAMPLE_IMAGE.read_bytes(), "sample.jpg", "image/jpeg")
    width, height = page.get_by_label("Width"), page.get_by_label("Height")
    expect(width).to_be_hidden()  # until "custom" is chosen
    megapixels = page.get_by_role("radio", name="0.25")
    expect(megapixels).to_be_visible()
    page.get_by_role("radio", name="custom").check()
    expect(width).to_be_visible()
    expect(megapixels).to_be_hidden()  # the sides alone give the size
    assert (width.get_attribute("min"), width.get_attribute("max"), width.get_attribute("step")) == (
        "256",
        "2048",
        "16",
    )
    width.fill("2048")
    height.fill("1024")
    sent = created_input(page, lambda: page.get_by_role("button", name="Run", exact=True).click())
    assert (sent["width"], sent["height"]) == (2048, 1024)
    assert "aspect_ratio" not in sent and "megapixels" not in sent, sent
    expect(page.locator("#status-text")).to_contain_text("Done", timeout=15_000)
    assert natural_size(page) == [2048, 1024]

    # Twice its sides would be 8 MP, past the 4 MP a final may have: the server's reason,
    # shown in the output panel, where the button is.
    page.get_by_role("button", name="Upscale 2\u00d7").click()
    expect(page.locator("#error-upscale_from")).to_contain_text("4 MP")
    expect(page.locator("#status-text")).to_have_text("Not started.")

    # Back to an aspect ratio: no width or height is sent.
    page.get_by_role("radio", name="3:2").check()
    expect(width).to_be_hidden()
    sent = created_input(page, lambda: page.get_by_role("button", name="Run", exact=True).click())
    assert "width" not in sent and sent["aspect_ratio"] == "3:2", sent
    expect(page.locator("#status-text")).to_contain_text("Done", timeout=15_000)

    # From the history, the custom one brings its size back.
    page.get_by_role("button", name="Open prediction: success · 2048\u00d71024").click()
    expect(page.get_by_role("radio", name="custom")).to_be_checked()
    expect(width).to_have_value("2048")
    expect(height).to_have_value("1024")
    # The refused upscale's 400 is the one error the browser logs.
    assert [error for error in watched.errors if "status of 400" not in error] == [], watched.errors


def test_a_prompt_alone_needs_no_reference(browser: Browser, api: Harness) -> None:
    watched = open_page(browser, api)
    page = watched.page
    enter_key(page, api.key)
    run = page.get_by_role("button", name="Run", exact=True)
    run.click()  # neither an image nor a prompt
    expect(page.locator("#error-redux_image")).to_contain_text("Choose a reference image first")
    expect(page.locator("#error-redux_image")).to_contain_text("type a prompt")
    page.get_by_text("Advanced", exact=True).click()
    page.get_by_label("Prompt").fill("a lighthouse at dusk")
    expect(page.locator("#reference-label")).to_have_text("Reference image (optional with a prompt)")
    page.get_by_role("radio", name="0.25").check()
    sent = created_input(page, run.click)
    assert "redux_image" not in sent and "redux_images" not in sent, sent
    assert sent["prompt"] == "a lighthouse at dusk"
    expect(page.locator("#status-text")).to_contain_text("Done", timeout=15_000)
    assert natural_size(page) == [512, 512]
    job = api.services.store.list_by_owner(api.services.keys.list()[0].id, 1)[0]
    assert (job.input["redux_image"], job.input["prompt"], job.input_files) == (
        None,
        "a lighthouse at dusk",
        [],
    )
    assert watched.errors == []


def test_upscale_an_output_and_find_the_final_under_its_draft(browser: Browser, api: Harness) -> None:
    watched = open_page(browser, api)
    page = watched.page
    enter_key(page, api.key)
    drop_file(page, SAMPLE_IMAGE.read_bytes(), "sample.jpg", "image/jpeg")
    page.get_by_role("radio", name="0.25").check()
    page.get_by_label("Num Outputs").fill("2")
    page.get_by_role("button", name="Run", exact=True).click()
    expect(page.locator("#status-text")).to_contain_text("Done", timeout=15_000)
    draft = api.services.store.list_by_owner(api.services.keys.list()[0].id, 1)[0]
    expect(page.get_by_role("button", name="Upscale 2\u00d7")).to_have_count(2)  # one per output

    with page.expect_request(lambda r: r.url.endswith(f"/v1/prediction/{draft.id}/upscale")) as sent:
        page.get_by_role("button", name="Upscale 2\u00d7: output 2").click()
    assert sent.value.method == "POST" and sent.value.post_data_json == {"index": 1, "scale": 2}
    # Followed as a new run is: progress, then its one output at twice the draft's sides.
    expect(page.locator("#status-text")).to_contain_text("Step", timeout=10_000)
    expect(page.locator("#status-text")).to_contain_text("Done", timeout=15_000)
    expect(page.get_by_role("img", name="Output")).to_have_count(1)
    assert natural_size(page) == [1024, 1024]
    expect(page.locator("#summary")).to_contain_text(f"final 2\u00d7 of output 2 of {draft.id}")
    final = api.services.store.list_by_owner(api.services.keys.list()[0].id, 1)[0]
    assert final.input["upscale_from"] == {"prediction": draft.id, "index": 1}

    # In the history, the final is listed under its draft, not beside it.
    entries = page.locator("#history-list > li")
    expect(entries).to_have_count(1)
    nested = entries.first.locator(".finals").get_by_role("button", name="Open prediction")
    expect(nested).to_have_count(1)
    expect(nested).to_have_accessible_name(re.compile(f"final 2\u00d7 of output 2 of {draft.id}"))
    box, under = entries.first.get_by_role("button").first.bounding_box(), nested.bounding_box()
    assert box is not None and under is not None
    assert under["y"] > box["y"] and under["x"] > box["x"], (box, under)  # below it, indented
    # Opening the draft from there brings its two outputs back; the final, its one.
    entries.first.get_by_role("button").first.click()
    expect(page.get_by_role("img", name="Output")).to_have_count(2)
    nested.click()
    expect(page.get_by_role("img", name="Output")).to_have_count(1)
    page.reload()  # a fresh page lists them the same way
    expect(page.locator("#history-list > li")).to_have_count(1)
    expect(page.locator("#history-list .finals li")).to_have_count(1)
    assert watched.errors == []


def test_style_adapters_are_chosen_from_those_the_server_offers(browser: Browser, api: Harness) -> None:
    for seed, name in enumerate(("ink", "moss"), start=1):
        tiny_lora(api.services.settings.loras_dir / f"{name}.safetensors", seed=seed)
    watched = open_page(browser, api)
    page = watched.page
    enter_key(page, api.key)
    drop_file(page, SAMPLE_IMAGE.read_bytes(), "sample.jpg", "image/jpeg")
    page.get_by_text("Advanced", exact=True).click()
    plain = created_input(page, lambda: page.get_by_role("button", name="Run", exact=True).click())
    assert "loras" not in plain  # no adapter row: the hosted API's request
    expect(page.locator("#status-text")).to_contain_text("Done", timeout=15_000)
    page.get_by_role("button", name="Add a style adapter").click()
    adapter = page.get_by_label("Adapter 1", exact=True)
    assert adapter.locator("option").all_text_contents() == ["ink", "moss"]  # GET /v1/loras's
    adapter.select_option("moss")
    page.get_by_label("Scale of adapter 1").fill("0.5")
    sent = created_input(page, lambda: page.get_by_role("button", name="Run", exact=True).click())
    assert sent["loras"] == [{"name": "moss", "scale": 0.5}]
    expect(page.locator("#status-text")).to_contain_text("Done", timeout=15_000)
    job = api.services.store.list_by_owner(api.services.keys.list()[0].id, 1)[0]
    assert job.input["loras"] == [{"name": "moss", "scale": 0.5}]
    assert watched.errors == []


def test_a_previewing_run_shows_the_image_as_it_denoises_from_the_event_stream(
    browser: Browser, api: Harness
) -> None:
    watched = open_page(browser, api)
    page = watched.page
    enter_key(page, api.key)
    drop_file(page, SAMPLE_IMAGE.read_bytes(), "sample.jpg", "image/jpeg")
    page.get_by_text("Advanced", exact=True).click()
    page.get_by_label("Preview", exact=True).check()
    page.get_by_role("button", name="Run", exact=True).click()
    preview = page.get_by_role("img", name="The image as it denoises (a preview)")
    expect(preview).to_be_visible(timeout=15_000)  # mid-run, under the progress bar
    assert preview.evaluate("img => img.src").startswith("data:image/jpeg;base64,")
    expect(page.locator("#status-text")).to_contain_text("Done", timeout=15_000)
    expect(preview).to_be_hidden()  # the images themselves take its place
    assert any(url.endswith("/stream") for url in watched.requests), watched.requests
    job = api.services.store.list_by_owner(api.services.keys.list()[0].id, 1)[0]
    assert job.input["preview"] is True
    assert watched.errors == []
