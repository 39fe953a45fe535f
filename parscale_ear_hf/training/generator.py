"""Generator training: LiteHybrid + EARTransformer + EnergyHead on cached latents, with `accelerate`.

`examples/train_ear.py` and `parscale-ear train` parse :func:`add_arguments` and call :func:`run`.
The method itself (masking, label dropout, the energy loss) is :class:`~.objectives.EARTrainingModel`.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import functools
import json
import math
from pathlib import Path

import torch

from ..models._checks import check_float, check_int, check_mixed_precision
from ..models.diffusion_head import DiffusionHead
from ..models.ear_transformer import EARTransformer
from ..models.energy_head import EnergyHead
from ..models.lite_hybrid import LiteHybrid
from . import recipe
from .objectives import EARTrainingModel

# ---------------------------------------------------------------------------------------------
# The training loop: `examples/train_ear.py` and `parscale-ear train` parse these arguments and
# call `run`. Everything random is a function of (seed, step, micro-step, rank), so a run resumed
# from a checkpoint continues exactly as the uninterrupted run would have.


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The command-line arguments of generator training."""
    data = parser.add_argument_group("data and output")
    data.add_argument("--latents", required=True, help="latent cache folder written by examples/cache_latents.py")
    data.add_argument("--output-dir", required=True, help="checkpoints, logs, sample grids and the final pipeline")
    data.add_argument(
        "--model-config",
        required=True,
        help="JSON with {'lite_hybrid': {...}, 'transformer': {...}, 'energy_head': {...}} config fields, or "
        "'diffusion_head' in place of 'energy_head' (MAR's head, the baseline EAR replaces); token channels, grid "
        "size and number of classes are taken from the latent cache",
    )
    data.add_argument(
        "--vae",
        default=None,
        help="the VAE of the saved pipeline, a folder or Hub id, in place of the latent cache's copy; refused unless "
        "its class, config and weights are the ones the cache recorded (default: the cache's VAE)",
    )
    model = parser.add_argument_group("ablations (override the model config)")
    model.add_argument("--parscale-n", type=int, default=None, help="number of ParScale streams P")
    model.add_argument("--no-coarse", action="store_true", help="LiteHybrid without its coarse branch")
    model.add_argument("--no-fine", action="store_true", help="LiteHybrid without its fine branch")
    parser.add_argument(
        "--grad-checkpointing",
        action="store_true",
        help="recompute each backbone and head block in the backward pass (EAR: --grad_checkpointing): far less "
        "activation memory, same gradients, about a third more compute; `parscale-ear plan` says when it is needed",
    )
    recipe.add_arguments(parser)
    recipe.add_runtime_arguments(
        parser,
        sample_steps=16,
        sample_steps_help="autoregressive steps of the sample grids",
    )
    return parser


def build_components(
    model_config: dict, info: dict, args
) -> tuple[LiteHybrid, EARTransformer, EnergyHead | DiffusionHead]:
    """Components from the JSON model config, filled in and checked against the latent cache.

    The token head is an :class:`EnergyHead` (section ``energy_head``, the default) or MAR's
    :class:`DiffusionHead` (section ``diffusion_head``); a config may name one of them, not both.
    """
    if "energy_head" in model_config and "diffusion_head" in model_config:
        raise ValueError("--model-config: give one token head, 'energy_head' or 'diffusion_head', not both.")
    head_section = "diffusion_head" if "diffusion_head" in model_config else "energy_head"
    from_data = {
        "lite_hybrid": {"in_channels": info["latent_channels"], "grid_size": info["grid_size"]},
        "transformer": {
            "in_channels": info["latent_channels"],
            "grid_size": info["grid_size"],
            "num_classes": info["num_classes"],
        },
        head_section: {"token_channels": info["latent_channels"]},
    }
    unknown = set(model_config) - set(from_data)
    if unknown:
        accepted = sorted({*from_data, "energy_head", "diffusion_head"})
        raise ValueError(f"--model-config: unknown sections {sorted(unknown)}; accepted: {accepted}.")
    configs = {}
    for name, data_fields in from_data.items():
        config = dict(model_config.get(name, {}))
        for field, value in data_fields.items():
            if field in config and config[field] != value:
                raise ValueError(
                    f"--model-config: {name}.{field}={config[field]} does not fit the latent cache "
                    f"({args.latents}: {field}={value}); remove it or make them equal."
                )
            config[field] = value
        configs[name] = config
    if args.parscale_n is not None:
        configs["transformer"]["parscale_n"] = args.parscale_n
    if args.no_coarse:
        configs["lite_hybrid"]["use_coarse"] = False
    if args.no_fine:
        configs["lite_hybrid"]["use_fine"] = False
    configs[head_section].setdefault("condition_dim", configs["transformer"].get("hidden_size", 768))
    head_class = DiffusionHead if head_section == "diffusion_head" else EnergyHead
    return (
        LiteHybrid(**configs["lite_hybrid"]),
        EARTransformer(**configs["transformer"]),
        head_class(**configs[head_section]),
    )


def _validate(args) -> None:
    """The checks that need only the flags; the ones that need the latent cache follow its reading in :func:`run`."""
    recipe.check_flags(args)
    for name in ("checkpoint_every", "keep_checkpoints", "log_every", "sample_steps", "sample_images"):
        check_int("train", f"--{name.replace('_', '-')}", getattr(args, name))
    for name in ("sample_every", "seed"):
        check_int("train", f"--{name.replace('_', '-')}", getattr(args, name), minimum=0)
    check_float("train", "--sample-guidance", args.sample_guidance, 1.0, math.inf)
    check_float("train", "--checkpoint-minutes", args.checkpoint_minutes, 0.0, math.inf)
    args.mixed_precision = check_mixed_precision(
        "train", args.mixed_precision, args.cpu or not torch.cuda.is_available()
    )


def run(args: argparse.Namespace) -> EARTrainingModel:
    """Train LiteHybrid + EARTransformer + EnergyHead on cached latents; save the pipeline with EMA weights.

    Returns the trained model (the live weights; the saved pipeline holds the EMA weights).
    """
    from accelerate import Accelerator

    from . import loop
    from .checkpointing import JsonlLog, resume_point
    from .latent_cache import load_cache_vae

    _validate(args)
    output_dir = Path(args.output_dir)
    resume_from = resume_point("train", args.resume, output_dir)
    with open(args.model_config, encoding="utf-8") as f:
        model_config = json.load(f)
    dataset, info = loop.load_latents("train", args.latents, args.batch_size)
    schedule = recipe.resolve(args, len(dataset))
    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        # Without CUDA, torchrun'd CPU processes must be told they are CPU ranks (gloo), or each
        # would train alone as rank 0.
        cpu=args.cpu or not torch.cuda.is_available(),
    )
    loop.check_processes("train", accelerator, args.batch_size)
    vae = load_cache_vae("train", args.latents, info, args.vae)  # up front: a wrong VAE fails now
    torch.manual_seed(args.seed)
    model = _training_model(model_config, info, args)
    groups = recipe.param_groups(model, args.param_groups, args.head_lr_scale, args.weight_decay)
    optimizer = torch.optim.AdamW(groups, lr=schedule.lr, betas=tuple(args.adam_betas))
    ema = recipe.make_ema(model.parameters(), args.ema_decay, warmup=args.ema_warmup)
    model, optimizer = accelerator.prepare(model, optimizer)
    unwrapped = accelerator.unwrap_model(model)
    parts = {"model": model, "optimizer": optimizer, "ema": ema}
    sample = functools.partial(_save_ema_pipeline, unwrapped, ema, vae, info, args)

    log = JsonlLog(output_dir / "train_log.jsonl", enabled=accelerator.is_main_process)
    this_run = {"args": loop.run_flags(args), "resolved": dataclasses.asdict(schedule)}
    start_step = loop.load_resume(accelerator, resume_from, log, parts)
    if resume_from is not None:
        accelerator.print(
            f"resumed from {resume_from} at step {start_step}: lr {schedule.lr_at(start_step):.3g} "
            f"(peak {schedule.lr:.3g}), energy lambda {args.energy_lambda}"
        )
    details = {"model_config": model_config, "latent_cache": info}
    loop.write_run_config(accelerator, output_dir, log, this_run, details, start_step, resumed=resume_from is not None)

    steps = loop.Steps(accelerator, args, log, parts, sample, start_step, schedule.max_steps, "train")
    for step in steps:
        model.train()
        lr = schedule.lr_at(step)
        recipe.set_lr(optimizer, lr)
        step_loss = _update(accelerator, model, optimizer, dataset, info, step, args)
        ema.step(unwrapped.parameters())
        # lr: of this update, before the groups' scales (the head's: lr * --head-lr-scale).
        steps.end(step, step_loss, {"lr": lr, "energy_lambda": args.energy_lambda})

    loop.save_final_pipeline(accelerator, sample, output_dir, "pipeline")
    return unwrapped


def _training_model(model_config: dict, info: dict, args) -> EARTrainingModel:
    """The components of ``--model-config`` (:func:`build_components`) with the flags' loss settings."""
    lite_hybrid, transformer, energy_head = build_components(model_config, info, args)
    model = EARTrainingModel(
        lite_hybrid,
        transformer,
        energy_head,
        score_batch_mul=args.score_batch_mul,
        energy_lambda=args.energy_lambda,
        diffusion_batch_mul=args.diffusion_batch_mul,
    )
    if args.grad_checkpointing:
        model.enable_gradient_checkpointing()
    return model


def _update(accelerator, model, optimizer, dataset, info: dict, step: int, args) -> float:
    """Optimizer update ``step`` from ``--gradient-accumulation-steps`` micro-batches, each a global batch of its
    own; returns its loss, the mean over the micro-batches and the processes."""
    from ..data import derived_seed
    from . import loop

    step_loss = torch.zeros((), device=accelerator.device)
    for micro in range(args.gradient_accumulation_steps):
        seed = derived_seed(args.seed, step, micro, accelerator.process_index)
        torch.manual_seed(seed)  # dropout draws from the global generator
        generator = torch.Generator().manual_seed(seed)
        index = step * args.gradient_accumulation_steps + micro
        latents, labels = loop.read_batch(
            accelerator, dataset, info, index, generator, args.batch_size, args.seed, info["shift_factor"]
        )
        with accelerator.accumulate(model):
            loss = model(latents, labels, generator=generator)  # the prepared model autocasts (bf16)
            accelerator.backward(loss)
            if accelerator.sync_gradients and args.grad_clip > 0:
                accelerator.clip_grad_norm_(model.parameters(), args.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        step_loss += loss.detach() / args.gradient_accumulation_steps
    return accelerator.reduce(step_loss, reduction="mean").item()


def _save_ema_pipeline(model: EARTrainingModel, ema, vae, info: dict, args, grid_path: Path):
    """A pipeline holding copies of the EMA weights, and a sample grid (one image per class) from it."""
    from ..pipeline_parscale_ear import ParScaleEARPipeline
    from .loop import save_sample_grid

    ema.store(model.parameters())
    ema.copy_to(model.parameters())
    parts = [copy.deepcopy(m).float().eval() for m in (model.lite_hybrid, model.transformer, model.energy_head)]
    ema.restore(model.parameters())
    id2label = {int(k): v for k, v in info["id2label"].items()} if info.get("id2label") else None
    pipe = ParScaleEARPipeline(vae.to(parts[0].device), *parts, id2label=id2label)
    caption = (lambda i: pipe.id2label[i]) if pipe.id2label else str
    save_sample_grid(pipe, info["num_classes"], args, grid_path, caption)
    return pipe
