"""A fresh clone with nothing beside it: `python app.py` serves the bundled gallery and searches while it indexes."""
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

from tests.conftest import call_api

ROOT = Path(__file__).resolve().parents[1]


def _clone(to: Path) -> Path:
    """The files a clone of this tree holds (tracked, or new and not ignored): no venv, no cache, no ../shared."""
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"], cwd=ROOT,
                            check=True, capture_output=True).stdout.decode().split("\0")
    for name in filter(None, listed):
        if (ROOT / name).is_file():
            (to / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, to / name)
    return to


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(check, timeout: float, what: str):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        result = check()
        if result:
            return result
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def _look_while_indexing(url: str) -> None:
    """The page in a browser during indexing: its progress line, and a search that says what it covers."""
    from tests.test_browser import ARTIFACTS, CHROMIUM, CHROMIUM_ARGS

    if not Path(CHROMIUM).exists():
        return  # test_browser fails in CI without chromium; here the HTTP checks above suffice
    from playwright.sync_api import expect, sync_playwright

    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.goto(f"{url}/?q=a+dog+jumps+into+the+water")
        # the progress line moves on its own (a timer): a count above zero, with an estimate of the time left
        expect(page.locator("#index-status")).to_contain_text(re.compile(r"Indexing the gallery: [1-9][\d,]* of 1,000 "
                                                                          r"photos \(about"), timeout=60_000)
        expect(page.locator("#search-status")).to_contain_text("indexed so far", timeout=60_000)
        page.screenshot(path=ARTIFACTS / "indexing.png", full_page=True)
        browser.close()


def test_a_fresh_clone_answers_and_searches_while_indexing(tmp_path):
    clone = _clone(tmp_path / "clone")
    assert not (tmp_path / "shared").exists() and (clone / "assets" / "gallery" / "README.md").is_file()
    port = _free_port()
    env = {**os.environ, "CHAN_CACHE": str(tmp_path / "empty-cache")}
    log = (tmp_path / "app.log").open("w")
    started = time.monotonic()
    app = subprocess.Popen([sys.executable, "app.py", "--port", str(port)], cwd=clone, env=env, stdout=log,
                           stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        def page():
            try:
                return httpx.get(url, timeout=5).status_code == 200
            except httpx.HTTPError:
                assert app.poll() is None, (tmp_path / "app.log").read_text()
                return False

        _wait(page, 120, "the page")
        print(f"page answered {time.monotonic() - started:.1f} s after launch")

        def partial_search():
            status = call_api(url, "search_images", ["a dog runs on the grass", 5])
            return status if "indexed so far" in status else None

        status = _wait(partial_search, 120, "a search over the first indexed photos")
        assert status.startswith("Top 5 of ") and "of 1,000" in status, status
        _look_while_indexing(url)
    finally:
        app.terminate()
        app.wait(30)
        log.close()
