"""The search page driven in real headless Chromium against a live uvicorn server on 127.0.0.1."""

from __future__ import annotations

import base64
import socket
import threading
import time
from pathlib import Path

import pytest
import uvicorn
from test_search import build_tiny, draw, make_manifest

from unialign.search.app import create_app
from unialign.search.build import entries_from_manifest
from unialign.search.query import Searcher

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
pytestmark = pytest.mark.skipif(not CHROMIUM.exists(),
                                reason=f"{CHROMIUM} not found: install Debian's chromium (apt-get install -y chromium)")
COLOURS = ["red", "green", "blue", "yellow", "purple", "orange"]


@pytest.fixture(scope="module")
def live_server(tiny_checkpoint, tmp_path_factory):
    root = tmp_path_factory.mktemp("browser")
    manifest = make_manifest(root, COLOURS)
    # the page over an index with a query bank (its own captions): text scores are cosine - bias
    build_tiny(tiny_checkpoint, root / "index", entries_from_manifest(manifest), query_bank=manifest)
    searcher = Searcher(root / "index", device="cpu")
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))  # bound before the server starts: no race for a "free" port
    server = uvicorn.Server(uvicorn.Config(create_app(searcher), log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{sock.getsockname()[1]}", root
    server.should_exit = True
    thread.join(10)
    sock.close()
    searcher.close()


def test_search_page_in_headless_chromium(live_server):
    from playwright.sync_api import expect, sync_playwright

    url, root = live_server
    problems: list[str] = []
    all_loaded = "() => { const imgs = [...document.querySelectorAll('#results img')];" \
                 " return imgs.length > 0 && imgs.every(i => i.complete && i.naturalWidth > 0); }"
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
        try:
            page = browser.new_page()
            page.on("pageerror", lambda err: problems.append(f"page error: {err}"))
            page.on("console", lambda msg: problems.append(msg.text) if msg.type == "error" else None)
            page.goto(url + "/")
            expect(page.locator("#index-info")).to_contain_text("6 images indexed")
            expect(page.locator("#index-info")).to_contain_text("normalised by a query bank of 12 queries")

            # Text search from the keyboard: type, press Enter.
            box = page.get_by_label("Describe the image you are looking for")
            box.fill("a red square")
            box.press("Enter")
            expect(page.locator("#status")).to_contain_text("6 results for “a red square”")
            expect(page.locator("#results img")).to_have_count(6)
            page.wait_for_function(all_loaded, timeout=10_000)
            widths = page.eval_on_selector_all("#results img", "imgs => imgs.map(i => i.naturalWidth)")
            assert len(widths) == 6 and all(w > 0 for w in widths)
            scores = page.locator("#results .score").all_inner_texts()
            assert [float(s) for s in scores] == sorted((float(s) for s in scores), reverse=True)

            # The longest query allowed, one unbroken word: echoed in the status line, it wraps.
            expect(page.locator("#legend summary")).to_be_visible()
            long_query = "x" * 512
            box.fill(long_query)
            box.press("Enter")
            expect(page.locator("#status")).to_contain_text(long_query)
            assert page.evaluate("document.documentElement.scrollWidth <= document.documentElement.clientWidth")
            box.fill("a red square")
            box.press("Enter")
            expect(page.locator("#status")).to_contain_text("6 results for “a red square”")

            # Results are focusable buttons with a readable name; Enter on one finds similar images.
            first = page.locator("#results .result").first
            first.focus()
            expect(first).to_be_focused()
            assert first.get_attribute("aria-label").startswith("Rank 1, score")
            page.keyboard.press("Enter")
            expect(page.locator("#status")).to_contain_text("images similar to")

            # Captions search (the option appears because this index has captions).
            page.get_by_label("match the query against captions").check()
            box.fill("the blue box in the middle")
            box.press("Enter")
            expect(page.locator("#results .name").first).to_have_text("blue_square.png")
            page.get_by_label("match the query against captions").uncheck()

            # Upload with the file input.
            query = root / "query.png"
            draw("green").save(query)
            page.get_by_label("Image file (JPEG, PNG, WebP, GIF or BMP)").set_input_files(str(query))
            expect(page.locator("#status")).to_contain_text("results for query.png")
            expect(page.locator("#results .name").first).to_have_text("green_square.png")
            page.wait_for_function(all_loaded, timeout=10_000)

            # Drag and drop onto the drop zone.
            page.evaluate("""(b64) => {
                const bytes = Uint8Array.from(atob(b64), c => c.charCodeAt(0));
                const transfer = new DataTransfer();
                transfer.items.add(new File([bytes], "dropped.png", {type: "image/png"}));
                document.getElementById("drop").dispatchEvent(
                    new DragEvent("drop", {dataTransfer: transfer, bubbles: true, cancelable: true}));
            }""", base64.b64encode((root / "img" / "orange_square.png").read_bytes()).decode())
            expect(page.locator("#status")).to_contain_text("results for dropped.png")
            expect(page.locator("#results .name").first).to_have_text("orange_square.png")

            # A server-side error is shown to the user, not swallowed.
            page.evaluate("""() => {
                const transfer = new DataTransfer();
                transfer.items.add(new File(["not really"], "fake.png", {type: "image/png"}));
                document.getElementById("drop").dispatchEvent(
                    new DragEvent("drop", {dataTransfer: transfer, bubbles: true, cancelable: true}));
            }""")
            expect(page.get_by_role("alert")).to_contain_text("not an image in an accepted format")
        finally:
            browser.close()
    # The only console error is the browser logging the 415 of the deliberately bad upload.
    assert len(problems) == 1 and "status of 415" in problems[0], problems
