"""The production server with a token, in headless Chromium: the login form without it, the page with it."""

from __future__ import annotations

import os
import time

import pytest

from serving import Served

pytestmark = [pytest.mark.browser,
              pytest.mark.skipif(not os.path.exists("/usr/bin/chromium"), reason="needs /usr/bin/chromium")]
TOKEN = "browser-token-0123456789"


@pytest.fixture(scope="module")
def served(cache):
    s = Served(cache, "--workers", "2", "--threads", "2", "--token", TOKEN)
    yield s
    s.stop()


def _rows(driver) -> str:
    """The run table's text once it has rows ('' before)."""
    return driver.execute_script("const t = document.querySelector('#runs-table tbody');"
                                 "return t && t.querySelectorAll('tr').length > 1 ? t.innerText : '';")


def test_the_token_opens_the_page_in_chromium(served, dash_br, screenshot):
    from selenium.webdriver.common.by import By

    url = f"http://127.0.0.1:{served.port}"
    driver = dash_br.driver
    driver.get(url + "/?run=qwen3-base")
    assert driver.find_elements(By.NAME, "token") and "runs-table" not in driver.page_source
    assert "qwen3-base" not in driver.page_source.replace("?run=qwen3-base", "")  # only the form, no run data
    driver.get(url + f"/?run=qwen3-base&token={TOKEN}")  # a first link; the server drops the token from the URL
    end, rows = time.time() + 60, []
    while time.time() < end and not rows:
        rows = _rows(driver)
        time.sleep(0.2)
    assert "qwen3-base" in rows and "llama-base" in rows, (rows, driver.current_url, driver.page_source[:500])
    assert TOKEN not in driver.current_url and "run=qwen3-base" in driver.current_url
    end = time.time() + 60
    fig = None
    while time.time() < end and not fig:
        fig = driver.execute_script("const g = document.querySelector('#flow-graph .js-plotly-plot'); "
                                    "return g && g.data && g.data.length ? g.data.length : null;")
        time.sleep(0.2)
    assert fig, "the entropy flow drew nothing behind the token"
    screenshot(driver, "served-with-token")
    driver.delete_all_cookies()  # a visitor without the cookie gets the form again, via the form the page
    driver.get(url + "/")
    box = driver.find_element(By.NAME, "token")
    box.send_keys(TOKEN)
    box.submit()
    end, rows = time.time() + 60, []
    while time.time() < end and not rows:
        rows = _rows(driver)
        time.sleep(0.2)
    assert "llama-base" in rows
