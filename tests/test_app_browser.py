"""The web demo end to end in headless Chromium (Debian's chromium + chromedriver, driven by Selenium): the shipped
demo model served by `parscale-ear app` on a free port; two classes generated; images of the model's size; each
kind of bad input shown in the page while the server goes on; a screenshot.

Without Chromium the test is skipped and says why; CI (.ci/run) installs it and sets REQUIRE_BROWSER=1, which
makes a missing browser a failure instead."""

import os
import re
from pathlib import Path

import pytest

from parscale_ear_hf import app_browser as ab

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "models" / "mnist_demo"
ANSWERED = re.compile(r"Request \d+: 4 images in [\d.]+ s on (cpu|cuda)\.")

why = ab.missing_browser()
if why and os.environ.get("REQUIRE_BROWSER") == "1":
    raise RuntimeError(f"REQUIRE_BROWSER=1 but the browser test cannot run: {why}")
pytestmark = pytest.mark.skipif(why is not None, reason=f"no headless Chromium: {why}")


@pytest.fixture(scope="module")
def page(tmp_path_factory):
    log = tmp_path_factory.mktemp("app") / "server.log"
    port = ab.free_port()
    server = ab.serve(str(MODEL), port, log)
    driver = ab.chrome()
    try:
        driver.get(f"http://127.0.0.1:{port}/")
        driver.implicitly_wait(30)
        yield driver, server
    finally:
        driver.quit()
        server.kill()
        server.wait()


def test_two_classes_give_images_of_the_models_size_and_the_settings(page, tmp_path):
    driver, _ = page
    ab.set_field(driver, "classes", "3, 7")
    ab.set_field(driver, "per_class", 2)
    status = ab.click_generate(driver)
    assert re.fullmatch(r"Request 1: 4 images in [\d.]+ s on (cpu|cuda)\.", status)
    assert ab.gallery_sizes(driver) == [(32, 32)] * 4
    settings = driver.find_element("css selector", "#settings").text
    assert '"class_ids"' in settings and "snippet" not in status
    snippet = driver.find_element("css selector", "#snippet").text
    assert "ParScaleEARPipeline.from_pretrained" in snippet and "num_images_per_class=2" in snippet
    driver.save_screenshot(str(tmp_path / "app.png"))
    assert (tmp_path / "app.png").stat().st_size > 10_000


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("classes", "3, dog", "unknown class name(s) ['dog']"),
        ("steps", 0, "Steps must be a whole number of at least 1, got 0"),
        ("guidance", 0.5, "Guidance must be at least 1"),
        ("model", "/no/such/model", "Model: cannot load '/no/such/model'"),
    ],
)
def test_bad_input_shows_its_error_in_the_page_and_the_server_goes_on(page, field, value, message):
    driver, server = page
    good = {"classes": "3, 7", "steps": 16, "guidance": 3.0, "model": str(MODEL)}
    ab.set_field(driver, field, value)
    status = ab.click_generate(driver)
    assert "Error:" in status and message in status
    ab.set_field(driver, field, good[field])
    assert ANSWERED.fullmatch(ab.click_generate(driver)) and server.poll() is None
    again = ab.click_generate(driver)  # the same request twice: the page still shows that the second was answered
    assert ANSWERED.fullmatch(again) and again.split(":")[0] != status.split(":")[0]
