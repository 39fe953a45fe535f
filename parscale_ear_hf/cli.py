"""`parscale-ear`: generate, train-vae, train, info, card.

parscale-ear generate --model models/mnist_demo --labels 0 1 2 --output grid.png
parscale-ear info --model models/mnist_demo
parscale-ear train --latents data/latents --model-config cfg.json --output-dir runs/x --max-steps 1000
parscale-ear train-vae --help
parscale-ear card --model models/mnist_demo --results results/eval/mnist_demo.json
"""

from __future__ import annotations

import argparse
import json
import os
import time

import PIL.Image
import PIL.ImageDraw
import torch


def labelled_grid(images: list[PIL.Image.Image], labels: list[str], columns: int | None = None) -> PIL.Image.Image:
    """Images in a grid with each image's label written under it (white background, black text)."""
    columns = columns or len(images)
    rows = -(-len(images) // columns)
    width, height = images[0].size
    caption = 12
    grid = PIL.Image.new("RGB", (columns * width, rows * (height + caption)), "white")
    draw = PIL.ImageDraw.Draw(grid)
    for i, (image, label) in enumerate(zip(images, labels)):
        x, y = (i % columns) * width, (i // columns) * (height + caption)
        grid.paste(image.convert("RGB"), (x, y))
        draw.text((x + 2, y + height), str(label)[: max(1, width // 6)], fill="black")
    return grid


def add_generate_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--model", required=True, help="pipeline folder or Hub repo id")
    parser.add_argument("--labels", nargs="+", default=None, help="class ids or names (default: the first 10 classes)")
    parser.add_argument("--images-per-class", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0, help="image i uses the seed seed+i")
    parser.add_argument("--steps", type=int, default=None, help="autoregressive steps (default: min(64, tokens))")
    parser.add_argument("--guidance", type=float, default=3.0, help="classifier-free guidance scale (1: off)")
    parser.add_argument("--temperature", type=float, default=0.7, help="energy head temperature")
    parser.add_argument("--output", default="outputs/grid.png", help="PNG grid, or a folder with --no-grid")
    parser.add_argument("--no-grid", action="store_true", help="write one PNG per image into --output (a folder)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return parser


def generate(args: argparse.Namespace) -> list[PIL.Image.Image]:
    """Generate with a saved pipeline and write a labelled grid (or single PNGs)."""
    from .pipeline_parscale_ear import ParScaleEARPipeline

    pipe = ParScaleEARPipeline.from_pretrained(args.model).to(args.device)
    num_classes = pipe.transformer.config.num_classes
    labels = [int(x) if x.lstrip("-").isdigit() else x for x in args.labels or []] or list(range(min(10, num_classes)))
    steps = args.steps or min(64, pipe.grid_size**2)
    count = len(labels) * args.images_per_class
    generators = [torch.Generator().manual_seed(args.seed + i) for i in range(count)]
    start = time.perf_counter()
    images = pipe(
        labels,
        num_inference_steps=steps,
        guidance_scale=args.guidance,
        temperature=args.temperature,
        generator=generators,
        num_images_per_class=args.images_per_class,
    ).images
    seconds = time.perf_counter() - start
    ids = [i for i in pipe.class_ids(labels) for _ in range(args.images_per_class)]
    names = [pipe.id2label[i].split(",")[0] if pipe.id2label else str(i) for i in ids]
    if args.no_grid:
        os.makedirs(args.output, exist_ok=True)
        for k, (image, i) in enumerate(zip(images, ids)):
            image.save(os.path.join(args.output, f"{k:05d}_class{i}.png"))
    else:
        os.makedirs(os.path.dirname(args.output) or ".", exist_ok=True)
        # One column per requested label, one row per image of that label.
        by_row = [k * args.images_per_class + r for r in range(args.images_per_class) for k in range(len(labels))]
        labelled_grid([images[k] for k in by_row], [names[k] for k in by_row], columns=len(labels)).save(args.output)
    print(
        f"wrote {args.output}: {len(images)} images of classes {labels}, {steps} steps, guidance {args.guidance}, "
        f"temperature {args.temperature}, seed {args.seed}, {seconds:.2f} s on {args.device}"
    )
    return images


def info(args: argparse.Namespace) -> dict:
    """Components, parameter counts and configs of a saved pipeline."""
    from .info import pipeline_summary
    from .pipeline_parscale_ear import ParScaleEARPipeline

    summary = {"model": args.model, **pipeline_summary(ParScaleEARPipeline.from_pretrained(args.model))}
    counts = summary["parameters"]
    if args.json:
        print(json.dumps(summary, indent=2, default=list))
    else:
        print(
            f"{args.model}: {summary['image_size']}x{summary['image_size']} images, token grid "
            f"{'x'.join(map(str, summary['token_grid']))}, {summary['num_classes']} classes"
        )
        for name, count in counts.items():
            print(f"  {name:16s} {count:>12,d} parameters")
    return summary


def main(argv: list[str] | None = None) -> None:
    from . import benchmark, evaluation, model_card, training, vae_training  # extras are needed only when run

    parser = argparse.ArgumentParser(
        prog="parscale-ear", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    commands = parser.add_subparsers(dest="command", required=True)
    add_generate_arguments(
        commands.add_parser("generate", help="generate images with a saved pipeline", description=generate.__doc__)
    ).set_defaults(func=generate)
    vae_training.add_arguments(
        commands.add_parser(
            "train-vae",
            help="train a LiteVAE",
            description=vae_training.__doc__,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
    ).set_defaults(func=vae_training.run)
    training.add_arguments(
        commands.add_parser("train", help="train the generator on cached latents", description=training.run.__doc__)
    ).set_defaults(func=training.run)
    info_parser = commands.add_parser(
        "info", help="components, parameter counts and configs of a pipeline", description=info.__doc__
    )
    info_parser.add_argument("--model", required=True, help="pipeline folder or Hub repo id")
    info_parser.add_argument("--json", action="store_true", help="print everything as JSON")
    info_parser.set_defaults(func=info)
    evaluation.add_arguments(
        commands.add_parser(
            "eval",
            help="FID / IS / precision / recall of a pipeline (ADM protocol); torchrun / accelerate launch for many",
            description=evaluation.run.__doc__,
        )
    ).set_defaults(func=evaluation.run)
    evaluation.add_reconstruction_arguments(
        commands.add_parser(
            "eval-vae",
            help="reconstruction FID of a VAE on a dataset split",
            description=evaluation.run_reconstruction.__doc__,
        )
    ).set_defaults(func=evaluation.run_reconstruction)
    benchmark.add_arguments(
        commands.add_parser(
            "bench", help="speed and memory benchmarks, beside the baselines", description=benchmark.__doc__
        )
    ).set_defaults(func=benchmark.run)
    model_card.add_arguments(
        commands.add_parser(
            "card",
            help="write a pipeline's model card (README.md) from its evaluation results",
            description=model_card.run.__doc__,
        )
    ).set_defaults(func=model_card.run)
    args = parser.parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main()
