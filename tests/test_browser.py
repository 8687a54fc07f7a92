"""A person's path through the demo in a real browser: Playwright driving Debian's chromium."""
import os
import shutil
from pathlib import Path
from urllib.parse import urlparse

import pytest

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARTIFACTS = Path(__file__).parent / "artifacts"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def served(gallery):
    if not Path(CHROMIUM).exists():
        if os.environ.get("CI"):
            pytest.fail("chromium is missing in CI: .ci/run must apt-get install it")
        pytest.skip("no chromium on this machine (apt-get install chromium)")
    from app.ui import build_demo, launch
    from chan.checkpoint import DEFAULT_COMPARISON
    from chan.gallery import Comparison, Gallery

    demo = build_demo(gallery, [Comparison.loaded(Gallery(DEFAULT_COMPARISON, gallery.dataset, progress=False))])
    launch(demo, server_name="127.0.0.1", prevent_thread_lock=True, quiet=True)
    yield demo.local_url, gallery
    demo.close()


def test_search_inspect_and_rank_in_a_browser(served):
    from playwright.sync_api import expect, sync_playwright

    url, gallery = served
    ARTIFACTS.mkdir(exist_ok=True)
    hosts = set()
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.on("request", lambda r: hosts.add(urlparse(r.url).hostname))
        page.goto(url)
        expect(page.locator("#search-button")).to_be_visible(timeout=30_000)

        page.locator("#query textarea, #query input").first.fill("a dog runs on the grass")
        page.locator("#search-button").click()
        expect(page.locator("#results img").first).to_be_visible(timeout=60_000)
        assert page.locator("#results img").count() >= 12
        expect(page.locator("#search-status")).to_contain_text("ms")
        assert "q=a+dog" in page.url or "q=a%20dog" in page.url
        # side by side: the SCAN twin's top-k for the same query, each photo marked against CHAN's rank
        expect(page.locator("#compare-results img").first).to_be_visible(timeout=60_000)
        expect(page.locator("#compare-status")).to_contain_text("SCAN")
        # every result photo arrives through the file route (the served folder), none broken
        page.wait_for_function("() => [...document.querySelectorAll('#results img, #compare-results img')]"
                               ".every(img => img.complete && img.naturalWidth > 0)", timeout=30_000)
        page.screenshot(path=ARTIFACTS / "search.png", full_page=True)

        page.locator("#results img").first.click()
        expect(page.locator("#hard-plot .plotly").first).to_be_visible(timeout=60_000)
        expect(page.locator("#soft-plot .plotly").first).to_be_visible(timeout=60_000)
        expect(page.locator("#inspect-status")).to_contain_text("Hard-alignment score (CHAN)")
        page.screenshot(path=ARTIFACTS / "inspector.png", full_page=True)

        page.get_by_role("tab", name="Image → captions").click()
        page.locator("#upload input[type=file]").set_input_files(str(gallery.photos[5].path))
        page.wait_for_timeout(1000)
        page.locator("#own-captions textarea").fill("a purple elephant reading a newspaper")
        page.locator("#rank-button").click()
        expect(page.locator("#rank-status")).to_contain_text("captions ranked", timeout=60_000)
        expect(page.locator("#ranked")).to_contain_text("a purple elephant reading a newspaper", timeout=10_000)
        expect(page.locator("#ranked")).to_contain_text("your caption")
        page.screenshot(path=ARTIFACTS / "rank.png", full_page=True)

        # a shared link reproduces its search
        page.goto(f"{url}?q=a+man+rides+a+bike")
        expect(page.locator("#results img").first).to_be_visible(timeout=60_000)
        expect(page.locator("#query textarea, #query input").first).to_have_value("a man rides a bike")
        expect(page.locator("#search-status")).to_contain_text("Top 12")
        browser.close()
    assert hosts == {"127.0.0.1"}, hosts
