"""The README's explorer screenshot: serve a repository with HTTP on, stream one source in headless Chromium.

    python scripts/explorer_screenshot.py [--repo models --model dates --source "le 14 juillet 1789"]

Needs the dev extra (selenium) and Debian's chromium + chromium-driver. Writes docs/explorer.png (the heatmap)
and docs/explorer-alignment.png (the alignment panel, one output span hovered).
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repo", type=Path, default=ROOT / "models")
    p.add_argument("--model", default="dates")
    p.add_argument("--source", default="le 14 juillet 1789")
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "explorer.png")
    args = p.parse_args()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    from bench.cli import _start_server, _stop_server
    from bench.compare_servers import _free_port

    http = _free_port()
    log = ROOT / "out" / "explorer-screenshot-server.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    server, _ = _start_server(args.repo, args.model, log, ["--http-port", str(http)])  # returns once healthy
    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium")
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1100,1000"):
        options.add_argument(arg)
    browser = webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=options)
    try:
        browser.get(f"http://127.0.0.1:{http}/")
        wait = WebDriverWait(browser, 60)
        wait.until(lambda b: Select(b.find_element(By.ID, "model")).options)
        Select(browser.find_element(By.ID, "model")).select_by_value(args.model)
        source = browser.find_element(By.ID, "source")
        source.clear()
        source.send_keys(args.source)
        browser.find_element(By.ID, "run").click()
        wait.until(lambda b: b.find_element(By.ID, "output").get_attribute("data-done") == "true")
        Select(browser.find_element(By.ID, "layer")).select_by_value("1")
        Select(browser.find_element(By.ID, "head")).select_by_value("mean")
        cells = browser.find_elements(By.CSS_SELECTOR, '#heatmap td[data-row="3"]')
        if cells:
            cells[-1].click()  # a tooltip in the picture: "9" looks at the source's last "9"
        args.out.parent.mkdir(parents=True, exist_ok=True)
        browser.save_screenshot(str(args.out))
        print(f"wrote {args.out}")
        from selenium.webdriver.common.action_chains import ActionChains

        panel = browser.find_element(By.ID, "alignment-title")
        browser.execute_script("arguments[0].scrollIntoView()", panel)
        spans = browser.find_elements(By.CSS_SELECTOR, "#align-output [tabindex]")
        if spans:
            ActionChains(browser).move_to_element(spans[min(5, len(spans) - 1)]).perform()  # the month's "0"
        aligned = args.out.with_name(args.out.stem + "-alignment.png")
        browser.save_screenshot(str(aligned))
        print(f"wrote {aligned}")
    finally:
        browser.quit()
        _stop_server(server)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
