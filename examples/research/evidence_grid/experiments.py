"""The demo-scale evidence grid (`examples/experiments.py`): the method's claims over training seeds.

Each **cell** is one model trained on the demo latents with the same steps, batch and optimiser
settings; each cell runs once per **seed** (the training seed and the sampling seed both change),
and each run is scored against the held-out digits:

- A1 / A3, LiteHybrid: ``lh_off`` (plain EAR), ``lh_coarse``, ``lh_fine``, ``lh_both`` (the method);
- ParScale: ``lh_both`` is P = 1, then ``p2``, ``p4``, beside P = 1 made wider (``p1_wide``) and deeper
  (``p1_deep``) to about the backbone FLOPs of P = 4;
- the token head: ``lh_both`` (EAR's energy head) against ``diffusion_head`` (MAR's, same backbone);
- ``dit``: a diffusers ``DiTTransformer2DModel`` of about the same size on the same latents.

A run is a folder ``<work-dir>/<cell>/seed<k>/`` (training, evaluation features, sample PNGs; git-ignored)
and a results file ``<results-dir>/<cell>/seed<k>.json`` written after every stage: training (resumed from
its last checkpoint when killed), parameters and FLOPs, then each sampling point (the eval driver with the
FID Inception-v3, resumed from its saved features; demo-FID and class accuracy from the same samples).
A run whose results file says ``complete`` is skipped; two drivers may share a grid (each run is locked by
the process that works on it). A run left unscored in an earlier sitting whose folder is gone (a new clone) is
trained again, and its record says whether the training reproduced. :func:`report` turns the results files
into tables and plots with the mean and the seed-to-seed standard deviation of every figure.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import subprocess
import time
from pathlib import Path

import numpy as np
import torch

from parscale_ear_hf.commands import cli_process

GRID_STEPS = 600  # training steps per run, chosen from the pilot (`--length-curve`): see docs/experiments.md
SEEDS = (0, 1, 2)
SAMPLING_SEED_OFFSET = 100  # sampling seed = training seed + 100: both change with the seed
EVAL_STEPS = 16  # the grid's sampling point (autoregressive steps; a DiT's scheduler steps)
CURVE_STEPS = (8, 32)  # extra points of the speed-quality curve, for the cells that draw one
GUIDANCE, TEMPERATURE = 3.0, 0.7  # the demo model's evaluation settings
DIT_GUIDANCE = 1.5  # the DiT baseline's (as in the sampling benchmark)

# The recipe every EAR cell shares: EAR's defaults (reference param groups, score-batch-mul 2, head lr x 0.25,
# AdamW betas 0.9 / 0.95, weight decay 0.02, clip 3) except the three that depend on the run's length: an
# absolute lr (EAR's blr 1e-4 gives 2.5e-5 at batch 64, for 800 epochs), a 100-step warm-up, and an EMA rate of
# 0.999 with diffusers' warm-up (EAR's 0.9999 from step 0 would leave a short run's EMA near its initial weights).
EAR_RECIPE = ("--batch-size", "64", "--lr", "1e-3", "--warmup-steps", "100", "--ema-decay", "0.999", "--ema-warmup")
# The DiT baseline (examples/train_demo.sh dit): 1.57M parameters against the generator's 1.54M; the same steps,
# batch, lr, warm-up, EMA and clipping.
DIT_RECIPE = (
    "--num-layers", "5", "--num-attention-heads", "4", "--attention-head-dim", "30", "--patch-size", "1",
    "--batch-size", "64", "--lr", "1e-3", "--warmup-steps", "100", "--ema-decay", "0.999", "--ema-warmup",
    "--grad-clip", "3.0",
)  # fmt: skip


@dataclasses.dataclass(frozen=True)
class Cell:
    """One configuration of the grid.

    Args:
        name: folder and key.
        label: how tables name it.
        kind: ``"ear"`` (``parscale-ear train``) or ``"dit"`` (``parscale-ear train-dit``).
        flags: training flags beside the recipe (ablation flags).
        config: changes to the base model config (`examples/configs/mnist_demo_generator.json`): section ->
            fields; a section set to None is removed.
        curve: also scored at :data:`CURVE_STEPS` (the speed-quality curve).
    """

    name: str
    label: str
    kind: str = "ear"
    flags: tuple[str, ...] = ()
    config: dict | None = None
    curve: bool = False


# The base config (the shipped demo model's) pins three settings of the demo models' older architecture: the tanh
# GELU, head LayerNorms without affine, and a temperature that also scales the head's last layer. Every energy-head
# cell inherits them; these are EAR's own values (the classes' defaults), which the `lh_both_exact` control trains
# with, and which the shipped model is retrained with (`--ship`).
EXACT_ARCHITECTURE = {
    "transformer": {"mlp_activation": "gelu"},
    "energy_head": {"block_norm_affine": True, "temperature_scales_final_layer": False},
}

CELLS = (
    Cell("lh_both", "LiteHybrid coarse + fine (the method; P = 1, energy head)", curve=True),
    Cell("lh_both_exact", "lh_both with EAR's exact architecture (no demo pins)", config=EXACT_ARCHITECTURE),
    Cell("lh_off", "LiteHybrid off (plain EAR)", flags=("--no-coarse", "--no-fine")),
    Cell("lh_coarse", "LiteHybrid coarse only", flags=("--no-fine",)),
    Cell("lh_fine", "LiteHybrid fine only", flags=("--no-coarse",)),
    Cell("p2", "ParScale P = 2", flags=("--parscale-n", "2")),
    Cell("p4", "ParScale P = 4", flags=("--parscale-n", "4")),
    Cell("p1_wide", "P = 1, width 256 (P = 4's FLOPs)", config={"transformer": {"hidden_size": 256, "num_heads": 8}}),
    Cell("p1_deep", "P = 1, 24 layers (P = 4's FLOPs)", config={"transformer": {"num_layers": 24}}),
    # MAR's head on the same backbone: its width and depth are the energy head's; MAR's 100 DDPM steps per token,
    # 4 timesteps per target, and MAR's head lr (x 1: the x 0.25 is EAR's, for the energy score).
    Cell(
        "diffusion_head",
        "MAR's diffusion head (same backbone)",
        flags=("--head-lr-scale", "1.0", "--diffusion-batch-mul", "4"),
        config={"energy_head": None, "diffusion_head": {"width": 128, "depth": 3, "num_sampling_steps": 100}},
        curve=True,
    ),
    Cell("dit", "diffusers DiT (same latents, ~same parameters)", kind="dit", curve=True),
)
CELLS_BY_NAME = {cell.name: cell for cell in CELLS}
GROUPS = {
    "lite_hybrid": ("lh_off", "lh_coarse", "lh_fine", "lh_both"),
    "parscale": ("lh_both", "p2", "p4", "p1_wide", "p1_deep"),
    "head": ("lh_both", "diffusion_head", "dit"),
}


# ------------------------------------------------------------------------------ one run


def model_config(cell: Cell, base: dict) -> dict:
    """The base model config with the cell's changes (a section set to None is removed)."""
    config = json.loads(json.dumps(base))
    for section, fields in (cell.config or {}).items():
        if fields is None:
            config.pop(section, None)
        else:
            config.setdefault(section, {}).update(fields)
    return config


def train_command(cell: Cell, seed: int, args, train_dir: Path) -> list[str]:
    """`parscale-ear train` / `train-dit` flags of one run (resuming when it has a checkpoint)."""
    common = ["--latents", args.latents, "--output-dir", str(train_dir), "--max-steps", str(args.steps),
              "--seed", str(seed), "--checkpoint-every", str(args.checkpoint_every), "--keep-checkpoints", "1",
              "--sample-every", "0", "--cpu"]  # fmt: skip
    if any((train_dir / "checkpoints").glob("checkpoint-*")):
        common += ["--resume", "latest"]
    if cell.kind == "dit":
        return ["train-dit", *common, *DIT_RECIPE, "--sample-steps", str(EVAL_STEPS)]
    config_path = train_dir.parent / "model_config.json"
    base = json.loads(Path(args.base_config).read_text(encoding="utf-8"))
    config_path.parent.mkdir(parents=True, exist_ok=True)
    config_path.write_text(json.dumps(model_config(cell, base), indent=2) + "\n", encoding="utf-8")
    return ["train", *common, "--model-config", str(config_path), *EAR_RECIPE, *cell.flags]


def run_command(argv: list[str], log_path: Path) -> None:
    """``parscale-ear <argv>`` in a fresh process on this code (:func:`cli_process`), its output appended to
    `log_path`.

    Raises:
        RuntimeError: it failed; the message has its last line of output and where the rest is.
    """
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "a", encoding="utf-8") as log:
        log.write(f"\n$ parscale-ear {' '.join(argv)}\n")
        log.flush()
        command, env = cli_process(*argv)
        code = subprocess.call(command, stdout=log, stderr=log, env=env)
    if code:
        lines = [line for line in log_path.read_text(encoding="utf-8").splitlines() if line.strip()]
        raise RuntimeError(f"`parscale-ear {argv[0]}` failed (exit {code}): {lines[-1] if lines else ''} "
                           f"(the whole output: {log_path})")  # fmt: skip


def training_summary(train_dir: Path) -> dict:
    """Steps, wall clock and the loss at the end of a finished run (mean of its last 10 % of log lines)."""
    lines = [json.loads(line) for line in (train_dir / "train_log.jsonl").read_text(encoding="utf-8").splitlines()]
    tail = lines[-max(1, len(lines) // 10) :]
    return {
        "steps": lines[-1]["step"],
        "final_loss": float(np.mean([line["loss"] for line in tail])),
        "seconds": lines[-1].get("seconds"),
        "what": "final_loss: mean of the last 10% of the logged losses; seconds: the training loop's wall clock "
        "(a resumed run: since its last start)",
    }


def sample_points(cell: Cell) -> tuple[int, ...]:
    return (EVAL_STEPS, *CURVE_STEPS) if cell.curve else (EVAL_STEPS,)


def point_guidance(cell: Cell) -> float:
    return DIT_GUIDANCE if cell.kind == "dit" else GUIDANCE


def load_grid_pipeline(path: Path):
    """The run's saved pipeline (ours or a DiTPipeline), in fp32 on the CPU."""
    from parscale_ear_hf.evaluation.driver import pipeline_class_name
    from parscale_ear_hf.loading import load_pipeline
    from parscale_ear_hf.training import dit  # noqa: F401  (registers the DiT baseline's transformer class for from_pretrained)

    pipe, _, modules = load_pipeline(str(path), pipeline_class_name(str(path)), torch.device("cpu"), False)
    pipe.set_progress_bar_config(disable=True)
    return pipe, modules


def pipeline_classes(pipe) -> int:
    """Number of classes: ours in the transformer's config, a DiT's in its label table (`num_embeds_ada_norm`)."""
    config = pipe.transformer.config
    return config.num_classes if hasattr(pipe, "lite_hybrid") else config.num_embeds_ada_norm


def generative_parameters(pipe) -> int:
    """Parameters of what generates tokens (the VAE, shared by every cell, excluded)."""
    from parscale_ear_hf.info import count_parameters

    if hasattr(pipe, "lite_hybrid"):
        return sum(count_parameters(m) for m in (pipe.lite_hybrid, pipe.transformer, pipe.energy_head))
    return count_parameters(pipe.transformer)


def sampling_kwargs(pipe, steps: int, guidance: float) -> dict:
    """A grid point's call arguments: steps and guidance, and our pipeline's temperature (a DiT has none)."""
    kwargs = {"num_inference_steps": steps, "guidance_scale": guidance}
    if hasattr(pipe, "lite_hybrid"):
        kwargs["temperature"] = TEMPERATURE
    return kwargs


def flops_per_image(pipe, steps: int, guidance: float, num_classes: int) -> float:
    """FLOPs of one image (one per class, averaged), VAE decoding included, as `torch.utils.flop_counter`
    counts them (matrix products, convolutions and attention; element-wise work is not counted)."""
    from torch.utils.flop_counter import FlopCounterMode

    kwargs = sampling_kwargs(pipe, steps, guidance)
    labels = list(range(num_classes))
    generators = [torch.Generator().manual_seed(i) for i in labels]
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        pipe(labels, generator=generators, output_type="pt", **kwargs)
    return counter.get_total_flops() / num_classes


def digit_scores(args, png_dir: Path, images_per_class: int, num_classes: int) -> dict:
    """Demo-FID / precision / recall (the digit classifier's features) and class accuracy of the PNG samples
    that the Inception evaluation wrote: the same images, not a second sampling."""
    import PIL.Image

    from parscale_ear_hf.data import load_dataset_from_args
    from parscale_ear_hf.evaluation.extractors import load_extractor
    from parscale_ear_hf.evaluation.reference import load_reference, reference_cache_path, reference_from_dataset
    from parscale_ear_hf.evaluation.sampling import SampleFeatures, compute_metrics, sample_labels

    labels = sample_labels(num_classes, images_per_class)
    paths = [png_dir / f"{i:06d}.png" for i in range(len(labels))]
    missing = [p.name for p in paths if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"{png_dir} lacks {len(missing)} of the {len(labels)} samples (first: {missing[0]}).")
    images = torch.from_numpy(np.stack([np.asarray(PIL.Image.open(p)) for p in paths]))
    images = images[:, None] if images.ndim == 3 else images.permute(0, 3, 1, 2)
    extractor = load_extractor("digit", classifier=args.classifier, device="cpu")
    image_size = images.shape[-1]
    extractor.check_images(images.shape[1], image_size)
    reference_from_dataset(
        lambda: load_dataset_from_args(args, args.split),
        dataset_name=args.dataset,
        split=args.split,
        image_size=image_size,
        channels=images.shape[1],
        extractor=extractor,
        cache_dir=args.reference_cache_dir,
        max_images=None,
        allow_upsampling=args.allow_upsampling,
    )
    reference = load_reference(
        reference_cache_path(args.reference_cache_dir, args.dataset, args.split, image_size, extractor)
    )
    features, logits = [], []
    for start in range(0, len(images), 250):
        out = extractor(images[start : start + 250])
        features.append(out.features.numpy())
        logits.append(out.logits.numpy())
    features, logits = np.concatenate(features), np.concatenate(logits)
    metrics, _ = compute_metrics(SampleFeatures(features, logits, labels, None), reference, extractor, device="cpu")
    metrics["class_accuracy"] = float((logits.argmax(axis=1) == labels).mean())
    return metrics


def score_point(args, cell: Cell, seed: int, pipeline: Path, steps: int, run_dir: Path) -> dict:
    """One sampling point: `parscale-ear eval` with the FID Inception-v3 (or the extractor of --inception-extractor)
    writing the samples as PNGs, then the digit scores of those PNGs."""
    from parscale_ear_hf.results import git_revision

    work = run_dir / f"eval-s{steps}"
    results_file = work / "inception.json"
    flags = ["eval", "--model", str(pipeline), "--extractor", args.inception_extractor, "--dataset", args.dataset,
             "--split", args.split, "--reference-cache-dir", args.reference_cache_dir,
             "--images-per-class", str(args.images_per_class), "--batch-size", str(args.eval_batch_size),
             "--steps", str(steps), "--guidance", str(point_guidance(cell)),
             "--seed", str(seed + SAMPLING_SEED_OFFSET),
             "--output-dir", str(work), "--results-file", str(results_file), "--write-png", "--cpu"]  # fmt: skip
    if args.inception_extractor == "digit":  # the test suite's stand-in (no Inception weights needed)
        flags += ["--classifier", args.classifier]
    if cell.kind != "dit":
        flags += ["--temperature", str(TEMPERATURE)]
    run_command(flags, run_dir / "log.txt")
    record = json.loads(results_file.read_text(encoding="utf-8"))
    num_classes = record["samples"]["num_classes"]
    digit = digit_scores(args, work / "png", args.images_per_class, num_classes)
    timing = record["timing"]
    return {
        "steps": steps,
        "guidance_scale": point_guidance(cell),
        "temperature": None if cell.kind == "dit" else TEMPERATURE,
        "sampling_seed": seed + SAMPLING_SEED_OFFSET,
        "samples": record["samples"],
        "metrics": {**record["metrics"], **digit},
        "seconds_per_image": timing.get("median_batch_seconds_per_image"),
        "timing": timing,
        "extractor": record["extractor"]["name"],
        "git_revision": git_revision(),
        "eval_results": str(results_file),
    }


def run_one(args, cell: Cell, seed: int) -> dict:
    """Train, measure and score one (cell, seed), resuming from whatever an earlier call left."""
    from parscale_ear_hf.results import git_revision, load_results, write_results

    run_dir = Path(args.work_dir) / cell.name / f"seed{seed}"
    train_dir = run_dir / "train"
    results_path = Path(args.results_dir) / cell.name / f"seed{seed}.json"
    record = load_results(results_path) or {
        "cell": cell.name,
        "label": cell.label,
        "kind": cell.kind,
        "seed": seed,
        "training_seed": seed,
        "settings": grid_settings(args),
        "points": {},
        "complete": False,
    }
    record.pop("provenance", None)
    if record["settings"] != grid_settings(args):
        raise ValueError(
            f"{results_path} was written with other grid settings ({record['settings']}); this call has "
            f"{grid_settings(args)}. Use another --results-dir / --work-dir, or delete that run."
        )
    pipeline = train_dir / "pipeline"

    def save():
        write_results(results_path, record)

    trained = (pipeline / "model_index.json").is_file()
    unscored = "parameters" not in record or any(str(k) not in record["points"] for k in sample_points(cell))
    lost = record.pop("train") if "train" in record and unscored and not trained else None
    if "train" not in record:
        if not trained:  # a fresh run, or one whose work folder is gone (a new clone): trained again
            run_command(train_command(cell, seed, args, train_dir), run_dir / "log.txt")
        # The run's command as a fresh start gives it (a resume adds --resume latest and trains the same weights).
        argv = [a for a in train_command(cell, seed, args, train_dir) if a not in ("--resume", "latest")]
        command = "parscale-ear " + " ".join(argv)
        record["train"] = {**training_summary(train_dir), "git_revision": git_revision(), "command": command}
        if lost is not None:
            record["train"]["retrained"] = retrained_note(lost, record["train"])
            if not record["train"]["retrained"]["reproduced"]:
                record["points"] = {}  # scores of the lost weights are not mixed with the new weights' scores
        save()
    if "parameters" not in record:
        pipe, _ = load_grid_pipeline(pipeline)
        num_classes = pipeline_classes(pipe)
        record["parameters"] = generative_parameters(pipe)
        record["flops_per_image"] = {
            str(k): flops_per_image(pipe, k, point_guidance(cell), num_classes) for k in sample_points(cell)
        }
        save()
    for steps in sample_points(cell):
        if str(steps) not in record["points"]:
            record["points"][str(steps)] = score_point(args, cell, seed, pipeline, steps, run_dir)
            save()
    record["complete"] = True
    save()
    return record


def retrained_note(lost: dict, summary: dict) -> dict:
    """What a run trained again (its work folder gone before its points were scored) says about the first
    training: whether the same command reproduced it (the same final loss, to the last bit: seeded CPU training is
    deterministic on one machine and torch build; another CPU may round differently)."""
    return {
        "reproduced": lost["final_loss"] == summary["final_loss"],
        "lost_final_loss": lost["final_loss"],
        "lost_git_revision": lost.get("git_revision"),
        "what": "the first training's folder was lost before every point was scored, so the run was trained "
        "again; when the final loss differs, the points scored from the lost weights were dropped and scored again",
    }


def grid_settings(args) -> dict:
    """What every run of one grid shares; a run written with other settings is refused, not mixed in."""
    return {
        "training_steps": args.steps,
        "latents": args.latents,
        "base_config": args.base_config,
        "images_per_class": args.images_per_class,
        "dataset": args.dataset,
        "split": args.split,
        "inception_extractor": args.inception_extractor,
    }


# ------------------------------------------------------------------------------ locking and the loop


class RunLock:
    """An exclusive lock file (``O_EXCL``) holding the owner's pid: two drivers never work on one run. A lock
    whose process is gone (a killed driver) is taken over."""

    def __init__(self, path: Path):
        self.path = path
        self.held = False

    def acquire(self) -> bool:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                try:
                    pid = int(self.path.read_text().strip() or 0)
                except (OSError, ValueError):
                    pid = 0
                if pid and _alive(pid):
                    return False
                self.path.unlink(missing_ok=True)  # stale: its driver was killed
                continue
            with os.fdopen(fd, "w") as f:
                f.write(str(os.getpid()))
            self.held = True
            return True
        return False

    def release(self) -> None:
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def run_grid(args) -> dict:
    """Every (seed, cell) asked for, seed by seed (a partial grid has whole seeds); returns what each did."""
    from parscale_ear_hf.results import load_results

    outcome = {}
    for seed in args.seeds:
        for name in args.cells:
            cell = CELLS_BY_NAME[name]
            results_path = Path(args.results_dir) / name / f"seed{seed}.json"
            key = f"{name}/seed{seed}"
            done = load_results(results_path)
            if done and done.get("complete"):
                outcome[key] = "complete earlier, skipped"
                continue
            lock = RunLock(Path(args.work_dir) / name / f"seed{seed}.lock")
            if not lock.acquire():
                outcome[key] = "another driver holds it, skipped"
                print(f"[experiments] {key}: {outcome[key]}", flush=True)
                continue
            try:
                start = time.time()
                print(f"[experiments] {key}: running", flush=True)
                run_one(args, cell, seed)
                outcome[key] = f"done in {time.time() - start:.0f} s"
                print(f"[experiments] {key}: {outcome[key]}", flush=True)
            finally:
                lock.release()
    return outcome


# ------------------------------------------------------------------------------ the report


def load_grid(results_dir: str | os.PathLike) -> dict[str, list[dict]]:
    """The complete runs per cell (partial runs are left out of every table)."""
    grid = {}
    for cell in CELLS:
        runs = []
        for path in sorted(Path(results_dir, cell.name).glob("seed*.json")):
            record = json.loads(path.read_text(encoding="utf-8"))
            if record.get("complete"):
                runs.append(record)
        grid[cell.name] = runs
    return grid


def mean_std(values: list[float]) -> tuple[float, float | None]:
    """Mean and the sample standard deviation (n - 1); None for one value (no spread)."""
    values = [v for v in values if v is not None]
    if not values:
        return math.nan, None
    return float(np.mean(values)), (float(np.std(values, ddof=1)) if len(values) > 1 else None)


def seed_values(runs: list[dict], steps: int, key: str) -> list[float]:
    """One figure at one sampling point, one value per run that has it; keys as in the tables. Seconds per image:
    the timings taken alone (`--retime`) where the cell has any at this point, else those of the evaluations
    (beside a second worker): never a mean of both kinds."""
    values = []
    points = [run["points"].get(str(steps)) for run in runs]
    quiet = key == "seconds_per_image" and any(p is not None and "quiet_timing" in p for p in points)
    for run, point in zip(runs, points):
        if point is None:
            continue
        if key == "seconds_per_image":
            if quiet and "quiet_timing" not in point:
                continue
            values.append(point.get("quiet_timing", point)["seconds_per_image"])
        elif key == "gflops_per_image":
            values.append(run["flops_per_image"][str(steps)] / 1e9)
        elif key == "parameters":
            values.append(run["parameters"])
        else:
            values.append(point["metrics"].get(key))
    return [v for v in values if v is not None]


def figure(runs: list[dict], steps: int, key: str) -> tuple[float, float | None, int]:
    """Mean, std and count over the runs of one figure at one sampling point (:func:`seed_values`)."""
    values = seed_values(runs, steps, key)
    mean, std = mean_std(values)
    return mean, std, len(values)


def differs(a: tuple, b: tuple) -> bool | None:
    """Whether two cells' means differ by more than the seed-to-seed spread: |mean_a - mean_b| > std_a + std_b
    (None when either has fewer than two seeds: no spread to compare with)."""
    if a[1] is None or b[1] is None:
        return None
    return abs(a[0] - b[0]) > a[1] + b[1]


# Columns of the main table: (key, header, format); keys as :func:`figure` reads them.
COLUMNS = (
    ("fid", "FID", ".1f"),
    ("sfid", "sFID", ".1f"),
    ("precision", "precision", ".3f"),
    ("recall", "recall", ".3f"),
    ("demo_fid", "demo-FID", ".3f"),
    ("class_accuracy", "class acc.", ".3f"),
    ("seconds_per_image", "s / image", ".4f"),
    ("gflops_per_image", "GFLOPs / image", ".2f"),
    ("parameters", "parameters", ",.0f"),
)
# Columns the architecture fixes (the same for every seed): one value, no "± 0"; a spread would still show.
ARCHITECTURE_COLUMNS = frozenset({"gflops_per_image", "parameters"})


def _cell_text(value: tuple, fmt: str, fixed: bool = False) -> str:
    """``mean ± std`` of a :func:`figure`; the mean alone with one seed, or when ``fixed`` and the seeds agree."""
    mean, std, n = value
    if n == 0 or math.isnan(mean):
        return "–"
    if std is None or (fixed and std == 0.0):
        return format(mean, fmt)
    return f"{format(mean, fmt)} ± {format(std, fmt)}"


def main_table(grid: dict, steps: int = EVAL_STEPS) -> list[str]:
    header = "| cell | seeds | " + " | ".join(h for _, h, _ in COLUMNS) + " |"
    lines = [header, "|---|---:|" + "---:|" * len(COLUMNS)]
    for cell in CELLS:
        runs = grid.get(cell.name, [])
        n = len(runs)
        cells = ["–"] * len(COLUMNS)
        if n:
            cells = [_cell_text(figure(runs, steps, key), fmt, key in ARCHITECTURE_COLUMNS) for key, _, fmt in COLUMNS]
        lines.append(f"| {cell.label} (`{cell.name}`) | {n} | " + " | ".join(cells) + " |")
    return lines


def floor_row(results_dir: str | os.PathLike) -> str | None:
    """The real-data floor (the demo's train digits against the held-out ones) from the sampling benchmark's
    files, with the digit classifier's held-out accuracy."""
    from parscale_ear_hf.results import load_results

    inception = load_results(Path(results_dir, "sampling_quality", "floor_inception.json"))
    digit = load_results(Path(results_dir, "sampling_quality", "floor_digit.json"))
    classifier = load_results(Path(results_dir, "digit_classifier.json"))
    if inception is None and digit is None:
        return None
    values = {}
    for record in (inception, digit):
        for key, value in (record or {}).get("metrics", {}).items():
            if key.endswith("_real_train"):
                values[key.removesuffix("_real_train")] = value
    accuracy = (classifier or {}).get("metrics", {}).get("heldout_accuracy") if classifier else None
    texts = {
        "fid": values.get("fid"),
        "sfid": values.get("sfid"),
        "precision": values.get("precision"),
        "recall": values.get("recall"),
        "demo_fid": values.get("demo_fid"),
        "class_accuracy": accuracy,
    }
    cells = [format(texts[key], fmt) if texts.get(key) is not None else "–" for key, _, fmt in COLUMNS]
    return "| real train digits vs held-out (the floor) | – | " + " | ".join(cells) + " |"


# The comparisons docs/experiments.md states (the README in short); each: (claim, metric, cell a, cell b, what
# would support the claim).
COMPARISONS = (
    ("A1: LiteHybrid costs no quality", "fid", "lh_both", "lh_off", "lh_both not worse"),
    ("A3: the coarse branch contributes", "fid", "lh_both", "lh_fine", "lh_both better"),
    ("A3: the fine branch contributes", "fid", "lh_both", "lh_coarse", "lh_both better"),
    ("A3: coarse + fine improve FID by 15% over off", "fid", "lh_both", "lh_off", "15% better"),
    ("ParScale: P = 2 beats P = 1", "fid", "p2", "lh_both", "p2 better"),
    ("ParScale: P = 4 beats P = 1", "fid", "p4", "lh_both", "p4 better"),
    ("ParScale: P = 4 beats P = 1 made wider to its FLOPs", "fid", "p4", "p1_wide", "p4 better"),
    ("ParScale: P = 4 beats P = 1 made deeper to its FLOPs", "fid", "p4", "p1_deep", "p4 better"),
    ("EAR: the energy head matches the diffusion head", "fid", "lh_both", "diffusion_head", "lh_both not worse"),
    ("EAR: the energy head samples faster than the diffusion head", "seconds_per_image", "lh_both",
     "diffusion_head", "lh_both better"),
    ("EAR against a same-size DiT", "fid", "lh_both", "dit", "lh_both not worse"),
    ("Control: the demo pins cost EAR nothing", "fid", "lh_both", "lh_both_exact", "lh_both not worse"),
)  # fmt: skip
METRIC_NAMES = {"fid": ("FID", ".1f"), "seconds_per_image": ("s / image", ".4f")}


def verdict(grid: dict, metric: str, a: str, b: str, support: str, steps: int = EVAL_STEPS) -> dict:
    """One comparison: both means and spreads, the difference, whether it exceeds the spread, and the
    verdict on the claim (lower is better for FID-like metrics)."""
    fa, fb = figure(grid.get(a, []), steps, metric), figure(grid.get(b, []), steps, metric)
    row = {"a": fa, "b": fb}
    if fa[2] == 0 or fb[2] == 0:
        return {**row, "verdict": "not measured yet"}
    beyond = differs(fa, fb)
    change = (fa[0] - fb[0]) / fb[0]
    row.update(change=change, beyond_spread=beyond)
    if beyond is None:
        return {**row, "verdict": "one seed only: no spread to judge by"}
    if support == "15% better":
        ok = change <= -0.15 and beyond
        return {**row, "verdict": "supported" if ok else "not supported at this scale"}
    if support.endswith("not worse"):  # worse by more than the spread refutes it; within the spread supports it
        return {**row, "verdict": "supported (within the spread, or better)" if not (beyond and change > 0)
                else "not supported at this scale (worse beyond the spread)"}  # fmt: skip
    ok = beyond and change < 0
    return {**row, "verdict": "supported" if ok else
            ("within the seed-to-seed spread: not supported" if not beyond else "not supported (worse)")}  # fmt: skip


def claims_table(grid: dict) -> list[str]:
    """One row per claim: its metric, both cells' mean ± std, the relative change, whether it exceeds the spread,
    the verdict, and for FID claims the same change in demo-FID beside it (the stand-in extractor)."""
    lines = ["| claim | metric | A | B | A's | B's | A vs B | beyond the spread? | verdict | demo-FID A vs B "
             "(beyond?) |", "|---|---|---|---|---:|---:|---:|---|---|---:|"]  # fmt: skip
    yes_no = {True: "yes", False: "no", None: "–"}
    for claim, metric, a, b, support in COMPARISONS:
        name, fmt = METRIC_NAMES[metric]
        v = verdict(grid, metric, a, b, support)
        d = verdict(grid, "demo_fid", a, b, support) if metric == "fid" else {}
        change = f"{v['change']:+.1%}" if "change" in v else "–"
        demo = f"{d['change']:+.1%} ({yes_no[d.get('beyond_spread')]})" if "change" in d else "–"
        lines.append(
            f"| {claim} | {name} | `{a}` | `{b}` | {_cell_text(v['a'], fmt)} | {_cell_text(v['b'], fmt)} | {change} | "
            f"{yes_no[v.get('beyond_spread')]} | {v['verdict']} | {demo} |"
        )
    return lines


def curve_table(grid: dict) -> list[str]:
    lines = ["| model | steps | seeds | s / image | FID | demo-FID |", "|---|---:|---:|---:|---:|---:|"]
    for name in GROUPS["head"]:
        for steps in sorted({EVAL_STEPS, *CURVE_STEPS}):
            runs = grid.get(name, [])
            sec, fid, dfid = (figure(runs, steps, key) for key in ("seconds_per_image", "fid", "demo_fid"))
            if fid[2]:
                lines.append(f"| `{name}` | {steps} | {fid[2]} | {_cell_text(sec, '.4f')} | "
                             f"{_cell_text(fid, '.1f')} | {_cell_text(dfid, '.3f')} |")  # fmt: skip
    return lines


def plot_report(grid: dict, path: Path) -> bool:
    """Three panels: A3 bars with error bars; FID against seconds per image (each head and DiT, at their step
    counts); FID against P beside FID against backbone FLOPs (P = 1, 2, 4, wider, deeper). False: nothing yet."""
    if not any(grid.values()):
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib import ticker

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    ax = axes[0]
    names = GROUPS["lite_hybrid"]
    stats = [figure(grid.get(n, []), EVAL_STEPS, "fid") for n in names]
    xs = np.arange(len(names))
    # An error bar only where there is a spread (two seeds or more); each seed's own FID drawn over its bar.
    yerr = [s[1] if s[1] is not None else np.nan for s in stats]
    ax.bar(xs, [s[0] if s[2] else 0 for s in stats], yerr=yerr, capsize=4, color="#4c72b0")
    for x, name, stat in zip(xs, names, stats):
        seeds = seed_values(grid.get(name, []), EVAL_STEPS, "fid")
        ax.plot([x] * len(seeds), seeds, "o", color="black", markersize=3)
        text = f"n = {stat[2]}" if stat[2] else "not run yet"
        ax.annotate(text, (x, 0), xytext=(0, 4), textcoords="offset points", ha="center", va="bottom", fontsize=8,
                    color="white" if stat[2] else "black", rotation=0 if stat[2] else 90)  # fmt: skip
    ax.set_xticks(xs, ["off", "coarse", "fine", "both"])
    ax.set_ylabel(f"Inception FID (mean ± std, dots: seeds; {EVAL_STEPS} steps)")
    ax.set_title("A3: LiteHybrid branches")
    ax = axes[1]
    for name, marker in zip(GROUPS["head"], "osD"):
        pts = []
        for steps in sorted({EVAL_STEPS, *CURVE_STEPS}):
            sec, fid = figure(grid.get(name, []), steps, "seconds_per_image"), figure(grid.get(name, []), steps, "fid")
            if fid[2]:
                pts.append((sec, fid, steps))
        if pts:
            ax.errorbar([p[0][0] for p in pts], [p[1][0] for p in pts], xerr=[p[0][1] or 0 for p in pts],
                        yerr=[p[1][1] or 0 for p in pts], marker=marker, capsize=3, label=name)  # fmt: skip
            for sec, fid, steps in pts:
                ax.annotate(str(steps), (sec[0], fid[0]), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xscale("log")
    ax.xaxis.set_major_locator(ticker.LogLocator(subs=(1.0, 2.0, 5.0)))  # 0.05, 0.1, 0.2, ...: a short log axis
    ax.xaxis.set_major_formatter(ticker.FormatStrFormatter("%g"))
    ax.xaxis.set_minor_formatter(ticker.NullFormatter())  # matplotlib's minor labels collide here
    ax.set_xlabel("sampling seconds per image (CPU; see the table for how timed)")
    ax.set_ylabel("Inception FID")
    ax.set_title("speed-quality (labels: steps)")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    ax = axes[2]
    series = [("lh_both", 1), ("p2", 2), ("p4", 4)]
    pts = [(figure(grid.get(n, []), EVAL_STEPS, "gflops_per_image"), figure(grid.get(n, []), EVAL_STEPS, "fid"), p)
           for n, p in series]  # fmt: skip
    pts = [p for p in pts if p[1][2]]
    if pts:
        ax.errorbar([p[0][0] for p in pts], [p[1][0] for p in pts], yerr=[p[1][1] or 0 for p in pts], marker="o",
                    capsize=3, label="ParScale P = 1, 2, 4")  # fmt: skip
        for flops, fid, p in pts:
            ax.annotate(f"P={p}", (flops[0], fid[0]), textcoords="offset points", xytext=(4, 4), fontsize=8)
    for name, marker, label in (("p1_wide", "s", "P = 1 wider"), ("p1_deep", "^", "P = 1 deeper")):
        runs = grid.get(name, [])
        flops, fid = figure(runs, EVAL_STEPS, "gflops_per_image"), figure(runs, EVAL_STEPS, "fid")
        if fid[2]:
            ax.errorbar([flops[0]], [fid[0]], yerr=[fid[1] or 0], marker=marker, capsize=3, linestyle="none",
                        label=label)  # fmt: skip
    ax.set_xlabel(f"GFLOPs per image ({EVAL_STEPS} steps, guidance)")
    ax.set_ylabel("Inception FID")
    ax.set_title("P streams against width and depth")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def provenance_lines(grid: dict) -> list[str]:
    """The revisions and machines of the runs and of their retimes (a retimed record keeps its run's provenance)."""
    records = [p for runs in grid.values() for r in runs for p in (r.get("run_provenance"), r["provenance"]) if p]
    revisions = sorted({p["git_revision"][:12] for p in records})
    machines = sorted({f"{p['machine']['cpu']} ({p['machine']['cpu_count']} cores)" for p in records})
    return [f"Revisions: {', '.join(revisions) or '–'}; machines: {', '.join(machines) or '–'}."]


def compute_line(grid: dict) -> str | None:
    """The grid's compute so far: training and sampling hours summed over the complete runs that record them."""
    runs = [r for runs in grid.values() for r in runs if "train" in r]
    if not runs:
        return None
    train = sum(r["train"]["seconds"] for r in runs)
    sampling = sum(p["timing"]["sampling_seconds"] for r in runs for p in r["points"].values())
    these = f"these {len(runs)} runs" if len(runs) > 1 else "this 1 run"
    return (f"Compute of {these}: {train / 3600:.1f} h of training and {sampling / 3600:.1f} h of "
            "sampling, summed over runs (each on one CPU thread beside a second worker: two workers take about "
            "half the sum in wall-clock time; a run resumed after a kill counts from its last start; loading and "
            "feature extraction not included).")  # fmt: skip


def retrained_line(grid: dict) -> str | None:
    """The runs trained a second time whose final loss did not reproduce the lost first training's."""
    runs = [
        r for runs in grid.values() for r in runs if r.get("train", {}).get("retrained", {}).get("reproduced") is False
    ]
    if not runs:
        return None
    items = []
    for r in runs:
        lost = r["train"]["retrained"]
        items.append(f"`{r['cell']}` seed {r['seed']} ({r['train']['final_loss']:.5f} against "
                     f"{lost['lost_final_loss']:.5f} at {lost['lost_git_revision'][:12]})")  # fmt: skip
    return (
        "Trained again after the first training's folder was lost, with a final loss that differs from the "
        f"lost one's (the figures are the second training's): {'; '.join(items)}."
    )


def length_lines(results_dir: str | os.PathLike) -> list[str]:
    """The pilot's loss and demo-FID by training step (`results/experiments_length.json`), if it ran."""
    from parscale_ear_hf.results import load_results, short_revision

    pilot = load_results(Path(results_dir, "experiments_length.json"))
    if pilot is None or not pilot.get("points"):
        return []
    losses = dict((int(step), loss) for step, loss in pilot["loss"])
    lines = ["How the training length was chosen: one pilot run of `lh_both` (seed 0), its EMA weights scored "
             f"at every checkpoint (demo-FID, {EVAL_STEPS} steps, one sampling seed; "
             f"`python examples/experiments.py --length-curve`, {short_revision(pilot)}):", "",
             "| training step | loss (mean of the logged steps since the last checkpoint) | demo-FID |",
             "|---:|---:|---:|"]  # fmt: skip
    previous = 0
    for step in sorted(int(k) for k in pilot["points"]):
        window = [loss for s, loss in losses.items() if previous < s <= step]
        loss = f"{np.mean(window):.3f}" if window else "–"
        lines.append(f"| {step} | {loss} | {pilot['points'][str(step)]['demo_fid']:.3f} |")
        previous = step
    return lines + [""]


def timing_note(grid: dict) -> str:
    """Where the table's seconds per image come from: timed alone (`--retime`) or beside a second worker."""
    points = [p for runs in grid.values() for r in runs for p in r["points"].values()]
    quiet = [p["quiet_timing"] for p in points if "quiet_timing" in p]
    if not quiet:
        return (
            "the median batch of each evaluation, one CPU thread, beside a second grid worker: noisy (run "
            "`--retime` with the grid stopped)"
        )
    q = quiet[0]
    how = f"(median of {q['repeats']} calls of a batch of {q['batch']}, {q['threads']} thread(s), "
    how += f"{q['machine']['cpu']})"
    if len(quiet) == len(points):
        return f"every point timed alone by `--retime` {how}"
    missing = sorted(f"`{name}` seed {r['seed']}" for name, runs in grid.items() for r in runs
                     if any("quiet_timing" not in p for p in r["points"].values()))  # fmt: skip
    return (
        f"{len(quiet)} of {len(points)} points timed alone by `--retime` {how}; a cell's figure is the mean "
        "over its seeds timed alone, leaving out the runs not timed alone (their pipelines were not kept, or "
        "`--retime` has not reached them yet): " + ", ".join(missing)
    )


def report_markdown(results_dir: str | os.PathLike, png_name: str = "experiments.png") -> str:
    grid = load_grid(Path(results_dir, "experiments"))
    total = sum(len(runs) for runs in grid.values())
    settings = next((r["settings"] for runs in grid.values() for r in runs), None)
    lines = [
        f"_{total} of {len(CELLS) * len(SEEDS)} runs complete ({len(CELLS)} cells x {len(SEEDS)} seeds); "
        "each figure is the mean ± the sample standard deviation over the complete seeds of its cell. "
        "Written by `python examples/experiments.py --report` from `results/experiments/<cell>/seed<k>.json`._",
        "",
    ]
    if settings:
        lines += [f"Every run: {settings['training_steps']} training steps at batch 64 on `{settings['latents']}`; "
                  f"{settings['images_per_class']} samples per class at {EVAL_STEPS} steps (guidance {GUIDANCE}, "
                  f"temperature {TEMPERATURE}; the DiT: its scheduler's steps, guidance {DIT_GUIDANCE}) against "
                  f"`{settings['dataset']}` [{settings['split']}]. FID, sFID, precision and recall: the FID "
                  "Inception-v3; demo-FID and class accuracy: the digit classifier, on the same samples. "
                  f"Seconds per image: {timing_note(grid)}.",
                  ""]  # fmt: skip
    lines += main_table(grid)
    floor = floor_row(results_dir)
    if floor:
        lines.append(floor)
    lines += ["", "A difference **exceeds the seed-to-seed spread** when the two means are further apart than the "
              "sum of the two standard deviations.", ""]  # fmt: skip
    lines += claims_table(grid)
    lines += ["", "Speed against quality:", ""] + curve_table(grid)
    lines += ["", f"![the grid's plots]({png_name})", ""] + provenance_lines(grid) + [""]
    for line in (compute_line(grid), retrained_line(grid)):
        if line:
            lines += [line, ""]
    lines += length_lines(results_dir)
    return "\n".join(lines) + "\n"


def write_report(results_dir: str | os.PathLike) -> str:
    """`results/experiments.md` and `results/experiments.png` from the results files; returns the markdown."""
    grid = load_grid(Path(results_dir, "experiments"))
    has_plot = plot_report(grid, Path(results_dir, "experiments.png"))
    text = report_markdown(results_dir, png_name="experiments.png" if has_plot else "")
    if not has_plot:
        text = text.replace("![the grid's plots]()\n", "")
    Path(results_dir, "experiments.md").write_text(text, encoding="utf-8")
    return text


def readme_section(results_dir: str | os.PathLike) -> str:
    """The `experiments` block of docs/experiments.md: the report with the plot's path from the repository root."""
    grid = load_grid(Path(results_dir, "experiments"))
    if not any(grid.values()):
        return "\n".join(["_No run of the grid is complete yet: `python examples/experiments.py` runs it._", "",
                          *length_lines(results_dir)])  # fmt: skip
    return report_markdown(results_dir, png_name=f"{Path(results_dir).name}/experiments.png")


# ------------------------------------------------------------------------------ choosing the length


def pipeline_from_checkpoint(train_dir: Path, checkpoint: Path):
    """A :class:`~parscale_ear_hf.ParScaleEARPipeline` holding the EMA weights of one training checkpoint."""
    from safetensors.torch import load_file

    from parscale_ear_hf.pipeline_parscale_ear import ParScaleEARPipeline
    from parscale_ear_hf.training.generator import build_components
    from parscale_ear_hf.training.latent_cache import load_cache_vae
    from parscale_ear_hf.training.objectives import EARTrainingModel

    run_config = json.loads((train_dir / "run_config.json").read_text(encoding="utf-8"))
    flags = run_config["args"]
    info = run_config["latent_cache"]
    ablation = argparse.Namespace(**{k: flags[k] for k in ("parscale_n", "no_coarse", "no_fine", "latents")})
    model = EARTrainingModel(*build_components(run_config["model_config"], info, ablation))
    model.load_state_dict(load_file(checkpoint / "model.safetensors"))
    shadow = load_file(checkpoint / "ema.safetensors")
    params = list(model.parameters())
    if len(shadow) != len(params):
        raise ValueError(f"{checkpoint}: {len(shadow)} EMA tensors for a model of {len(params)} parameters.")
    with torch.no_grad():
        for i, p in enumerate(params):
            p.copy_(shadow[str(i)])
    id2label = {int(k): v for k, v in info["id2label"].items()} if info.get("id2label") else None
    parts = [m.float().eval() for m in (model.lite_hybrid, model.transformer, model.energy_head)]
    vae = load_cache_vae("experiments", flags["latents"], info, flags["vae"])
    return ParScaleEARPipeline(vae, *parts, id2label=id2label)


def length_curve(args) -> dict:
    """The pilot run behind :data:`GRID_STEPS`: ``lh_both`` at seed 0 trained for ``--pilot-steps`` with a checkpoint
    every ``--pilot-every`` steps (all kept), each checkpoint's EMA weights scored by demo-FID (the digit classifier,
    ``--images-per-class`` per class, exact sampling at the grid's point); `<results-dir>/../experiments_length.json`
    holds the loss and demo-FID curves. Resumable like a grid run."""
    from parscale_ear_hf.results import load_results, write_results

    cell = CELLS_BY_NAME["lh_both"]
    train_dir = Path(args.work_dir) / "length" / "train"
    results_path = Path(args.results_dir).parent / "experiments_length.json"
    record = load_results(results_path) or {"points": {}}
    record.pop("provenance", None)
    pilot = argparse.Namespace(**{**vars(args), "steps": args.pilot_steps, "checkpoint_every": args.pilot_every})
    command = train_command(cell, 0, pilot, train_dir)
    keep = command.index("--keep-checkpoints") + 1
    command[keep] = str(args.pilot_steps // args.pilot_every + 1)
    if not (train_dir / "pipeline" / "model_index.json").is_file():
        run_command(command, train_dir.parent / "log.txt")
    record["command"] = "parscale-ear " + " ".join(command)
    record["loss"] = [(line["step"], line["loss"]) for line in map(json.loads, (train_dir / "train_log.jsonl").open())]
    for checkpoint in sorted((train_dir / "checkpoints").glob("checkpoint-*")):
        step = int(checkpoint.name.split("-")[1])
        if str(step) in record["points"]:
            continue
        folder = train_dir.parent / f"pipeline-{step}"
        if not (folder / "model_index.json").is_file():
            pipeline_from_checkpoint(train_dir, checkpoint).save_pretrained(folder)
        work = train_dir.parent / f"eval-{step}"
        run_command(["eval", "--model", str(folder), "--extractor", "digit", "--classifier", args.classifier,
                     "--dataset", args.dataset, "--split", args.split,
                     "--reference-cache-dir", args.reference_cache_dir,
                     "--images-per-class", str(args.images_per_class), "--batch-size", str(args.eval_batch_size),
                     "--steps", str(EVAL_STEPS), "--guidance", str(GUIDANCE), "--temperature", str(TEMPERATURE),
                     "--seed", str(SAMPLING_SEED_OFFSET), "--output-dir", str(work), "--cpu"],
                    train_dir.parent / "log.txt")  # fmt: skip
        metrics = json.loads((work / "results.json").read_text(encoding="utf-8"))["metrics"]
        record["points"][str(step)] = {"demo_fid": metrics["demo_fid"], "demo_precision": metrics["demo_precision"],
                                       "demo_recall": metrics["demo_recall"]}  # fmt: skip
        write_results(results_path, record)
    record["what"] = ("loss: (step, training loss) of every logged step; points: demo-FID of the EMA weights at each "
                      "checkpoint, one sampling seed")  # fmt: skip
    return write_results(results_path, record)


# ------------------------------------------------------------------------------ timing alone


def retime(args) -> dict:
    """Time every complete run's sampling points again with nothing else of the grid running: the grid's workers
    time their evaluations beside each other, which is too noisy to rank samplers by. Each point: one warm-up call,
    then the median of ``--retime-repeats`` calls of one evaluation batch (``--eval-batch-size`` images, the classes
    in turn, output as tensors), in this process's threads, for the ``--cells`` and ``--seeds`` given, in that
    order; stored as the point's ``quiet_timing`` (used by the report where present). Points timed already are
    skipped."""
    from parscale_ear_hf.results import git_revision, load_results, machine_description, write_results

    done = {}
    for cell in (CELLS_BY_NAME[name] for name in args.cells):  # in the order given
        for seed in args.seeds:
            path = Path(args.results_dir) / cell.name / f"seed{seed}.json"
            record = load_results(path)
            if not record or not record.get("complete"):
                continue
            todo = [k for k, point in record["points"].items() if "quiet_timing" not in point]
            if not todo:
                continue
            folder = Path(args.work_dir) / cell.name / f"seed{seed}" / "train" / "pipeline"
            if not (folder / "model_index.json").is_file():  # trained in a sitting whose runs/ was not kept
                print(f"[experiments] {cell.name}/seed{seed}: no saved pipeline at {folder}, not retimed", flush=True)
                continue
            pipe, _ = load_grid_pipeline(folder)
            labels = [i % pipeline_classes(pipe) for i in range(args.eval_batch_size)]
            for steps in todo:
                kwargs = sampling_kwargs(pipe, int(steps), point_guidance(cell))
                times = []
                for repeat in range(args.retime_repeats + 1):
                    generators = [torch.Generator().manual_seed(i) for i in range(len(labels))]
                    start = time.perf_counter()
                    with torch.no_grad():
                        pipe(labels, generator=generators, output_type="pt", **kwargs)
                    if repeat:  # the first call warms up
                        times.append(time.perf_counter() - start)
                record["points"][steps]["quiet_timing"] = {
                    "seconds_per_image": float(np.median(times)) / len(labels),
                    "batch": len(labels),
                    "repeats": len(times),
                    "threads": torch.get_num_threads(),
                    "git_revision": git_revision(),
                    "machine": machine_description(),
                }
                # The run's own provenance (command, revision, machine) is kept beside the retime's.
                record.setdefault("run_provenance", record.pop("provenance", None))
                write_results(path, record)
                done[f"{cell.name}/seed{seed}/s{steps}"] = record["points"][steps]["quiet_timing"]["seconds_per_image"]
                print(f"[experiments] retimed {cell.name}/seed{seed} at {steps} steps", flush=True)
    return done


# ------------------------------------------------------------------------------ the shipped model

# The energy-head EAR cells.
SHIP_CANDIDATES = ("lh_off", "lh_coarse", "lh_fine", "lh_both", "lh_both_exact", "p2", "p4", "p1_wide", "p1_deep")


def best_cell(grid: dict) -> dict:
    """The energy-head cell with the lowest mean Inception FID (exact sampling, the grid's point), among cells
    complete for every seed; with each candidate's mean and spread, and whether the winner's lead over the
    runner-up exceeds the seed-to-seed spread.

    Raises:
        ValueError: a candidate is not complete for every seed yet (a winner could still change).
    """
    missing = [f"{n} ({len(grid.get(n, []))} of {len(SEEDS)} seeds)" for n in SHIP_CANDIDATES
               if len(grid.get(n, [])) < len(SEEDS)]  # fmt: skip
    if missing:
        raise ValueError(f"the grid is not complete: {', '.join(missing)}; run examples/experiments.py first.")
    scores = {n: figure(grid[n], EVAL_STEPS, "fid") for n in SHIP_CANDIDATES}
    ranked = sorted(scores, key=lambda n: scores[n][0])
    best, second = ranked[0], ranked[1]
    return {
        "cell": best,
        "fid": {n: {"mean": scores[n][0], "std": scores[n][1]} for n in ranked},
        "runner_up": second,
        "lead_exceeds_spread": differs(scores[best], scores[second]),
    }


def exact_variant(cell: Cell) -> Cell:
    """The cell at EAR's exact architecture: its config changes with :data:`EXACT_ARCHITECTURE` on top."""
    config = {section: dict(fields) for section, fields in (cell.config or {}).items() if fields is not None}
    for section, fields in EXACT_ARCHITECTURE.items():
        config.setdefault(section, {}).update(fields)
    return dataclasses.replace(cell, config=config)


def ship(args) -> dict:
    """Retrain the grid's best exact configuration (:func:`best_cell`, or ``--ship-cell``) with the grid's recipe
    at EAR's exact architecture (:func:`exact_variant`: the demo pins dropped) for ``--ship-steps`` (seed 0, two
    threads welcome) and save it as the shipped demo model ``--ship-to`` (an atomic save; its model card and
    training logs folder are carried over, then the logs replaced). Writes ``<results-dir>/../experiments_ship.json``;
    the model's scores and card come from `train_demo.sh`'s stages."""
    import shutil

    from parscale_ear_hf.pipeline_parscale_ear import ParScaleEARPipeline
    from parscale_ear_hf.results import write_results

    grid = load_grid(Path(args.results_dir))
    choice = {"cell": args.ship_cell, "chosen_by": "--ship-cell"} if args.ship_cell else best_cell(grid)
    cell = CELLS_BY_NAME[choice["cell"]]
    if cell.name not in SHIP_CANDIDATES:
        raise ValueError(f"--ship-cell: {cell.name!r} is not an energy-head cell; accepted: {list(SHIP_CANDIDATES)}.")
    train_dir = Path(args.work_dir) / "ship" / cell.name / "train"
    shipped = argparse.Namespace(**{**vars(args), "steps": args.ship_steps})
    command = train_command(exact_variant(cell), 0, shipped, train_dir)
    if not (train_dir / "pipeline" / "model_index.json").is_file():
        run_command(command, train_dir.parent / "log.txt")
    ParScaleEARPipeline.from_pretrained(train_dir / "pipeline").save_pretrained(args.ship_to)
    logs = Path(args.ship_to) / "training"
    logs.mkdir(exist_ok=True)
    for name in ("train_log.jsonl", "run_config.json"):
        shutil.copyfile(train_dir / name, logs / name)
    fresh = [a for a in command if a not in ("--resume", "latest")]
    return write_results(
        Path(args.results_dir).parent / "experiments_ship.json",
        {
            **choice,
            "model": args.ship_to,
            "training_steps": args.ship_steps,
            "architecture": f"the cell's, at EAR's exact architecture: {json.dumps(EXACT_ARCHITECTURE)}",
            "command": "parscale-ear " + " ".join(fresh),
        },
    )


# ------------------------------------------------------------------------------ the command


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    from parscale_ear_hf.data import add_dataset_arguments

    parser.add_argument("--cells", nargs="+", choices=list(CELLS_BY_NAME), default=list(CELLS_BY_NAME))
    parser.add_argument("--seeds", nargs="+", type=int, default=list(SEEDS))
    parser.add_argument("--steps", type=int, default=GRID_STEPS, help="training steps of every run")
    parser.add_argument("--latents", default="runs/demo_latents", help="the latent cache every cell trains on")
    parser.add_argument("--base-config", default="examples/configs/mnist_demo_generator.json")
    parser.add_argument("--work-dir", default="runs/experiments", help="training and evaluation folders")
    parser.add_argument("--results-dir", default="results/experiments", help="one JSON per (cell, seed)")
    parser.add_argument("--checkpoint-every", type=int, default=100)
    parser.add_argument("--images-per-class", type=int, default=100)
    parser.add_argument("--eval-batch-size", type=int, default=100)
    parser.add_argument("--classifier", default="models/digit_classifier")
    parser.add_argument("--reference-cache-dir", default="runs/fid_refs")
    parser.add_argument(
        "--inception-extractor",
        choices=("inception", "digit"),
        default="inception",
        help="the extractor of the FID columns: the FID Inception-v3 (the grid), or the digit classifier "
        "(fast tests; the figures are then named demo_*)",
    )
    parser.add_argument("--report", action="store_true", help="only write results/experiments.{md,png}")
    parser.add_argument(
        "--retime",
        action="store_true",
        help="time the sampling of every complete run again, alone (run it with no grid worker running)",
    )
    parser.add_argument("--retime-repeats", type=int, default=3)
    parser.add_argument(
        "--length-curve",
        action="store_true",
        help="the pilot that chose the training length: lh_both, seed 0, --pilot-steps long, demo-FID per checkpoint",
    )
    parser.add_argument(
        "--ship",
        action="store_true",
        help="retrain the grid's best energy-head cell for --ship-steps and save it as --ship-to (the demo model)",
    )
    parser.add_argument("--ship-cell", default=None, choices=SHIP_CANDIDATES, help="this cell, not the grid's best")
    parser.add_argument("--ship-steps", type=int, default=4000)
    parser.add_argument("--ship-to", default="models/mnist_demo")
    parser.add_argument("--pilot-steps", type=int, default=2000)
    parser.add_argument("--pilot-every", type=int, default=250)
    add_dataset_arguments(parser, labels=False)
    for action in parser._actions:  # the held-out demo digits unless told otherwise
        if action.dest == "dataset":
            action.required = False
    parser.set_defaults(dataset="data/mnist_demo", split="heldout")
    return parser


def run(args: argparse.Namespace) -> dict:
    from parscale_ear_hf.models._checks import check_int

    results_root = Path(args.results_dir).parent
    if args.report:
        print(write_report(results_root))
        return {}
    for name in ("steps", "checkpoint_every", "images_per_class", "eval_batch_size"):
        check_int("experiments", f"--{name.replace('_', '-')}", getattr(args, name))
    for seed in args.seeds:
        check_int("experiments", "--seeds", seed, minimum=0)
    if not Path(args.latents, "cache_info.json").is_file():
        raise FileNotFoundError(
            f"experiments: --latents {args.latents!r} holds no latent cache (cache_info.json); "
            "`bash examples/train_demo.sh data vae latents` makes the demo's."
        )
    if not Path(args.classifier, "config.json").is_file():
        raise FileNotFoundError(f"experiments: --classifier {args.classifier!r} holds no DigitClassifier.")
    if args.length_curve:
        return length_curve(args)
    if args.ship:
        return ship(args)
    if args.retime:
        done = retime(args)
        write_report(results_root)
        return done
    outcome = run_grid(args)
    write_report(results_root)
    return outcome
