"""End to end: `streamlit run app.py` on 127.0.0.1 (with the project's .streamlit/config.toml),
headless Chromium through Selenium uploads two photos and waits for the verdict, then saves a
screenshot (E2E_SCREENSHOT or tmp); on the "Who is this?" page it enrols two people, asks who
a third photo is and saves a second screenshot (the same name, ending _identify.png).

The fixture net is untrained but deterministic (seed 0, as in tests/test_app.py): the astronaut
and her mirror image score about -0.13, so at its threshold of -0.3 the verdict is "Same person"
and no close call, but at its (made-up) 1-in-10,000 threshold of -0.02 it is "Different
people"; a cropped, rescaled astronaut scores about -0.02 against her and -0.51
against the cameraman, so she is named.

Skipped unless the browser and its driver are installed:
  apt-get install -y chromium chromium-driver && pip install -r requirements-e2e.txt
"""
import io
import json
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

import faces
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


THRESHOLD = -0.3


def write_checkpoint(logs):
    """An untrained tiny net in training.py's checkpoint format (crop settings included):
    the page only needs to load it, and seed 0 makes its scores known (see above)."""
    torch.manual_seed(0)
    cfg = {"model": "compact", "image_size": 64, "embedding_dim": 32, "loss": "arcface",
           "distance": "cosine", "drop_layer4": False, "head_hidden": 1024, "head_depth": 1,
           "activation": "sigmoid", "p": 0.0, "init": "kaiming"}
    row = {"accuracy": 0.61, "auc": 0.66, "threshold": THRESHOLD}
    run = logs / "compact-arcface-e2e"
    run.mkdir(parents=True)
    torch.save({"model": model.build_model(cfg).eval().state_dict(),
                "model_config": model.ModelConfig.from_dict(cfg).to_dict(), "config": cfg,
                "epoch": 1, "step": 1, "metrics": row, "threshold": THRESHOLD,
                "crop": faces.crop_settings(), "operating_points": {
                    "points": {"0.0001": {"far": 1e-4, "threshold": -0.02, "tar": 0.1}},
                    "n_people": 40, "n_same": 300, "n_different": 90_000}},
               run / "best_accuracy.pt")
    # Curves whose two losses differ in scale and an honest evaluation older than a
    # contaminated one, as a real run has them, so the screenshot shows that part too.
    (run / "metrics.csv").write_text("epoch,train_loss,loss,accuracy,auc\n"
                                     "1,25.0,0.19,0.8,0.85\n2,6.0,0.18,0.86,0.92\n"
                                     "3,1.3,0.17,0.89,0.95\n")
    for name, pairs, accuracy, seen in (("eval-pairsDevTest-flip", "pairsDevTest.txt", 0.898, 0),
                                        ("eval-pairs-flip", "pairs.txt", 0.948, 4000)):
        (run / name).mkdir()
        (run / name / "results.json").write_text(json.dumps(
            {"checkpoint": str(run / "best_accuracy.pt"), "pairs": f"dataset/{pairs}",
             "n_pairs": 6000, "auc": 0.9612, "eer": 0.0961, "tar@far=1e-3": 0.2224,
             "kfold": {"mean": accuracy, "stderr": 0.0041}, "contaminated": bool(seen),
             "people_seen_in_training": seen, "people_in_pairs": 5749}))
        time.sleep(0.05)  # the contaminated one is the newer, as it was on the real run


@pytest.fixture
def server(tmp_path):
    """The app on a free loopback port; yields its URL and stops it afterwards."""
    write_checkpoint(tmp_path / "logs")
    port = free_port()
    env = {**os.environ, "LFW_DEMO_LOGS": str(tmp_path / "logs"),
           "LFW_DEMO_DATA": str(tmp_path / "no-dataset")}
    log = open(tmp_path / "streamlit.log", "wb")
    proc = subprocess.Popen(
        # No watcher or usage-stats flags: .streamlit/config.toml must set them.
        [sys.executable, "-m", "streamlit", "run", "app.py", "--server.headless", "true",
         "--server.address", "127.0.0.1", "--server.port", str(port)],
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
                 "--disable-sync", "--disable-dev-shm-usage", "--window-size=1400,2600",
                 f"--user-data-dir={tmp_path / 'chromium-profile'}"):
        options.add_argument(flag)
    # An explicit driver path keeps Selenium Manager from trying to download one.
    driver = webdriver.Chrome(options=options,
                              service=webdriver.ChromeService(executable_path=CHROMEDRIVER))
    try:
        yield driver
    finally:
        driver.quit()


def write_jpeg(path, array):
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="JPEG", quality=90)
    path.write_bytes(buf.getvalue())
    return path


def screenshot_path(tmp_path, suffix=""):
    shot = Path(os.environ.get("E2E_SCREENSHOT") or tmp_path / "e2e_screenshot.png")
    shot = shot.with_name(f"{shot.stem}{suffix}{shot.suffix}")
    shot.parent.mkdir(parents=True, exist_ok=True)
    return shot


def page_text(browser):
    return browser.find_element(By.TAG_NAME, "body").text


def file_inputs(browser):
    return browser.find_elements(By.CSS_SELECTOR, "input[type=file]")


def waiter(browser, shot, tmp_path):
    """wait_for(what, condition): wait for condition() to return something true; on timeout
    fail with the page text, the server log and a screenshot, so that a CI failure can be read
    without rerunning it."""
    def wait_for(what, condition, timeout=120):
        try:
            # The page re-renders while it reruns: elements can go stale under us.
            return WebDriverWait(browser, timeout, ignored_exceptions=(
                StaleElementReferenceException, NoSuchElementException)).until(lambda _: condition())
        except TimeoutException:
            browser.save_screenshot(str(shot))
            log = (tmp_path / "streamlit.log").read_text(errors="replace")[-3000:]
            pytest.fail(f"timed out waiting for {what}; screenshot {shot}\n--- page ---\n"
                        f"{page_text(browser)}\n--- streamlit log ---\n{log}")
    return wait_for


def test_two_uploads_show_a_verdict(server, browser, tmp_path):
    from skimage.data import astronaut  # public-domain photo with one clear face
    face = astronaut()
    # A long name, as phones write them: the page must show it whole.
    mirrored = "mirrored_astronaut_IMG_20240701_183015_HDR_portrait_mode.jpg"
    paths = [write_jpeg(tmp_path / name, array)
             for name, array in (("astronaut.jpg", face), (mirrored, face[:, ::-1].copy()))]

    shot = screenshot_path(tmp_path)
    body = lambda: page_text(browser)  # noqa: E731
    wait_for = waiter(browser, shot, tmp_path)

    browser.get(server)
    wait_for("two upload boxes", lambda: len(file_inputs(browser)) == 2)
    for i, path in enumerate(paths):
        file_inputs(browser)[i].send_keys(str(path))
        # Wait until the page has run with this photo (its aligned crop is shown) before the
        # next upload, so that no upload lands on an input the rerun is replacing.
        wait_for(f"the face of {path.name}",
                 lambda: body().count("Aligned face the model sees") == i + 1)

    verdict = wait_for("the verdict", lambda: next(
        (e for e in browser.find_elements(
            By.XPATH, "//*[starts-with(normalize-space(text()), 'Verdict:')]") if e.text), None))
    assert verdict.text == "Verdict: Same person"
    # The verdict is where the eye lands first: above both photos.
    photos = [i for i in browser.find_elements(By.TAG_NAME, "img") if i.size["width"] > 100]
    assert photos and verdict.location["y"] < min(i.location["y"] for i in photos)
    assert f"Photo B: {mirrored}" in body()
    assert "Traceback" not in body()
    assert "Deploy" not in body()  # .streamlit/config.toml: toolbarMode = "minimal"
    # The honest figure leads, and no figure is cut off ("0.94…") by its column.
    figures = wait_for("the evaluation figures", lambda: browser.find_elements(
        By.CSS_SELECTOR, "[data-testid=stMetricValue]"))
    assert [f.text for f in figures][3] == "89.8% ± 0.4%"
    clipped = browser.execute_script(
        "return [...document.querySelectorAll('[data-testid=stMetricValue] *')]"
        ".filter(e => e.scrollWidth > e.clientWidth + 1).map(e => e.textContent)")
    assert not clipped, f"metric values cut off: {clipped}"
    log = (tmp_path / "streamlit.log").read_text(errors="replace")
    assert "Inotify" not in log and "Traceback" not in log
    time.sleep(2)  # let the images and charts finish drawing for the screenshot
    assert browser.save_screenshot(str(shot)), f"could not write {shot}"


def test_enrol_two_people_and_identify_a_third_photo(server, browser, tmp_path):
    import numpy as np
    from skimage.data import astronaut, camera  # public-domain photos, one face each
    from selenium.webdriver.common.keys import Keys
    enrolled = (("Eileen Collins", write_jpeg(tmp_path / "astronaut.jpg", astronaut())),
                ("Cameraman", write_jpeg(tmp_path / "cameraman.jpg",
                                         np.stack([camera()] * 3, axis=-1))))
    third = Image.fromarray(astronaut()[20:400, 60:460]).resize((300, 285))
    query = write_jpeg(tmp_path / "who_is_this.jpg", np.asarray(third))

    shot = screenshot_path(tmp_path, "_identify")
    wait_for = waiter(browser, shot, tmp_path)
    browser.get(server)
    # st.navigation's page links, in the sidebar above the model chooser.
    wait_for("the page link", lambda: browser.find_element(
        By.XPATH, "//a[@data-testid='stSidebarNavLink'][contains(., 'Who is this?')]")).click()
    wait_for("the enrol form", lambda: "Enrol at least one person" in page_text(browser))

    for n, (person, path) in enumerate(enrolled, 1):
        name_box = wait_for("the name box", lambda: browser.find_element(
            By.CSS_SELECTOR, "input[aria-label='Name']"))
        name_box.send_keys(person, Keys.ENTER)  # Enter applies the text before the click
        wait_for(f"{person} typed", lambda: browser.find_element(
            By.CSS_SELECTOR, "input[aria-label='Name']").get_attribute("value") == person)
        file_inputs(browser)[0].send_keys(str(path))  # "Their photo", above the query box
        wait_for(f"{path.name} uploaded", lambda: path.name in page_text(browser))
        time.sleep(1)  # the upload's own rerun ends before the click
        wait_for("the Add button", lambda: browser.find_element(
            By.XPATH, "//button[normalize-space(.)='Add to gallery']")).click()
        wait_for(f"{person} enrolled", lambda: f"Gallery: {n} people in {n} photos"
                 in page_text(browser))
    assert "Enrolled: Eileen Collins (1 photo), Cameraman (1 photo)" in page_text(browser)

    wait_for("the query box enabled", lambda: len(file_inputs(browser)) == 2 and
             file_inputs(browser)[1].is_enabled())
    file_inputs(browser)[1].send_keys(str(query))
    answer = wait_for("the answer", lambda: next(
        (e for e in browser.find_elements(
            By.XPATH, "//*[starts-with(normalize-space(text()), 'Face 1:')]") if e.text), None))
    assert answer.text.startswith("Face 1: Eileen Collins (score ")
    # Her best match first, then the other person; the captions draw after the verdict.
    body = wait_for("both matches", lambda: (lambda t: "2. Cameraman" in t and t)(
        page_text(browser)))
    assert body.index("1. Eileen Collins") < body.index("2. Cameraman")
    assert "unknown" not in answer.text and "Traceback" not in body
    log = (tmp_path / "streamlit.log").read_text(errors="replace")
    assert "Traceback" not in log
    time.sleep(2)  # let the thumbnails finish drawing for the screenshot
    assert browser.save_screenshot(str(shot)), f"could not write {shot}"


def test_strictness_changes_a_close_pairs_verdict(server, browser, tmp_path):
    from skimage.data import astronaut
    face = astronaut()
    paths = [write_jpeg(tmp_path / name, array)
             for name, array in (("astronaut.jpg", face), ("mirror.jpg", face[:, ::-1].copy()))]
    shot = screenshot_path(tmp_path, "_strictness")
    wait_for = waiter(browser, shot, tmp_path)
    browser.get(server)
    wait_for("two upload boxes", lambda: len(file_inputs(browser)) == 2)
    for i, path in enumerate(paths):
        file_inputs(browser)[i].send_keys(str(path))
        wait_for(f"the face of {path.name}", lambda: page_text(browser).count(
            "Aligned face the model sees") == i + 1)

    def verdict():
        return next((e.text for e in browser.find_elements(
            By.XPATH, "//*[starts-with(normalize-space(text()), 'Verdict:')]") if e.text), None)
    assert wait_for("the verdict", verdict) == "Verdict: Same person"
    wait_for("the strictness box", lambda: browser.find_element(
        By.XPATH, "//div[@data-testid='stSelectbox'][.//label[contains(., 'Strictness')]]"
                  "//div[@data-baseweb='select']")).click()
    wait_for("the 1 in 10,000 option", lambda: browser.find_element(
        By.XPATH, "//li[@role='option'][contains(., '1 in 10,000')]")).click()
    assert wait_for("the stricter verdict", lambda: (lambda v: v if v and "Different" in v
                                                      else None)(verdict())) == \
        "Verdict: Different people"
    assert "about 1 in 10,000 different-person pairs" in page_text(browser)
    assert browser.save_screenshot(str(shot)), f"could not write {shot}"
