"""The README's screenshot of the web demo: `parscale-ear app` served on a free port, two classes generated in
headless Chromium (Debian's chromium + chromium-driver), the page saved as a PNG beside a JSON with its provenance.

python examples/app_screenshot.py     # results/app_screenshot.png and results/app_screenshot.json
"""

import argparse
import tempfile
from pathlib import Path

from parscale_ear_hf.commands import run_script
from parscale_ear_hf.results import write_results
from research.app_screenshot import app_browser as ab


def main(args: argparse.Namespace) -> None:
    why = ab.missing_browser()
    if why:
        raise FileNotFoundError(f"app_screenshot: no headless Chromium: {why}.")
    port = ab.free_port()
    with tempfile.TemporaryDirectory() as tmp:
        server = ab.serve(args.model, port, Path(tmp) / "server.log")
        driver = ab.chrome(args.width, args.height)
        try:
            driver.get(f"http://127.0.0.1:{port}/")
            driver.implicitly_wait(30)
            ab.set_field(driver, "classes", args.classes)
            ab.set_field(driver, "per_class", args.images_per_class)
            status = ab.click_generate(driver)
            if "Error:" in status:
                raise RuntimeError(f"app_screenshot: the page answered with an error: {status}")
            Path(args.output).parent.mkdir(parents=True, exist_ok=True)
            driver.execute_script("window.scrollTo(0, 0)")  # the click scrolled to the button
            driver.save_screenshot(args.output)
        finally:
            driver.quit()
            server.kill()
            server.wait()
    write_results(Path(args.output).with_suffix(".json"), {"screenshot": args.output, "model": args.model,
                                                           "classes": args.classes, "status": status})  # fmt: skip
    print(f"wrote {args.output}: {status}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="models/mnist_demo")
    parser.add_argument("--classes", default="0, 3, 7, 9")
    parser.add_argument("--images-per-class", type=int, default=2)
    parser.add_argument("--output", default="results/app_screenshot.png")
    parser.add_argument("--width", type=int, default=1280)
    parser.add_argument("--height", type=int, default=1150)
    run_script(parser, main)
