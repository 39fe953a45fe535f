r"""Encode a dataset once with a trained VAE and cache the posterior moments for generator training.

    python examples/cache_latents.py --vae outputs/vae_mnist/vae --dataset data/mnist_demo \
        --output-dir outputs/latents_mnist --no-hflip            # or: parscale-ear cache-latents ...
    # ImageNet (gated: --hf-token or HF_TOKEN), several GPUs, with flipped copies (the default, --hflip):
    accelerate launch examples/cache_latents.py --vae VAE_DIR --dataset ILSVRC/imagenet-1k --streaming \
        --image-size 256 --output-dir latents_in256

The cache keeps a copy of the VAE (OUTPUT_DIR/vae), so training finds it wherever the cache is moved.
"""

import argparse

from parscale_ear_hf.commands import run_script
from parscale_ear_hf.training.latent_cache import add_arguments, run

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    run_script(add_arguments(parser), run)
