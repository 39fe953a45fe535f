"""The entry point of a Hugging Face Space (sdk: gradio): the web demo of parscale_ear_hf/app.py.

Locally: python app.py (or parscale-ear app --model DIR_OR_REPO). It serves $MODEL (several: comma-separated),
else the shipped demo, with the app's safe defaults: visitors choose among those models only, and each request
is within :class:`~parscale_ear_hf.app.Limits`' defaults.
"""

import os

from parscale_ear_hf.app import DEFAULT_MODEL, build_app

demo = build_app([m.strip() for m in os.environ.get("MODEL", DEFAULT_MODEL).split(",") if m.strip()])

if __name__ == "__main__":
    demo.launch()
