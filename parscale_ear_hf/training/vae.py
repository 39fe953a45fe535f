"""Train a LiteVAE with `accelerate`: L1 + KL + wavelet high-frequency loss, held-out PSNR, and the
latent ``shift_factor`` / ``scaling_factor`` measured on training images at the end.

    accelerate launch examples/train_vae.py --dataset data/mnist_demo --output-dir outputs/vae ...

Losses are element means: L1 over pixels, KL over latent elements, the wavelet loss over the high
bands, so the weights do not depend on the image or latent size. The KL weight is small (default
1e-6 per latent element, about 50x SD's 1e-6 on sums at f8/c4): it keeps the latents' scale
bounded at no cost in reconstruction, and, as in SD's VAE, the posterior becomes nearly
deterministic (on the MNIST demo its std falls to ~1e-3 while the means have std ~1); raise it
(e.g. 1e-4) for a noisier, smoother posterior at some cost in PSNR.

The loop is the one the generator trainers share (``loop``), and the learning rate is theirs too
(:func:`~.recipe.lr_at_step`: linear warm-up from 0, then constant or a half cosine down to ``--min-lr``).
Training is reproducible by step: the data order (:func:`~parscale_ear_hf.data.batch_indices`) and the
posterior noise are functions of the seed and the step, never of a DataLoader's internal state, so a run
resumed from a checkpoint ends with the same weights as one that was never interrupted, whichever step the
checkpoint was saved at: a kept one every ``--checkpoint-every`` steps, or the interim one saved when
``--checkpoint-minutes`` (default 5) have passed since the last save, so that a kill loses minutes of
training. A fresh start is refused over checkpoints and moves an earlier run's log and run_config.json aside
(``checkpointing``). Each process takes its slice of every global batch and of its noise, so a run on several
processes matches a one-process run up to the order of floating-point sums.
"""

from __future__ import annotations

import argparse
import json
import math
from contextlib import nullcontext
from pathlib import Path

import torch
from accelerate import Accelerator
from tqdm.auto import tqdm

from ..data import (
    StepBatchSampler,
    add_dataset_arguments,
    derived_seed,
    image_loader,
    load_dataset_from_args,
    shard_for_process,
)
from ..models._checks import MIXED_PRECISION_HELP, check_float, check_int, check_mixed_precision
from ..models.lite_vae import LiteVAE
from ..results import write_results
from . import loop, recipe
from .checkpointing import CHECKPOINT_MINUTES, CHECKPOINT_MINUTES_HELP, JsonlLog, read_checkpoint_state, resume_point
from .objectives import VAETrainingModel
from .recipe import lr_at_step

# Command-line flag -> LiteVAE config field, for the architecture fields people change most.
CONFIG_FLAGS = {
    "image_size": "sample_size",
    "levels": "levels",
    "latent_channels": "latent_channels",
    "encoder_channels": "encoder_channels",
    "encoder_layers_per_level": "encoder_layers_per_level",
    "aggregation_channels": "aggregation_channels",
    "aggregation_layers": "aggregation_layers",
    "decoder_channels": "decoder_block_out_channels",
    "decoder_layers_per_block": "decoder_layers_per_block",
    "norm_num_groups": "norm_num_groups",
}
LOG_FILE = "train_vae_log.jsonl"
LOSSES = ("loss", "l1", "kl", "wavelet")  # what VAETrainingModel returns, in the log


def _vae_loader(
    vae: LiteVAE, dataset, accelerator: Accelerator | None, batch_size: int, num_workers: int, allow_upsampling: bool
):
    """This process's shard of ``dataset``, preprocessed to the VAE's size and channels."""
    rank, world_size = _rank_and_world(accelerator)
    return image_loader(
        shard_for_process(dataset, rank, world_size),
        vae.config.sample_size,
        vae.config.in_channels,
        batch_size=batch_size,
        num_workers=num_workers,
        allow_upsampling=allow_upsampling,
    )


def _rank_and_world(accelerator: Accelerator | None) -> tuple[int, int]:
    return (accelerator.process_index, accelerator.num_processes) if accelerator is not None else (0, 1)


@torch.no_grad()
def heldout_psnr(
    vae: LiteVAE,
    dataset,
    *,
    batch_size: int = 64,
    accelerator: Accelerator | None = None,
    num_workers: int = 0,
    allow_upsampling: bool = False,
) -> float:
    """Mean over images of ``10 * log10(1 / mse)`` between images and reconstructions in [0, 1].

    Reconstructions decode the posterior mode and are clamped to the image range. With an
    ``accelerator``, each process scores its shard and the sums are reduced.

    Args:
        vae: model to score, images resized to ``vae.config.sample_size``.
        dataset: map-style or streamed dataset with an "image" column.

    Returns:
        The PSNR in dB, as a float.
    """
    device = accelerator.device if accelerator is not None else vae.device
    totals = torch.zeros(2, dtype=torch.float64, device=device)
    loader = _vae_loader(vae, dataset, accelerator, batch_size, num_workers, allow_upsampling)
    for batch in loader:
        images = batch["pixel_values"].to(device)
        reconstruction = vae(images).sample.float().clamp(-1, 1)
        mse = ((reconstruction - images) / 2).pow(2).flatten(1).mean(1).double()
        totals += torch.stack([(10 * torch.log10(1 / mse.clamp_min(1e-10))).sum(), mse.new_tensor(len(mse))])
    if accelerator is not None:
        totals = accelerator.reduce(totals, reduction="sum")
    return (totals[0] / totals[1]).item()


@torch.no_grad()
def measure_latent_scale(
    vae: LiteVAE,
    dataset,
    *,
    batch_size: int = 64,
    max_images: int | None = 10_000,
    accelerator: Accelerator | None = None,
    num_workers: int = 0,
    allow_upsampling: bool = False,
) -> tuple[float, float]:
    """``shift_factor`` (mean) and ``scaling_factor`` (1 / std) of posterior samples, over all latent
    elements of the first ``max_images`` images of ``dataset`` (all when None).

    Scaled latents ``(z - shift_factor) * scaling_factor`` then have mean 0 and std 1 on these images.
    The moments are exact expectations over the posterior (``E[z] = mean``, ``E[z^2] = mean^2 + var``),
    so no sampling noise enters and the result does not depend on the number of processes.

    Returns:
        ``(shift_factor, scaling_factor)`` as floats.
    """
    device = accelerator.device if accelerator is not None else vae.device
    if max_images is not None and max_images < len(dataset):
        dataset = dataset.select(range(max_images))
    sums = torch.zeros(3, dtype=torch.float64, device=device)
    loader = _vae_loader(vae, dataset, accelerator, batch_size, num_workers, allow_upsampling)
    for batch in loader:
        posterior = vae.encode(batch["pixel_values"].to(device)).latent_dist
        mean, var = posterior.mean.double(), posterior.var.double()
        sums += torch.stack([mean.sum(), (mean.pow(2) + var).sum(), mean.new_tensor(mean.numel())])
    if accelerator is not None:
        sums = accelerator.reduce(sums, reduction="sum")
    mean = sums[0] / sums[2]
    std = (sums[1] / sums[2] - mean**2).clamp_min(1e-12).sqrt()
    return mean.item(), (1 / std).item()


def vae_config_from_args(args: argparse.Namespace) -> dict:
    """LiteVAE kwargs: ``--vae-config`` JSON (if given), then the architecture flags that were set."""
    config = {}
    if args.vae_config is not None:
        with open(args.vae_config, encoding="utf-8") as f:
            config = {k: v for k, v in json.load(f).items() if not k.startswith("_")}
    for flag, field in CONFIG_FLAGS.items():
        value = getattr(args, flag)
        if value is not None:
            config[field] = tuple(value) if isinstance(value, list) else value
    if args.channels is not None:
        config["in_channels"] = config["out_channels"] = args.channels
    in_channels, out_channels = config.get("in_channels", 3), config.get("out_channels", 3)
    if in_channels != out_channels:
        raise ValueError(
            f"train_vae: the reconstruction loss needs `in_channels` == `out_channels`, got {in_channels} and "
            f"{out_channels}; use --channels to set both."
        )
    return config


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The flags of :func:`run`."""
    add_dataset_arguments(parser, labels=False)
    parser.add_argument("--eval-split", default=None, help="held-out split for PSNR (e.g. 'heldout'); none: no eval")
    parser.add_argument("--output-dir", required=True, help="checkpoints/, vae/ and the loss log go here")
    parser.add_argument("--results-file", default=None, help="write the final held-out PSNR here (results JSON)")

    model = parser.add_argument_group("model (LiteVAE config; flags override --vae-config)")
    model.add_argument("--vae-config", default=None, help="JSON file of LiteVAE kwargs")
    model.add_argument("--image-size", type=int, default=None, help="training image size (config sample_size)")
    model.add_argument("--channels", type=int, default=None, choices=(1, 3), help="image channels (in and out)")
    model.add_argument("--levels", type=int, default=None, help="Haar levels: downsampling factor 2**levels")
    model.add_argument("--latent-channels", type=int, default=None)
    model.add_argument("--encoder-channels", type=int, nargs="+", default=None, help="one width per level")
    model.add_argument("--encoder-layers-per-level", type=int, default=None)
    model.add_argument("--aggregation-channels", type=int, default=None)
    model.add_argument("--aggregation-layers", type=int, default=None)
    model.add_argument("--decoder-channels", type=int, nargs="+", default=None, help="levels + 1 block widths")
    model.add_argument("--decoder-layers-per-block", type=int, default=None)
    model.add_argument("--norm-num-groups", type=int, default=None)

    train = parser.add_argument_group("training")
    train.add_argument("--max-steps", type=int, default=1000, help="optimizer steps")
    train.add_argument("--batch-size", type=int, default=64, help="global batch per micro-step, all processes")
    train.add_argument("--gradient-accumulation-steps", type=int, default=1)
    train.add_argument("--lr", type=float, default=1e-4, help="peak learning rate")
    train.add_argument("--lr-schedule", default="constant", choices=recipe.LR_SCHEDULES, help="after warmup")
    train.add_argument("--lr-warmup-steps", type=int, default=0, help="linear warm-up from 0")
    train.add_argument("--min-lr", type=float, default=0.0, help="where the cosine schedule ends")
    train.add_argument("--weight-decay", type=float, default=0.0)
    train.add_argument("--max-grad-norm", type=float, default=1.0, help="0 disables clipping")
    train.add_argument("--kl-weight", type=float, default=1e-6, help="KL weight, per latent element")
    train.add_argument("--wavelet-weight", type=float, default=0.1, help="weight of the wavelet high-band L1")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--mixed-precision", default=None, metavar="{no,bf16}", help=MIXED_PRECISION_HELP)
    train.add_argument("--cpu", action="store_true", help="train on CPU even when a GPU is present")
    train.add_argument("--num-workers", type=int, default=0, help="DataLoader workers decoding images")
    train.add_argument("--log-every", type=int, default=10, help="steps between loss-log lines")
    train.add_argument("--eval-every", type=int, default=500, help="steps between held-out PSNRs (0: end only)")
    train.add_argument("--eval-batch-size", type=int, default=128)
    train.add_argument(
        "--checkpoint-every",
        type=int,
        default=500,
        help="steps between the checkpoints that are kept, and one at the end (0: none)",
    )
    train.add_argument(
        "--checkpoint-minutes",
        type=float,
        default=CHECKPOINT_MINUTES,
        help=CHECKPOINT_MINUTES_HELP,
    )
    train.add_argument("--keep-checkpoints", type=int, default=2)
    train.add_argument("--resume", default=None, help="'latest' or a checkpoint folder")
    train.add_argument("--scaling-images", type=int, default=10_000, help="images for the latent scale (max)")
    return parser


def _check_arguments(args: argparse.Namespace) -> tuple[dict, Path | None]:
    """Everything about the flags that can be wrong, checked before any data is read; returns the
    LiteVAE config and the checkpoint to resume from (or None)."""
    for name in (
        "max_steps", "batch_size", "gradient_accumulation_steps", "eval_batch_size", "keep_checkpoints", "log_every",
        "scaling_images",
    ):  # fmt: skip
        check_int("train_vae", f"--{name.replace('_', '-')}", getattr(args, name))
    for name in ("lr_warmup_steps", "eval_every", "checkpoint_every", "num_workers", "seed"):
        check_int("train_vae", f"--{name.replace('_', '-')}", getattr(args, name), minimum=0)
    check_float("train_vae", "--lr", args.lr, 1e-12, 10.0)
    check_float("train_vae", "--min-lr", args.min_lr, 0.0, args.lr)
    for name in ("weight_decay", "max_grad_norm", "kl_weight", "wavelet_weight", "checkpoint_minutes"):
        check_float("train_vae", f"--{name.replace('_', '-')}", getattr(args, name), 0.0, math.inf)
    if args.streaming:
        raise ValueError(
            "train_vae: --streaming is not supported for VAE training, which reads batches by index from a "
            "map-style dataset; drop --streaming (cache the images locally, e.g. with save_to_disk)."
        )
    if args.results_file is not None and args.eval_split is None:
        raise ValueError("train_vae: --results-file records the held-out PSNR, so it needs --eval-split.")
    config = vae_config_from_args(args)
    resume_path = resume_point("train_vae", args.resume, args.output_dir)
    if resume_path is not None:
        trained = read_checkpoint_state(resume_path).get("vae_config")
        if trained != json.loads(json.dumps(config)):
            raise ValueError(
                f"train_vae: --resume {str(resume_path)!r} was trained with the LiteVAE config {trained}, not "
                f"{config}; pass the same model flags."
            )
    return config, resume_path


def _load_splits(args: argparse.Namespace):
    """The training split and the held-out one (None without ``--eval-split``)."""
    train_set = load_dataset_from_args(args, args.split)
    if len(train_set) < args.batch_size:
        raise ValueError(
            f"train_vae: --batch-size {args.batch_size} is larger than split {args.split!r} ({len(train_set)} images)."
        )
    eval_set = load_dataset_from_args(args, args.eval_split) if args.eval_split else None
    return train_set, eval_set


def _training_batches(accelerator, train_set, vae: LiteVAE, start_step: int, args: argparse.Namespace):
    """This process's micro-batches of updates ``start_step ..`` (``--gradient-accumulation-steps`` an update): its
    slices of global batches :func:`~parscale_ear_hf.data.batch_indices` of the seed, images at the VAE's size."""
    accumulation = args.gradient_accumulation_steps
    sampler = StepBatchSampler(
        len(train_set), args.batch_size, args.seed, start_step * accumulation, args.max_steps * accumulation,
        rank=accelerator.process_index, world_size=accelerator.num_processes,
    )  # fmt: skip
    return iter(
        image_loader(
            train_set, vae.config.sample_size, vae.config.in_channels,
            batch_sampler=sampler, num_workers=args.num_workers, allow_upsampling=args.allow_upsampling,
        )
    )  # fmt: skip


def _posterior_noise(accelerator, vae: LiteVAE, index: int, per_rank: int, args: argparse.Namespace) -> torch.Tensor:
    """This process's slice of the posterior noise of micro-batch ``index``, `(per_rank, C, h, w)`.

    The noise is drawn for the whole global batch and each process takes its slice: the run is the same for any
    number of processes.
    """
    latent_size = vae.config.sample_size // vae.spatial_compression
    generator = torch.Generator().manual_seed(derived_seed(args.seed, index))
    noise = torch.randn((args.batch_size, vae.config.latent_channels, latent_size, latent_size), generator=generator)
    rank = accelerator.process_index
    return noise[rank * per_rank : (rank + 1) * per_rank].to(accelerator.device)


def _update(accelerator, model, optimizer, batches, step: int, args: argparse.Namespace) -> dict[str, float]:
    """Optimizer update ``step`` from ``--gradient-accumulation-steps`` micro-batches; returns its losses ("loss",
    "l1", "kl", "wavelet"), each the mean over the micro-batches and the processes."""
    accumulation, vae = args.gradient_accumulation_steps, accelerator.unwrap_model(model).vae
    totals = torch.zeros(4, device=accelerator.device)
    for micro_step in range(accumulation):
        images = next(batches)["pixel_values"].to(accelerator.device)
        noise = _posterior_noise(accelerator, vae, step * accumulation + micro_step, len(images), args)
        with accelerator.no_sync(model) if micro_step < accumulation - 1 else nullcontext():
            losses = model(images, noise)
            accelerator.backward(losses["loss"] / accumulation)
        totals += torch.stack([losses[k].detach().float() for k in LOSSES]) / accumulation
    if args.max_grad_norm > 0:
        accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return dict(zip(LOSSES, accelerator.reduce(totals, reduction="mean").tolist()))


class HeldOutPSNR:
    """The held-out PSNR of the VAE being trained, logged every ``--eval-every`` updates and at the end.

    Args:
        eval_set: the held-out split; None: no evaluation.
    """

    def __init__(self, accelerator, vae: LiteVAE, eval_set, log: JsonlLog, args: argparse.Namespace):
        self.accelerator, self.vae, self.eval_set, self.log, self.args = accelerator, vae, eval_set, log, args
        self.psnr, self.step = None, None

    def __call__(self, done: int) -> None:
        """After update ``done``: measure and print when ``--eval-every`` says so (on every process)."""
        every = self.args.eval_every
        if self.eval_set is not None and every > 0 and done % every == 0:
            tqdm.write(f"step {done}: held-out PSNR {self.measure(done):.2f} dB")

    def measure(self, step: int) -> float:
        """The PSNR after update ``step``, logged as ``{"step": step, "heldout_psnr": ...}``."""
        self.vae.eval()
        self.psnr = heldout_psnr(
            self.vae,
            self.eval_set,
            batch_size=self.args.eval_batch_size,
            accelerator=self.accelerator,
            num_workers=self.args.num_workers,
            allow_upsampling=self.args.allow_upsampling,
        )
        self.step = step
        self.log.write({"step": step, "heldout_psnr": self.psnr})
        return self.psnr

    def final(self, max_steps: int) -> float | None:
        """The PSNR of the trained VAE (measured now unless the last update was measured); None without a split."""
        if self.eval_set is not None and self.step != max_steps:
            self.measure(max_steps)
        return self.psnr


def _save_scaled_vae(accelerator, vae: LiteVAE, train_set, log: JsonlLog, args: argparse.Namespace) -> tuple:
    """Measure the latent ``shift_factor`` and ``scaling_factor`` on the training split, record them in the VAE's
    config and save it to ``<output-dir>/vae`` (main process); returns ``(shift, scale, vae_path)``."""
    vae.eval()
    shift, scale = measure_latent_scale(
        vae,
        train_set,
        batch_size=args.eval_batch_size,
        max_images=args.scaling_images,
        allow_upsampling=args.allow_upsampling,
        accelerator=accelerator,
        num_workers=args.num_workers,
    )
    vae_path = Path(args.output_dir) / "vae"
    if accelerator.is_main_process:
        vae.register_to_config(shift_factor=shift, scaling_factor=scale)
        vae.save_pretrained(vae_path)
        log.write({"step": args.max_steps, "shift_factor": shift, "scaling_factor": scale})
    return shift, scale, vae_path


def _write_psnr_result(vae: LiteVAE, psnr: float, vae_path: Path, args: argparse.Namespace) -> None:
    """The held-out PSNR of the saved VAE as a results JSON at ``--results-file``."""
    write_results(
        args.results_file,
        {
            "metric": "vae_heldout_psnr",
            "value": psnr,
            "unit": "dB",
            "definition": "mean over images of 10*log10(1/mse), images in [0, 1], posterior mode",
            "dataset": str(args.dataset),
            "split": args.eval_split,
            "train_split": args.split,
            "steps": args.max_steps,
            "global_batch_size": args.batch_size * args.gradient_accumulation_steps,
            "model": str(vae_path),
            "vae_config": dict(vae.config),
        },
    )


def run(args: argparse.Namespace) -> dict:
    """Train, evaluate, measure the latent scale and save ``output_dir/vae``; returns a summary dict
    ("heldout_psnr" (None without ``--eval-split``), "shift_factor", "scaling_factor", "vae_path")."""
    # Without a GPU, accelerate joins a torchrun world (gloo) only when told cpu=True.
    cpu = args.cpu or not torch.cuda.is_available()
    # Before the Accelerator, which takes fp16 on CPUs.
    args.mixed_precision = check_mixed_precision("train_vae", args.mixed_precision, cpu)
    accelerator = Accelerator(mixed_precision=args.mixed_precision, cpu=cpu)
    config, resume_from = _check_arguments(args)
    loop.check_processes("train_vae", accelerator, args.batch_size)
    train_set, eval_set = _load_splits(args)
    output_dir = Path(args.output_dir)

    torch.manual_seed(args.seed)
    model = VAETrainingModel(LiteVAE(**config), kl_weight=args.kl_weight, wavelet_weight=args.wavelet_weight)
    group = {"params": list(model.parameters()), "lr_scale": 1.0, "weight_decay": args.weight_decay}
    optimizer = torch.optim.AdamW([group], lr=args.lr)
    model, optimizer = accelerator.prepare(model, optimizer)
    vae = accelerator.unwrap_model(model).vae
    parts = {"model": model, "optimizer": optimizer, "ema": None}

    log = JsonlLog(output_dir / LOG_FILE, enabled=accelerator.is_main_process)
    start_step = loop.load_resume(accelerator, resume_from, log, parts)
    this_run = {"args": loop.run_flags(args)}
    details = {"vae_config": config}
    loop.write_run_config(accelerator, output_dir, log, this_run, details, start_step, resumed=resume_from is not None)

    held_out = HeldOutPSNR(accelerator, vae, eval_set, log, args)
    steps = loop.Steps(
        accelerator, args, log, parts, None, start_step, args.max_steps, "train_vae",
        evaluate=held_out, state=details, clock=False,
    )  # fmt: skip
    batches = _training_batches(accelerator, train_set, vae, start_step, args)
    for step in steps:
        model.train()
        lr = lr_at_step(
            step, lr=args.lr, warmup_steps=args.lr_warmup_steps, max_steps=args.max_steps,
            schedule=args.lr_schedule, min_lr=args.min_lr,
        )  # fmt: skip
        recipe.set_lr(optimizer, lr)
        losses = _update(accelerator, model, optimizer, batches, step, args)
        steps.end(step, losses.pop("loss"), {**losses, "lr": lr})
    steps.progress.close()

    psnr = held_out.final(args.max_steps)
    shift, scale, vae_path = _save_scaled_vae(accelerator, vae, train_set, log, args)
    if accelerator.is_main_process and args.results_file is not None and psnr is not None:
        _write_psnr_result(vae, psnr, vae_path, args)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return {"heldout_psnr": psnr, "shift_factor": shift, "scaling_factor": scale, "vae_path": vae_path}
