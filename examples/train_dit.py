"""Train a diffusers DiT baseline on cached VAE latents and save it as a DiTPipeline.

One CPU:        python examples/train_dit.py --latents runs/demo_latents --output-dir runs/demo_dit
                    --max-steps 4000 --batch-size 64 --num-layers 5 --num-attention-heads 4
                    --attention-head-dim 30 --patch-size 1 --compare-parameters models/mnist_demo --cpu
Two CPU procs:  torchrun --nproc_per_node 2 examples/train_dit.py ... --cpu
GPUs:           accelerate launch --config_file examples/accelerate_configs/h100_bf16.yaml
                    examples/train_dit.py ... --mixed-precision bf16
Resume:         the same command with --resume latest (a checkpoint is saved every --checkpoint-every steps
                and whenever --checkpoint-minutes, 5, have passed)
Score it:       parscale-ear eval --model runs/demo_dit/pipeline ... (the driver recognises a DiTPipeline)
"""

import argparse

from parscale_ear_hf.commands import run_script
from parscale_ear_hf.training.dit import add_arguments, run

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    run_script(add_arguments(parser), run)
