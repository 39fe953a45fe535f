"""The entry point of a Hugging Face Space (sdk: gradio): the web demo of parscale_ear_hf/app.py.

Locally: python app.py (or parscale-ear app --model DIR_OR_REPO). The model is $MODEL, else the shipped demo.
"""

import os

from parscale_ear_hf.app import DEFAULT_MODEL, build_app

demo = build_app(os.environ.get("MODEL", DEFAULT_MODEL))

if __name__ == "__main__":
    demo.launch()
