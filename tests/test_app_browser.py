"""app.py end to end: a real `streamlit run` server, headless Chromium uploads an image, the caption appears.

Skipped unless streamlit, selenium, chromium and chromedriver are installed
(Debian: apt-get install chromium chromium-driver; pip install streamlit selenium).
"""
import os
import pathlib
import shutil
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

pytest.importorskip("streamlit")
webdriver = pytest.importorskip("selenium.webdriver")
import torch  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support import expected_conditions as EC  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

from models.checkpoint import load_checkpoint, load_model  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHROMIUM = next(filter(None, map(shutil.which, ["chromium", "chromium-browser", "google-chrome"])), None)
CHROMEDRIVER = shutil.which("chromedriver")
WAIT_S = 60
MISSING = [name for name, found in (("chromium", CHROMIUM), ("chromedriver", CHROMEDRIVER)) if not found]
pytestmark = pytest.mark.skipif(bool(MISSING), reason=f"{' and '.join(MISSING)} not installed (Debian: apt-get install "
                                                      f"chromium chromium-driver)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(checkpoint: str, runs_dir: str, log_path: str):
    """`streamlit run app.py` on a free local port; returns (process, url) once /_stcore/health answers."""
    port = free_port()
    env = {**os.environ, "CAPTION_APP_CHECKPOINT": checkpoint, "CAPTION_APP_RUNS_DIR": runs_dir,
           "STREAMLIT_BROWSER_GATHER_USAGE_STATS": "false", "STREAMLIT_SERVER_FILE_WATCHER_TYPE": "none",
           "OMP_NUM_THREADS": "2"}
    with open(log_path, "w") as log:   # the child keeps its own copy of the file descriptor
        server = subprocess.Popen([sys.executable, "-m", "streamlit", "run", os.path.join(ROOT, "app.py"),
                                   "--server.port", str(port), "--server.headless", "true",
                                   "--server.address", "127.0.0.1", "--global.developmentMode", "false"],
                                  cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        if server.poll() is not None:
            break
        try:
            with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as response:
                if response.status == 200:
                    return server, url
        except OSError:
            time.sleep(0.5)
    stop_server(server)
    raise AssertionError(f"streamlit did not start within {WAIT_S} s: {open(log_path).read()[-2000:]}")


def stop_server(server) -> None:
    server.terminate()
    try:
        server.wait(timeout=10)
    except subprocess.TimeoutExpired:
        server.kill()
        server.wait(timeout=10)


def open_browser(profile_dir: str):
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic",
                 "--no-first-run", "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 f"--user-data-dir={profile_dir}", "--window-size=1280,1000"]:
        options.add_argument(flag)
    return webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=CHROMEDRIVER))


def upload_and_read_caption(url: str, image_path: str, profile_dir: str, screenshot_path: str) -> str:
    """Open the app, upload image_path through the file input, wait for the caption; save a screenshot."""
    browser = open_browser(profile_dir)
    try:
        browser.set_page_load_timeout(WAIT_S)
        browser.get(url)
        wait = WebDriverWait(browser, WAIT_S)
        wait.until(EC.presence_of_element_located((By.CSS_SELECTOR, "input[type=file]"))).send_keys(image_path)
        # The caption is the page's only st.subheader (an h3 in the main area).
        main_h3 = (By.CSS_SELECTOR, "section.main h3, [data-testid=stMain] h3")
        heading = wait.until(EC.visibility_of_element_located(main_h3))
        wait.until(lambda _: heading.text.strip())
        time.sleep(1)   # let the beam table and images finish drawing before the screenshot
        browser.save_screenshot(screenshot_path)
        return heading.text.strip()
    finally:
        browser.quit()


def test_upload_in_browser_shows_caption(tiny_checkpoints, tiny_data, tmp_path):
    import app
    checkpoint = tiny_checkpoints["attention"]
    image_dir = tiny_data[1]
    image_path = os.path.join(image_dir, sorted(os.listdir(image_dir))[0])
    (tmp_path / "runs").mkdir()
    server, url = start_server(checkpoint, str(tmp_path / "runs"), str(tmp_path / "streamlit.log"))
    try:
        shown = upload_and_read_caption(url, image_path, str(tmp_path / "profile"), str(tmp_path / "page.png"))
    finally:
        stop_server(server)
    model, vocab, config = load_model(load_checkpoint(checkpoint), checkpoint)
    image = app.read_image(pathlib.Path(image_path).read_bytes(), os.path.basename(image_path))
    expected = app.caption((model, vocab, config, torch.device("cpu"), None), image,
                           config["decode"]["beam_size"], config["decode"]["max_len"],
                           config["decode"]["no_repeat_ngram"])                           # the sliders' defaults
    assert shown == (expected["caption"] or "(empty caption)")
    assert (tmp_path / "page.png").stat().st_size > 10_000
