"""``edge-convert label``: the sorting page, driven in Debian's headless Chromium.

The test clicks and types as a person would, looks at screenshots of the page (the crops it
shows must be the crops on disk), and checks the folders that result.
"""

from __future__ import annotations

import json
import shutil
import threading
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import cv2
import numpy as np
import pytest

from converter.label import serve
from tests.scenes import door

if TYPE_CHECKING:
    from selenium.webdriver.remote.webdriver import WebDriver
    from selenium.webdriver.remote.webelement import WebElement

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"

pytestmark = pytest.mark.skipif(
    shutil.which(CHROMEDRIVER) is None,
    reason="needs Debian's chromium and chromium-driver (make test installs them)",
)


@pytest.fixture
def crops(tmp_path: Path) -> Path:
    """Six crops as edge-daemon collect leaves them: three of a closed door, three open."""
    folder = tmp_path / "garage_door"
    folder.mkdir()
    rng = np.random.default_rng(4)
    for n, state in enumerate(["closed", "open", "closed", "open", "closed", "open"]):
        cv2.imwrite(str(folder / f"2026112{n}_{state}.png"), door(state, rng, 64))
    return folder


@pytest.fixture
def page(crops: Path) -> Iterator[str]:
    server = serve(crops, "127.0.0.1", 0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/"
    server.shutdown()
    server.server_close()


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[WebDriver]:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--window-size=1000,700",
        f"--user-data-dir={tmp_path / 'chromium'}",
    ):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def _screenshot(driver: WebDriver, path: Path) -> np.ndarray:
    png: bytes = driver.get_screenshot_as_png()
    path.write_bytes(png)
    image = cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_COLOR)
    assert image is not None
    return image


def _count(selector: str, count: int) -> Callable[[WebDriver], bool]:
    """Waits until the page has ``count`` elements matching ``selector``."""
    from selenium.webdriver.common.by import By

    return lambda driver: len(driver.find_elements(By.CSS_SELECTOR, selector)) == count


def _file(element: WebElement) -> str:
    name = element.get_attribute("data-file")
    assert name is not None
    return name


def _shown(screen: np.ndarray, element: WebElement) -> np.ndarray:
    """The part of a screenshot an element covers (inside its 3-pixel border)."""
    rect = element.rect
    x, y = round(rect["x"]) + 3, round(rect["y"]) + 3
    w, h = round(rect["width"]) - 6, round(rect["height"]) - 6
    return screen[y : y + h, x : x + w]


def test_sorting_crops_in_the_browser_moves_them_into_class_folders(
    crops: Path, page: str, browser: WebDriver, tmp_path: Path
) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    driver = browser
    wait: WebDriverWait[Any] = WebDriverWait(driver, 10)
    driver.get(page)
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#grid img")) == 6)
    wait.until(
        lambda d: all(
            d.execute_script("return arguments[0].complete && arguments[0].naturalWidth", i)
            for i in d.find_elements(By.CSS_SELECTOR, "#grid img")
        )
    )
    title = driver.find_element(By.ID, "title").text
    assert title == "garage_door: 6 unsorted"
    # The screenshot shows the crops that are on disk, in order: the page is what it says.
    screen = _screenshot(driver, tmp_path / "before.png")
    images = driver.find_elements(By.CSS_SELECTOR, "#grid img")
    for element in images:
        on_disk = cv2.imread(str(crops / _file(element)))
        assert on_disk is not None
        shown = _shown(screen, element)
        expected = cv2.resize(on_disk, (shown.shape[1], shown.shape[0]))
        assert float(np.mean(np.abs(shown.astype(int) - expected.astype(int)))) < 20
    # Two classes, typed in as a person would.
    for name in ("closed", "open"):
        field = driver.find_element(By.ID, "newclass")
        field.send_keys(name, Keys.ENTER)
        wait.until(_count(f"button[data-cls='{name}']", 1))
    # Each crop: click it, then press its class's key (1 closed, 2 open).
    for _ in range(6):
        first = driver.find_elements(By.CSS_SELECTOR, "#grid img")[0]
        file = _file(first)
        first.click()
        key = "1" if "closed" in file else "2"
        driver.find_element(By.TAG_NAME, "body").send_keys(key)
        wait.until(_count(f"img[data-file='{file}']", 0))
    # One mistake, undone with its key, then sorted with a click on the class button.
    driver.find_element(By.TAG_NAME, "body").send_keys("u")
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#grid img")) == 1)
    back = driver.find_elements(By.CSS_SELECTOR, "#grid img")[0]
    assert (crops / _file(back)).is_file()
    cls = "closed" if "closed" in _file(back) else "open"
    driver.find_element(By.CSS_SELECTOR, f"button[data-cls='{cls}']").click()
    wait.until(lambda d: not d.find_elements(By.CSS_SELECTOR, "#grid img"))
    status = driver.find_element(By.ID, "status").text
    assert status == "closed: 3, open: 3"
    after = _screenshot(driver, tmp_path / "after.png")
    grid = driver.find_element(By.ID, "grid")
    assert float(_shown(after, grid).std()) < 3  # the grid is empty: one flat colour
    assert sorted(p.name for p in (crops / "closed").iterdir()) == [
        "20261120_closed.png",
        "20261122_closed.png",
        "20261124_closed.png",
    ]
    assert len(list((crops / "open").glob("*_open.png"))) == 3
    assert not [p for p in crops.iterdir() if p.is_file()]


def test_the_page_refuses_other_hosts_form_posts_and_paths_outside_the_folder(
    crops: Path, page: str
) -> None:
    def request(path: str, body: bytes | None = None, **headers: str) -> tuple[int, bytes]:
        req = urllib.request.Request(page.rstrip("/") + path, data=body, headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=5) as response:
                return response.status, response.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read()

    assert request("/api/state")[0] == 200
    # A DNS name that points here (rebinding) is not this page.
    assert request("/api/state", Host="evil.example:80")[0] == 403
    # Another site's form can post text/plain without asking: refused.
    name = sorted(p.name for p in crops.iterdir())[0]
    form = json.dumps({"name": "x"}).encode()
    assert request("/api/class", form, **{"Content-Type": "text/plain"})[0] == 415
    assert not (crops / "x").exists()
    # Paths out of the folder, names that are no class.
    assert request("/img/..%2F..%2Fetc%2Fpasswd")[0] == 404
    status, body = request(
        "/api/class", json.dumps({"name": "../up"}).encode(), **{"Content-Type": "application/json"}
    )
    assert status == 400
    assert b"class name" in body
    status, _ = request(
        "/api/assign",
        json.dumps({"file": "../" + name, "class": "open"}).encode(),
        **{"Content-Type": "application/json"},
    )
    assert status == 400
    assert (crops / name).is_file()


def test_links_out_of_the_folder_are_neither_listed_nor_served_and_lengths_are_checked(
    crops: Path, page: str, tmp_path: Path
) -> None:
    import http.client

    secret = tmp_path / "secret.png"
    secret.write_bytes(b"not yours")
    (crops / "link.png").symlink_to(secret)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (crops / "linked-class").symlink_to(elsewhere)
    with urllib.request.urlopen(page + "api/state", timeout=5) as response:
        state = json.loads(response.read())
    assert "link.png" not in state["unsorted"]
    assert "linked-class" not in state["classes"]
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(page + "img/link.png", timeout=5)
    assert refused.value.code == 404
    refused.value.close()
    port = int(page.rstrip("/").rsplit(":", 1)[1])
    for length in ("-1", "lots", "5000"):
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        conn.putrequest("POST", "/api/undo", skip_accept_encoding=True)
        conn.putheader("Content-Type", "application/json")
        conn.putheader("Content-Length", length)
        conn.endheaders()
        assert conn.getresponse().status == 400
        conn.close()
