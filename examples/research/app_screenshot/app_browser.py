"""Driving the web demo in headless Chromium (Selenium): the browser test and `examples/app_screenshot.py`.

Debian's ``chromium`` and ``chromium-driver`` (``apt-get install chromium chromium-driver``); ``$CHROMIUM`` and
``$CHROMEDRIVER`` point elsewhere. No browser is ever downloaded.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

from parscale_ear_hf.commands import cli_process

CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("CHROMEDRIVER", "/usr/bin/chromedriver")


def missing_browser() -> str | None:
    """Why the browser cannot run here, or None when it can."""
    for path, package in ((CHROMIUM, "chromium"), (CHROMEDRIVER, "chromium-driver")):
        if not (Path(path).is_file() or shutil.which(path)):
            return f"{path} not found: `apt-get install chromium chromium-driver` (Debian's {package})"
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed: pip install -e '.[test]'"
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve(model: str, port: int, log_path: str | os.PathLike, timeout: float = 180.0) -> subprocess.Popen:
    """``parscale-ear app --model MODEL --port PORT`` in a new process, returned once the page answers.

    Raises:
        RuntimeError: the server exited or did not answer within `timeout`; the message has its log's tail.
    """
    log = open(log_path, "w", encoding="utf-8")
    argv, env = cli_process(
        "app", "--model", model, "--port", str(port),
        env={**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_OFFLINE": "1"},
    )  # fmt: skip
    process = subprocess.Popen(
        argv,
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
    )
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            break
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2) as response:
                if response.status == 200:
                    return process
        except OSError:
            time.sleep(0.5)
    process.kill()
    tail = Path(log_path).read_text(encoding="utf-8")[-2000:]
    raise RuntimeError(f"the app did not start on port {port} within {timeout:.0f} s; its output ends:\n{tail}")


def chrome(width: int = 1280, height: int = 1000):
    """A headless Chromium driven by Debian's chromedriver."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                 f"--window-size={width},{height}"):  # fmt: skip
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)


def set_field(driver, elem_id: str, value) -> None:
    """Replace the text of the textbox or number field ``#elem_id`` as a user would type it."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    field = driver.find_element(By.CSS_SELECTOR, f"#{elem_id} textarea, #{elem_id} input")
    field.send_keys(Keys.CONTROL, "a")
    field.send_keys(Keys.DELETE)
    field.send_keys(str(value))
    field.send_keys(Keys.TAB)


def status_text(driver) -> str:
    from selenium.webdriver.common.by import By

    return driver.find_element(By.CSS_SELECTOR, "#status").text


def click_generate(driver, timeout: float = 120.0) -> str:
    """Click Generate (once no loading overlay covers it) and wait for its answer: the status box numbers each
    answer ("Request N: ..."), and shows the progress while one runs, so the wait ends when it starts with the
    next number. Returns the answer."""
    import re

    from selenium.common.exceptions import ElementClickInterceptedException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    def clicked(d) -> bool:
        try:
            d.find_element(By.CSS_SELECTOR, "#generate").click()
            return True
        except ElementClickInterceptedException:  # Gradio's loading overlay: the page's first load is still running
            return False

    match = re.match(r"Request (\d+):", status_text(driver))
    answer = f"Request {int(match.group(1)) + 1 if match else 1}:"
    WebDriverWait(driver, timeout).until(clicked)
    WebDriverWait(driver, timeout).until(lambda d: status_text(d).startswith(answer))
    return status_text(driver)


def gallery_sizes(driver) -> list[tuple[int, int]]:
    """The natural (width, height) of every loaded image in the gallery."""
    from selenium.webdriver.common.by import By

    sizes = []
    for image in driver.find_elements(By.CSS_SELECTOR, "#gallery img"):
        width = driver.execute_script("return arguments[0].complete ? arguments[0].naturalWidth : 0", image)
        height = driver.execute_script("return arguments[0].naturalHeight", image)
        if width:
            sizes.append((width, height))
    return sizes
