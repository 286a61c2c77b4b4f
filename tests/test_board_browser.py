"""fedapp-board in a real browser (headless Chromium through Selenium): what an operator sees
during a running job and after it, a released model version, the audit trail. Each page's
screenshot is written to docs/board/ (so the pictures in the docs stay true)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

from fedapp.core.config import PROJECT_ROOT
from fedapp.features import events as ev

CHROMIUM = next(
    (shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)),
    None,
)
DRIVER = shutil.which("chromedriver")
NO_BROWSER = (
    "headless Chromium is not installed (Debian: apt-get install chromium chromium-driver; "
    ".ci/run installs it)"
)
pytestmark = pytest.mark.skipif(CHROMIUM is None or DRIVER is None, reason=NO_BROWSER)
# where the screenshots go: a temporary folder, so a test run leaves the tree clean;
# FEDAPP_BOARD_SCREENSHOTS=docs/board refreshes the documentation's images
SHOTS = Path(
    os.environ.get("FEDAPP_BOARD_SCREENSHOTS")
    or Path(tempfile.gettempdir()) / "fedapp-board-screenshots"
)
TOKEN = "browser-test-operator-token-0123"
# A live run slow enough to watch (about 2 s a round on two cores), with one crashing client
# so that the run page has failures with their reasons.
LIVE = (
    "rounds=5 clients_per_round=4 eval_clients_per_round=2 attack=crash attack.fraction=0.25 "
    "train.max_steps=10"
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Served:
    def __init__(self, app) -> None:
        import uvicorn

        self.port = _free_port()
        self.server = uvicorn.Server(
            uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning")
        )
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> str:
        self.thread.start()
        for _ in range(300):
            if self.server.started:
                return f"http://127.0.0.1:{self.port}"
            time.sleep(0.05)
        raise RuntimeError("the board did not start")

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


def browser():
    from selenium import webdriver

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-dev-shm-usage",
        "--disable-gpu",
        "--window-size=1280,1000",
        "--force-device-scale-factor=1",
    ):
        opts.add_argument(arg)
    return webdriver.Chrome(options=opts, service=webdriver.ChromeService(executable_path=DRIVER))


def shot(driver, name: str) -> Path:
    """A full-page screenshot, reduced to a small palette PNG."""
    from PIL import Image

    SHOTS.mkdir(parents=True, exist_ok=True)
    height = driver.execute_script("return Math.min(document.body.scrollHeight, 2400)")
    driver.set_window_size(1280, max(700, int(height) + 40))
    path = SHOTS / f"{name}.png"
    driver.save_screenshot(str(path))
    img = Image.open(path).convert("RGB").quantize(colors=64)
    img.save(path, optimize=True)
    driver.set_window_size(1280, 1000)
    return path


def wait(fn, timeout: float, what: str, every: float = 0.1):
    end = time.monotonic() + timeout
    last = None
    while time.monotonic() < end:
        try:
            last = fn()
            if last:
                return last
        except Exception as exc:  # the element not there yet
            last = exc
        time.sleep(every)
    raise AssertionError(f"timed out waiting for {what} (last: {last!r})")


def test_an_operator_watches_a_run_then_releases_its_model(tmp_path, data_dir):
    from selenium.webdriver.common.by import By

    from fedapp.cli.board.app import create_app

    root = tmp_path / "outputs"
    url = ev.sqlite_url(root / ev.DB_NAME)
    env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "FEDAPP_OUTPUT_ROOT": str(root)}
    run_dir = root / "live-run"
    log = (tmp_path / "job.log").open("w")
    job = subprocess.Popen(
        [sys.executable, "-m", "fedapp.cli.inline", *LIVE.split(), f"output_dir={run_dir}"],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=PROJECT_ROOT,
    )
    driver = browser()
    try:
        with Served(create_app(url, root=root, token=TOKEN)) as base:
            # the runs list: the job appears with status running
            driver.get(base + "/")
            link = wait(
                lambda: driver.find_element(By.CSS_SELECTOR, "a.run-link"),
                240,
                "the run in the list",
            )
            row = link.find_element(By.XPATH, "./ancestor::tr")
            assert link.text == "live-run"
            assert "running" in row.text, row.text
            wait(
                lambda: (
                    "1/5" in driver.find_element(By.CSS_SELECTOR, "table.runs").text
                    or "2/5" in driver.find_element(By.CSS_SELECTOR, "table.runs").text
                ),
                120,
                "a round in the list",
            )
            shot(driver, "runs")
            # the run page: the round counter advances without a reload
            driver.find_element(By.CSS_SELECTOR, "a.run-link").click()
            wait(lambda: driver.find_element(By.ID, "run-round"), 30, "the run page")
            seen = []
            marker = driver.execute_script("window.__same_page = 1; return window.__same_page")
            while job.poll() is None:
                try:
                    status = driver.find_element(By.ID, "run-status").text
                    rnd = int(driver.find_element(By.ID, "run-round").text)
                except Exception:
                    continue
                if status == "running" and (not seen or rnd != seen[-1]):
                    seen.append(rnd)
                time.sleep(0.1)
            assert job.returncode == 0, (tmp_path / "job.log").read_text()[-3000:]
            assert len(seen) >= 2 and seen == sorted(seen), (
                f"round counter seen while running: {seen}"
            )
            # after it: completed, all rounds, on the same page (no reload)
            wait(
                lambda: driver.find_element(By.ID, "run-status").text == "completed",
                30,
                "status completed",
            )
            assert driver.find_element(By.ID, "run-round").text == "5"
            assert driver.execute_script("return window.__same_page") == marker
            page = driver.find_element(By.ID, "content").text
            assert "InjectedCrash" in page  # the failing client and its reason
            assert len(driver.find_elements(By.CSS_SELECTOR, "svg.chart path.line")) >= 4
            shot(driver, "run")
            # model versions: read-only until the token is given, then release
            driver.get(base + "/versions")
            wait(
                lambda: driver.find_element(By.CSS_SELECTOR, "table.versions tbody tr"),
                30,
                "versions",
            )
            assert not driver.find_elements(By.CSS_SELECTOR, "button.release")
            driver.find_element(By.ID, "token").send_keys(TOKEN)
            driver.find_element(By.ID, "release-by").send_keys("ci-operator")
            driver.find_element(By.CSS_SELECTOR, "#token-form button").click()
            button = wait(
                lambda: driver.find_element(
                    By.CSS_SELECTOR, "table.versions tbody tr button.release"
                ),
                30,
                "release buttons",
            )
            vid = button.get_attribute("data-version")
            button.click()
            done = wait(
                lambda: driver.find_element(
                    By.CSS_SELECTOR, f"span.released[data-version='{vid}']"
                ),
                30,
                "the release",
            )
            assert done.text.startswith("by ci-operator at ")
            shot(driver, "versions")
            # the audit trail: the release and the failures, filterable by kind
            driver.get(base + "/audit")
            wait(
                lambda: (
                    "version_released" in driver.find_element(By.CSS_SELECTOR, "table.audit").text
                ),
                30,
                "the audit trail",
            )
            assert "ci-operator" in driver.find_element(By.CSS_SELECTOR, "table.audit").text
            from selenium.webdriver.support.ui import Select

            Select(driver.find_element(By.ID, "audit-kind")).select_by_value("client_error")
            wait(
                lambda: (
                    "version_released"
                    not in driver.find_element(By.CSS_SELECTOR, "table.audit").text
                ),
                30,
                "the filter",
            )
            assert "InjectedCrash" in driver.find_element(By.CSS_SELECTOR, "table.audit").text
            Select(driver.find_element(By.ID, "audit-kind")).select_by_value("")
            wait(
                lambda: (
                    "version_released" in driver.find_element(By.CSS_SELECTOR, "table.audit").text
                ),
                30,
                "all kinds",
            )
            shot(driver, "audit")
    finally:
        driver.quit()
        if job.poll() is None:
            job.terminate()
            job.wait(timeout=30)
