"""The web demo under load: 8 browser sessions on loopback, each uploading 5 photos at once, against one
`streamlit run app.py` with the shipped model. Every caption arrives, no session shows an error, the model
is loaded once, and the server's memory stays bounded. Latencies go to $APP_LOAD_REPORT when it is set.

Skipped unless streamlit, selenium, chromium and chromedriver are installed.
"""
import json
import os
import time

import pytest
from PIL import Image

from tests.test_app_browser import By, open_browser, pytestmark, start_server, stop_server  # noqa: F401 (skips with it)

SESSIONS, PHOTOS, DEADLINE_S = 8, 5, 300
FLICKR8K = os.environ.get("FLICKR8K_DIR", "")


def photos(folder):
    dev = os.path.join(FLICKR8K, "Flickr_8k.devImages.txt")
    if os.path.isfile(dev):
        return [os.path.join(FLICKR8K, "Images", n) for n in open(dev).read().split()[:PHOTOS]]
    made = []
    for i in range(PHOTOS):
        made.append(str(folder / f"photo_{i}.jpg"))
        Image.effect_noise((500, 375), 30 + 10 * i).convert("RGB").save(made[-1])
    return made


def memory(server, log_path):
    """The server's resident and peak memory, in bytes. A server that has exited has no memory to read
    (its /proc entry, while unreaped, lacks VmRSS): fail with its exit status and log instead."""
    with open(f"/proc/{server.pid}/status") as f:
        fields = dict(line.split(":", 1) for line in f)
    if "VmRSS" not in fields:
        raise AssertionError(f"the streamlit server exited (status {server.wait()}): {open(log_path).read()[-2000:]}")
    return {k: int(fields[k].split()[0]) * 1024 for k in ("VmRSS", "VmHWM")}


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="reads the server's memory from Linux /proc")
def test_eight_sessions_uploading_five_photos_each(tmp_path):
    files = photos(tmp_path)
    (tmp_path / "runs").mkdir()
    log = tmp_path / "streamlit.log"
    server, url = start_server("", str(tmp_path / "runs"), str(log))       # no preset: the shipped model
    browser = open_browser(str(tmp_path / "profile"))
    try:
        browser.set_page_load_timeout(120)
        tabs, uploaded = [], {}
        for i in range(SESSIONS):
            if i:
                browser.switch_to.new_window("tab")
            browser.get(url)
            tabs.append(browser.current_window_handle)
        for tab in tabs:                  # every page ready before the first upload: the uploads come together
            browser.switch_to.window(tab)
            deadline = time.monotonic() + 120
            while not browser.find_elements(By.CSS_SELECTOR, "input[type=file]") and time.monotonic() < deadline:
                time.sleep(0.2)
        idle = memory(server, log)
        for tab in tabs:
            browser.switch_to.window(tab)
            browser.find_element(By.CSS_SELECTOR, "input[type=file]").send_keys("\n".join(files))
            uploaded[tab] = time.monotonic()
        done, errors = {}, {}
        deadline = time.monotonic() + DEADLINE_S
        while len(done) < SESSIONS and time.monotonic() < deadline:
            for tab in tabs:
                if tab in done:
                    continue
                browser.switch_to.window(tab)
                captions = [h.text for h in browser.find_elements(By.CSS_SELECTOR, "[data-testid=stMain] h3")]
                shown_errors = browser.find_elements(By.CSS_SELECTOR, "[data-testid=stException], [data-testid=stAlertContentError]")
                if shown_errors:
                    errors[tab] = [e.text for e in shown_errors]
                if len([c for c in captions if c.strip()]) == PHOTOS:
                    done[tab] = time.monotonic() - uploaded[tab]
            time.sleep(0.1)
        loaded = memory(server, log)
    finally:
        browser.quit()
        stop_server(server)
    assert not errors, errors
    assert len(done) == SESSIONS, f"{len(done)} of {SESSIONS} sessions showed all captions in {DEADLINE_S} s"
    assert open(log).read().count("app: loaded ") == 1                     # one model for every visitor
    assert loaded["VmHWM"] - idle["VmRSS"] < 1.5 * 2**30                   # 8 sessions do not hold 8 models
    latencies = sorted(done.values())
    report = {"sessions": SESSIONS, "photos_per_session": PHOTOS, "median_s": round(latencies[len(latencies) // 2], 1),
              "max_s": round(latencies[-1], 1), "server_rss_idle_mib": idle["VmRSS"] >> 20,
              "server_peak_rss_mib": loaded["VmHWM"] >> 20, "cpus": os.cpu_count()}
    print(report)
    if os.environ.get("APP_LOAD_REPORT"):
        with open(os.environ["APP_LOAD_REPORT"], "w") as f:
            json.dump(report, f)
