r"""Train a LiteVAE tokenizer; saves OUTPUT_DIR/vae with its measured scaling / shift factors.

    # MNIST demo (create the data first: python examples/prepare_demo_data.py); 5000 steps on 2 CPU cores
    python examples/train_vae.py --dataset data/mnist_demo --eval-split heldout --output-dir outputs/vae_mnist \
        --image-size 32 --channels 1 --levels 2 --latent-channels 4 --encoder-channels 32 32 \
        --encoder-layers-per-level 1 --aggregation-channels 64 --aggregation-layers 2 \
        --decoder-channels 16 32 64 --decoder-layers-per-block 1 --norm-num-groups 8 \
        --batch-size 64 --lr 2e-3 --lr-schedule cosine --lr-warmup-steps 100 --max-steps 5000 \
        --eval-every 1000 --checkpoint-every 1000 --results-file results/vae_mnist_demo.json
    # several processes: accelerate launch examples/train_vae.py ...  (CPU: torchrun --nproc_per_node 2 ...)

Interrupted runs continue exactly with --resume latest.
"""

import argparse

from accelerate import PartialState

from parscale_ear_hf.commands import run_script
from parscale_ear_hf.training.vae import add_arguments, run


def main(args: argparse.Namespace) -> None:
    summary = run(args)
    if not PartialState().is_main_process:
        return
    if summary["heldout_psnr"] is not None:
        print(f"held-out PSNR {summary['heldout_psnr']:.2f} dB")
    print(f"scaling_factor {summary['scaling_factor']:.4f}, shift_factor {summary['shift_factor']:.4f}")
    print(f"saved {summary['vae_path']}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    run_script(add_arguments(parser), main)
