"""GET /: upload an image in a real headless Chromium and see the top-5 bars."""

from __future__ import annotations

import shutil

import pytest

from harness.server import stop
from tests.service.test_server import start_server

CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(
    not (CHROMIUM and CHROMEDRIVER), reason="Debian's chromium and chromium-driver are not installed (.ci/run installs them)"
)


@pytest.fixture
def browser(tmp_path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", f"--user-data-dir={tmp_path / 'profile'}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    yield driver
    driver.quit()


def test_upload_shows_the_image_and_top5_bars(onnx_model, browser, tmp_path, cifar_like_jpegs):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    image = tmp_path / "upload.jpg"
    image.write_bytes(cifar_like_jpegs[1])
    process, url = start_server(onnx_model)
    try:
        browser.get(url + "/")
        browser.find_element(By.ID, "file").send_keys(str(image))
        browser.find_element(By.ID, "submit").click()
        WebDriverWait(browser, 20).until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#bars .row")) == 5)
        rows = browser.find_elements(By.CSS_SELECTOR, "#bars .row")
        labels = [row.get_attribute("data-label") for row in rows]
        widths = [float(row.find_element(By.CSS_SELECTOR, ".fill").value_of_css_property("width").rstrip("px"))
                  for row in rows]
        status = browser.find_element(By.ID, "status").text
        WebDriverWait(browser, 5).until(ec.visibility_of_element_located((By.ID, "preview")))
        browser.save_screenshot(str(tmp_path / "page.png"))
    finally:
        stop(process)

    assert len(set(labels)) == 5
    assert widths == sorted(widths, reverse=True) and widths[0] > 0
    assert status.startswith(labels[0]) and "onnxruntime" in status


def test_a_bad_file_shows_the_error(onnx_model, browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    bad = tmp_path / "notes.txt"
    bad.write_text("not an image")
    process, url = start_server(onnx_model)
    try:
        browser.get(url + "/")
        browser.find_element(By.ID, "file").send_keys(str(bad))
        browser.find_element(By.ID, "submit").click()
        WebDriverWait(browser, 20).until(lambda d: d.find_element(By.ID, "status").get_attribute("class") == "error")
        message = browser.find_element(By.ID, "status").text
    finally:
        stop(process)
    assert "not a recognized image format" in message
