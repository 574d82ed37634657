"""The page at / in a real browser: Debian's headless Chromium, driven by Selenium, against 127.0.0.1.

Upload a photo, the caption appears; pointing at a word, or moving to the next with the arrow key, changes
the overlay; a text file shows the loader's one-line error; a phone-sized window needs no sideways scroll.
Screenshots are saved (CAPTIONER_SCREENSHOTS=folder keeps them; CAPTIONER_SERVE_MODEL=run serves a trained
run instead of the untrained tiny one). `.ci/run` installs chromium and chromium-driver when missing, so this
skips only where no browser could be installed.
"""

from __future__ import annotations

import os
import shutil
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

pytest.importorskip("fastapi", reason="the serve extra is not installed: pip install -e '.[serve]'")
pytest.importorskip("selenium", reason="selenium is not installed: pip install -e '.[dev]'")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")
if not (CHROMIUM and DRIVER):
    pytest.skip("no Chromium here: apt-get install chromium chromium-driver (.ci/run does when it can)",
                allow_module_level=True)

import uvicorn  # noqa: E402
from selenium import webdriver  # noqa: E402
from selenium.webdriver.common.action_chains import ActionChains  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

from captioner.api import Captioner  # noqa: E402
from captioner.cli import app as cli_app  # noqa: E402
from captioner.serve.app import create_app  # noqa: E402
from captioner.serve.settings import ServeSettings  # noqa: E402

from .test_reliability import save_tiny_run  # noqa: E402

WAIT = 60  # seconds for the page to answer on a busy machine


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def base_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    run = os.environ.get("CAPTIONER_SERVE_MODEL") or save_tiny_run(tmp_path_factory.mktemp("browser") / "run")
    captioner = Captioner.load(run, device="cpu", precision="fp32")
    port = free_port()
    config = uvicorn.Config(create_app(captioner, ServeSettings(port=port)), host="127.0.0.1", port=port,
                            log_level="warning")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)  # not the main thread: installs no signal handlers
    thread.start()
    deadline = time.monotonic() + WAIT
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.started, "the server did not start"
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(timeout=30)


@pytest.fixture(scope="module")
def browser() -> Iterator[webdriver.Chrome]:
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                 "--window-size=1280,1000", "--no-proxy-server"):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=DRIVER))
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture(scope="module")
def photo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A scene of the built-in world, drawn big enough to see."""
    out = tmp_path_factory.mktemp("scene")
    result = CliRunner().invoke(cli_app, ["data", "synth", "--out", str(out), "--n", "1", "--split", "test",
                                          "--image-size", "384"])
    assert result.exit_code == 0, result.output
    return next((out / "images").iterdir())


def screenshots(tmp_path: Path) -> Path:
    folder = Path(os.environ.get("CAPTIONER_SCREENSHOTS") or tmp_path)
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def overlay(driver: webdriver.Chrome) -> str:
    return driver.execute_script("return document.getElementById('photo').toDataURL()")


def test_upload_caption_point_at_words_and_see_an_error(base_url: str, browser: webdriver.Chrome, photo: Path,
                                                       tmp_path: Path) -> None:
    wait = WebDriverWait(browser, WAIT)
    browser.get(base_url + "/")
    wait.until(lambda d: "encoder" in d.find_element(By.ID, "model").text)
    browser.find_element(By.ID, "file").send_keys(str(photo))
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#caption .word"))
    words = browser.find_elements(By.CSS_SELECTOR, "#caption .word")
    assert len(words) >= 2, "the caption needs two words to compare their overlays"
    plain = overlay(browser)

    ActionChains(browser).move_to_element(words[0]).perform()
    wait.until(lambda d: d.find_element(By.ID, "photo").get_attribute("data-word") == "0")
    first = overlay(browser)
    ActionChains(browser).move_to_element(words[1]).perform()
    wait.until(lambda d: d.find_element(By.ID, "photo").get_attribute("data-word") == "1")
    second = overlay(browser)
    assert len({plain, first, second}) == 3, "each word must draw its own overlay"
    assert words[1].get_attribute("aria-pressed") == "true"

    words[1].send_keys(Keys.ARROW_LEFT)  # the keyboard walks the words too
    wait.until(lambda d: d.find_element(By.ID, "photo").get_attribute("data-word") == "0")
    assert overlay(browser) == first
    assert len(browser.find_elements(By.CSS_SELECTOR, "#grid li")) == len(words)
    assert browser.find_element(By.ID, "error").get_attribute("hidden") is not None
    folder = screenshots(tmp_path)
    browser.save_screenshot(str(folder / "serve_page.png"))

    notes = tmp_path / "notes.txt"
    notes.write_text("not a photo\n")
    browser.find_element(By.ID, "file").send_keys(str(notes))
    wait.until(lambda d: d.find_element(By.ID, "error").text)
    assert browser.find_element(By.ID, "error").text == "notes.txt: not an image (or a format Pillow cannot read)"
    assert not browser.find_element(By.ID, "result").is_displayed()


def test_a_phone_sized_window_needs_no_sideways_scroll(base_url: str, browser: webdriver.Chrome, photo: Path,
                                                       tmp_path: Path) -> None:
    browser.set_window_size(390, 844)
    try:
        browser.get(base_url + "/")
        browser.find_element(By.ID, "file").send_keys(str(photo))
        WebDriverWait(browser, WAIT).until(lambda d: d.find_elements(By.CSS_SELECTOR, "#caption .word"))
        width = browser.execute_script("return [document.documentElement.scrollWidth, window.innerWidth]")
        assert width[0] <= width[1], f"the page is {width[0]} px wide in a {width[1]} px window"
        browser.save_screenshot(str(screenshots(tmp_path) / "serve_phone.png"))
    finally:
        browser.set_window_size(1280, 1000)
