"""Regenerate docs/screenshot-desktop.png and docs/screenshot-phone.png.

Starts `fluxredux serve --model demo` on a free port with a throw-away data dir, runs one
prediction through the page (drop the sample image, 16:9, 2 outputs), and captures the
page at desktop and phone widths in Debian's Chromium. The demo model's outputs are
noise (random weights): the screenshots show the page, not the model.

    .venv/bin/python scripts/screenshots.py
"""

from __future__ import annotations

import base64
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
from playwright.sync_api import Page, expect, sync_playwright

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "examples" / "sample.jpg"
ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]  # fmt: skip


def start_server() -> tuple[subprocess.Popen[bytes], str, str]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    data_dir = tempfile.mkdtemp(prefix="fluxredux-shots-")
    process = subprocess.Popen(
        [str(Path(sys.executable).with_name("fluxredux")), "serve", "--model", "demo", "--port", str(port),
         "--data-dir", data_dir],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""},
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    key = None
    assert process.stdout is not None
    while key is None:
        match = re.search(rb"(fr_[0-9a-f]{12}_[A-Za-z0-9_-]+)", process.stdout.readline())
        key = match.group(1).decode() if match else None
    deadline = time.monotonic() + 60
    while not httpx.get(url + "/health").json()["model"]["ready"]:
        assert time.monotonic() < deadline, "the worker did not load the demo model"
        time.sleep(0.2)
    return process, url, key


def run_once(page: Page, key: str) -> None:
    page.get_by_label("API key", exact=True).fill(key)
    page.get_by_role("button", name="Save key").click()
    page.evaluate(
        """(b64) => {
            const bytes = Uint8Array.from(atob(b64), c => c.charCodeAt(0));
            const transfer = new DataTransfer();
            transfer.items.add(new File([bytes], 'sample.jpg', {type: 'image/jpeg'}));
            const zone = document.getElementById('dropzone');
            zone.dispatchEvent(new DragEvent('drop', {dataTransfer: transfer}));
        }""",
        base64.b64encode(SAMPLE.read_bytes()).decode(),
    )
    page.get_by_role("radio", name="16:9").check()
    page.get_by_label("Num Outputs").fill("2")
    page.get_by_role("button", name="Run", exact=True).click()
    expect(page.locator("#status-text")).to_contain_text("Done", timeout=60_000)
    page.wait_for_load_state("networkidle")


def main() -> None:
    process, url, key = start_server()
    try:
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path="/usr/bin/chromium", args=ARGS)
            for name, viewport in (
                ("desktop", {"width": 1280, "height": 900}),
                ("phone", {"width": 390, "height": 844}),
            ):
                page = browser.new_page(viewport=viewport, device_scale_factor=1)
                page.goto(url + "/")
                run_once(page, key)
                path = REPO / "docs" / f"screenshot-{name}.png"
                page.screenshot(path=str(path), full_page=True)
                print(f"wrote {path}")
            browser.close()
    finally:
        process.terminate()
        process.wait(10)


if __name__ == "__main__":
    main()
