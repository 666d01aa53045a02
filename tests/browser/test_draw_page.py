"""The drawing page at ``/`` in headless Chromium, against a real server.

Needs Debian's ``chromium`` and ``chromium-driver`` packages and the
``selenium`` pip package. Without them the module is skipped, except under
CI (``CI`` set), where a missing browser is an error rather than a silent
skip.
"""

import importlib.util
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from mnist_pipeline.localcloud.runner import free_port
from tests.conftest import MODEL_VERSION, serve, server_settings

# Debian's Chromium, or Google Chrome where that is what the machine has
# (as on GitHub's Ubuntu runners).
CHROMIUM = shutil.which("chromium") or shutil.which("google-chrome")
CHROMEDRIVER = shutil.which("chromedriver")
MISSING = [
    name
    for name, found in [
        ("chromium", CHROMIUM is not None),
        ("chromedriver", CHROMEDRIVER is not None),
        ("selenium", importlib.util.find_spec("selenium") is not None),
    ]
    if not found
]
if MISSING:
    _reason = (
        f"Missing for the browser tests: {', '.join(MISSING)}. Install them with "
        "`apt-get install -y chromium chromium-driver` and "
        "`pip install -c constraints.txt selenium`."
    )
    if os.environ.get("CI"):
        pytest.fail(_reason, pytrace=False)
    pytest.skip(_reason, allow_module_level=True)

from selenium import webdriver  # noqa: E402
from selenium.webdriver.common.action_chains import ActionChains  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

VERSION = MODEL_VERSION
# Seconds to wait for the page to show a prediction or an error.
RESULT_TIMEOUT = 30


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[webdriver.Chrome]:
    """Headless Chromium with a fresh profile and background networking off."""
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        "--window-size=900,700",
        f"--user-data-dir={tmp_path / 'chromium-profile'}",
    ]:
        options.add_argument(argument)
    # An explicit driver path keeps Selenium Manager, which may download
    # drivers, from running.
    service = webdriver.ChromeService(executable_path=CHROMEDRIVER)
    driver = webdriver.Chrome(options=options, service=service)
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


def draw_vertical_stroke(driver: webdriver.Chrome) -> None:
    """Draw a "1": one vertical stroke down the middle of the canvas."""
    canvas = driver.find_element(By.ID, "pad")
    actions = ActionChains(driver)
    # Offsets are from the centre of the 280x280 canvas, so the stroke is
    # 200 pixels long.
    actions.move_to_element_with_offset(canvas, 0, -100)
    actions.click_and_hold()
    for _ in range(10):
        actions.move_by_offset(0, 20)
    actions.release()
    actions.perform()


def wait_for_result(driver: webdriver.Chrome) -> None:
    """Wait until the page shows a digit or an error message."""

    def has_result(driver: webdriver.Chrome) -> bool:
        digit = driver.find_element(By.ID, "digit").text
        status = driver.find_element(By.ID, "status")
        is_error = "error" in (status.get_attribute("class") or "")
        return bool(re.fullmatch(r"[0-9]", digit)) or is_error

    WebDriverWait(driver, RESULT_TIMEOUT).until(has_result)


def test_drawn_one_is_predicted(s3, browser, tmp_path):
    port = free_port()
    with serve(server_settings(port), s3) as base_url:
        browser.get(f"{base_url}/")
        draw_vertical_stroke(browser)
        wait_for_result(browser)

        status = browser.find_element(By.ID, "status").text
        digit = browser.find_element(By.ID, "digit").text
        bars = browser.find_elements(By.CSS_SELECTOR, "#bars .bar")
        probabilities = [float(bar.get_attribute("data-probability")) for bar in bars]
        labels = [bar.find_element(By.CLASS_NAME, "bar-label").text for bar in bars]
        best = browser.find_elements(By.CSS_SELECTOR, "#bars .bar.best")
        model_version = browser.find_element(By.ID, "model-version").text
        browser.save_screenshot(str(tmp_path / "draw.png"))

    assert status == "", f"page shows an error: {status}"
    assert digit == "1", f"probabilities: {probabilities}"
    assert len(bars) == 10
    assert labels == [str(d) for d in range(10)]
    assert abs(sum(probabilities) - 1) < 1e-3
    assert max(probabilities) == probabilities[1]
    assert [bar.get_attribute("data-digit") for bar in best] == ["1"]
    assert VERSION in model_version


def test_clear_empties_result(s3, browser):
    port = free_port()
    with serve(server_settings(port), s3) as base_url:
        browser.get(f"{base_url}/")
        draw_vertical_stroke(browser)
        wait_for_result(browser)
        browser.find_element(By.ID, "clear").click()

        digit = browser.find_element(By.ID, "digit").text
        bars = browser.find_elements(By.CSS_SELECTOR, "#bars .bar")
        # Count the pixels whose red channel is below 255, that is, not white.
        ink_pixels = browser.execute_script(
            "const canvas = document.getElementById('pad');"
            "const data = canvas.getContext('2d')"
            ".getImageData(0, 0, canvas.width, canvas.height).data;"
            "let count = 0;"
            "for (let i = 0; i < data.length; i += 4) {"
            "  if (data[i] < 255) count += 1;"
            "}"
            "return count;"
        )

    assert digit == ""
    assert bars == []
    assert ink_pixels == 0


def test_server_rejection_shows_detail(s3, browser):
    port = free_port()
    with serve(server_settings(port, max_upload_bytes=100), s3) as base_url:
        browser.get(f"{base_url}/")
        draw_vertical_stroke(browser)
        wait_for_result(browser)

        status = browser.find_element(By.ID, "status")
        digit = browser.find_element(By.ID, "digit").text
        status_text = status.text
        status_class = status.get_attribute("class")

    assert "larger than 100 bytes" in status_text
    assert "error" in status_class
    assert digit == ""
