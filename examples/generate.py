"""Generate a labelled image grid with a ParScale-EAR pipeline (the same as `parscale-ear generate`).

python examples/generate.py --model models/mnist_demo --labels 0 1 2 --seed 0 --output grid.png
python examples/generate.py --model org/repo --labels "tabby cat" --images-per-class 4 --no-grid --output imgs/
"""

import argparse

from parscale_ear_hf.cli import add_generate_arguments, generate
from parscale_ear_hf.commands import run_script

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    run_script(add_generate_arguments(parser), generate)
