"""The app in headless Chromium (Playwright driving Debian's /usr/bin/chromium; .ci/run installs both).

Opens the tabs, runs each one's main action on the bundled model, waits for images and figures, presses play on the
timestep player and saves a screenshot of each tab (to DISCOLENS_SCREENSHOTS when set, e.g. docs/screenshots).
"""
from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

CHROMIUM = "/usr/bin/chromium"
LOADED = ("(sel) => {const i=document.querySelector(sel); return i && i.complete && i.naturalWidth > 0}")


def _shot(page, folder: Path, name: str) -> Path:
    """A full-page screenshot, shrunk to 900 px wide and palettised (small PNGs for the docs)."""
    im = Image.open(io.BytesIO(page.screenshot(full_page=True))).convert("RGB")
    if im.width > 900:
        im = im.resize((900, round(im.height * 900 / im.width)), Image.LANCZOS)
    path = folder / f"{name}.png"
    im.quantize(colors=128, method=Image.Quantize.MEDIANCUT).save(path, optimize=True)
    return path


@pytest.mark.slow
def test_every_tab_in_a_browser(server, tmp_path):
    """A person's path through every tab on the bundled model, with a screenshot of each."""
    from playwright.sync_api import expect, sync_playwright

    out = Path(os.environ.get("DISCOLENS_SCREENSHOTS") or tmp_path)
    out.mkdir(parents=True, exist_ok=True)
    long = 180_000
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True,
                                    args=["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"])
        page = browser.new_page(viewport={"width": 1200, "height": 1400})
        page.goto(server)

        # an error stays next to the action that failed
        page.locator("#prompt textarea").fill("")
        page.locator("#generate").click()
        expect(page.locator("#generate-status")).to_contain_text("the prompt is empty", timeout=60_000)

        # Generate & look
        page.locator("#prompt textarea").fill("a red circle left of a blue square")
        page.locator("#generate").click()
        page.wait_for_function(LOADED, arg="#image img", timeout=long)
        expect(page.locator("#word-maps img")).to_have_count(8, timeout=60_000)
        page.get_by_text("Trace explorer: one layer, head or denoising step").click()  # open its accordion
        expect(page.locator("#slice-maps img")).to_have_count(8, timeout=60_000)  # filled without a dropdown change
        expect(page.locator("#model-view img")).to_have_count(28, timeout=60_000)  # 7 layers x 4 heads
        expect(page.locator("#generate-status")).not_to_contain_text("Error")
        shot = Image.open(io.BytesIO(page.locator("#image").screenshot())).convert("RGB")
        assert np.asarray(shot, np.float32).std() > 10  # not a blank panel
        expect(page.locator("#player-caption")).to_contain_text("step 25 of 25", timeout=60_000)
        page.locator("#player-play").click()
        expect(page.locator("#player-caption")).to_contain_text("step 1 of 25", timeout=60_000)
        expect(page.locator("#player-caption")).to_contain_text("step 25 of 25", timeout=90_000)  # played to the end
        page.wait_for_function(LOADED, arg="#player-preview img", timeout=60_000)
        page.locator("#any-word textarea").fill("green")
        page.locator("#any-word-go").click()
        page.wait_for_function(LOADED, arg="#any-word-map img", timeout=long)
        expect(page.locator("#any-word-note")).to_contain_text("no new UNet call")
        page.locator("#edit-go").click()  # suppress the first content word, same seed
        page.wait_for_function(LOADED, arg="#edit-after img", timeout=long)
        expect(page.locator("#edit-note")).to_contain_text("same seed")
        _shot(page, out, "generate")

        # Match & rank (the generated image is already in the Match image box)
        page.get_by_role("tab", name="Match & rank").click()
        page.locator("#match").click()
        expect(page.locator("#match-ranking")).to_contain_text("a blue square left of a red circle", timeout=long)
        expect(page.locator("#match-notes")).to_contain_text("Routed to", timeout=long)
        expect(page.locator("#match-breakdown .js-plotly-plot")).to_be_visible(timeout=long)  # auto -> structure terms
        expect(page.locator("#match-winner-maps img").first).to_be_visible(timeout=long)
        _shot(page, out, "match")

        # Self-correction (DPT): corrected beside plain, its trajectory; then best of N with every sample's score
        page.get_by_role("tab", name="Self-correction").click()
        page.locator("#dpt-prompt textarea").fill("two red circles")
        page.locator("#dpt-steps input").fill("4")
        page.locator("#dpt-eta input").fill("3")
        page.locator("#dpt-go").click()
        page.wait_for_function(LOADED, arg="#dpt-image img", timeout=long)
        page.wait_for_function(LOADED, arg="#dpt-plain img", timeout=long)
        expect(page.locator("#dpt-plot .js-plotly-plot")).to_be_visible(timeout=long)
        expect(page.locator("#dpt-note")).to_contain_text("η = 3", timeout=long)
        page.locator("#dpt-bestof-go").click()
        expect(page.locator("#dpt-bestof img")).to_have_count(2, timeout=long)
        expect(page.locator("#dpt-bestof-note")).to_contain_text("Best of 2: kept seed", timeout=long)
        expect(page.locator("#dpt-status")).not_to_contain_text("Error")
        expect(page.locator("#dpt-bestof-status")).not_to_contain_text("Error")
        _shot(page, out, "self_correction")

        # Failures
        page.get_by_role("tab", name="Failures").click()
        page.locator("#fail-n input").fill("8")
        page.locator("#fail-go").click()
        expect(page.locator("#fail-summary")).to_contain_text("failures", timeout=long)
        if page.locator("#fail-table tbody tr").count() and "comvg-" in page.locator("#fail-table").inner_text():
            page.locator("#fail-open").click()
            page.wait_for_function(LOADED, arg="#fail-image img", timeout=long)
            expect(page.locator("#fail-true-maps img").first).to_be_visible(timeout=long)
        _shot(page, out, "failures")

        # Faithfulness
        page.get_by_role("tab", name="Faithfulness").click()
        page.locator("#faith-go").click()
        page.wait_for_function(LOADED, arg="#faith-image img", timeout=long)
        expect(page.locator("#faith-maps-a img").first).to_be_visible(timeout=long)
        expect(page.locator("#faith-table")).to_contain_text("mean (masked words)", timeout=long)
        n = page.locator("#faith-maps-a img").count()
        assert n >= 3 and page.locator("#faith-maps-b img").count() == n
        _shot(page, out, "faithfulness")

        # Learn
        page.get_by_role("tab", name="Learn").click()
        expect(page.locator("#learn-text")).to_contain_text("Timestep player")
        _shot(page, out, "learn")
        browser.close()
