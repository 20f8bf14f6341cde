"""A landing page as a person sees it: Debian's Chromium, driven by Playwright."""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path
from typing import Any

import pytest
from playwright.async_api import async_playwright

from tests.web_helpers import data_file, purl_rows, running

CHROMIUM = shutil.which("chromium")
ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts"
# As root, with this machine's closed network: no sandbox, no background connections.
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--autoplay-policy=no-user-gesture-required"]


async def until(page: Any, expression: str, timeout: float = 30.0) -> None:
    """Poll a condition through the debugger protocol (wait_for_function evaluates
    strings with eval, which the page's own CSP rightly refuses)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not await page.evaluate(expression):
        assert asyncio.get_running_loop().time() < deadline, f"timed out: {expression}"
        await asyncio.sleep(0.05)


@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed "
                    "(scripts/dev test installs it)")
@pytest.mark.asyncio
async def test_landing_page_plays_in_chromium(tmp_path: Path) -> None:
    """In a real browser the page shows the row's name, the video loads and plays (its
    metadata says 4 s), the thumbnail is its poster and loads as an image, and the CSP
    blocks nothing the page needs. Screenshot in test-artifacts/landing-page.png."""
    async with running(tmp_path) as run:
        outcome = await run.process("acme_spring_20261127_101500_00.csv", data_file(3))
        row = purl_rows(outcome.purl)[0]  # type: ignore[arg-type]
        async with async_playwright() as pw:
            browser = await pw.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
            try:
                page = await browser.new_page(viewport={"width": 412, "height": 860})
                problems: list[str] = []
                page.on("console", lambda m: problems.append(m.text)
                        if m.type == "error" else None)
                page.on("requestfailed", lambda r: problems.append(f"failed {r.url}"))
                response = await page.goto(run.url(row["landingPage"]))
                assert response is not None and response.status == 200
                assert await page.inner_text("h1") == f"Hi {row['first_name']}!"
                poster = await page.get_attribute("video", "poster")
                assert poster == run.url(row["thumbnail_1"]).removeprefix(run.base)
                await until(page, "document.querySelector('video').readyState >= 1")
                duration = await page.evaluate("document.querySelector('video').duration")
                assert abs(duration - 4.0) < 0.1
                size = await page.evaluate(
                    "[document.querySelector('video').videoWidth,"
                    " document.querySelector('video').videoHeight]")
                assert size == [1280, 720]
                await page.evaluate("document.querySelector('video').muted = true")
                await page.evaluate("document.querySelector('video').play()")
                await until(page, "document.querySelector('video').currentTime > 0.5")
                poster_ok = await page.evaluate(
                    """async (src) => { const i = new Image(); i.src = src;
                         await i.decode(); return [i.naturalWidth, i.naturalHeight]; }""",
                    poster)
                assert poster_ok == [640, 360]
                await page.evaluate("document.querySelector('video').pause()")
                ARTIFACTS.mkdir(exist_ok=True)
                await page.screenshot(path=str(ARTIFACTS / "landing-page.png"), full_page=True)
                assert problems == []
            finally:
                await browser.close()
