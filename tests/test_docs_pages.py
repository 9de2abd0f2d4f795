"""The API docs page: Swagger UI at /docs from the server itself (offline, same origin, a strict CSP), and the
bearer scheme in OpenAPI that its Authorize button sends with "Try it out"."""

from __future__ import annotations

import hashlib
import re

import pytest
from selenium import webdriver
from selenium.common.exceptions import WebDriverException
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from app_harness import app_with_tasks
from deploy_harness import require_tool
from server_harness import TOKEN, serve_tasks

API_TOKEN = "api-token-for-the-docs-tests"
BEARER = [{"HTTPBearer": []}]
PATH_VALUES = {"task": "pets", "kind": "classify", "name": "pets", "version": "1"}


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_weights, shared_backbone):
    with app_with_tasks(tmp_path_factory, tiny_weights, shared_backbone, {"pets": "classify"}, api_token=API_TOKEN) as server:
        yield server


@pytest.fixture(scope="module")
def http(server):
    return server.client(token=None)


def page_urls(html: str) -> list[str]:
    """Every `src` and `href` of a page."""
    return re.findall(r"""(?:src|href)\s*=\s*["']([^"']*)""", html)


def test_the_page_refers_only_to_this_server_and_runs_no_inline_script(http):
    page = http.get("/docs")
    assert page.status_code == 200 and page.headers["content-type"] == "text/html; charset=utf-8"
    urls = page_urls(page.text)
    assert len(urls) == 4 and "/favicon.ico" in urls
    assert all(url.startswith("/") and not url.startswith("//") for url in urls), urls
    assert not re.search(r"https?:|//cdn", page.text) and not re.search(r"<script>|<script[^>]*>[^<]", page.text)
    policy = dict(p.strip().split(" ", 1) for p in page.headers["content-security-policy"].split(";"))
    assert policy["default-src"] == "'none'" and policy["script-src"] == "'self'" and policy["connect-src"] == "'self'"
    assert page.headers["x-content-type-options"] == "nosniff" and page.headers["cache-control"] == "no-cache"


def test_every_asset_answers_with_its_type_and_may_be_kept_for_good(http):
    urls = [url for url in page_urls(http.get("/docs").text) if url != "/favicon.ico"]  # the favicon is health.py's
    types = {"css": "text/css; charset=utf-8", "js": "text/javascript; charset=utf-8"}
    sizes = {}
    for url in urls:
        answer = http.get(url)
        _, digest, ext = url.rsplit(".", 2)
        assert answer.status_code == 200 and answer.headers["content-type"] == types[ext], url
        assert (
            answer.headers["cache-control"] == "public, max-age=31536000, immutable"
            and answer.headers["x-content-type-options"] == "nosniff"
        )
        assert hashlib.sha256(answer.content).hexdigest().startswith(digest)  # the URL changes with the content
        sizes[url.split("/")[-1].split(".")[0]] = len(answer.content)
    assert sizes.keys() == {"swagger-ui", "swagger-ui-bundle", "docs-init"}
    assert sizes["swagger-ui-bundle"] > 10**6 and sizes["swagger-ui"] > 10**5 and sizes["docs-init"] > 200


@pytest.mark.parametrize(
    "path",
    [
        "/redoc",
        "/docs/",
        "/docs/swagger-ui-bundle.js",
        "/docs/swagger-ui.css",
        "/docs/docs-init.0000000000000000.js",
        "/docs/favicon-32x32.png",
        "/docs/oauth2-redirect",
        "/docs/playground.html",
        "/docs/%2e%2e/pyproject.toml",
        "/docs/..%2f..%2fpyproject.toml",
    ],
)
def test_no_other_path_is_served(http, path):
    answer = http.get(path)
    assert answer.status_code == 404 and answer.json()["error"] == "http_404"


def test_openapi_declares_the_bearer_scheme_and_the_routes_that_need_it(http):
    schema = http.get("/openapi.json").json()
    scheme = schema["components"]["securitySchemes"]["HTTPBearer"]
    assert scheme["type"] == "http" and scheme["scheme"] == "bearer" and "admin token" in scheme["description"]
    paths = schema["paths"]
    assert paths["/v1/adapters/{task}"]["put"]["security"] == BEARER and paths["/v1/adapters"]["get"]["security"] == BEARER
    assert paths["/v1/tasks/{task}/{kind}"]["post"]["security"] == BEARER and paths["/v2/models/{name}/infer"]["post"]["security"] == BEARER
    assert all("security" not in paths[path]["get"] for path in ["/health/live", "/health/ready", "/metrics", "/v2", "/v2/health/ready"])
    assert "/docs" not in paths and "/openapi.json" not in paths


def test_exactly_the_operations_marked_secured_refuse_a_request_without_a_token(http):
    """With an API token configured every route but the public ones needs a token: the document says which."""
    refused, marked = set(), set()
    for path, operations in http.get("/openapi.json").json()["paths"].items():
        url = re.sub(r"\{(\w+)\}", lambda m: PATH_VALUES[m.group(1)], path)
        for method, operation in operations.items():
            if http.request(method.upper(), url).status_code == 401:
                refused.add(f"{method} {path}")
            if operation.get("security") == BEARER:
                marked.add(f"{method} {path}")
    assert refused == marked and len(marked) > 20


@pytest.fixture(scope="module")
def offline_browser():
    """Headless Chromium that resolves no host name (this server is 127.0.0.1), logging the console."""
    options = webdriver.ChromeOptions()
    options.binary_location = require_tool("chromium")
    flags = ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--window-size=1200,900")
    for flag in (*flags, "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=require_tool("chromedriver")))
    yield driver
    driver.quit()


def execute(browser, operation) -> str:
    """Press Execute on an expanded operation in "Try it out" mode; the status of the answer shown."""
    for old in operation.find_elements(By.CSS_SELECTOR, ".btn-clear"):
        old.click()
    operation.find_element(By.CSS_SELECTOR, ".execute").click()
    status = ".live-responses-table tr.response .response-col_status"
    WebDriverWait(browser, 30).until(lambda b: operation.find_elements(By.CSS_SELECTOR, status))
    return operation.find_element(By.CSS_SELECTOR, status).text.strip()


@pytest.mark.process
@pytest.mark.browser
def test_swagger_ui_works_offline_and_authorize_sends_the_token(tmp_path_factory, tiny_weights, shared_backbone, offline_browser):
    browser = offline_browser
    with pytest.raises(WebDriverException, match="ERR_NAME_NOT_RESOLVED"):  # the browser really has no network
        browser.get("https://cdn.jsdelivr.net/npm/swagger-ui-dist@5/swagger-ui.css")
    with serve_tasks(tmp_path_factory, tiny_weights, shared_backbone, {"pets": "classify"}) as server:
        browser.get(server.url + "/docs")
        WebDriverWait(browser, 60).until(lambda b: len(b.find_elements(By.CSS_SELECTOR, ".opblock")) > 20)
        adapters = browser.find_element(By.XPATH, "//div[contains(@class, 'opblock-get')][.//*[@data-path='/v1/adapters']]")
        adapters.find_element(By.CSS_SELECTOR, ".opblock-summary-control").click()
        WebDriverWait(browser, 10).until(lambda b: adapters.find_elements(By.CSS_SELECTOR, ".try-out__btn"))
        adapters.find_element(By.CSS_SELECTOR, ".try-out__btn").click()
        assert execute(browser, adapters) == "401"

        browser.find_element(By.CSS_SELECTOR, ".btn.authorize").click()
        dialog = WebDriverWait(browser, 10).until(lambda b: b.find_element(By.CSS_SELECTOR, ".modal-ux"))
        assert "HTTPBearer" in dialog.text and "the admin token on admin routes" in dialog.text
        dialog.find_element(By.CSS_SELECTOR, "input").send_keys(TOKEN)
        dialog.find_element(By.CSS_SELECTOR, ".auth-btn-wrapper .authorize").click()
        dialog.find_element(By.CSS_SELECTOR, ".btn-done").click()
        assert execute(browser, adapters) == "200"
        assert '"pets"' in adapters.find_element(By.CSS_SELECTOR, ".live-responses-table tr.response .response-col_description").text

        origins = browser.execute_script("return performance.getEntriesByType('resource').map(e => new URL(e.name).origin)")
        assert set(origins) == {server.url}, origins
    console = [entry["message"] for entry in browser.get_log("browser")]
    assert any(" 401 " in message for message in console), console  # the console is read: the first Execute's 401 is there
    assert [message for message in console if "Content Security Policy" in message] == []
