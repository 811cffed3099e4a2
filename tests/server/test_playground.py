"""The playground page in a real browser: Debian's headless Chromium driven by Playwright.

No browser is downloaded: Playwright launches the system Chromium (``apt-get install -y
chromium``; the README's test command installs it). The test starts a real server, types
a prompt, drags the coefficient slider, generates, and checks that both panes filled
and differ. Set ``PYACTADD_SCREENSHOT=path.png`` to keep a screenshot of the result.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from pyactadd.extract.pipeline import extract
from helpers.server_launcher import ServerProcess

CHROMIUM_CANDIDATES = ("/usr/bin/chromium", "/usr/bin/chromium-browser")


def system_chromium() -> str:
    for candidate in (os.environ.get("PYACTADD_CHROMIUM"), *CHROMIUM_CANDIDATES, shutil.which("chromium")):
        if candidate and Path(candidate).is_file():
            return candidate
    pytest.fail("no system Chromium: install it with `apt-get install -y chromium` (the README's test command does)")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    folder = tmp_path_factory.mktemp("playground-vectors")
    extract("Love", "Hate", [6], coeff=1.0).save(folder / "love.gguf")
    with ServerProcess("--vectors", str(folder), "--threads", "1", "--n-ctx", "512") as process:
        yield process


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        # --no-sandbox: Chromium's sandbox cannot start as root (CI runs as root).
        browser = playwright.chromium.launch(executable_path=system_chromium(), headless=True, args=["--no-sandbox"])
        try:
            yield browser
        finally:
            browser.close()


def pane_finished(side: str) -> str:
    return f"['done', 'error'].includes(document.getElementById('pane-{side}').dataset.state)"


def test_playground_streams_unsteered_and_steered_side_by_side(server, browser, tmp_path):
    page = browser.new_page(viewport={"width": 1280, "height": 860})
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.set_default_timeout(30_000)
    page.goto(server.url + "/")

    page.wait_for_function("document.querySelectorAll('#vector option:not([disabled])').length > 0")
    assert page.input_value("#vector") == "love"
    page.click("#prompt")
    page.keyboard.type("I hate you because")

    # Drag the coefficient slider from its start (4) towards the right end.
    slider = page.locator("#coeff")
    box = slider.bounding_box()
    y = box["y"] + box["height"] / 2
    start = float(page.input_value("#coeff"))
    page.mouse.move(box["x"] + box["width"] * (start + 20) / 40, y)
    page.mouse.down()
    page.mouse.move(box["x"] + box["width"] * 0.65, y, steps=8)
    page.mouse.up()
    coeff = float(page.input_value("#coeff"))
    assert coeff > start, "the slider did not move"
    assert page.inner_text("#coeff-value") == page.input_value("#coeff")

    # Count text updates per pane: streamed text arrives in many pieces, not at once.
    page.evaluate(
        """() => {
            window.updates = {unsteered: 0, steered: 0};
            for (const side of ["unsteered", "steered"]) {
                new MutationObserver(() => { window.updates[side] += 1; })
                    .observe(document.getElementById("out-" + side), {childList: true, characterData: true, subtree: true});
            }
        }"""
    )
    page.click("#generate")
    page.wait_for_function(pane_finished("unsteered"), timeout=240_000)
    page.wait_for_function(pane_finished("steered"), timeout=240_000)
    unsteered = page.inner_text("#out-unsteered")
    steered = page.inner_text("#out-steered")
    shot = Path(os.environ.get("PYACTADD_SCREENSHOT") or tmp_path / "playground.png")
    page.screenshot(path=str(shot), full_page=True)

    assert page.get_attribute("#pane-unsteered", "data-state") == "done", page.inner_text("#pane-unsteered .meta")
    assert page.get_attribute("#pane-steered", "data-state") == "done", page.inner_text("#pane-steered .meta")
    assert unsteered.strip() and steered.strip()
    assert unsteered != steered
    updates = page.evaluate("window.updates")
    assert updates["unsteered"] > 3 and updates["steered"] > 3, updates
    assert f"love × {page.input_value('#coeff')}" in page.inner_text("#steer-label")
    assert "tokens" in page.inner_text("#pane-steered .meta")
    assert not errors, errors
    page.close()


def test_playground_page_and_assets_are_package_data():
    """The page ships inside the package (what a wheel installs), not only in the source tree."""
    from importlib import resources

    static = resources.files("pyactadd.server") / "static"
    for name in ("index.html", "playground.js", "playground.css"):
        assert (static / name).is_file(), name
    html = (static / "index.html").read_text(encoding="utf-8")
    assert "/static/playground.js" in html and 'id="coeff"' in html
