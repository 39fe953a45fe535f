"""Generate a labelled image grid with a ParScale-EAR pipeline.

    python examples/generate.py --model path/or/repo-id --labels 0 1 2 --seed 0 --output grid.png
    python examples/generate.py --output outputs/demo_grid.png      # no --model: random tiny pipeline

Without --model there is no trained model yet, so this builds a tiny pipeline with RANDOM
weights, saves it with `save_pretrained`, reloads it with `from_pretrained` and samples from the
reloaded copy: it shows the whole save / load / sample path works, and the images are noise.
"""

import argparse
import os
import time

import torch
from diffusers.utils import make_image_grid

from parscale_ear_hf import EARTransformer, EnergyHead, LiteHybrid, LiteVAE, ParScaleEARPipeline


def random_tiny_pipeline(seed: int = 0) -> ParScaleEARPipeline:
    """A 32x32 RGB pipeline over an 8x8x8 token grid with 10 classes, randomly initialised."""
    torch.manual_seed(seed)
    vae = LiteVAE(
        sample_size=32,
        levels=2,
        latent_channels=8,
        encoder_channels=(16, 16),
        encoder_layers_per_level=1,
        aggregation_channels=32,
        aggregation_layers=1,
        decoder_block_out_channels=(16, 32, 32),
        decoder_layers_per_block=1,
        norm_num_groups=8,
    )
    lite_hybrid = LiteHybrid(in_channels=8, grid_size=8, coarse_grid_size=2, hidden_dim=32, num_heads=2)
    transformer = EARTransformer(
        in_channels=8,
        grid_size=8,
        num_classes=10,
        hidden_size=64,
        num_layers=2,
        num_heads=4,
        buffer_size=8,
        parscale_n=2,
    )
    energy_head = EnergyHead(condition_dim=64, token_channels=8, width=64, depth=2, noise_dim=16)
    return ParScaleEARPipeline(
        vae, lite_hybrid, transformer, energy_head, id2label={i: f"digit {i}" for i in range(10)}
    )


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="pipeline folder or Hub repo id; omit for the random tiny demo pipeline")
    parser.add_argument("--labels", nargs="+", default=None, help="class ids or names (default: the first 10 classes)")
    parser.add_argument("--images-per-class", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=None, help="autoregressive steps (default: min(64, tokens))")
    parser.add_argument("--guidance", type=float, default=3.0)
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--output", default="outputs/grid.png", help="PNG file for the grid")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()

    if args.model is None:
        folder = os.path.join(os.path.dirname(args.output) or ".", "random_tiny_pipeline")
        random_tiny_pipeline(args.seed).save_pretrained(folder)
        print(
            f"NOTE: no --model given; the pipeline saved to {folder} has RANDOM weights (nothing is trained "
            "yet), so the images are noise. This run checks build -> save_pretrained -> from_pretrained -> sample."
        )
        args.model = folder
    pipe = ParScaleEARPipeline.from_pretrained(args.model).to(args.device)

    labels = (
        [int(x) if x.lstrip("-").isdigit() else x for x in args.labels]
        if args.labels
        else list(range(min(10, pipe.transformer.config.num_classes)))
    )
    tokens = pipe.grid_size**2
    steps = args.steps or min(64, tokens)
    generator = [torch.Generator().manual_seed(args.seed + i) for i in range(len(labels) * args.images_per_class)]
    start = time.perf_counter()
    images = pipe(
        labels,
        num_inference_steps=steps,
        guidance_scale=args.guidance,
        temperature=args.temperature,
        generator=generator,
        num_images_per_class=args.images_per_class,
    ).images
    seconds = time.perf_counter() - start
    os.makedirs(os.path.dirname(args.output) or ".", exist_ok=True)
    make_image_grid(images, rows=args.images_per_class, cols=len(labels)).save(args.output)
    print(
        f"wrote {args.output}: {len(images)} images of classes {labels}, {steps} steps, "
        f"guidance {args.guidance}, temperature {args.temperature}, seed {args.seed}, {seconds:.2f} s on {args.device}"
    )


if __name__ == "__main__":
    main()
