"""The attention explorer in a real browser: Debian's headless Chromium, driven by Selenium through chromedriver,
loads the page from a running server, streams a generation and draws its heatmap; a screenshot is written."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from serving.client import AttnServeClient

from .server_harness import start

ROOT = Path(__file__).resolve().parents[1]
SCREENSHOTS = ROOT / "out" / "explorer"


def _browser() -> tuple[str, str]:
    """Chromium and its driver, installed from Debian's packages when missing (as root, like the Docker engine)."""
    browser, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if (browser is None or driver is None) and os.geteuid() == 0 and shutil.which("apt-get"):
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(["apt-get", "update", "-qq"], env=env, capture_output=True, timeout=600, check=False)
        subprocess.run(["apt-get", "install", "-y", "-q", "chromium", "chromium-driver"], env=env,
                       capture_output=True, timeout=900, check=False)
        browser, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if browser is None or driver is None:
        pytest.fail("the explorer test needs Debian's chromium and chromium-driver (apt-get install chromium "
                    "chromium-driver)")
    return browser, driver


@pytest.fixture(scope="module")
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    binary, driver = _browser()
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,1000",
                "--disable-gpu"):
        options.add_argument(arg)
    b = webdriver.Chrome(service=Service(driver), options=options)
    yield b
    b.quit()


@pytest.fixture(scope="module")
def server(serving_repo):
    s = start(serving_repo, ["tiny"], http_port=0)
    yield s
    s.stop()


def _wait(b, condition, timeout: float = 30):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(b, timeout).until(lambda _: condition())


@pytest.mark.slow
def test_the_explorer_streams_a_generation_and_fills_the_heatmap_row_by_row(server, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    b = browser
    b.get(f"http://127.0.0.1:{server.app.http_port}/")
    _wait(b, lambda: len(Select(b.find_element(By.ID, "model")).options) == 1)
    assert b.find_element(By.ID, "model-info").text.startswith("2+2 layers, 4 heads")
    source = b.find_element(By.ID, "source")
    source.clear()
    source.send_keys("qwerty")
    b.find_element(By.ID, "run").click()
    _wait(b, lambda: b.find_element(By.ID, "output").get_attribute("data-done") == "true")
    with AttnServeClient(server.address) as c:
        want = c.predict("qwerty", model="tiny", attention="cross")
    shown = "".join(s.text for s in b.find_elements(By.CSS_SELECTOR, "#output .tok"))
    assert shown == want.text
    rows = b.find_elements(By.CSS_SELECTOR, "#heatmap tbody tr")
    assert len(rows) == len(want.tokens)  # one row per output token
    assert len(rows[0].find_elements(By.TAG_NAME, "td")) == len("qwerty")  # one cell per source token
    columns = [th.text for th in b.find_elements(By.CSS_SELECTOR, "#heatmap thead th")][1:]
    assert columns == list("qwerty")
    # the first row's cells carry the streamed weights: the mean of layer 1's heads, as Predict computes them
    Select(b.find_element(By.ID, "layer")).select_by_value("1")
    Select(b.find_element(By.ID, "head")).select_by_value("mean")
    cross = next(a for a in want.attention if a.kind == "cross" and a.layer == 1)
    import numpy as np

    matrix = np.asarray(cross.weights).reshape(cross.head_indices.__len__(), cross.query_length, cross.key_length)
    cell = b.find_element(By.CSS_SELECTOR, '#heatmap td[data-row="0"][data-col="0"]')
    assert cell.get_attribute("aria-label") == f"{want.tokens[0].text} → q: {matrix.mean(0)[0, 0]:.3f}"
    cell.click()  # keyboard: arrows move the focus, the tooltip follows
    from selenium.webdriver.common.keys import Keys

    b.switch_to.active_element.send_keys(Keys.ARROW_RIGHT)
    assert b.switch_to.active_element.get_attribute("data-col") == "1"
    assert not b.find_element(By.ID, "tooltip").get_attribute("hidden")
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    b.save_screenshot(str(SCREENSHOTS / "generate.png"))

    b.find_element(By.ID, "want-self").click()  # decoder self-attention on request: a triangle, one key per step
    b.find_element(By.ID, "run").click()
    _wait(b, lambda: b.find_element(By.ID, "output").get_attribute("data-done") == "true"
          and len(Select(b.find_element(By.ID, "kind")).options) == 2)
    Select(b.find_element(By.ID, "kind")).select_by_value("decoder_self")
    rows = b.find_elements(By.CSS_SELECTOR, "#heatmap tbody tr")
    assert [len(r.find_elements(By.TAG_NAME, "td")) for r in rows] == list(range(1, len(want.tokens) + 1))

    b.find_element(By.ID, "tab-encode").click()
    a_input, b_input = b.find_element(By.ID, "sentence-a"), b.find_element(By.ID, "sentence-b")
    a_input.clear()
    a_input.send_keys("abcd")
    b_input.clear()
    b_input.send_keys("dcba")
    b.find_element(By.CSS_SELECTOR, "#encode-form button").click()
    _wait(b, lambda: "shared" in b.find_element(By.ID, "encode-status").text)
    drift = b.find_elements(By.CSS_SELECTOR, "#drift-a tbody tr")
    assert len(drift) == 4 and len(drift[0].find_elements(By.TAG_NAME, "td")) == 2  # 2 encoder layers
    shared = b.find_elements(By.CSS_SELECTOR, "#shared tbody tr")
    assert len(shared) == 4
    first = [float(td.text) for td in shared[0].find_elements(By.TAG_NAME, "td")]
    assert first[0] == pytest.approx(1.0, abs=1e-3) and first[-1] < 0.999  # same embedding, moved by attention
    b.save_screenshot(str(SCREENSHOTS / "embeddings.png"))
