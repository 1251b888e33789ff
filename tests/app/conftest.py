"""Fixtures for the dashboard tests: a cache of synthetic runs, and headless Chromium for dash_duo."""

from __future__ import annotations

from pathlib import Path

import pytest

from app_fixtures import build_cache

CHROMIUM = "/usr/bin/chromium"
SCREENSHOTS = Path(__file__).resolve().parents[1] / "screenshots"


def pytest_configure(config):
    # `pytest` without --headless must still run the browser tests headless (the lead's `make test`).
    if hasattr(config.option, "headless"):
        config.option.headless = True


def pytest_setup_options():
    """Selenium options for dash[testing]: Debian's Chromium, headless, sandbox off (containers)."""
    from selenium.webdriver.chrome.options import Options

    options = Options()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--disable-background-networking", "--window-size=1400,1500"):
        options.add_argument(arg)
    return options


@pytest.fixture(scope="session")
def cache(tmp_path_factory) -> Path:
    return build_cache(tmp_path_factory.mktemp("cache"))


@pytest.fixture
def screenshot():
    """save(name): write the current browser window to tests/screenshots/<name>.png."""
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)

    def save(driver, name: str) -> Path:
        path = SCREENSHOTS / f"{name}.png"
        driver.save_screenshot(str(path))
        return path

    return save


@pytest.fixture(autouse=True)
def settled(request):
    """After a browser test, wait until the page has no callback in flight before dash_duo stops the server:
    stopping it mid-request kills the request's thread with SystemExit (a PytestUnhandledThreadExceptionWarning)."""
    duo = request.getfixturevalue("dash_duo") if "dash_duo" in request.fixturenames else None
    yield
    if duo is not None and duo.driver is not None:
        from dash.testing.wait import until

        until(duo._wait_for_callbacks, timeout=30, poll=0.2)
