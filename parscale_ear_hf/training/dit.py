"""A diffusers DiT baseline, trained on the generator's latent cache and saved as a ``DiTPipeline``.

    parscale-ear train-dit --latents runs/demo_latents --output-dir runs/demo_dit --max-steps 4000 \
        --batch-size 64 --num-layers 5 --num-attention-heads 4 --attention-head-dim 30 --patch-size 1 \
        --compare-parameters models/mnist_demo --cpu

The model is ``diffusers.DiTTransformer2DModel`` with DiT's objective (Peebles & Xie, 2023): epsilon
prediction, MSE at a uniform timestep of the linear DDPM schedule (1000 steps, betas 1e-4 .. 0.02),
class labels dropped to the null class with probability 0.1 for classifier-free guidance; learned
sigma is off (``out_channels = in_channels``), so the loss is the plain MSE. The defaults are DiT's
recipe (AdamW at a constant 1e-4, no weight decay, no clipping, EMA 0.9999 from step 0, batch 256) at
DiT-S/2 size. The loop is generator training's: ``accelerate``, pickle-free checkpoints, every random
draw a function of (seed, step, rank), so ``--resume latest`` after a kill continues exactly.

The saved folder is a plain ``diffusers.DiTPipeline`` (EMA weights, the cache's VAE, a
``DPMSolverMultistepScheduler``), with two things made to fit it:

* **Latent scale.** ``DiTPipeline`` decodes ``latents / vae.config.scaling_factor`` and knows no
  ``shift_factor``, so the DiT learns ``z * scaling_factor`` (not the generator's
  ``(z - shift_factor) * scaling_factor``): then the pipeline's decoding is exact for any VAE. For the
  demo's LiteVAE the two differ by a constant 0.047, against unit variance.
* **Null class.** ``DiTPipeline`` always passes 1000 (ImageNet's null class) as the unconditional label;
  :class:`NullClassDiTTransformer2DModel` is ``DiTTransformer2DModel`` with that id mapped to its own
  null class ``num_embeds_ada_norm``, so guidance works for any number of classes up to 1000.

A ``LiteVAE`` has ``AutoencoderKL``'s ``decode(z).sample`` and ``config.scaling_factor`` and decodes
to [-1, 1] as ``DiTPipeline`` expects; diffusers logs that it expected an ``AutoencoderKL`` when
loading, which is harmless.

The scheduler is DPM-Solver++ (2M) rather than DDIM: guided sampling converges in 15-20 steps with it
(Lu et al., 2022), where DDIM needs about 50, and diffusers' ``DiTPipeline`` example switches to it; so
the speed-quality comparison shows the baseline with its faster sampler. It is deterministic like
DDIM, so a list of generators gives each image its own noise, and image ``i`` is the same alone or in
a batch.
"""

from __future__ import annotations

import argparse
import copy
import functools
import math
from pathlib import Path

import torch

# ModelMixin is here for diffusers' loader: `DiffusionPipeline.from_pretrained` loads model_index.json's
# ["parscale_ear_hf.training.dit", "<class>"] only when this module has `ModelMixin` (it looks for its loaders here).
from diffusers import DiTTransformer2DModel, ModelMixin  # noqa: F401

from ..models._checks import check_float, check_int, check_mixed_precision
from . import recipe
from .objectives import NOISE_SCHEDULE, DiTTrainingModel

# `DiTPipeline.__call__` hard-codes this id as the unconditional ("null") class: ImageNet's 1000.
DIT_PIPELINE_NULL_CLASS = 1000
LATENT_SCALING = "z * scaling_factor (DiTPipeline decodes latents / vae.config.scaling_factor; no shift_factor)"


class NullClassDiTTransformer2DModel(DiTTransformer2DModel):
    """``DiTTransformer2DModel`` whose unconditional label may also be DiTPipeline's 1000.

    ``DiTPipeline`` passes 1000 as the null class whatever the model's ``num_embeds_ada_norm``; this
    maps it to the model's own null class, row ``num_embeds_ada_norm`` of its label tables. The
    weights and config are ``DiTTransformer2DModel``'s.
    """

    def forward(self, hidden_states, timestep=None, class_labels=None, *args, **kwargs):
        if class_labels is not None:
            null = self.config.num_embeds_ada_norm
            class_labels = torch.where(class_labels == DIT_PIPELINE_NULL_CLASS, null, class_labels)
        return super().forward(hidden_states, timestep, class_labels, *args, **kwargs)


def build_transformer(info: dict, args) -> NullClassDiTTransformer2DModel:
    """The DiT for the latent cache ``info``: its grid, channels and classes, the flags' size."""
    if info["num_classes"] > DIT_PIPELINE_NULL_CLASS:
        raise ValueError(
            f"train-dit: the latent cache has {info['num_classes']} classes; DiTPipeline uses id "
            f"{DIT_PIPELINE_NULL_CLASS} as its null class, so at most {DIT_PIPELINE_NULL_CLASS} classes fit."
        )
    if info["grid_size"] % args.patch_size:
        raise ValueError(
            f"train-dit: `--patch-size` must divide the latent grid {info['grid_size']}, got {args.patch_size}."
        )
    return NullClassDiTTransformer2DModel(
        num_attention_heads=args.num_attention_heads,
        attention_head_dim=args.attention_head_dim,
        in_channels=info["latent_channels"],
        out_channels=info["latent_channels"],  # learned sigma off
        num_layers=args.num_layers,
        sample_size=info["grid_size"],
        patch_size=args.patch_size,
        num_embeds_ada_norm=info["num_classes"],
    )


def compared_parameters(pipeline: str) -> dict:
    """Parameters of a ParScaleEARPipeline's generator (LiteHybrid + EARTransformer + EnergyHead), counted
    from its configs on the meta device (no weights read)."""
    from ..info import count_parameters
    from ..models import EARTransformer, EnergyHead, LiteHybrid

    counts = {}
    for name, cls in (("lite_hybrid", LiteHybrid), ("transformer", EARTransformer), ("energy_head", EnergyHead)):
        with torch.device("meta"):
            counts[name] = count_parameters(cls.from_config(cls.load_config(pipeline, subfolder=name)))
    return {"model": pipeline, **counts, "generator_total": sum(counts.values())}


# ---------------------------------------------------------------------------------------------
# The training loop (`parscale-ear train-dit`, `examples/train_dit.py`).


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The command-line arguments of DiT training."""
    data = parser.add_argument_group("data and output")
    data.add_argument("--latents", required=True, help="latent cache folder written by examples/cache_latents.py")
    data.add_argument("--output-dir", required=True, help="checkpoints, logs, sample grids and the DiTPipeline")
    data.add_argument(
        "--vae",
        default=None,
        help="the VAE of the saved pipeline, a folder or Hub id, in place of the latent cache's copy; refused unless "
        "its class, config and weights are the ones the cache recorded (default: the cache's VAE)",
    )
    data.add_argument(
        "--compare-parameters",
        default=None,
        metavar="PIPELINE",
        help="a ParScaleEARPipeline folder or Hub id: its generator's parameter count is recorded beside the DiT's",
    )
    model = parser.add_argument_group("model (default: DiT-S/2)")
    model.add_argument("--num-layers", type=int, default=12)
    model.add_argument("--num-attention-heads", type=int, default=6)
    model.add_argument("--attention-head-dim", type=int, default=64, help="width = heads x head dim")
    model.add_argument("--patch-size", type=int, default=2, help="latent positions per side of a token")
    model.add_argument("--class-dropout-prob", type=float, default=0.1, help="labels -> null class, for guidance")
    optim = parser.add_argument_group("optimisation (default: DiT's recipe)")
    optim.add_argument("--max-steps", type=int, required=True, help="optimizer updates")
    optim.add_argument("--batch-size", type=int, default=256, help="over all processes")
    optim.add_argument("--lr", type=float, default=1e-4)
    optim.add_argument("--lr-schedule", choices=recipe.LR_SCHEDULES, default="constant", help="after the warm-up")
    optim.add_argument("--min-lr", type=float, default=0.0, help="where the cosine schedule ends")
    optim.add_argument("--warmup-steps", type=int, default=0, help="linear warm-up from 0")
    optim.add_argument("--weight-decay", type=float, default=0.0)
    optim.add_argument("--adam-betas", type=float, nargs=2, default=(0.9, 0.999), metavar=("BETA1", "BETA2"))
    optim.add_argument("--grad-clip", type=float, default=0.0, help="max gradient norm (0: no clipping)")
    optim.add_argument("--ema-decay", type=float, default=0.9999, help="EMA rate (constant from a copy, as DiT)")
    optim.add_argument("--ema-warmup", action="store_true", help="ramp the rate as diffusers' EMAModel does")
    recipe.add_runtime_arguments(
        parser,
        sample_steps=25,
        sample_steps_help="DPM-Solver steps of the sample grids",
    )
    return parser


def _validate(args) -> None:
    """The checks that need only the flags."""
    owner = "train-dit"
    for name in ("num_layers", "num_attention_heads", "attention_head_dim", "patch_size", "max_steps", "batch_size"):
        check_int(owner, f"--{name.replace('_', '-')}", getattr(args, name))
    for name in ("checkpoint_every", "keep_checkpoints", "log_every", "sample_steps", "sample_images"):
        check_int(owner, f"--{name.replace('_', '-')}", getattr(args, name))
    for name in ("warmup_steps", "sample_every", "seed"):
        check_int(owner, f"--{name.replace('_', '-')}", getattr(args, name), minimum=0)
    check_float(owner, "--class-dropout-prob", args.class_dropout_prob, 0.0, 1.0, high_inclusive=False)
    check_float(owner, "--lr", args.lr, 1e-12, 10.0)
    check_float(owner, "--min-lr", args.min_lr, 0.0, args.lr)
    for name in ("weight_decay", "grad_clip"):
        check_float(owner, f"--{name.replace('_', '-')}", getattr(args, name), 0.0, math.inf)
    for beta in args.adam_betas:
        check_float(owner, "--adam-betas", beta, 0.0, 1.0, high_inclusive=False)
    check_float(owner, "--ema-decay", args.ema_decay, 0.0, 1.0)
    check_float(owner, "--sample-guidance", args.sample_guidance, 1.0, math.inf)
    check_float(owner, "--checkpoint-minutes", args.checkpoint_minutes, 0.0, math.inf)
    args.mixed_precision = check_mixed_precision(
        owner, args.mixed_precision, args.cpu or not torch.cuda.is_available()
    )


def run(args: argparse.Namespace) -> DiTTrainingModel:
    """Train a DiT on cached latents; save a DiTPipeline with the EMA weights to ``<output-dir>/pipeline``.

    Returns the trained model (the live weights; the saved pipeline holds the EMA weights).
    """
    from accelerate import Accelerator

    from . import loop
    from .checkpointing import JsonlLog, resume_point
    from .latent_cache import load_cache_vae

    _validate(args)
    output_dir = Path(args.output_dir)
    resume_from = resume_point("train-dit", args.resume, output_dir)
    compared = compared_parameters(args.compare_parameters) if args.compare_parameters else None
    dataset, info = loop.load_latents("train-dit", args.latents, args.batch_size)
    schedule = recipe.Recipe(
        lr=args.lr,
        effective_batch_size=args.batch_size,
        steps_per_epoch=len(dataset) // args.batch_size,
        warmup_steps=args.warmup_steps,
        max_steps=args.max_steps,
        lr_schedule=args.lr_schedule,
        min_lr=args.min_lr,
    )
    accelerator = Accelerator(mixed_precision=args.mixed_precision, cpu=args.cpu or not torch.cuda.is_available())
    loop.check_processes("train-dit", accelerator, args.batch_size)
    vae = load_cache_vae("train-dit", args.latents, info, args.vae)  # up front: a wrong VAE fails now
    torch.manual_seed(args.seed)
    model = DiTTrainingModel(build_transformer(info, args), args.class_dropout_prob)
    optimizer = _optimizer(model, args)
    ema = recipe.make_ema(model.parameters(), args.ema_decay, warmup=args.ema_warmup)
    model, optimizer = accelerator.prepare(model, optimizer)
    unwrapped = accelerator.unwrap_model(model)
    parts = {"model": model, "optimizer": optimizer, "ema": ema}
    sample = functools.partial(_ema_pipeline, unwrapped, ema, vae, info, args)

    log = JsonlLog(output_dir / "train_log.jsonl", enabled=accelerator.is_main_process)
    details = _run_details(unwrapped.transformer, compared, info)
    start_step = loop.load_resume(accelerator, resume_from, log, parts)
    if resume_from is not None:
        accelerator.print(f"resumed from {resume_from} at step {start_step}")
    this_run = {"args": loop.run_flags(args)}
    loop.write_run_config(accelerator, output_dir, log, this_run, details, start_step, resumed=resume_from is not None)
    accelerator.print(
        f"DiT: {details['parameters']['dit_transformer']:,} parameters"
        + (f"; compared generator: {compared['generator_total']:,}" if compared else "")
    )

    steps = loop.Steps(accelerator, args, log, parts, sample, start_step, schedule.max_steps, "train-dit")
    for step in steps:
        model.train()
        lr = schedule.lr_at(step)
        recipe.set_lr(optimizer, lr)
        step_loss = _update(accelerator, model, optimizer, dataset, info, step, args)
        ema.step(unwrapped.parameters())
        steps.end(step, step_loss, {"lr": lr})

    loop.save_final_pipeline(accelerator, sample, output_dir, "DiTPipeline")
    return unwrapped


def _optimizer(model: DiTTrainingModel, args) -> torch.optim.AdamW:
    """AdamW over the trainable parameters, one group ``all`` at ``--weight-decay``."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"name": "all", "params": params, "lr_scale": 1.0, "weight_decay": args.weight_decay}]
    return torch.optim.AdamW(groups, lr=args.lr, betas=tuple(args.adam_betas))


def _run_details(transformer: NullClassDiTTransformer2DModel, compared: dict | None, info: dict) -> dict:
    """What the run is, for run_config.json: the transformer's config, the diffusion, the latent scaling, the
    parameter counts (beside ``compared``'s, when ``--compare-parameters`` is given) and the latent cache."""
    from ..info import count_parameters

    parameters = {"dit_transformer": count_parameters(transformer)}
    if compared is not None:
        parameters["compared"] = compared
        parameters["ratio_to_compared"] = parameters["dit_transformer"] / compared["generator_total"]
    return {
        "transformer": {k: v for k, v in transformer.config.items() if not k.startswith("_")},
        "noise_schedule": NOISE_SCHEDULE,
        "latent_scaling": LATENT_SCALING,
        "parameters": parameters,
        "latent_cache": info,
    }


def _update(accelerator, model, optimizer, dataset, info: dict, step: int, args) -> float:
    """Optimizer update ``step`` on global batch ``step``; returns its loss, the mean over the processes."""
    from ..data import derived_seed
    from . import loop

    generator = torch.Generator().manual_seed(derived_seed(args.seed, step, 0, accelerator.process_index))
    # shift_factor 0.0: the DiT learns z * scaling_factor (LATENT_SCALING)
    latents, labels = loop.read_batch(accelerator, dataset, info, step, generator, args.batch_size, args.seed, 0.0)
    loss = model(latents, labels, generator=generator)  # the prepared model autocasts (bf16)
    accelerator.backward(loss)
    if args.grad_clip > 0:
        accelerator.clip_grad_norm_(model.parameters(), args.grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return accelerator.reduce(loss.detach(), reduction="mean").item()


def _ema_pipeline(model: DiTTrainingModel, ema, vae, info: dict, args, grid_path: Path):
    """A DiTPipeline holding a copy of the EMA weights, and a sample grid (one image per class) from it."""
    from diffusers import DiTPipeline, DPMSolverMultistepScheduler

    from .loop import save_sample_grid

    ema.store(model.parameters())
    ema.copy_to(model.parameters())
    transformer = copy.deepcopy(model.transformer).float().eval()
    ema.restore(model.parameters())
    scheduler = DPMSolverMultistepScheduler.from_config(model.noise_scheduler.config)
    id2label = {int(k): v for k, v in info["id2label"].items()} if info.get("id2label") else None
    pipe = DiTPipeline(transformer, vae.to(transformer.device).eval(), scheduler, id2label=id2label)
    if id2label is not None:  # DiTPipeline takes id2label but does not register it: saved only this way
        pipe.register_to_config(id2label=id2label)
    caption = (lambda i: id2label[i].split(",")[0]) if id2label else str
    save_sample_grid(pipe, info["num_classes"], args, grid_path, caption)
    return pipe
