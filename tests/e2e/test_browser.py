"""End to end: `streamlit run app.py` on 127.0.0.1, headless Chromium through Selenium uploads
two photos and waits for the verdict, then saves a screenshot (E2E_SCREENSHOT or tmp).

Skipped unless the browser and its driver are installed:
  apt-get install -y chromium chromium-driver && pip install -r requirements-e2e.txt
"""
import io
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch
from PIL import Image

import model

ROOT = Path(__file__).resolve().parents[2]
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")

webdriver = pytest.importorskip(
    "selenium.webdriver", reason="selenium not installed: pip install -r requirements-e2e.txt")
pytestmark = pytest.mark.skipif(
    not (CHROMIUM and CHROMEDRIVER),
    reason="no chromium/chromedriver: apt-get install -y chromium chromium-driver")

from selenium.common.exceptions import (  # noqa: E402
    NoSuchElementException, StaleElementReferenceException, TimeoutException)
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_checkpoint(logs):
    """An untrained tiny net in training.py's checkpoint format: the page only needs to load it."""
    torch.manual_seed(0)
    cfg = {"model": "compact", "image_size": 64, "embedding_dim": 32, "loss": "arcface",
           "distance": "cosine", "drop_layer4": False, "head_hidden": 1024, "head_depth": 1,
           "activation": "sigmoid", "p": 0.0, "init": "kaiming"}
    row = {"accuracy": 0.61, "auc": 0.66, "threshold": -0.4}
    run = logs / "compact-arcface-e2e"
    run.mkdir(parents=True)
    torch.save({"model": model.build_model(cfg).state_dict(), "model_config": cfg,
                "config": cfg, "epoch": 1, "step": 1, "metrics": row, "threshold": -0.4},
               run / "best_accuracy.pt")


@pytest.fixture
def server(tmp_path):
    """The app on a free loopback port; yields its URL and stops it afterwards."""
    write_checkpoint(tmp_path / "logs")
    port = free_port()
    env = {**os.environ, "LFW_DEMO_LOGS": str(tmp_path / "logs"),
           "LFW_DEMO_DATA": str(tmp_path / "no-dataset")}
    log = open(tmp_path / "streamlit.log", "wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "streamlit", "run", "app.py", "--server.headless", "true",
         "--server.address", "127.0.0.1", "--server.port", str(port),
         "--browser.gatherUsageStats", "false", "--server.fileWatcherType", "none"],
        cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 60
        while True:
            try:
                with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.time() > deadline:
                pytest.fail("streamlit did not start:\n" + (tmp_path / "streamlit.log").read_text())
            time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


@pytest.fixture
def browser(tmp_path):
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--disable-dev-shm-usage", "--window-size=1400,1500",
                 f"--user-data-dir={tmp_path / 'chromium-profile'}"):
        options.add_argument(flag)
    # An explicit driver path keeps Selenium Manager from trying to download one.
    driver = webdriver.Chrome(options=options,
                              service=webdriver.ChromeService(executable_path=CHROMEDRIVER))
    try:
        yield driver
    finally:
        driver.quit()


def test_two_uploads_show_a_verdict(server, browser, tmp_path):
    from skimage.data import astronaut  # public-domain photo with one clear face
    face = astronaut()
    paths = []
    for name, array in (("astronaut.jpg", face), ("mirrored.jpg", face[:, ::-1].copy())):
        buf = io.BytesIO()
        Image.fromarray(array).save(buf, format="JPEG", quality=90)
        (tmp_path / name).write_bytes(buf.getvalue())
        paths.append(tmp_path / name)

    shot = Path(os.environ.get("E2E_SCREENSHOT") or tmp_path / "e2e_screenshot.png")
    shot.parent.mkdir(parents=True, exist_ok=True)
    body = lambda: browser.find_element(By.TAG_NAME, "body").text  # noqa: E731
    file_inputs = lambda: browser.find_elements(By.CSS_SELECTOR, "input[type=file]")  # noqa: E731

    def wait_for(what, condition, timeout=120):
        """Wait for condition(); on timeout fail with the page text, the server log and a
        screenshot, so a CI failure can be read without rerunning it."""
        try:
            # The page re-renders while it reruns: elements can go stale under us.
            return WebDriverWait(browser, timeout, ignored_exceptions=(
                StaleElementReferenceException, NoSuchElementException)).until(lambda _: condition())
        except TimeoutException:
            browser.save_screenshot(str(shot))
            log = (tmp_path / "streamlit.log").read_text(errors="replace")[-3000:]
            pytest.fail(f"timed out waiting for {what}; screenshot {shot}\n--- page ---\n"
                        f"{body()}\n--- streamlit log ---\n{log}")

    browser.get(server)
    wait_for("two upload boxes", lambda: len(file_inputs()) == 2)
    for i, path in enumerate(paths):
        file_inputs()[i].send_keys(str(path))
        # Wait until the page has run with this photo (its aligned crop is shown) before the
        # next upload, so that no upload lands on an input the rerun is replacing.
        wait_for(f"the face of {path.name}",
                 lambda: body().count("Aligned face the model sees") == i + 1)

    verdict = wait_for("the verdict", lambda: next(
        (e for e in browser.find_elements(
            By.XPATH, "//*[starts-with(normalize-space(text()), 'Verdict:')]") if e.text), None))
    assert verdict.text in ("Verdict: Same person", "Verdict: Different people")
    assert "Traceback" not in body()
    time.sleep(2)  # let the images and charts finish drawing for the screenshot
    assert browser.save_screenshot(str(shot)), f"could not write {shot}"
