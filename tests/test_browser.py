"""The app in headless Chromium (Playwright driving Debian's /usr/bin/chromium; .ci/run installs both)."""
from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

CHROMIUM = "/usr/bin/chromium"


@pytest.mark.slow
def test_generate_and_match_in_a_browser(server, tmp_path):
    """A person's path: Generate on the bundled model, see the image and word maps, rank captions, see the plot."""
    from playwright.sync_api import expect, sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True,
                                    args=["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"])
        page = browser.new_page(viewport={"width": 1200, "height": 1400})
        page.goto(server)
        page.locator("#prompt textarea").fill("a red circle left of a blue square")
        page.locator("#generate").click()
        page.wait_for_function("() => {const i=document.querySelector('#image img');"
                               " return i && i.complete && i.naturalWidth > 0}", timeout=180_000)
        expect(page.locator("#word-maps img")).to_have_count(8, timeout=60_000)
        shot = Image.open(io.BytesIO(page.locator("#image").screenshot())).convert("RGB")
        assert np.asarray(shot, np.float32).std() > 10  # not a blank panel
        page.locator("#match").click()
        expect(page.locator("#match-breakdown .js-plotly-plot")).to_be_visible(timeout=180_000)
        expect(page.locator("#match-ranking")).to_contain_text("a blue square left of a red circle")
        page.screenshot(path=str(tmp_path / "app.png"), full_page=True)
        browser.close()
