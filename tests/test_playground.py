"""The playground page in headless Chromium against a real server: pick a task, upload an image, see it drawn."""

from __future__ import annotations

import base64
import io
import os

import httpx
import numpy as np
import pytest
from PIL import Image
from selenium import webdriver
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import Select, WebDriverWait

from deploy_harness import require_tool
from server_harness import TOKEN, image_bytes, serve_tasks

pytestmark = [pytest.mark.process, pytest.mark.browser]

SCREENSHOT = os.environ.get("MONASERVE_PLAYGROUND_SCREENSHOT")  # set to keep the screenshot (README image)


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_weights, shared_backbone):
    with serve_tasks(
        tmp_path_factory, tiny_weights, shared_backbone, {"pets": "classify", "street-objects": "detect", "road-scene": "segment"}
    ) as server:
        yield server


@pytest.fixture(scope="module")
def browser():
    options = webdriver.ChromeOptions()
    options.binary_location = require_tool("chromium")
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--window-size=1200,900"):
        options.add_argument(flag)
    service = webdriver.ChromeService(executable_path=require_tool("chromedriver"))
    driver = webdriver.Chrome(options=options, service=service)
    yield driver
    driver.quit()


def canvas_pixels(browser) -> np.ndarray:
    data_url = browser.execute_script("return document.getElementById('canvas').toDataURL('image/png')")
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(data_url.split(",", 1)[1]))).convert("RGB"))


def predict(browser, task: str, image_path) -> None:
    Select(browser.find_element(By.ID, "task")).select_by_value(task)
    browser.execute_script("document.getElementById('canvas').dataset.drawn = ''")
    browser.find_element(By.ID, "file").send_keys(str(image_path))
    WebDriverWait(browser, 60).until(
        lambda b: b.find_element(By.ID, "canvas").get_attribute("data-drawn") or b.find_element(By.ID, "error").text
    )
    assert browser.find_element(By.ID, "error").text == ""


def test_playground_draws_each_kind(server, browser, tmp_path):
    response = httpx.get(server.url + "/")
    assert response.headers["content-type"].startswith("text/html")
    assert "default-src 'none'" in response.headers["content-security-policy"]
    browser.get(server.url + "/")
    WebDriverWait(browser, 30).until(lambda b: b.find_element(By.ID, "task").get_attribute("data-loaded") == "3")
    assert "ready" in browser.find_element(By.ID, "status").text

    image = tmp_path / "photo.png"
    image.write_bytes(image_bytes(11, size=(320, 200), fmt="PNG"))
    original = np.asarray(Image.open(image).convert("RGB"))
    expected = {}
    for task, kind in [("pets", "classify"), ("road-scene", "segment")]:
        params = {"top_k": 5} if kind == "classify" else {}
        expected[task] = httpx.post(
            f"{server.url}/v1/tasks/{task}/{kind}", params=params, content=image.read_bytes(), headers={"content-type": "image/png"}
        ).json()["results"][0]

    predict(browser, "pets", image)
    bars = [bar.text for bar in browser.find_elements(By.CSS_SELECTOR, "#result .bar")]
    assert [bar.rsplit(" ", 1)[0] for bar in bars] == [t["label"] for t in expected["pets"]["top"]]
    assert "ms round trip" in browser.find_element(By.ID, "latency").text and "pets v1" in browser.find_element(By.ID, "latency").text
    assert (canvas_pixels(browser) == original).all()  # classify draws the image untouched

    predict(browser, "road-scene", image)
    drawn = canvas_pixels(browser)
    classes = expected["road-scene"]["classes"]
    assert int(browser.find_element(By.ID, "canvas").get_attribute("data-drawn")) == len(classes)
    background = next((c["pixels"] for c in classes if c["index"] == 0), 0)
    changed = (np.abs(drawn.astype(int) - original.astype(int)).sum(axis=2) > 3).sum()
    assert drawn.shape == original.shape and abs(changed - (320 * 200 - background)) < 0.02 * 320 * 200

    browser.find_element(By.ID, "min-score").clear()
    browser.find_element(By.ID, "min-score").send_keys("0")
    predict(browser, "street-objects", image)
    boxes = int(browser.find_element(By.ID, "canvas").get_attribute("data-drawn"))
    assert boxes > 0 and browser.find_element(By.ID, "result").text == f"{boxes} boxes"
    assert (canvas_pixels(browser) != original).any()

    browser.find_element(By.ID, "token").send_keys(TOKEN)
    browser.find_element(By.ID, "refresh").click()
    WebDriverWait(browser, 30).until(lambda b: "slots" in b.find_element(By.ID, "adapters").text)
    table = browser.find_element(By.ID, "adapters").text
    assert all(task in table for task in ("pets", "street-objects", "road-scene")) and "gpu slot" in table

    shot = browser.get_screenshot_as_png()
    assert Image.open(io.BytesIO(shot)).size[0] >= 800
    if SCREENSHOT:
        predict(browser, "road-scene", image)
        browser.save_screenshot(SCREENSHOT)


def test_playground_shows_server_errors(server, browser, tmp_path):
    browser.get(server.url + "/")
    WebDriverWait(browser, 30).until(lambda b: b.find_element(By.ID, "task").get_attribute("data-loaded") == "3")
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    Select(browser.find_element(By.ID, "task")).select_by_value("pets")
    browser.find_element(By.ID, "file").send_keys(str(bad))
    WebDriverWait(browser, 30).until(lambda b: b.find_element(By.ID, "error").text)
    assert "415 unsupported_media_type" in browser.find_element(By.ID, "error").text
