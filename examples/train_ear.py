"""Train the generator (LiteHybrid + EARTransformer + EnergyHead) on cached VAE latents.

One CPU:        python examples/train_ear.py --latents data/mnist_latents --model-config
                    examples/configs/mnist_demo_generator.json --output-dir runs/gen --max-steps 3000 --cpu
Two CPU procs:  torchrun --nproc_per_node 2 examples/train_ear.py ... --cpu
GPUs:           accelerate launch --config_file examples/accelerate_configs/h100_bf16.yaml
                    examples/train_ear.py ... --mixed-precision bf16
Resume:         the same command with --resume latest (a checkpoint is saved every --checkpoint-every steps
                and whenever --checkpoint-minutes, 5, have passed); new --lr / --blr / --energy-lambda /
                --ema-decay values take effect at once (EAR's second phase is such a resume, see docs/training.md)
EAR's recipe:   the defaults (--blr 1e-4, reference param groups, constant-rate EMA, --score-batch-mul 2);
                docs/training.md's "EAR's recipe, flag for flag" maps each main_ear.py flag to this script's
"""

import argparse

from parscale_ear_hf.commands import run_script
from parscale_ear_hf.training.generator import add_arguments, run

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    run_script(add_arguments(parser), run)
