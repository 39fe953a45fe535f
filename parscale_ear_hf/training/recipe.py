"""The optimisation recipe of generator training, as EAR's ``main_ear.py`` runs it: the flags, the
learning rate from ``--blr``, the AdamW parameter groups, the warm-up + constant / cosine schedule and
the EMA.

The learning rate is a pure function of the step and the flags (:meth:`Recipe.lr_at`, set on every
group by :func:`set_lr` before each update, as EAR's ``util/lr_sched.py`` does), so no scheduler
state is saved: a run resumed with a new ``--lr`` / ``--blr`` trains at the new rate from its first
step. :func:`flags_win` keeps the same promise for every other hyper-parameter that a checkpoint
would otherwise restore.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import math

import torch
import torch.nn as nn
from diffusers.training_utils import EMAModel

from ..models._checks import MIXED_PRECISION_HELP, check_float, check_int
from .checkpointing import CHECKPOINT_MINUTES, CHECKPOINT_MINUTES_HELP

PARAM_GROUPS = ("reference", "parscale-v0")
LR_SCHEDULES = ("constant", "cosine")
HEAD_PREFIX = "energy_head."  # EAR's "scoreloss" module


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The recipe's flags (EAR's ``main_ear.py`` names in the help; the README maps them one by one)."""
    optim = parser.add_argument_group("optimisation (EAR's recipe; the README maps main_ear.py's flags)")
    length = optim.add_mutually_exclusive_group(required=True)
    length.add_argument("--max-steps", type=int, default=None, help="optimizer updates")
    length.add_argument(
        "--epochs", type=int, default=None, help="passes over the latent cache (EAR: --epochs); sets --max-steps"
    )
    optim.add_argument(
        "--batch-size", type=int, default=64, help="images per micro-step over all processes (as in train_vae.py)"
    )
    optim.add_argument("--gradient-accumulation-steps", type=int, default=1, help="EAR: --accumulation_steps")
    rate = optim.add_mutually_exclusive_group()
    rate.add_argument(
        "--blr",
        type=float,
        default=1e-4,
        help="base learning rate (default 1e-4, EAR's): lr = blr * batch-size * gradient-accumulation-steps / 256",
    )
    rate.add_argument("--lr", type=float, default=None, help="absolute learning rate; replaces --blr")
    optim.add_argument(
        "--lr-schedule", choices=LR_SCHEDULES, default="constant", help="after the warm-up (EAR: constant)"
    )
    optim.add_argument("--min-lr", type=float, default=0.0, help="where the cosine schedule ends")
    warmup = optim.add_mutually_exclusive_group()
    warmup.add_argument("--warmup-steps", type=int, default=100, help="linear warm-up from 0 (default 100 steps)")
    warmup.add_argument(
        "--warmup-epochs", type=int, default=None, help="warm-up in epochs (EAR: 100); replaces --warmup-steps"
    )
    optim.add_argument(
        "--param-groups",
        choices=PARAM_GROUPS,
        default="reference",
        help="weight-decay and lr groups: EAR's add_weight_decay_scorelr, or parscale-v0 (the shipped demo models')",
    )
    optim.add_argument(
        "--head-lr-scale",
        type=float,
        default=0.25,
        help="energy-head weights train at lr * this (EAR: --score_lrscale 0.25; without it training collapses)",
    )
    optim.add_argument("--weight-decay", type=float, default=0.02)
    optim.add_argument(
        "--adam-betas", type=float, nargs=2, default=(0.9, 0.95), metavar=("BETA1", "BETA2"), help="AdamW betas"
    )
    optim.add_argument("--grad-clip", type=float, default=3.0, help="max gradient norm (0 disables clipping)")
    optim.add_argument("--ema-decay", "--ema-rate", dest="ema_decay", type=float, default=0.9999, help="EMA rate")
    optim.add_argument(
        "--ema-warmup",
        action="store_true",
        help="the rate grows as min(rate, (1+t)/(10+t)) (diffusers' EMAModel, the shipped demo models'); "
        "default: EAR's constant rate from step 0",
    )
    optim.add_argument(
        "--energy-lambda",
        "--train-temperature",
        dest="energy_lambda",
        type=float,
        default=1.0,
        help="weight of the energy score's repulsive term, in [0, 1] (EAR: --train_temperature, 0.99 late)",
    )
    optim.add_argument(
        "--score-batch-mul",
        type=int,
        default=2,
        help="copies of each target, each with its own pair of head samples (EAR's recipe: 2; 1 is one pair)",
    )
    optim.add_argument(
        "--diffusion-batch-mul",
        type=int,
        default=4,
        help="with a 'diffusion_head' model config: timesteps drawn per target (MAR's --diffusion_batch_mul, 4)",
    )


def add_runtime_arguments(parser: argparse.ArgumentParser, *, sample_steps: int, sample_steps_help: str) -> None:
    """The runtime flags every generator trainer shares (seed, precision, checkpoints, logs, sample grids)."""
    run_args = parser.add_argument_group("runtime")
    run_args.add_argument("--seed", type=int, default=0)
    # No argparse choices: `check_mixed_precision` refuses a value with the device and the reason (fp16: use bf16).
    run_args.add_argument("--mixed-precision", default=None, metavar="{no,bf16}", help=MIXED_PRECISION_HELP)
    run_args.add_argument("--cpu", action="store_true", help="force CPU (gloo between processes)")
    run_args.add_argument(
        "--checkpoint-every",
        type=int,
        default=500,
        help="steps between the checkpoints that are kept (the newest --keep-checkpoints of them), and one at the end",
    )
    run_args.add_argument(
        "--checkpoint-minutes",
        type=float,
        default=CHECKPOINT_MINUTES,
        help=CHECKPOINT_MINUTES_HELP,
    )
    run_args.add_argument("--keep-checkpoints", type=int, default=2)
    run_args.add_argument("--resume", default=None, help="'latest' or a checkpoint folder")
    run_args.add_argument("--log-every", type=int, default=10)
    run_args.add_argument("--sample-every", type=int, default=0, help="sample grid every N steps (0: only at the end)")
    run_args.add_argument("--sample-steps", type=int, default=sample_steps, help=sample_steps_help)
    run_args.add_argument("--sample-guidance", type=float, default=3.0, help="CFG scale of the sample grids (>= 1)")
    run_args.add_argument(
        "--sample-images",
        type=int,
        default=10,
        help="images in a sample grid, one per class from class 0 (at most the classes; default 10)",
    )


def check_flags(args: argparse.Namespace) -> None:
    """The recipe checks that need only the flags (the epoch-based ones follow in :func:`resolve`)."""
    for name in ("batch_size", "gradient_accumulation_steps", "score_batch_mul", "diffusion_batch_mul"):
        check_int("train", f"--{name.replace('_', '-')}", getattr(args, name))
    for name in ("max_steps", "epochs"):
        if getattr(args, name) is not None:
            check_int("train", f"--{name.replace('_', '-')}", getattr(args, name))
    for name in ("warmup_steps", "warmup_epochs"):
        if getattr(args, name) is not None:
            check_int("train", f"--{name.replace('_', '-')}", getattr(args, name), minimum=0)
    if args.lr is not None:
        check_float("train", "--lr", args.lr, 1e-12, 10.0)
    else:
        check_float("train", "--blr", args.blr, 1e-12, 10.0)
    check_float("train", "--min-lr", args.min_lr, 0.0, peak_lr(args))
    for name in ("head_lr_scale", "weight_decay", "grad_clip"):
        check_float("train", f"--{name.replace('_', '-')}", getattr(args, name), 0.0, math.inf)
    for beta in args.adam_betas:
        check_float("train", "--adam-betas", beta, 0.0, 1.0, high_inclusive=False)
    check_float("train", "--ema-decay", args.ema_decay, 0.0, 1.0)
    check_float("train", "--energy-lambda", args.energy_lambda, 0.0, 1.0)
    if args.lr_schedule not in LR_SCHEDULES:
        raise ValueError(f"train: `--lr-schedule` must be one of {LR_SCHEDULES}, got {args.lr_schedule!r}.")
    if args.param_groups not in PARAM_GROUPS:
        raise ValueError(f"train: `--param-groups` must be one of {PARAM_GROUPS}, got {args.param_groups!r}.")


def peak_lr(args: argparse.Namespace) -> float:
    """``--lr``, or EAR's ``blr * effective batch / 256`` (our ``--batch-size`` is already over all processes)."""
    if args.lr is not None:
        return args.lr
    return args.blr * args.batch_size * args.gradient_accumulation_steps / 256


@dataclasses.dataclass(frozen=True)
class Recipe:
    """The schedule of one run, resolved from the flags and the latent cache (recorded in run_config.json)."""

    lr: float
    effective_batch_size: int
    steps_per_epoch: float
    warmup_steps: float
    max_steps: int
    lr_schedule: str
    min_lr: float

    def lr_at(self, step: int) -> float:
        """The learning rate of update ``step`` (0-based), as EAR's ``adjust_learning_rate`` at epoch
        ``step / steps_per_epoch`` (:func:`lr_at_step`)."""
        return lr_at_step(
            step,
            lr=self.lr,
            warmup_steps=self.warmup_steps,
            max_steps=self.max_steps,
            schedule=self.lr_schedule,
            min_lr=self.min_lr,
        )


def lr_at_step(
    step: int, *, lr: float, warmup_steps: float, max_steps: int, schedule: str, min_lr: float = 0.0
) -> float:
    """The learning rate of update ``step`` (0-based), the schedule of every trainer: linear from 0 over
    ``warmup_steps`` (``lr * step / warmup_steps``), then ``lr`` (``schedule="constant"``) or a half cosine from
    ``lr`` at the end of the warm-up down to ``min_lr`` at ``max_steps`` (``"cosine"``).

    A pure function of the step, so a resumed run needs no scheduler state.
    """
    if step < warmup_steps:
        return lr * (step / warmup_steps)
    if schedule == "constant":
        return lr
    if schedule != "cosine":
        raise ValueError(f"lr_at_step: `schedule` must be one of {LR_SCHEDULES}, got {schedule!r}.")
    progress = (step - warmup_steps) / (max_steps - warmup_steps)
    return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def resolve(args: argparse.Namespace, num_examples: int) -> Recipe:
    """The run's :class:`Recipe`. An epoch is one pass of the data order over the cache's complete
    micro-batches (``parscale_ear_hf.data.batch_indices``): ``(num_examples // batch_size) / accumulation`` updates."""
    accumulation = args.gradient_accumulation_steps
    micro_batches = num_examples // args.batch_size
    max_steps = args.max_steps if args.epochs is None else -(-args.epochs * micro_batches // accumulation)
    warmup = args.warmup_steps if args.warmup_epochs is None else args.warmup_epochs * micro_batches / accumulation
    return Recipe(
        lr=peak_lr(args),
        effective_batch_size=args.batch_size * accumulation,
        steps_per_epoch=micro_batches / accumulation,
        warmup_steps=warmup,
        max_steps=max_steps,
        lr_schedule=args.lr_schedule,
        min_lr=args.min_lr,
    )


def param_groups(
    model: nn.Module, scheme: str = "reference", head_lr_scale: float = 0.25, weight_decay: float = 0.02
) -> list[dict]:
    """AdamW parameter groups, each ``{"name", "params", "lr_scale", "weight_decay"}``; :func:`set_lr`
    sets each group's lr to the schedule's times its ``lr_scale``.

    ``"reference"`` is EAR's ``add_weight_decay_scorelr``, with the energy head (prefix
    ``energy_head.``) as its ``scoreloss``: 1-d parameters and biases, head included, at lr x 1 and no
    decay (``no_decay``); the other head parameters at lr x ``head_lr_scale`` and no decay (``head``);
    everything else decays at lr x 1 (``decay``). "Everything else" is the backbone, where EAR decays
    its embeddings too (class embedding and null class, mask token, positions, z_proj); the parts EAR
    does not have follow the same rule because they play the same roles: the ParScale stream prefixes
    are learned buffer embeddings like EAR's, the stream aggregator is an MLP of the backbone, and
    LiteHybrid transforms the tokens on their way into the backbone, as z_proj does.

    ``"parscale-v0"`` are the groups that trained the shipped demo models: no decay on 1-d
    parameters and on any name holding "embedding", "prefix" or "token" (which includes the
    backbone's token projection), and the whole head, biases too, at lr x ``head_lr_scale``.
    """
    if scheme not in PARAM_GROUPS:
        raise ValueError(f"param_groups: `scheme` must be one of {PARAM_GROUPS}, got {scheme!r}.")
    if scheme == "reference":
        groups = {
            "no_decay": {"lr_scale": 1.0, "weight_decay": 0.0},
            "decay": {"lr_scale": 1.0, "weight_decay": weight_decay},
            "head": {"lr_scale": head_lr_scale, "weight_decay": 0.0},
        }
    else:
        groups = {
            f"{part}_{decay}": {
                "lr_scale": head_lr_scale if part == "head" else 1.0,
                "weight_decay": weight_decay if decay == "decay" else 0.0,
            }
            for part in ("backbone", "head")
            for decay in ("no_decay", "decay")
        }
    members = {name: [] for name in groups}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        is_head = name.startswith(HEAD_PREFIX)
        if scheme == "reference":
            if param.dim() == 1 or name.endswith(".bias"):
                group = "no_decay"
            else:
                group = "head" if is_head else "decay"
        else:
            decays = param.dim() >= 2 and not any(word in name for word in ("embedding", "prefix", "token"))
            group = f"{'head' if is_head else 'backbone'}_{'decay' if decays else 'no_decay'}"
        members[group].append(param)
    return [{"name": name, "params": members[name], **groups[name]} for name in groups if members[name]]


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Every group's lr = ``lr`` x its ``lr_scale`` (EAR's ``adjust_learning_rate``)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group["lr_scale"]


class ConstantRateEMA(EMAModel):
    """EAR's EMA (``engine_ear.update_ema``): the shadow starts as a copy of the parameters and after
    every update becomes ``rate * shadow + (1 - rate) * param``, at the same rate from the first update.

    diffusers' ``EMAModel`` copies the parameters at the first update and then ramps its rate as
    ``min(rate, (1+t)/(10+t))``; only the rate differs, so saving, loading and ``copy_to`` are its own.
    """

    def get_decay(self, optimization_step: int) -> float:
        return self.decay


def make_ema(parameters, rate: float, warmup: bool) -> EMAModel:
    """EAR's constant-rate EMA, or (``warmup``) diffusers' ``EMAModel`` as the shipped demo models used."""
    return (EMAModel if warmup else ConstantRateEMA)(parameters, decay=rate)


@contextlib.contextmanager
def flags_win(optimizer: torch.optim.Optimizer, ema: EMAModel | None):
    """Around loading a checkpoint: it restores the state (AdamW moments, EMA weights, step counts),
    while the hyper-parameters stay this run's flags (lr scales, weight decay, betas, EMA rate).

    ``Optimizer.load_state_dict`` and ``EMAModel.load_state_dict`` would restore the checkpoint's,
    which would silently undo e.g. EAR's second phase, a new run resumed with a lower ``--blr``.
    ``ema`` is None for a run without one (the VAE's).
    """
    groups = [{k: v for k, v in group.items() if k != "params"} for group in optimizer.param_groups]
    rate = ema.decay if ema is not None else None
    yield
    for group, ours in zip(optimizer.param_groups, groups):
        group.update(ours)
    if ema is not None:
        ema.decay = rate
