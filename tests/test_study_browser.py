"""A real browser (headless Chromium through Selenium) clicks and types through a short study
against `ccp-study serve`, stops and comes back, and the test reads the database.

Needs Debian's `chromium` and `chromium-driver` (.ci/run installs them where it can: root and
apt-get). The one test skipped anywhere, and only where they are absent.
CCP_STUDY_SCREENSHOT=docs/images/study_rating.png also saves the rating page there.
"""

from __future__ import annotations

import os
import shutil
import signal
import sqlite3

import pytest

from test_study import make_samples
from test_study_server import Server, no_server_left  # noqa: F401 (the fixture stops the server)

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")


@pytest.fixture
def browser():
    if not (CHROMIUM and CHROMEDRIVER):
        missing = "chromium" if not CHROMIUM else "chromedriver"
        fix = "install Debian's chromium and chromium-driver packages (apt-get install -y chromium chromium-driver)"
        pytest.skip(f"{missing} is not on PATH: {fix}")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--window-size=1100,760"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)  # a given driver: nothing is downloaded
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()


def current_pair(driver) -> tuple[int, int]:
    """(pair id, 1-based position) of the page on screen."""
    from selenium.webdriver.common.by import By

    pair_id = int(driver.find_element(By.NAME, "pair_id").get_attribute("value"))
    position = int(driver.find_element(By.CSS_SELECTOR, "p.muted").text.split()[1].rstrip("."))
    return pair_id, position


def wait_for_position(driver, position: int) -> None:
    from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException
    from selenium.webdriver.support.ui import WebDriverWait

    def moved(d):
        if d.find_elements("id", "done"):
            return True
        return current_pair(d)[1] == position

    from selenium.common.exceptions import TimeoutException

    try:  # the page is replaced under the reads while it navigates
        WebDriverWait(driver, 15, ignored_exceptions=(NoSuchElementException, StaleElementReferenceException)).until(moved)
    except TimeoutException:
        pytest.fail(f"pair {position} did not come within 15 s; the page says: {driver.find_element('tag name', 'body').text[:300]!r}")


@pytest.mark.timeout(120)
def test_browser_rates_a_short_study(browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    samples = make_samples(tmp_path / "samples", size=256)
    db = tmp_path / "study" / "study.sqlite"
    server = Server(samples, db).start()
    try:
        link = f"{server.url}/r/{server.tokens()['alice']}"
        browser.get(link)
        assert "Which of the two images looks better?" in browser.find_element(By.ID, "question").text
        loaded = browser.execute_script(
            "return Array.from(document.images).map(i => i.complete && i.naturalWidth)")
        assert loaded == [256, 256]  # both images came through the image route
        screenshot = tmp_path / "rating.png"
        assert browser.save_screenshot(str(screenshot)) and screenshot.stat().st_size > 10_000
        if os.environ.get("CCP_STUDY_SCREENSHOT"):
            shutil.copyfile(screenshot, os.environ["CCP_STUDY_SCREENSHOT"])

        expected: dict[int, str] = {}
        answer_ways = ["click-left", "key-right", "key-f", "double-click-right"]
        for k in range(4):
            pair_id, position = current_pair(browser)
            assert position == k + 1
            way = answer_ways[k]
            if way == "click-left":
                browser.find_element(By.ID, "left").click()
            elif way == "key-right":
                browser.find_element(By.TAG_NAME, "body").send_keys(Keys.ARROW_RIGHT)
            elif way == "key-f":
                browser.find_element(By.TAG_NAME, "body").send_keys("f")
            else:  # an impatient double click: one vote
                browser.execute_script("const b = document.getElementById('right'); b.click(); b.click();")
            expected[pair_id] = "left" if way in ("click-left", "key-f") else "right"
            wait_for_position(browser, k + 2)

        # stop: leave the study, come back later with the same link
        browser.get("about:blank")
        browser.get(link)
        assert current_pair(browser)[1] == 5
        while not browser.find_elements(By.ID, "done"):
            pair_id, position = current_pair(browser)
            browser.find_element(By.ID, "right").click()
            expected[pair_id] = "right"
            wait_for_position(browser, position + 1)
        assert "all 8 pairs are answered" in browser.find_element(By.ID, "done").text
    finally:
        server.kill(signal.SIGTERM)

    with sqlite3.connect(db) as conn:
        stored = dict(conn.execute("SELECT v.pair_id, v.choice FROM votes v JOIN pairs p ON p.id = v.pair_id "
                                   "JOIN raters r ON r.id = p.rater_id WHERE r.name = 'alice'").fetchall())
        others = conn.execute("SELECT COUNT(*) FROM votes v JOIN pairs p ON p.id = v.pair_id "
                              "JOIN raters r ON r.id = p.rater_id WHERE r.name != 'alice'").fetchone()[0]
    assert stored == expected and len(stored) == 8 and others == 0
