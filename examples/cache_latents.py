r"""Encode a dataset once with a trained VAE and cache the posterior moments for generator training.

    python examples/cache_latents.py --vae outputs/vae_mnist/vae --dataset data/mnist_demo \
        --output-dir outputs/latents_mnist
    # ImageNet (gated: --hf-token or HF_TOKEN), several GPUs, with flipped copies:
    accelerate launch examples/cache_latents.py --vae VAE_DIR --dataset ILSVRC/imagenet-1k --streaming \
        --image-size 256 --hflip --output-dir latents_in256
"""

import argparse

from accelerate import PartialState

from parscale_ear_hf.latent_cache import add_arguments, run


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    args = add_arguments(parser).parse_args()
    info = run(args)
    if PartialState().is_main_process:
        grid = info["grid_size"]
        print(f"cached {info['count']} examples, latents {info['latent_channels']}x{grid}x{grid} -> {args.output_dir}")


if __name__ == "__main__":
    main()
