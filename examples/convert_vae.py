"""Turn MAR's KL-16 VAE (`kl16.ckpt`, used by MAR and EAR) into a diffusers AutoencoderKL folder.

    python examples/convert_vae.py --checkpoint pretrained_models/vae/kl16.ckpt --output-dir kl16-diffusers \
        [--scaling-factor 0.2325]

The same as `parscale-ear convert-vae`; see `parscale_ear_hf/convert_vae.py` for what is read and written.
"""

import argparse

from parscale_ear_hf.commands import run_script
from parscale_ear_hf.convert_vae import add_arguments, run

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    run_script(add_arguments(parser), run)
