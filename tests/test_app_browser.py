"""The web demo end to end in headless Chromium (Debian's chromium + chromedriver, driven by Selenium): the shipped
demo model served by `parscale-ear app` on a free port with its default limits; two classes generated; images of
the model's size; the served model and the limits in the page; each kind of bad input, each limit included, shown
in the page while the server goes on; temperature 0 accepted; a screenshot.

Without Chromium the test is skipped and says why; CI (.ci/run) installs it and sets REQUIRE_BROWSER=1, which
makes a missing browser a failure instead."""

import os
import re
from pathlib import Path

import pytest

from research.app_screenshot import app_browser as ab

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
    assert driver.find_element("css selector", "#model input").get_attribute("value") == str(MODEL)
    limits = driver.find_element("css selector", "#limits").text
    assert limits == "Limits per request: at most 64 steps, 64 images, and 1024 image-steps (images x steps)."
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
    again = ab.click_generate(driver)  # the same request twice: the page still shows that the second was answered
    assert again.startswith("Request 2: 4 images in")


@pytest.mark.parametrize(
    "bad, good, message",
    [
        ({"classes": "3, dog"}, {"classes": "3, 7"}, "unknown class name(s) ['dog']"),
        ({"steps": 0}, {"steps": 16}, "Steps must be a whole number from 1 to 64 (this server's limit), got 0."),
        ({"steps": 65}, {"steps": 16}, "Steps must be a whole number from 1 to 64 (this server's limit), got 65."),
        ({"per_class": 40}, {"per_class": 2},
         "Images: 2 classes x 40 per class = 80 images; this server's limit is 64"),
        ({"per_class": 10, "steps": 64}, {"per_class": 2, "steps": 16},
         "Images x steps: 20 x 64 = 1280; this server's limit is 1024"),
        ({"guidance": 0.5}, {"guidance": 3.0}, "guidance_scale must be a finite number >= 1.0, got 0.5"),
        # ... and the good request after it is at temperature 0, which the pipeline accepts.
        ({"temperature": -0.5}, {"temperature": 0}, "temperature must be a finite number >= 0.0, got -0.5"),
    ],
)  # fmt: skip
def test_bad_input_shows_its_error_in_the_page_and_the_server_goes_on(page, bad, good, message):
    driver, server = page
    for field, value in bad.items():
        ab.set_field(driver, field, value)
    status = " ".join(ab.click_generate(driver).split())  # `code` spans: lines of their own
    assert "Error:" in status and message in status
    for field, value in good.items():
        ab.set_field(driver, field, value)
    assert ANSWERED.fullmatch(ab.click_generate(driver)) and server.poll() is None
