"""The attention explorer in a real browser: Debian's headless Chromium, driven by Selenium through chromedriver,
loads the page from a running server, streams a generation and draws its heatmap and its alignment; screenshots are
written."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import urllib.request
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


def _generate_json(server, model: str, body: dict) -> dict:
    """The same server's non-streamed generate answer (greedy decoding: the stream's own result)."""
    request = urllib.request.Request(f"http://127.0.0.1:{server.app.http_port}/v2/models/{model}/generate",
                                     data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.loads(response.read())


def _spans(b, side: str) -> list[tuple[int, int, str, bool]]:
    """(start, end, text, highlighted) of each linked span on one line of the alignment view."""
    from selenium.webdriver.common.by import By

    return [(int(e.get_attribute("data-start")), int(e.get_attribute("data-end")), e.get_attribute("textContent"),
             "highlight" in e.get_attribute("class").split())
            for e in b.find_elements(By.CSS_SELECTOR, f"#align-{side} .aspan")]


@pytest.mark.slow
def test_the_alignment_view_links_source_and_output_spans_as_the_final_alignment_says(server, browser):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    b = browser
    b.get(f"http://127.0.0.1:{server.app.http_port}/")
    _wait(b, lambda: len(Select(b.find_element(By.ID, "model")).options) == 1)
    assert b.find_element(By.ID, "want-alignment").is_selected()  # on by default
    source = b.find_element(By.ID, "source").get_attribute("value")  # the default source, as the page sends it
    b.find_element(By.ID, "run").click()
    _wait(b, lambda: b.find_element(By.ID, "output").get_attribute("data-done") == "true")
    want = _generate_json(server, "tiny", {"text_input": source, "parameters": {
        "max_tokens": 32, "attention": "cross", "alignment": True}})
    links, words = want["alignment"], want["word_alignment"]
    assert links, "the final alignment has no link: nothing for the view to show"

    # (a) both texts, whole, cut into spans: the linked ones are the spans of the links
    assert b.find_element(By.ID, "align-source").get_attribute("textContent") == source
    assert b.find_element(By.ID, "align-output").get_attribute("textContent") == want["text_output"]
    sources, outputs = _spans(b, "source"), _spans(b, "output")
    assert sources and outputs
    assert {(s, e) for s, e, _, _ in sources} == {(x[0], x[1]) for x in links}  # token spans never overlap
    assert {(s, e) for s, e, _, _ in outputs} == {(x[2], x[3]) for x in links}
    assert all(text == source[s:e] for s, e, text, _ in sources)
    assert all(text == want["text_output"][s:e] for s, e, text, _ in outputs)
    # (b) one line per link of the final alignment
    lines = b.find_elements(By.CSS_SELECTOR, "#align-lines path")
    assert len(lines) == len(links)
    # (c) hovering an output span lights it, the source span(s) it links to and its line; leaving clears them
    first = next((x for x in links if x[2] == 0), None)  # the link of the output's first character
    assert first is not None, f"no link covers the first output character: {links}"
    span = b.find_element(By.CSS_SELECTOR, '#align-output .aspan[data-start="0"]')
    ActionChains(b).move_to_element(span).perform()
    lit_sources = [(s, e, text) for s, e, text, lit in _spans(b, "source") if lit]
    assert [(s, e) for s, e, _, lit in _spans(b, "output") if lit] == [(0, first[3])]
    assert lit_sources
    assert len(b.find_elements(By.CSS_SELECTOR, "#align-lines path.highlight")) == 1
    # (d) the first output character's source span is the part of the source the final alignment names
    assert [(s, e) for s, e, _ in lit_sources] == [(first[0], first[1])]
    assert lit_sources[0][2] == source[first[0]:first[1]] and lit_sources[0][2] in source
    assert span.get_attribute("aria-label") == (f"output “{want['text_output'][0:first[3]]}”, from source "
                                                f"“{source[first[0]:first[1]]}”")
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    b.save_screenshot(str(SCREENSHOTS / "alignment.png"))
    ActionChains(b).move_to_element(b.find_element(By.TAG_NAME, "h1")).perform()
    assert not b.find_elements(By.CSS_SELECTOR, "#alignment .highlight")
    # keyboard: focusing a source span lights it too
    b.execute_script("arguments[0].focus()", b.find_element(By.CSS_SELECTOR, "#align-source .aspan"))
    assert any(lit for *_, lit in _spans(b, "source")) and any(lit for *_, lit in _spans(b, "output"))

    # "words": the word links of the final event, each span a whole word
    b.find_element(By.ID, "align-words").click()
    assert b.find_element(By.ID, "alignment").get_attribute("data-mode") == "words"
    assert len(b.find_elements(By.CSS_SELECTOR, "#align-lines path")) == len(words)
    assert all(text in source.split() for *_, text, _ in _spans(b, "source"))
    assert all(text in want["text_output"].split() for *_, text, _ in _spans(b, "output"))
    b.find_element(By.ID, "align-words").click()
    assert len(b.find_elements(By.CSS_SELECTOR, "#align-lines path")) == len(links)
