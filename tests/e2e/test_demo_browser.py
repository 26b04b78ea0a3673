"""The demo page at / in a real headless Chromium, against the running stack: upload a photo, see
5 results, like one, see the list refined by /v1/recommend; once at desktop and once at phone
width. Screenshots go to tests/artifacts/ (git-ignored); FASHIONREC_UPDATE_DEMO_PNG=1 also
copies the desktop one to docs/demo.png for the README.

Chromium is Debian's `chromium` (or any Chromium or Chrome: FASHIONREC_TEST_CHROMIUM, else
chromium / chromium-browser / google-chrome on PATH) driven by Playwright, which never downloads
a browser of its own here. Without one the tests are skipped, saying so.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from tests.e2e.conftest import IngestedCatalog, RunningStack

if TYPE_CHECKING:  # imported for real only once a Chromium is found
    from playwright.sync_api import Browser, Page

ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = ROOT / "tests" / "artifacts"
README_SCREENSHOT = ROOT / "docs" / "demo.png"
CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome")
RESULT = "[data-testid=result]"
TIMEOUT_MS = 60_000


def find_chromium() -> str | None:
    configured = os.environ.get("FASHIONREC_TEST_CHROMIUM")
    if configured:
        return configured if Path(configured).is_file() else None
    return next((path for name in CHROMIUM_NAMES if (path := shutil.which(name))), None)


CHROMIUM = find_chromium()
# Decided before any fixture runs: without a browser the stack is not even started for these.
pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(
        CHROMIUM is None,
        reason="no Chromium found (set FASHIONREC_TEST_CHROMIUM, or install Debian's "
        "`chromium`: apt-get install chromium); the demo page's browser test needs one",
    ),
]


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
    with sync_api.sync_playwright() as playwright:
        # --no-sandbox: CI containers run as root, where Chromium's sandbox cannot start.
        launched = playwright.chromium.launch(
            executable_path=CHROMIUM, headless=True, args=["--no-sandbox"]
        )
        yield launched
        launched.close()


def result_ids(page: Page) -> list[str]:
    return page.eval_on_selector_all(RESULT, "nodes => nodes.map(n => n.dataset.itemId)")


def screenshot(page: Page, name: str) -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / name
    page.screenshot(path=str(path), full_page=True)
    return path


def like_and_refine(page: Page, stack: RunningStack, photo: Path) -> tuple[list[str], list[str]]:
    """Upload `photo`, wait for 5 results, like the second: (ids before, ids after)."""
    requested: list[str] = []
    page.on("request", lambda request: requested.append(request.url))
    page.goto(stack.url)
    page.set_input_files("#photo", str(photo))
    page.wait_for_function(
        "document.querySelectorAll('[data-testid=result]').length === 5", timeout=TIMEOUT_MS
    )
    before = result_ids(page)
    cards = page.locator(RESULT)
    # Every result shows its image, title, price, score and the reasons it matches.
    first = cards.nth(0)
    assert first.locator("img").get_attribute("src").startswith(f"{stack.url}/v1/images/")
    assert first.locator("[data-testid=score]").inner_text().startswith("score ")
    assert first.locator("[data-testid=price]").inner_text()
    assert first.locator("[data-testid=reasons] .chip").count() >= 1

    liked = before[1]
    with page.expect_response(lambda r: "/v1/recommend" in r.url, timeout=TIMEOUT_MS) as answer:
        cards.nth(1).locator("[data-testid=like]").click()
    assert answer.value.status == 200
    page.wait_for_function(
        "ids => { const now = [...document.querySelectorAll('[data-testid=result]')]"
        ".map(n => n.dataset.itemId); return now.length > 0 && now.join() !== ids.join(); }",
        arg=before,
        timeout=TIMEOUT_MS,
    )
    after = result_ids(page)
    # The liked item is now an example, shown among the liked ones (and removable).
    assert page.locator(f"[data-testid=liked-item][data-item-id='{liked}']").count() == 1
    assert liked not in after
    assert any("/v1/recommend" in url for url in requested)
    # Everything the page loads comes from the gateway (no CDN).
    foreign = [u for u in requested if not u.startswith((stack.url, "blob:", "data:"))]
    assert foreign == []
    return before, after


def test_like_refines_the_results(
    browser: Browser, stack: RunningStack, ingested_catalog: IngestedCatalog
) -> None:
    context = browser.new_context(viewport={"width": 1200, "height": 900})
    page = context.new_page()
    try:
        photo = ingested_catalog.image(ingested_catalog.specs[0])
        before, after = like_and_refine(page, stack, photo)
        assert before != after and len(after) == 5
        # A dislike refines again: the item joins the disliked ones and leaves the list.
        disliked = after[0]
        with page.expect_response(lambda r: "/v1/recommend" in r.url, timeout=TIMEOUT_MS):
            page.locator(RESULT).nth(0).locator("[data-testid=dislike]").click()
        page.wait_for_selector(f"[data-testid=disliked-item][data-item-id='{disliked}']")
        page.wait_for_function(
            "id => !document.querySelector(`[data-testid=result][data-item-id='${id}']`)",
            arg=disliked,
            timeout=TIMEOUT_MS,
        )
        assert len(result_ids(page)) == 5
        path = screenshot(page, "demo-desktop.png")
        if os.environ.get("FASHIONREC_UPDATE_DEMO_PNG") == "1":
            README_SCREENSHOT.parent.mkdir(exist_ok=True)
            shutil.copyfile(path, README_SCREENSHOT)
    finally:
        context.close()


def test_phone_width(
    browser: Browser, stack: RunningStack, ingested_catalog: IngestedCatalog
) -> None:
    context = browser.new_context(
        viewport={"width": 375, "height": 812}, device_scale_factor=2, is_mobile=True
    )
    page = context.new_page()
    try:
        photo = ingested_catalog.image(ingested_catalog.specs[1])
        before, after = like_and_refine(page, stack, photo)
        assert before != after
        # No horizontal scroll, and the grid and its cards lie within the screen's width.
        assert page.evaluate("document.documentElement.scrollWidth") <= 375
        grid = page.locator("[data-testid=results]").bounding_box()
        assert grid is not None and grid["x"] >= 0 and grid["x"] + grid["width"] <= 375
        for n in range(page.locator(RESULT).count()):
            box = page.locator(RESULT).nth(n).bounding_box()
            assert box is not None and box["x"] + box["width"] <= 375
        screenshot(page, "demo-phone.png")
    finally:
        context.close()
