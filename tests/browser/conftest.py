"""The browser tests' fixtures: one headless Chromium per module (Debian's, driven by Playwright).

``scripts/test`` installs Chromium (``apt-get install chromium``) when it is
missing; Playwright's own browser download is not used. Without it these
tests are skipped, except in CI (``CI`` set), where that is a failure.
``CONSOLE_SCREENSHOTS=DIR`` makes the tests save each page they visit as
``DIR/<name>.png`` (``scripts/console_screenshots`` writes docs/console/ so).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import pytest

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
INSTALLED = Path(CHROMIUM).exists()
SCREENSHOTS = os.environ.get("CONSOLE_SCREENSHOTS", "")


@pytest.fixture(scope="module")
def anyio_backend() -> str:
    """asyncio, shared by the module's tests so that one browser serves them all."""
    return "asyncio"


@pytest.fixture(scope="module")
async def browser() -> AsyncIterator[Any]:
    """A headless Chromium for the module's tests."""
    if not INSTALLED:
        if os.environ.get("CI"):
            pytest.fail(f"no Chromium at {CHROMIUM}: scripts/test installs it (apt-get install chromium)")
        pytest.skip(f"no Chromium at {CHROMIUM} (scripts/test installs it)")
    from playwright.async_api import async_playwright

    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            yield browser
        finally:
            await browser.close()


@pytest.fixture
async def page(browser: Any) -> AsyncIterator[Any]:
    """A fresh page (its own cookies) of the module's browser, 1280 px wide."""
    context = await browser.new_context(viewport={"width": 1280, "height": 860})
    context.set_default_timeout(15_000)
    try:
        yield await context.new_page()
    finally:
        await context.close()


async def screenshot(page: Any, name: str) -> None:
    """Save the page as ``$CONSOLE_SCREENSHOTS/<name>.png`` when screenshots are asked for."""
    if SCREENSHOTS:
        await anyio.Path(SCREENSHOTS).mkdir(parents=True, exist_ok=True)
        await page.screenshot(path=str(Path(SCREENSHOTS) / f"{name}.png"), full_page=True)
