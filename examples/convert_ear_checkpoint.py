"""Turn a checkpoint of the authors' EAR (shaochenze/EAR `main_ear.py`) into a saved pipeline.

    python examples/convert_ear_checkpoint.py --checkpoint output_dir/checkpoint-last.pth \
        --vae kl16-diffusers --output-dir ear-base [--weights model] [--num-heads 12] [--buffer-size 64]

The same as `parscale-ear convert`; see `parscale_ear_hf/convert.py` for what is read and written.
"""

import argparse

from parscale_ear_hf.commands import run_script
from parscale_ear_hf.convert import add_arguments, run

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    run_script(add_arguments(parser), run)
