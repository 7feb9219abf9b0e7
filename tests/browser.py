"""A real browser for the tests of web pages: Debian's Chromium, driven by Selenium
through Debian's chromedriver (scripts/setup.sh --dev installs both).

Nothing is downloaded at test time: the driver and browser are given by path, so
Selenium's own driver manager never runs. Where they are missing the tests skip
with the fix, except under scripts/test.sh, which sets P2PSCHED_REQUIRE_BROWSER=1
so that CI fails instead of skipping.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from typing import Any

import pytest

CHROMIUM = ("chromium", "chromium-browser", "google-chrome")


def _find() -> tuple[str, str] | None:
    driver = shutil.which("chromedriver")
    browser = next((p for p in map(shutil.which, CHROMIUM) if p), None)
    return (browser, driver) if browser and driver else None


@pytest.fixture
def browser(tmp_path: Any) -> Iterator[Any]:
    found = _find()
    if found is None:
        why = "no chromium and chromedriver on PATH: install them with apt-get install chromium chromium-driver " \
              "(scripts/setup.sh --dev does)"
        if os.environ.get("P2PSCHED_REQUIRE_BROWSER") == "1":
            pytest.fail(why)
        pytest.skip(why)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = found[0]
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1400,1100", f"--user-data-dir={tmp_path / 'chromium-profile'}"):
        opts.add_argument(arg)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(found[1]), options=opts)
    try:
        yield driver
    finally:
        driver.quit()


def console_errors(driver: Any) -> list[dict[str, Any]]:
    """The page's console errors since the last call: script errors, refused loads,
    CSP violations. A request that a test's own navigation cut short (ERR_ABORTED)
    is not the page's error."""
    return [e for e in driver.get_log("browser") if e["level"] == "SEVERE" and "net::ERR_ABORTED" not in e["message"]]
