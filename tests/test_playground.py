"""The playground page in headless Chromium against a real server: pick a task, upload an image, see it drawn;
each answer replaces the last, options show for their kind, the minimum score re-draws without asking again."""

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
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support.ui import Select, WebDriverWait

from deploy_harness import require_tool
from helpers import random_package
from server_harness import TOKEN, ServerProcess, image_bytes, store_of

pytestmark = [pytest.mark.process, pytest.mark.browser]

SCREENSHOT = os.environ.get("MONASERVE_PLAYGROUND_SCREENSHOT")  # set to keep the screenshot (docs/playground.png)
TASKS = {"pets": "classify", "road-scene": "segment", "street-objects": "detect"}  # the select lists them in this order
PAGE_MIN_SCORE = 0.3  # the page's when a task has no defaults.min_score


def tame_detect_head(package):
    """Random weights blow the detect head's features up to about 1e7, so every box scores 1.0 and spans the image
    or nothing: with the last layers scaled down, the scores spread (about 0.75 to 0.85) and the boxes keep near their anchors."""
    for layer, scale in (("classification_head.cls_logits", 1e-7), ("regression_head.bbox_reg", 1e-8)):
        package.tensors[f"head.head.{layer}.weight"] *= scale
        package.tensors[f"head.head.{layer}.bias"].zero_()
    return package


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_weights, shared_backbone):
    packages = [random_package(shared_backbone, name, seed=len(name), kind=kind, num_labels=4) for name, kind in TASKS.items()]
    store = store_of(tmp_path_factory, [tame_detect_head(p) if p.manifest.kind == "detect" else p for p in packages])
    log = tmp_path_factory.mktemp("log") / "log"
    with ServerProcess(tiny_weights, store, env={"MONASERVE_ADMIN_TOKEN": TOKEN}, log=log) as server:
        yield server


@pytest.fixture(scope="module")
def browser():
    options = webdriver.ChromeOptions()
    options.binary_location = require_tool("chromium")
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--window-size=1280,860"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    service = webdriver.ChromeService(executable_path=require_tool("chromedriver"))
    driver = webdriver.Chrome(options=options, service=service)
    yield driver
    driver.quit()


@pytest.fixture
def photo(tmp_path):
    path = tmp_path / "photo.png"
    path.write_bytes(image_bytes(11, size=(320, 200), fmt="PNG"))
    return path


def open_page(browser, server, tasks: int = len(TASKS)) -> None:
    browser.get(server.url + "/")
    WebDriverWait(browser, 30).until(lambda b: b.find_element(By.ID, "task").get_attribute("data-loaded") == str(tasks))
    browser.get_log("browser")  # from here on, the console of this page only


def console_errors(browser) -> list[str]:
    """What the page logged as errors since the last call: failed loads (404s), CSP refusals, uncaught exceptions."""
    return [entry["message"] for entry in browser.get_log("browser") if entry["level"] == "SEVERE"]


def shown(browser, element_id: str) -> bool:
    return browser.find_element(By.ID, element_id).is_displayed()


def text(browser, element_id: str) -> str:
    return browser.find_element(By.ID, element_id).text


def canvas_pixels(browser) -> np.ndarray:
    data_url = browser.execute_script("return document.getElementById('canvas').toDataURL('image/png')")
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(data_url.split(",", 1)[1]))).convert("RGB"))


def drawn(browser) -> int:
    return int(browser.find_element(By.ID, "canvas").get_attribute("data-drawn"))


def wait_drawn(browser) -> None:
    WebDriverWait(browser, 60).until(lambda b: b.find_element(By.ID, "canvas").get_attribute("data-drawn") or text(b, "error"))
    assert text(browser, "error") == ""


def predict(browser, task: str, image_path=None) -> None:
    """Select `task` (a new task asks again about the image on show) and, if given, upload `image_path`; wait for the drawing."""
    browser.execute_script("document.getElementById('canvas').dataset.drawn = ''")
    Select(browser.find_element(By.ID, "task")).select_by_value(task)
    if image_path is not None:
        browser.find_element(By.ID, "file").send_keys(str(image_path))
    wait_drawn(browser)


def drop(browser, image_path) -> None:
    """Drop `image_path` on the image area, as a file dragged there from the desktop."""
    script = """
      const [name, data] = arguments, transfer = new DataTransfer();
      transfer.items.add(new File([Uint8Array.from(atob(data), (c) => c.charCodeAt(0))], name, { type: "image/png" }));
      document.getElementById("stage").dispatchEvent(new DragEvent("drop", { dataTransfer: transfer, bubbles: true, cancelable: true }));
    """
    browser.execute_script("document.getElementById('canvas').dataset.drawn = ''")
    browser.execute_script(script, image_path.name, base64.b64encode(image_path.read_bytes()).decode())
    wait_drawn(browser)


def requests_to(browser, path: str) -> list[str]:
    """The URLs of the requests the page sent to `path`, first to last (its resource timing entries)."""
    script = "return performance.getEntriesByType('resource').map((e) => e.name).filter((url) => new URL(url).pathname === arguments[0])"
    return browser.execute_script(script, path)


def set_value(browser, element_id: str, value, event: str = "input") -> None:
    """Set a field as a user does: its value changes, then its `event` fires (`input` while a slider moves, `change` once typed)."""
    script = "const f = document.getElementById(arguments[0]); f.value = arguments[1]; f.dispatchEvent(new Event(arguments[2]))"
    browser.execute_script(script, element_id, str(value), event)


def infer(server, task: str, image_path, **params) -> dict:
    response = httpx.post(
        f"{server.url}/v1/tasks/{task}/{TASKS[task]}", params=params, content=image_path.read_bytes(), headers={"content-type": "image/png"}
    )
    return response.raise_for_status().json()["results"][0]


def listed(browser) -> list[str]:
    """What the results panel lists: the top labels, the boxes' labels or the classes of the legend."""
    return [name.text for name in browser.find_elements(By.CSS_SELECTOR, "#result .name")]


def test_playground_draws_each_kind(server, browser, photo):
    response = httpx.get(server.url + "/")
    assert response.headers["content-type"].startswith("text/html")
    assert "default-src 'none'" in response.headers["content-security-policy"]
    open_page(browser, server)
    assert "ready" in text(browser, "status")
    assert shown(browser, "hint") and "Pick a task, then drop an image here or choose a file" in text(browser, "hint")
    assert not shown(browser, "canvas") and not shown(browser, "no-tasks")
    original = np.asarray(Image.open(photo).convert("RGB"))

    # classify: every label asked once, the top ones listed with score bars; the image left as it is
    predict(browser, "pets", photo)
    assert not shown(browser, "hint") and not shown(browser, "min-score") and shown(browser, "top-k")
    assert "classify" in text(browser, "task-info") and "4 labels" in text(browser, "task-info")
    top = infer(server, "pets", photo, top_k=4)["top"]
    assert listed(browser) == [t["label"] for t in top]
    assert len(browser.find_elements(By.CSS_SELECTOR, "#result .row .meter span")) == len(top)
    latency = text(browser, "latency")
    assert "ms round trip" in latency and latency.startswith("pets v1")
    assert (canvas_pixels(browser) == original).all()
    browser.find_element(By.ID, "top-k").clear()
    browser.find_element(By.ID, "top-k").send_keys("2")
    assert listed(browser) == [t["label"] for t in top[:2]] and drawn(browser) == 2
    assert len(requests_to(browser, "/v1/tasks/pets/classify")) == 1

    # segment: the mask drawn over the image, a legend of the classes it holds; nothing left of the classify answer
    predict(browser, "road-scene")
    assert not shown(browser, "min-score") and not shown(browser, "top-k") and shown(browser, "opacity")
    classes = infer(server, "road-scene", photo)["classes"]
    assert drawn(browser) == len(classes) and not browser.find_elements(By.CSS_SELECTOR, "#result .rank")
    rows = browser.find_elements(By.CSS_SELECTOR, "#result .legend .row")
    legend = {row.find_element(By.CLASS_NAME, "name").text: row.find_element(By.CLASS_NAME, "value").text for row in rows}
    assert legend == {c["label"]: f"{100 * c['pixels'] / original[..., 0].size:.1f}%" for c in classes}
    tinted = [c for c in classes if c["index"] > 0]
    swatches = browser.find_elements(By.CSS_SELECTOR, "#result .legend .swatch:not(.untinted)")
    colours = {s.value_of_css_property("background-color") for s in swatches}
    assert tinted and len(swatches) == len(tinted) == len(colours) and "rgba(0, 0, 0, 0)" not in colours
    drawn_mask = canvas_pixels(browser)
    background = next((c["pixels"] for c in classes if c["index"] == 0), 0)
    changed = (np.abs(drawn_mask.astype(int) - original.astype(int)).sum(axis=2) > 3).sum()
    assert drawn_mask.shape == original.shape and abs(changed - (original[..., 0].size - background)) < 0.02 * original[..., 0].size

    # detect: asked once with no floor; the minimum score filters the boxes received, at once
    predict(browser, "street-objects")
    assert shown(browser, "min-score") and shown(browser, "max-detections") and not shown(browser, "opacity")
    scores = [d["score"] for d in infer(server, "street-objects", photo, min_score=0)["detections"]]
    middle = round(float(np.median(scores)), 2)
    assert 0 < sum(s >= middle for s in scores) < len(scores), f"the scores do not spread: {sorted(scores)}"
    slider = float(browser.find_element(By.ID, "min-score").get_attribute("value"))
    default = next(t for t in httpx.get(server.url + "/v1/tasks").json() if t["name"] == "street-objects").get("defaults", {})
    assert slider == default.get("min_score", PAGE_MIN_SCORE) and not browser.find_elements(By.CSS_SELECTOR, "#result .legend")
    assert len(listed(browser)) == drawn(browser) == sum(s >= slider for s in scores)
    boxes_at_default = canvas_pixels(browser)
    set_value(browser, "min-score", middle)
    assert len(listed(browser)) == drawn(browser) == sum(s >= middle for s in scores) < len(scores)
    assert f"≥ {middle:.2f}" in text(browser, "result-title") and (canvas_pixels(browser) != boxes_at_default).any()
    browser.find_element(By.ID, "min-score").send_keys(Keys.HOME)  # the keyboard moves it too: to 0, every box
    assert len(listed(browser)) == drawn(browser) == len(scores)
    assert len(requests_to(browser, "/v1/tasks/street-objects/detect")) == 1

    # the other detect options ask again, as query parameters
    browser.execute_script("document.getElementById('canvas').dataset.drawn = ''")
    set_value(browser, "max-detections", 5, event="change")
    wait_drawn(browser)
    assert len(listed(browser)) == drawn(browser) == 5 and "max_detections=5" in requests_to(browser, "/v1/tasks/street-objects/detect")[-1]
    browser.execute_script("document.getElementById('canvas').dataset.drawn = ''")
    browser.find_element(By.ID, "class-agnostic").click()
    wait_drawn(browser)
    asked = requests_to(browser, "/v1/tasks/street-objects/detect")
    assert len(asked) == 3 and "class_agnostic=true" in asked[-1] and "min_score=0&" in asked[-1]

    browser.find_element(By.ID, "token").send_keys(TOKEN)
    browser.find_element(By.ID, "refresh").click()
    WebDriverWait(browser, 30).until(lambda b: "slots" in text(b, "adapters"))
    table = text(browser, "adapters")
    assert all(task in table for task in TASKS) and "slot 0" in table
    assert console_errors(browser) == []

    if SCREENSHOT:
        set_value(browser, "min-score", slider)
        predict(browser, "road-scene")
        shot = Image.open(io.BytesIO(browser.get_screenshot_as_png())).convert("RGB")
        shot.quantize(256, method=Image.Quantize.FASTOCTREE).save(SCREENSHOT, optimize=True)  # 256 colours: a third of the bytes


def test_each_answer_replaces_the_last(server, browser, tmp_path):
    """A second image's answer (this one dropped on the page) is all that shows; an answer that comes after a newer
    request was sent is dropped."""
    open_page(browser, server)
    first, second = tmp_path / "first.png", tmp_path / "second.png"
    first.write_bytes(image_bytes(12, size=(320, 200), fmt="PNG"))
    second.write_bytes(image_bytes(13, size=(200, 240), fmt="PNG"))
    predict(browser, "road-scene", first)
    drop(browser, second)
    assert canvas_pixels(browser).shape == (240, 200, 3) and drawn(browser) == len(infer(server, "road-scene", second)["classes"])
    assert len(browser.find_elements(By.CSS_SELECTOR, "#result .legend .row")) == drawn(browser)

    # the classify answer is held back until the detect request that follows it has been answered and drawn
    browser.execute_script("""
      const send = window.fetch;
      window.heldBack = "waiting";
      window.fetch = async (url, options) => {
        const response = await send(url, options);
        if (String(url).includes("/classify") && window.heldBack === "waiting") {
          window.heldBack = "held";
          while (window.heldBack === "held") await new Promise((resolve) => setTimeout(resolve, 50));
          window.heldBack = "released";
        }
        return response;
      };
    """)
    Select(browser.find_element(By.ID, "task")).select_by_value("pets")
    WebDriverWait(browser, 30).until(lambda b: b.execute_script("return window.heldBack") == "held")
    predict(browser, "street-objects")
    browser.execute_script("window.heldBack = 'let go'")
    WebDriverWait(browser, 30).until(lambda b: b.execute_script("return window.heldBack") == "released")
    browser.execute_async_script("setTimeout(arguments[0], 300)")  # the late answer's turn to be drawn, or dropped
    assert "boxes" in text(browser, "result-title") and text(browser, "latency").startswith("street-objects v1")
    assert not browser.find_elements(By.CSS_SELECTOR, "#result .rank") and drawn(browser) == len(listed(browser))
    assert console_errors(browser) == []


def test_playground_shows_server_errors(server, browser, tmp_path, photo):
    open_page(browser, server)
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    Select(browser.find_element(By.ID, "task")).select_by_value("pets")
    browser.find_element(By.ID, "file").send_keys(str(bad))
    WebDriverWait(browser, 30).until(lambda b: text(b, "error"))
    title, message = text(browser, "error-title"), text(browser, "error-message")
    assert title == "415 unsupported_media_type" and "image" in message and not shown(browser, "canvas")
    assert [error for error in console_errors(browser) if "status of 415" not in error] == []  # the failed request itself
    predict(browser, "pets", photo)  # the next request clears the error
    assert not shown(browser, "error") and drawn(browser) == 4


def test_no_tasks_says_how_to_add_one(server, browser):
    """With no task to pick, the page says how to upload one rather than offering an empty list."""
    no_tasks = """
      const send = window.fetch;
      window.fetch = (url, options) => String(url).endsWith("/v1/tasks") ? Promise.resolve(new Response("[]")) : send(url, options);
    """
    script = browser.execute_cdp_cmd("Page.addScriptToEvaluateOnNewDocument", {"source": no_tasks})
    try:
        open_page(browser, server, tasks=0)
    finally:
        browser.execute_cdp_cmd("Page.removeScriptToEvaluateOnNewDocument", {"identifier": script["identifier"]})
    assert shown(browser, "no-tasks") and "PUT /v1/adapters/{task}" in text(browser, "no-tasks")
    assert not shown(browser, "task") and not shown(browser, "hint") and shown(browser, "task-none")
    assert console_errors(browser) == []


def test_favicon(server, browser):
    response = httpx.get(server.url + "/favicon.ico")
    assert response.status_code == 200 and response.headers["content-type"] == "image/svg+xml"
    assert "max-age=" in response.headers["cache-control"] and response.text.startswith("<svg")
    assert "/favicon.ico" not in httpx.get(server.url + "/openapi.json").json()["paths"]
    open_page(browser, server)
    icon = browser.find_element(By.CSS_SELECTOR, "link[rel=icon]").get_attribute("href")
    assert icon == server.url + "/favicon.ico"
    logo = browser.find_element(By.CSS_SELECTOR, ".brand img")
    WebDriverWait(browser, 10).until(lambda b: b.execute_script("return arguments[0].complete", logo))
    assert browser.execute_script("return arguments[0].naturalWidth", logo) > 0  # loaded, the CSP allowing it
    assert console_errors(browser) == []
