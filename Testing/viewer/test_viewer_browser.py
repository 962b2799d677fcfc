"""``medgmae view`` end to end: the real server process on a free loopback port, driven by a real headless
Chromium through Selenium (Debian ``chromium`` + ``chromium-driver``, installed by ``scripts/setup.sh --dev``).

Checks: the page loads and shows the phantom; the 3D view is a real render (screenshot variance); Predict (with a
tiny random-weight checkpoint) changes the glyph count shown; thresholds, picking and export work from the page;
a missing file and a non-CT show an error in the page while the server keeps running; Ctrl-C stops the server
cleanly (exit code 0, port closed)."""
from __future__ import annotations

import io
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
pytestmark = pytest.mark.skipif(
    not (os.access(CHROMIUM, os.X_OK) and os.access(CHROMEDRIVER, os.X_OK)),
    reason="the browser tests need Debian's chromium and chromium-driver (scripts/setup.sh --dev installs them)")

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def tiny_weights(tmp_path_factory):
    from medgmae_core.model import build_model, get_config
    from medgmae_core.train.checkpoint import save_checkpoint

    torch.manual_seed(0)
    model = build_model(get_config("tiny", img_size=48))
    return save_checkpoint(tmp_path_factory.mktemp("weights") / "tiny48.pt", model=model)


class Server:
    """``python -m medgmae_core.cli view ...`` in a child process; ``url`` once it prints it."""

    def __init__(self, args: list[str], cwd: Path) -> None:
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
        self.log = cwd / "server.log"
        self.proc = subprocess.Popen([sys.executable, "-m", "medgmae_core.cli", "view", *args, "--port", "0"],
                                     cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=open(self.log, "w"),
                                     text=True)
        line, deadline = "", time.time() + 120
        while time.time() < deadline:
            line = self.proc.stdout.readline()
            if not line and self.proc.poll() is not None:
                break
            if line.startswith("medgmae view: http"):
                break
        match = re.search(r"http://([\d.]+):(\d+)/", line)
        if not match:
            self.stop()
            raise AssertionError(f"server did not start: {line!r}\n{self.log.read_text()}")
        self.host, self.port, self.url = match.group(1), int(match.group(2)), match.group(0)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, sig=signal.SIGINT, timeout: float = 20) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
                raise AssertionError(f"server ignored {sig!r} for {timeout} s")
        return self.proc.returncode


def _listening_addresses(port: int) -> set[str]:
    """Local IPv4/IPv6 addresses with a socket listening on ``port`` (from /proc/net/tcp*)."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            rows = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            local, state = row.split()[1], row.split()[3]
            addr, p = local.split(":")
            if int(p, 16) == port and state == "0A":  # LISTEN
                found.add(addr)
    return found


@pytest.fixture(scope="module")
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    os.environ.setdefault("SE_AVOID_STATS", "true")
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--no-first-run", "--disable-default-apps", "--window-size=1400,1200"):
        opts.add_argument(arg)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


def _wait(predicate, timeout: float = 60, what: str = "condition"):
    deadline = time.time() + timeout
    last = None
    while time.time() < deadline:
        try:
            last = predicate()
            if last is not None and (last.size > 0 if isinstance(last, np.ndarray) else bool(last)):
                return last
        except Exception as exc:  # element not rendered yet
            last = exc
        time.sleep(0.25)
    raise AssertionError(f"timed out waiting for {what} (last: {last!r})")


def _text(driver, element_id: str) -> str:
    from selenium.webdriver.common.by import By

    return driver.find_element(By.ID, element_id).text


def _view_pixels(driver) -> np.ndarray:
    import matplotlib.image as mpimg
    from selenium.webdriver.common.by import By

    png = driver.find_element(By.ID, "view3d").screenshot_as_png
    return (mpimg.imread(io.BytesIO(png), format="png")[..., :3] * 255).astype(np.uint8)


def _counts(driver) -> tuple[int, int]:
    m = re.match(r"(\d+) of (\d+) Gaussians drawn", _text(driver, "glyph-count"))
    assert m, _text(driver, "glyph-count")
    return int(m.group(1)), int(m.group(2))


def _click(driver, element_id: str) -> None:
    from selenium.webdriver.common.by import By

    element = driver.find_element(By.ID, element_id)
    driver.execute_script("arguments[0].scrollIntoView({block: 'center'});", element)
    element.click()


def _type(driver, element_id: str, text: str) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    field = driver.find_element(By.ID, element_id)
    field.send_keys(Keys.CONTROL, "a")
    field.send_keys(Keys.DELETE)
    if text:
        field.send_keys(text)


def test_viewer_in_a_real_browser(browser, tiny_weights, tmp_path):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By

    t0 = time.time()
    server = Server(["--phantom-shape", "40,40,32", "--weights", str(tiny_weights),
                     "--out", str(tmp_path / "exports")], tmp_path)
    try:
        assert server.host == "127.0.0.1" and server.port > 0
        assert _listening_addresses(server.port) == {"0100007F"}  # 127.0.0.1 only, no other interface
        browser.get(server.url)
        _wait(lambda: "phantom" in _text(browser, "source-label"), what="the phantom to be shown")
        assert browser.title == "MedGMAE viewer"
        assert _counts(browser) == (0, 0)
        for plane in ("axial", "coronal", "sagittal"):
            src = browser.find_element(By.ID, f"slice-{plane}").get_attribute("src")
            assert src.startswith("data:image/png;base64,") and len(src) > 2000
        before = _wait(lambda: (lambda px: px if px.std() > 10 else None)(_view_pixels(browser)),
                       what="a non-blank 3D view")
        assert len(np.unique(before.reshape(-1, 3), axis=0)) > 50  # shaded geometry, not one flat colour

        # Predict: the glyph count changes and the 3D view shows the glyphs
        _click(browser, "predict-button")
        n, total = _wait(lambda: (lambda c: c if c[1] > 0 else None)(_counts(browser)), timeout=90,
                         what="the glyph count after Predict")
        assert n == total > 0
        assert "Gaussians in" in _text(browser, "progress-text")
        after = _wait(lambda: (lambda px: px if np.abs(px.astype(int) - before).mean() > 3 else None)(
            _view_pixels(browser)), what="the 3D view to show the glyphs")
        assert after.std() > 10

        # picking: click a glyph in the middle of the 3D view, its parameters appear
        ActionChains(browser).move_to_element(browser.find_element(By.ID, "view3d")).click().perform()
        picked = _wait(lambda: _text(browser, "picked"), what="picked Gaussian parameters")
        assert re.search(r"Gaussian \d+", picked) and "centre (RAS mm)" in picked and "sigmas (mm)" in picked

        # thresholds: raising the minimum intensity thins the glyphs
        slider = browser.find_element(By.XPATH, "//input[@id='intensity-slider']/ancestor::div[contains(@class,"
                                                "'v-slider ')][1]")
        thumb = slider.find_element(By.CSS_SELECTOR, ".v-slider-thumb")
        assert slider.size["width"] > 100
        ActionChains(browser).click_and_hold(thumb).move_by_offset(int(slider.size["width"] * 0.6), 0).release() \
            .perform()
        thinned = _wait(lambda: (lambda c: c if c[0] < total else None)(_counts(browser)),
                        what="fewer glyphs after the intensity threshold")
        assert 0 <= thinned[0] < total and thinned[1] == total

        # export from the page
        _click(browser, "export-ply")
        msg = _wait(lambda: _text(browser, "export-message"), what="the export message")
        assert msg.endswith("gaussians.ply") and (tmp_path / "exports" / "gaussians.ply").is_file()

        # bad inputs: an error in the page, the server keeps running and still answers
        _type(browser, "source-input", str(tmp_path / "missing.nii.gz"))
        _click(browser, "open-button")
        err = _wait(lambda: _text(browser, "error"), what="the missing-file error")
        assert "missing.nii.gz" in err and "not found" in err
        import nibabel as nib

        nib.save(nib.Nifti1Image(np.random.default_rng(0).random((20, 20, 20)).astype(np.float32), np.eye(4)),
                 str(tmp_path / "probability.nii.gz"))
        _type(browser, "source-input", str(tmp_path / "probability.nii.gz"))
        _click(browser, "open-button")
        err = _wait(lambda: (lambda e: e if "probability" in e else None)(_text(browser, "error")),
                    what="the non-CT error")
        assert "HU" in err or "CT" in err
        assert server.alive()
        assert "phantom" in _text(browser, "source-label") and _counts(browser)[1] == total  # old input kept
        _type(browser, "source-input", "")
        _click(browser, "open-button")
        _wait(lambda: _text(browser, "error") == "" and _counts(browser) == (0, 0), what="the phantom reopened")
        assert server.alive()
    finally:
        code = server.stop(signal.SIGINT)
    assert code == 0, server.log.read_text()
    assert not _listening_addresses(server.port)
    assert "Traceback" not in server.log.read_text()
    assert time.time() - t0 < 120


def test_a_bad_input_on_the_command_line_still_serves_the_page(browser, tmp_path):
    (tmp_path / "notes.txt").write_text("not an image")
    server = Server([str(tmp_path / "notes.txt")], tmp_path)
    try:
        browser.get(server.url)
        err = _wait(lambda: _text(browser, "error"), what="the start-up error in the page")
        assert "notes.txt" in err and err.startswith("Could not open")
        assert server.alive() and _counts(browser) == (0, 0)
        assert "notes.txt" in server.log.read_text()  # and on stderr
    finally:
        code = server.stop(signal.SIGTERM)
    assert code == 0, server.log.read_text()
