"""The sample-and-extract loop: a pipeline's samples, turned into features batch by batch, then scored.

Sample ``i`` has class ``i % num_classes`` (or the ``i % len(classes)``-th of a subset: :func:`sample_labels`)
and its own generator seeded by ``derived_seed(seed, i)``; batch ``k`` holds samples
``[k * batch_size, (k+1) * batch_size)`` and belongs to process ``k % world_size``. :func:`generate_features`
saves every finished batch to ``<output_dir>/parts/`` (:func:`part_path`, atomically, with the wall clock of its
pipeline call: :func:`sampling_timing`) before the next starts, so a killed run resumes; :func:`check_run_config`
refuses to resume with other settings (the weights' fingerprint among them). :func:`collect_features`
gathers the parts (each index exactly once; logits and spatial features where the extractor has them),
:func:`compute_metrics` scores them against a reference, and
:func:`write_adm_npz` assembles ADM's sample file from the PNGs.
"""

from __future__ import annotations

import json
import os
import time
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
import PIL.Image
import torch
from tqdm.auto import tqdm

from ..data import derived_seed
from .extractors import FeatureExtractor, to_uint8
from .metrics import feature_statistics, frechet_distance, inception_score, precision_recall
from .reference import Reference, _atomic_savez


def sample_labels(num_classes: int, images_per_class: int, classes: Sequence[int] | None = None) -> np.ndarray:
    """Class of each sample: ``classes[i % len(classes)]`` (``classes`` None: all, ``range(num_classes)``), so any
    consecutive run (a batch, an IS split) is balanced."""
    ids = np.arange(num_classes) if classes is None else np.asarray(classes, dtype=np.int64)
    return ids[np.arange(len(ids) * images_per_class) % len(ids)]


def part_path(output_dir: str | os.PathLike, batch_index: int) -> Path:
    return Path(output_dir) / "parts" / f"batch-{batch_index:06d}.npz"


def pipeline_num_classes(pipe) -> int:
    """Classes of a ParScaleEARPipeline (``transformer.config.num_classes``) or a DiTPipeline (its
    transformer's ``num_embeds_ada_norm``)."""
    config = pipe.transformer.config
    return config["num_classes"] if "num_classes" in config else config["num_embeds_ada_norm"]


def pipeline_call_kwargs(sampling: dict | None) -> dict:
    """The keyword arguments of ``pipe(...)`` for a `sampling` dict: as recorded in eval_config.json, with
    a ``"cache"`` dict (the fields of :class:`~parscale_ear_hf.pipeline_parscale_ear.SamplingCache`) made
    a SamplingCache; a SamplingCache or None (exact sampling) passes as it is."""
    kwargs = dict(sampling or {})
    if isinstance(kwargs.get("cache"), dict):
        from ..pipeline_parscale_ear import SamplingCache

        kwargs["cache"] = SamplingCache(**kwargs["cache"])
    return kwargs


def check_run_config(output_dir: str | os.PathLike, config: dict) -> None:
    """Write the evaluation's defining settings to `eval_config.json`, or check that the partial
    features already in `output_dir` were made with the same ones (then the run resumes). A folder
    with no features yet takes the new settings."""
    path = Path(output_dir) / "eval_config.json"
    if path.is_file() and any((Path(output_dir) / "parts").glob("batch-*.npz")):
        saved = json.loads(path.read_text(encoding="utf-8"))
        changed = {k: (saved.get(k), v) for k, v in config.items() if saved.get(k) != v}
        if changed:
            detail = "; ".join(f"{k}: {a!r} there, {b!r} now" for k, (a, b) in sorted(changed.items()))
            raise ValueError(
                f"{os.fspath(output_dir)!r} holds partial features of another evaluation ({detail}); use a new "
                "--output-dir, or the same settings to resume."
            )
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def generate_features(
    pipe,
    extractor: FeatureExtractor,
    *,
    images_per_class: int,
    output_dir: str | os.PathLike,
    batch_size: int = 50,
    seed: int = 0,
    sampling: dict | None = None,
    rank: int = 0,
    world_size: int = 1,
    png_dir: str | os.PathLike | None = None,
    progress: bool = True,
    classes: Sequence[int] | None = None,
) -> int:
    """Generate this process's batches and save their features to ``<output_dir>/parts/``.

    Batch `k` (samples ``k * batch_size`` ...) belongs to process ``k % world_size``; batches whose
    part file exists are skipped (resume). Each part also holds ``sampling_seconds``, the wall clock of
    its pipeline call alone (CUDA synchronised; no feature extraction). Returns how many batches this
    call generated.

    Args:
        pipe: a :class:`~parscale_ear_hf.ParScaleEARPipeline` or a ``diffusers.DiTPipeline``; `sampling`
            holds its keyword arguments (ours: `num_inference_steps`, `guidance_scale`, `guidance_schedule`,
            `temperature`, `cache`; DiT's: `num_inference_steps`, `guidance_scale`), see
            :func:`pipeline_call_kwargs`.
        png_dir: also write sample ``i`` to ``<png_dir>/<i:06d>.png`` (for ADM's evaluator).
        classes: the class ids sampled (:func:`sample_labels`); None: every class, as the protocol does.
    """
    labels = sample_labels(pipeline_num_classes(pipe), images_per_class, classes)
    num_batches = -(-len(labels) // batch_size)
    mine = [k for k in range(rank, num_batches, world_size) if not part_path(output_dir, k).is_file()]
    call_kwargs = pipeline_call_kwargs(sampling)
    done = 0
    for k in tqdm(mine, desc=f"sampling (rank {rank})", disable=not progress):
        indices = np.arange(k * batch_size, min((k + 1) * batch_size, len(labels)))
        # CPU generators: the same samples on any device count and device type.
        generators = [torch.Generator().manual_seed(derived_seed(seed, int(i))) for i in indices]
        start = time.perf_counter()
        images = pipe(labels[indices].tolist(), generator=generators, output_type="pt", **call_kwargs).images
        if images.is_cuda:  # the kernels are queued: wait for them, or the clock stops early
            torch.cuda.synchronize(images.device)
        seconds = time.perf_counter() - start
        images = to_uint8(images)
        out = extractor(images)
        if png_dir is not None:
            Path(png_dir).mkdir(parents=True, exist_ok=True)
            for i, image in zip(indices, images.permute(0, 2, 3, 1).cpu().numpy()):
                PIL.Image.fromarray(image.squeeze(-1) if image.shape[-1] == 1 else image).save(
                    Path(png_dir) / f"{i:06d}.png"
                )
        # Logits / spatial features only where the extractor has them (no IS / sFID otherwise).
        optional = {key: getattr(out, key).numpy() for key in ("logits", "spatial") if getattr(out, key) is not None}
        _atomic_savez(
            part_path(output_dir, k),
            indices=indices,
            labels=labels[indices],
            features=out.features.numpy(),
            sampling_seconds=np.float64(seconds),
            **optional,
        )
        done += 1
    return done


def sampling_timing(output_dir: str | os.PathLike) -> dict:
    """How long the pipeline calls of the parts in `output_dir` took (:func:`generate_features`).

    Returns:
        ``sampling_seconds`` (summed over batches and processes), ``images``, ``batches``,
        ``sampling_seconds_per_image`` (their ratio: the first batch of each process, with any warm-up or
        compilation, included) and ``median_batch_seconds_per_image`` (the median over batches of a
        batch's seconds per image: robust to that warm-up); or ``{"not_measured": why}`` when a part was
        written before the time was recorded.
    """
    per_batch = []
    for path in sorted((Path(output_dir) / "parts").glob("batch-*.npz")):
        with np.load(path) as part:
            if "sampling_seconds" not in part:
                return {"not_measured": f"{path.name} was written without its sampling time (an older run)"}
            per_batch.append((float(part["sampling_seconds"]), len(part["indices"])))
    if not per_batch:
        return {"not_measured": f"{os.fspath(output_dir)}/parts holds no batches"}
    seconds, images = sum(s for s, _ in per_batch), sum(n for _, n in per_batch)
    return {
        "sampling_seconds": seconds,
        "images": images,
        "batches": len(per_batch),
        "sampling_seconds_per_image": seconds / images,
        "median_batch_seconds_per_image": float(np.median([s / n for s, n in per_batch])),
    }


class SampleFeatures(NamedTuple):
    """The gathered parts, in sample order: `features` `(N, D)`, `logits` `(N, K)` or None, `labels`
    `(N,)`, `spatial` `(N, S)` or None (None: the extractor has no classifier / spatial features)."""

    features: np.ndarray
    logits: np.ndarray | None
    labels: np.ndarray
    spatial: np.ndarray | None


def collect_features(output_dir: str | os.PathLike, num_samples: int) -> SampleFeatures:
    """All parts -> :class:`SampleFeatures` in sample order; raises when a sample is missing or appears
    twice."""
    parts = sorted((Path(output_dir) / "parts").glob("batch-*.npz"))
    loaded = [np.load(p) for p in parts]
    indices = np.concatenate([p["indices"] for p in loaded]) if loaded else np.zeros(0, int)
    if len(indices) != num_samples or not np.array_equal(np.sort(indices), np.arange(num_samples)):
        raise RuntimeError(
            f"collect_features: {os.fspath(output_dir)}/parts holds {len(indices)} samples "
            f"({len(np.unique(indices))} distinct), expected each of 0..{num_samples - 1} once; rerun to resume."
        )
    order = np.argsort(indices)
    stack = {
        key: np.concatenate([p[key] for p in loaded])[order] if all(key in p for p in loaded) else None
        for key in SampleFeatures._fields
    }
    return SampleFeatures(**stack)


def compute_metrics(
    samples: SampleFeatures, reference: Reference, extractor: FeatureExtractor, device: str | torch.device = "cpu"
) -> tuple[dict[str, float], dict[str, str]]:
    """The metrics of `samples` against `reference`, as ADM's evaluator computes them: FID (features),
    sFID (Frechet distance of the spatial features' statistics), Inception Score (logits), precision /
    recall (features against the reference's). Keys carry the extractor's prefix (``demo_fid`` for
    the stand-in).

    Returns:
        The metrics, and for each metric that could not be computed, the reason (``{"sfid": ...}``).
    """
    p = extractor.metric_prefix
    not_computed = extractor.not_computed()
    metrics = {f"{p}fid": frechet_distance(*feature_statistics(samples.features), reference.mu, reference.sigma)}
    if samples.spatial is not None:
        if reference.mu_s is None:
            not_computed["sfid"] = f"not computed: the reference {reference.source} has no mu_s / sigma_s"
        else:
            mu_s, sigma_s = feature_statistics(samples.spatial)
            metrics[f"{p}sfid"] = frechet_distance(mu_s, sigma_s, reference.mu_s, reference.sigma_s)
    if samples.logits is not None:
        metrics[f"{p}is"], metrics[f"{p}is_std"] = inception_score(samples.logits)
    if reference.features is None:
        not_computed["precision_recall"] = f"not computed: the reference {reference.source} has no features"
    else:
        metrics[f"{p}precision"], metrics[f"{p}recall"] = precision_recall(
            reference.features, samples.features, device=device
        )
    return metrics, not_computed


def write_adm_npz(png_dir: str | os.PathLike, path: str | os.PathLike, num_samples: int) -> None:
    """PNG samples ``000000.png`` ... -> ADM's sample file (an .npz with `arr_0` `(N, H, W, 3)` uint8),
    written image by image into the zip, so the N images are never all in memory."""
    png_dir, path = Path(png_dir), Path(path)
    first = np.asarray(PIL.Image.open(png_dir / f"{0:06d}.png").convert("RGB"))
    header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.uint8)), "fortran_order": False}
    header["shape"] = (num_samples, *first.shape)
    tmp = path.with_name(path.name + ".tmp")
    with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as archive:
        with archive.open("arr_0.npy", "w", force_zip64=True) as f:
            np.lib.format.write_array_header_2_0(f, header)
            for i in range(num_samples):
                image = np.asarray(PIL.Image.open(png_dir / f"{i:06d}.png").convert("RGB"))
                if image.shape != first.shape:
                    raise ValueError(f"write_adm_npz: {i:06d}.png is {image.shape}, the first sample {first.shape}.")
                f.write(np.ascontiguousarray(image).tobytes())
    os.replace(tmp, path)
