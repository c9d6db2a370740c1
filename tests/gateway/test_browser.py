"""The live page in a real browser: Debian's headless Chromium, driven by Selenium through
the packaged chromedriver, against a real `ditserve up` behind the gateway.

`make test` installs the browser first (`make browser`: apt-get, when running as root, as
CI does); the tests skip, saying why, only when that set-up could not install it.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(
    not (CHROMIUM and CHROMEDRIVER),
    reason="chromium/chromedriver not installed: `make browser` installs them with apt-get "
           "when run as root; it could not here")
STEPS = 40
WAIT_S = 120.0


@pytest.fixture(scope="module")
def browser() -> Iterator:
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                 "--window-size=1100,800"):
        options.add_argument(flag)
    # Explicit driver path: Selenium then never tries to fetch a driver of its own.
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def wait_for(condition, what: str, timeout: float = WAIT_S):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def open_page(browser, live) -> None:
    from selenium.webdriver.common.by import By

    browser.get(f"http://127.0.0.1:{live.gateway.port}/")
    wait_for(lambda: browser.find_element(By.ID, "class-list").find_elements(By.TAG_NAME,
                                                                            "option"),
             "the class list")


def fill(browser, field: str, text: str) -> None:
    from selenium.webdriver.common.by import By

    element = browser.find_element(By.ID, field)
    element.clear()
    element.send_keys(text)


def test_generate_shows_previews_step_by_step_then_the_image(browser, live, tmp_path: Path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    def by_id(name: str):
        return browser.find_element(By.ID, name)

    open_page(browser, live)
    assert "10 classes" in by_id("model-name").text
    fill(browser, "class-search", "7")  # the search narrows the list to class 7
    assert [o.get_attribute("value") for o in Select(by_id("class-list")).all_selected_options] \
        == ["7"]
    fill(browser, "seed", "5")
    Select(by_id("sampler")).select_by_value("ddim")
    fill(browser, "steps", str(STEPS))
    fill(browser, "guidance", "2")
    by_id("generate").click()

    # While it runs: the preview image is replaced as steps arrive (and a screenshot).
    sources, shot = set(), tmp_path / "mid-generation.png"
    deadline = time.monotonic() + WAIT_S
    while not browser.find_elements(By.CSS_SELECTOR, "#results img"):
        previews = browser.find_elements(By.CSS_SELECTOR, "#previews img")
        if previews:
            sources.add(previews[0].get_attribute("src"))
            if not shot.exists() and 0 < float(by_id("progress").get_attribute("value")) < STEPS:
                browser.save_screenshot(str(shot))
        assert not by_id("error").is_displayed(), by_id("error").text
        assert time.monotonic() < deadline, f"no result image: {by_id('status').text}"
        time.sleep(0.02)

    assert int(by_id("previews").get_attribute("data-updates")) == STEPS  # one per step
    assert all(s.startswith("data:image/") for s in sources) and sources
    assert float(by_id("progress").get_attribute("value")) == STEPS
    assert by_id("status").text.startswith("done: seed 5")
    (image,) = browser.find_elements(By.CSS_SELECTOR, "#results img")
    assert image.get_attribute("src").startswith("data:image/png;base64,")
    assert browser.execute_script("return arguments[0].naturalWidth", image) == 16
    (link,) = browser.find_elements(By.CSS_SELECTOR, "#results a")
    assert link.get_attribute("download") == "ditserve-7-seed5.png"
    assert link.get_attribute("href") == image.get_attribute("src")


@pytest.mark.parametrize(("field", "value", "words"), [
    ("steps", "100000", "Invalid request: num_steps: 100000 is outside 1..1000"),
    ("guidance", "lots", "Invalid request: bad request body: guidance_scale must be a number"),
    ("seed", "-3", "Invalid request: bad request body: seed must be an integer"),
])
def test_an_invalid_input_shows_its_error_in_words(browser, live, field, value, words):
    from selenium.webdriver.common.by import By

    open_page(browser, live)
    fill(browser, field, value)
    browser.find_element(By.ID, "generate").click()
    error = browser.find_element(By.ID, "error")
    wait_for(error.is_displayed, "the error message")
    assert words in error.text
    assert not browser.find_elements(By.CSS_SELECTOR, "#results img")
    assert browser.find_element(By.ID, "generate").is_enabled()  # ready for another try


def test_cancel_stops_the_generation(browser, live):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    open_page(browser, live)
    Select(browser.find_element(By.ID, "sampler")).select_by_value("ddpm")
    fill(browser, "steps", "1000")
    browser.find_element(By.ID, "generate").click()
    progress = browser.find_element(By.ID, "progress")
    wait_for(lambda: float(progress.get_attribute("value")) > 0, "the first step")
    browser.find_element(By.ID, "cancel").click()
    wait_for(lambda: browser.find_element(By.ID, "status").text == "cancelled", "cancelled")
    assert float(progress.get_attribute("value")) < 1000
    assert not browser.find_elements(By.CSS_SELECTOR, "#results img")
    assert browser.find_element(By.ID, "generate").is_enabled()


def test_decoded_previews_are_spaced_to_about_50_on_long_runs(browser, live):
    """One VAE decode per step would queue behind the denoising and delay the result."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    open_page(browser, live)
    assert Select(browser.find_element(By.ID, "preview-mode")).first_selected_option \
        .get_attribute("value") == "decoded"  # the default when the model has a decoder
    Select(browser.find_element(By.ID, "sampler")).select_by_value("ddim")
    fill(browser, "steps", "150")
    browser.find_element(By.ID, "generate").click()
    wait_for(lambda: browser.find_elements(By.CSS_SELECTOR, "#results img"), "the result")
    assert browser.find_element(By.ID, "previews").get_attribute("data-updates") == "50"


def test_a_gateway_that_wants_a_token_says_so_and_takes_one(browser, guarded, fake):
    from selenium.webdriver.common.by import By

    browser.get(f"http://127.0.0.1:{guarded.port}/")
    error = browser.find_element(By.ID, "error")
    wait_for(error.is_displayed, "the error message")
    assert error.text.startswith("Not authorized: a valid 'Authorization: Bearer TOKEN'")
    browser.find_element(By.TAG_NAME, "summary").click()  # open "Access token"
    fill(browser, "token", "s3cret")
    browser.find_element(By.ID, "class-search").click()  # leaving the field loads the model
    wait_for(lambda: "DiT-Fake/2" in browser.find_element(By.ID, "model-name").text, "the model")
    assert not error.is_displayed()
    browser.find_element(By.ID, "generate").click()
    wait_for(lambda: browser.find_elements(By.CSS_SELECTOR, "#results img"), "the result")
    assert {m.get("authorization") for m in fake.calls.metadata} == {"Bearer s3cret"}
