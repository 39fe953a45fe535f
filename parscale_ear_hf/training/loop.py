"""The steps that generator training (``generator.run``), the DiT baseline (``dit.run``) and VAE training
(``vae.run``) share around their own models and losses: where a run starts (fresh or ``--resume``), the run's
record, what follows each optimizer update (log, held-out evaluation, checkpoint, sample grid), and for the two
trainers on cached latents, the latent cache and this rank's slice of each global batch.

``owner`` names the command in error messages (``train``, ``train-dit``, ``train_vae``). Every random draw comes from a
generator the caller seeds from (seed, step, ...), so a resumed run continues exactly, from a checkpoint saved
at any step: a kept one every ``--checkpoint-every`` steps, or the interim one saved when
``--checkpoint-minutes`` have passed since the last save (default 5, so a kill loses minutes, not the up to
500 steps of the default interval; see ``checkpointing``).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..data import batch_indices
from ..image_grid import labelled_grid
from . import latent_cache, recipe
from .checkpointing import (
    CheckpointTimer,
    JsonlLog,
    check_supported,
    checkpoint_dir,
    load_checkpoint,
    save_checkpoint,
    set_aside_earlier_run,
    write_json_atomic,
)

RUN_CONFIG = "run_config.json"


def load_latents(owner: str, latents: str, batch_size: int):
    """The latent cache at ``latents``, ``(dataset, info)``; raises when it has fewer than ``batch_size`` examples."""
    dataset, info = latent_cache.load_latent_cache(latents)
    if batch_size > len(dataset):
        raise ValueError(
            f"{owner}: `--batch-size` must be at most the {len(dataset)} examples of the latent cache {latents!r}, "
            f"got {batch_size}."
        )
    return dataset, info


def check_processes(owner: str, accelerator, batch_size: int) -> None:
    """Raise for a sharded distributed type, and when the processes cannot split ``batch_size`` evenly."""
    check_supported(accelerator)
    world = accelerator.num_processes
    if batch_size % world:
        raise ValueError(f"{owner}: `--batch-size` must be divisible by the {world} processes, got {batch_size}.")


def load_resume(accelerator, resume_from: Path | None, log: JsonlLog, parts: dict) -> int:
    """The step to start from: 0, or that of ``resume_from`` after loading it into ``parts``.

    Args:
        parts: ``model``, ``optimizer`` and ``ema`` (None for a run without one), as
            :func:`~.checkpointing.load_checkpoint` takes them; this run's flags win over the checkpoint's lr and
            EMA rate (:func:`~.recipe.flags_win`).
    """
    if resume_from is None:
        return 0
    with recipe.flags_win(parts["optimizer"], parts["ema"]):
        start_step = load_checkpoint(accelerator, resume_from, **parts)["step"]
    log.truncate_after(start_step)  # the later steps are trained again
    return start_step


def run_flags(args) -> dict:
    """The flags of a run as its record keeps them: ``vars(args)`` without the handler function that the
    ``parscale-ear`` subcommands put in the namespace (``set_defaults(func=...)``)."""
    return {k: v for k, v in vars(args).items() if not callable(v)}


def write_run_config(
    accelerator, output_dir: Path, log: JsonlLog, this_run: dict, details: dict, start_step: int, resumed: bool
) -> None:
    """Write ``<output_dir>/run_config.json`` (main process only): ``{**this_run, **details}`` on a fresh start,
    which first moves an earlier run's log and run_config.json aside (:func:`~.checkpointing.set_aside_earlier_run`);
    on a resume, the first run's record with ``this_run`` appended to its ``resumes`` (each resume adds its flags:
    EAR's second phase is a resume with new ones).

    Args:
        this_run: ``{"args": ...}`` and whatever else the flags resolve to.
        details: what the run is (model config, latent cache, ...).
    """
    if not accelerator.is_main_process:
        return
    output_dir.mkdir(parents=True, exist_ok=True)
    config_path = output_dir / RUN_CONFIG
    run_config = {**this_run, **details}
    if not resumed:
        set_aside_earlier_run(output_dir, [log.path.name, RUN_CONFIG])
    elif config_path.is_file():
        run_config = json.loads(config_path.read_text(encoding="utf-8"))
        earlier = [r for r in run_config.get("resumes", []) if r["step"] < start_step]
        run_config["resumes"] = [*earlier, {"step": start_step, **this_run}]
    write_json_atomic(config_path, run_config)


def read_batch(
    accelerator,
    dataset,
    info: dict,
    index: int,
    generator: torch.Generator,
    batch_size: int,
    seed: int,
    shift_factor: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """This process's slice of global batch ``index``, as sampled latents and labels.

    The global batch is :func:`~parscale_ear_hf.data.batch_indices` of ``(seed, index)``; process ``r`` of ``world``
    reads its ``r``-th ``batch_size // world`` examples. ``generator`` draws, in this order, the h-flips (when the
    cache has them) and the posterior noise.

    Returns:
        latents `(batch_size // world, C, h, w)`, ``(z - shift_factor) * info["scaling_factor"]``, and labels
        `(batch_size // world,)`, both on the accelerator's device.
    """
    per_rank, rank = batch_size // accelerator.num_processes, accelerator.process_index
    global_batch = batch_indices(len(dataset), batch_size, index, seed)
    batch = dataset[global_batch[rank * per_rank : (rank + 1) * per_rank].tolist()]
    moments = batch["moments"]
    if info.get("hflip"):  # each example: the flipped image's moments with probability 1/2
        flip = torch.rand(per_rank, generator=generator) < 0.5
        moments = torch.where(flip[:, None, None, None], batch["moments_flip"], moments)
    latents = latent_cache.sample_latents(moments, info["scaling_factor"], shift_factor, generator)
    return latents.to(accelerator.device), batch["label"].long().to(accelerator.device)


class Steps:
    """The optimizer updates ``start_step .. max_steps - 1`` of a run, with a progress bar on the main process, and
    what is due after each (:meth:`end`).

    Args:
        args: the flags ``--output-dir``, ``--log-every``, ``--checkpoint-every``, ``--checkpoint-minutes``,
            ``--keep-checkpoints`` and (with ``sample``) ``--sample-every``.
        log: the run's training log.
        parts: ``model``, ``optimizer`` and ``ema``, as :func:`~.checkpointing.save_checkpoint` takes them.
        sample: ``sample(grid_path)`` makes a pipeline of the EMA weights and saves its sample grid there; None:
            no grids.
        desc: the progress bar's label.
        evaluate: ``evaluate(done)``, called on every process after the log line of update ``done`` and before
            its checkpoint, so what it logs is in the log that the checkpoint covers (the VAE's held-out PSNR).
        state: more of the run to record in each checkpoint's ``trainer_state.json`` (the VAE's config).
        clock: give each log line the ``seconds`` since the start; without them (the VAE's log) a resumed run's
            log equals an uninterrupted one's.
    """

    def __init__(
        self,
        accelerator,
        args,
        log: JsonlLog,
        parts: dict,
        sample,
        start_step: int,
        max_steps: int,
        desc: str,
        *,
        evaluate=None,
        state: dict | None = None,
        clock: bool = True,
    ):
        self.accelerator, self.args, self.log, self.parts, self.sample = accelerator, args, log, parts, sample
        self.start_step, self.max_steps = start_step, max_steps
        self.evaluate, self.state, self.clock = evaluate, state or {}, clock
        self.progress = tqdm(
            range(start_step, max_steps),
            initial=start_step,
            total=max_steps,
            disable=not accelerator.is_main_process,
            desc=desc,
        )
        self.start_time = time.perf_counter()
        self.timer = CheckpointTimer(accelerator, args.checkpoint_minutes)

    def __iter__(self):
        return iter(self.progress)

    def end(self, step: int, loss: float, record: dict) -> None:
        """After update ``step``: the log line, the checkpoint and the sample grid that are due; then wait for every
        process.

        A line ``{"step": step + 1, "loss": loss, **record, "seconds": ...}`` every ``--log-every`` updates and at the
        first and last; the ``evaluate`` that is set; a kept checkpoint every ``--checkpoint-every`` and at the last
        (none with ``--checkpoint-every 0``), else an interim one when ``--checkpoint-minutes`` have passed since
        the last save; a sample grid every ``--sample-every`` when that is set.
        """
        accelerator, args, done = self.accelerator, self.args, step + 1
        output_dir = Path(args.output_dir)
        self.progress.set_postfix(loss=f"{loss:.4f}")
        if done % args.log_every == 0 or done == self.max_steps or done == self.start_step + 1:
            seconds = {"seconds": round(time.perf_counter() - self.start_time, 3)} if self.clock else {}
            self.log.write({"step": done, "loss": loss, **record, **seconds})
        if self.evaluate is not None:
            self.evaluate(done)
        kept = bool(args.checkpoint_every) and (done % args.checkpoint_every == 0 or done == self.max_steps)
        if kept or self.timer.due():
            save_checkpoint(
                accelerator,
                checkpoint_dir(output_dir),
                done,
                {"log": str(self.log.path), **self.state},
                **self.parts,
                keep=args.keep_checkpoints,
                interim=not kept,
            )
            self.timer.saved()
        if (
            self.sample is not None
            and args.sample_every
            and done % args.sample_every == 0
            and accelerator.is_main_process
        ):
            self.sample(output_dir / "samples" / f"step-{done:08d}.png")
        accelerator.wait_for_everyone()


def save_sample_grid(pipe, num_classes: int, args, grid_path: Path, caption) -> None:
    """Save a grid of one image for each of the first ``--sample-images`` classes (at most all) to ``grid_path``.

    Image ``i`` is sampled from generator ``args.seed + i`` with ``--sample-steps`` and ``--sample-guidance``, so
    the grids of a run show how the same draws change as it trains; ``caption(class_id)`` is written under it.
    """
    pipe.set_progress_bar_config(disable=True)
    labels = list(range(min(args.sample_images, num_classes)))
    generators = [torch.Generator().manual_seed(args.seed + i) for i in range(len(labels))]
    images = pipe(
        labels, num_inference_steps=args.sample_steps, guidance_scale=args.sample_guidance, generator=generators
    ).images
    grid_path.parent.mkdir(parents=True, exist_ok=True)
    labelled_grid(images, [caption(i) for i in labels]).save(grid_path)


def save_final_pipeline(accelerator, sample, output_dir: Path, name: str) -> None:
    """Save the EMA pipeline that ``sample`` makes (with its last grid) to ``<output_dir>/pipeline``; end training.

    Args:
        name: what the saved pipeline is called in the message ("pipeline", "DiTPipeline").
    """
    if accelerator.is_main_process:
        pipe = sample(output_dir / "samples" / "final.png")
        pipe.save_pretrained(output_dir / "pipeline")
        accelerator.print(f"saved the EMA {name} to {output_dir / 'pipeline'}")
    accelerator.wait_for_everyone()
    accelerator.end_training()
