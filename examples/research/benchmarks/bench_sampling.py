"""Sampling speed and what it costs in quality: sections `reference`, `cache` and `quality` of the
benchmark (`examples/benchmark.py`), their targets, report and plot.

- `reference`: our exact sampler against the authors' ``EAR.sample_tokens`` (shaochenze/EAR at
  9256a9f, imported from a checkout outside this repository, see :mod:`research.reference.reference_ear`)
  at the same config and weights, timed in alternating rounds in one process, at the demo model's
  shape and a mid-size config. Without a checkout (``--reference-code DIR``) or timm, the section
  records why it was skipped.
- `mar_reference`: the same for MAR: our pipeline with MAR's backbone and diffusion head against the authors'
  ``MAR.sample_tokens`` (LTH14/mar at fe470ac, from a checkout, see :mod:`research.reference.reference_mar`)
  at one random-weight config (:data:`research.reference.reference_mar.MAR_CONFIG`), exact and cached, in
  alternating rounds. Without a checkout (``--mar-reference-code DIR`` or ``$MAR_REFERENCE_CODE``) it records
  why it was skipped.
- `cache`: exact sampling against the sampling caches (``cache=SamplingCache(...)``), the compiled
  backbone step (``pipe.enable_compiled_step()``) and both, in alternating rounds, for the demo model
  and a mid-size config (random weights). Where the compiled step is not faster than eager at
  batch 16, a profile of both says where the time goes.
- `quality`: the demo model's samples (100 per class) scored by ``parscale-ear eval`` with the FID
  Inception-v3 (FID, sFID) and the digit classifier (demo-FID) against the held-out split, exact and
  cached at several step counts from each sampling seed of ``--quality-seeds`` (the report shows the mean
  over seeds and their spread), each cache alone and the compiled step at one, beside ``DiTPipeline``
  at several step counts (``--dit-model``, from ``parscale-ear train-dit``; recorded as absent when
  missing) and the real-data floor (``parscale-ear eval-vae --baseline-split train``). Seconds per
  image are the eval's own timing of the pipeline calls. Each point writes its own results JSON as it
  finishes; a finished point is skipped when the section runs again, a killed one resumes.

    python examples/benchmark.py --sections reference cache --reference-code /path/to/EAR   # CPU: ~30 min
    python examples/benchmark.py --sections mar_reference --mar-reference-code /path/to/mar --sampling-steps 16
        # shared 2-core CPU: ~6 min; the 64-step cell adds ~15 min
    python examples/benchmark.py --sections quality                                          # CPU: hours
    python examples/update_readme.py

The rows merge into `results/benchmark_<profile>.json` (each section with its provenance); the
report is `results/benchmark_<profile>_sampling.{md,png}` and the `sampling-speed` block of docs/benchmarks.md.
The targets are checked by this output, never by timed tests.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import statistics
import subprocess
import sys
from functools import partial
from pathlib import Path
from typing import Callable

import torch

from parscale_ear_hf.commands import cli_process
from parscale_ear_hf.results import short_revision
from research.reference.reference_ear import DEMO_CONFIG, MID_CONFIG, ReferenceUnavailable
from research.reference.reference_mar import MAR_CONFIG

GUIDANCE, TEMPERATURE = 3.0, 0.7
MAR_TEMPERATURE = 1.0  # MAR's default (main_mar.py)
# The cached variants use SamplingCache's defaults, unless --sampling-cache overrides some fields.
DEFAULT_CACHE: dict = {}
CONFIGS = {"demo": DEMO_CONFIG, "mid": MID_CONFIG}
# Bounds of the issue's targets.
CACHED_SPEEDUP, CACHED_FID_INCREASE, REFERENCE_SPEEDUP = 2.5, 0.05, 1.2
# Quality variants: (cache fields or None, compiled step).
VARIANTS = {
    "exact": (None, False),
    "cached": ({}, False),
    "token_cache": ({"condition_cache": False}, False),
    "condition_cache": ({"token_cache": False}, False),
    "compiled": (None, True),
    "cached_compiled": ({}, True),
}
SPEED_VARIANTS = ("exact", "cached", "compiled", "cached_compiled")
SECTIONS = ("reference", "mar_reference", "cache", "quality")


def make_cache(fields: dict):
    """A :class:`SamplingCache` from `fields` (the pipeline's dataclass; its defaults fill the rest)."""
    from parscale_ear_hf.pipeline_parscale_ear import SamplingCache

    return SamplingCache(**fields)


def variant_cache(variant: str, cache_fields: dict):
    """The `cache=` argument of `variant` (None: exact), its fields overriding `cache_fields`."""
    if variant not in VARIANTS:
        raise ValueError(f"bench_sampling: unknown variant {variant!r}; accepted: {sorted(VARIANTS)}.")
    overrides, _ = VARIANTS[variant]
    return None if overrides is None else make_cache({**cache_fields, **overrides})


def describe_cache(cache) -> dict | None:
    return None if cache is None else dataclasses.asdict(cache)


# ------------------------------------------------------------------------------ timing


def measure_interleaved(b, fns: dict[str, Callable], warmup: int = 1, repeats: int | None = None):
    """Time each of `fns` in alternating rounds (A B C, then C B A, ...), so that a slow spell of the
    machine falls on all of them alike; the number of rounds shrinks (to at least 3) when a round
    would overrun the bench's budget per measurement times the number of functions.

    Returns:
        ``(rows, times)``: per name a row as ``Bench.measure`` gives it (median / min / max seconds,
        repeats, warmup, `first_s`: the first warm-up call), and the
        seconds of every round, in round order (for paired ratios, :func:`paired_ratio`).
    """
    names = list(fns)
    first: dict[str, float] = {}
    for _ in range(warmup):
        for name in names:
            elapsed = b._once(fns[name])
            first.setdefault(name, elapsed)
    repeats = repeats or b.repeats
    if first and sum(first.values()) * repeats > b.budget_s * len(names):
        repeats = max(3, int(b.budget_s * len(names) / max(sum(first.values()), 1e-9)))
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeats):
        for name in names if r % 2 == 0 else reversed(names):
            times[name].append(b._once(fns[name]))
    rows = {
        name: {
            "median_s": statistics.median(t),
            "min_s": min(t),
            "max_s": max(t),
            "repeats": len(t),
            "warmup": warmup,
            "first_s": first.get(name),
            "peak_memory_mib": None,
        }
        for name, t in times.items()
    }
    return rows, times


def paired_ratio(numerator: list[float], denominator: list[float]) -> dict:
    """Median, min and max of ``numerator[r] / denominator[r]`` over the rounds `r` of one interleaved run."""
    ratios = [a / b for a, b in zip(numerator, denominator, strict=True)]
    return {"median": statistics.median(ratios), "min": min(ratios), "max": max(ratios)}


def _labels(batch: int, num_classes: int) -> list[int]:
    return [i % num_classes for i in range(batch)]


def _call(pipe, labels, steps, cache=None, output_type="latent", seed=0):
    kwargs = {} if cache is None else {"cache": cache}
    return pipe(labels, num_inference_steps=steps, guidance_scale=GUIDANCE, temperature=TEMPERATURE,
                generator=torch.Generator().manual_seed(seed), output_type=output_type, **kwargs)  # fmt: skip


# ------------------------------------------------------------------------------ section: reference


def bench_reference(b, reference_code, configs: dict[str, dict], batches, steps) -> None:
    """The authors' ``EAR.sample_tokens`` against ours (``pipe(..., output_type="latent")``, which
    draws its orders and noise as theirs does) with the same weights, fp32, guidance 3 (linear),
    temperature 0.7; each (batch, steps) in alternating rounds. Also records, once per config, the
    largest difference of the two samplers' tokens given the same orders and noise.

    Ours also runs with ``pipe.enable_compiled_step()`` (same FLOPs), compiled before the timing.

    Rows: ``reference/status`` (`skipped` with the reason, or what was loaded),
    ``reference/<config>_b<B>_s<K>_{ours,reference,ours_compiled}`` (times),
    ``reference/ratio_<config>_b<B>_s<K>`` (ours / reference per round: median, min, max; `speedup`:
    the median of reference / ours per round; `speedup_compiled`: the same for ours compiled),
    ``reference/compiled_status_<config>`` and ``reference/agreement_<config>``.
    """
    from research.benchmarks.sampling_flops import count_flops
    from research.reference import reference_ear

    try:
        reference_ear.import_reference(reference_code)
    except ReferenceUnavailable as error:
        b.results["reference/status"] = {"skipped": str(error)}
        print(f"  reference: skipped: {error}", flush=True)
        return
    import timm

    b.results["reference/status"] = {
        "code": str(reference_code),
        "commit": reference_ear.EAR_COMMIT,
        "files": ", ".join(reference_ear.REFERENCE_FILES),
        "timm": timm.__version__,
    }
    for name, config in configs.items():
        reference = reference_ear.build_reference(reference_code, config).to(b.device)
        pipe = reference_ear.our_pipeline(reference, config)
        compiled, status = _compiled_copy(pipe)
        b.results[f"reference/compiled_status_{name}"] = status
        b.results[f"reference/agreement_{name}"] = _agreement(reference, pipe, config, b.device, min(steps))
        for batch in batches:
            labels = torch.tensor(_labels(batch, config["num_classes"]), device=b.device)
            for k in steps:
                fns = {
                    "ours": partial(_call, pipe, labels.tolist(), k),
                    "reference": partial(reference_ear.reference_sample, reference, labels, k, GUIDANCE, TEMPERATURE),
                }
                flops = {who: count_flops(fn) for who, fn in fns.items()}
                if compiled is not None:
                    fns["ours_compiled"] = partial(_call, compiled, labels.tolist(), k)
                    _first_calls(b, fns, ("ours_compiled",), f"reference/compiled_status_{name}")
                    if "ours_compiled" not in fns:
                        compiled = None  # it failed: the status row says why; the next cells skip it
                rows, times = measure_interleaved(b, fns)
                info = dict(config=name, batch=batch, steps=k, guidance=GUIDANCE, dtype="torch.float32")
                b.add(f"reference/{name}_b{batch}_s{k}_ours", rows["ours"], **info)
                b.add(f"reference/{name}_b{batch}_s{k}_reference", rows["reference"], **info)
                if "ours_compiled" in rows:
                    b.add(f"reference/{name}_b{batch}_s{k}_ours_compiled", rows["ours_compiled"], **info)
                ratio = paired_ratio(times["ours"], times["reference"])
                row = b.results[f"reference/ratio_{name}_b{batch}_s{k}"] = {
                    "config": name,
                    "batch": batch,
                    "steps": k,
                    "ours_over_reference_median": ratio["median"],
                    "ours_over_reference_min": ratio["min"],
                    "ours_over_reference_max": ratio["max"],
                    "speedup": paired_ratio(times["reference"], times["ours"])["median"],
                    "flops_ours": flops["ours"],
                    "flops_reference": flops["reference"],
                }
                if "ours_compiled" in times:
                    row["speedup_compiled"] = paired_ratio(times["reference"], times["ours_compiled"])["median"]


def _agreement(reference, pipe, config: dict, device, steps: int, batch: int = 2) -> dict:
    from research.reference.reference_ear import reference_sample_tokens

    g = torch.Generator().manual_seed(0)
    n = config["grid_size"] ** 2
    labels = torch.tensor(_labels(batch, config["num_classes"]), device=device)
    orders = torch.argsort(torch.rand(batch, n, generator=g), dim=1).to(device)
    noise = (torch.rand(batch, n, config["noise_dim"], generator=g) - 0.5).to(device)
    theirs = reference_sample_tokens(reference, labels, orders, noise, steps, GUIDANCE, TEMPERATURE)
    ours = pipe.sample_tokens(labels, orders, noise, steps, GUIDANCE, temperature=TEMPERATURE)
    return {"max_abs_diff": (ours - theirs).abs().max().item(), "batch": batch, "steps": steps, "guidance": GUIDANCE}


# ------------------------------------------------------------------------------ section: mar_reference


def _mar_call(pipe, labels, steps, cache=None):
    kwargs = {} if cache is None else {"cache": cache}
    return pipe(labels, num_inference_steps=steps, guidance_scale=GUIDANCE, temperature=MAR_TEMPERATURE,
                generator=torch.Generator().manual_seed(0), output_type="latent", **kwargs)  # fmt: skip


def bench_mar_reference(b, reference_code, config: dict, batches, steps) -> None:
    """The authors' ``MAR.sample_tokens`` against ours (MAR's backbone and diffusion head in our pipeline,
    ``pipe(..., output_type="latent")``) and ours cached (``SamplingCache()``'s defaults), the same random weights,
    fp32, guidance 3 (linear; MAR mixes it in the head at every diffusion step), temperature 1; each
    (batch, steps) in alternating rounds. Also records the largest difference of the two samplers' tokens given the
    same orders and Gaussian draws.

    Rows: ``mar_reference/status`` (`skipped` with the reason, or what was loaded and the config),
    ``mar_reference/b<B>_s<K>_{ours,reference,cached}`` (times), ``mar_reference/ratio_b<B>_s<K>`` (ours / theirs
    and exact / cached per round: median, min, max) and ``mar_reference/agreement``.
    """
    from research.reference import reference_mar

    try:
        reference = reference_mar.build_reference(reference_code, config).to(b.device)
    except ReferenceUnavailable as error:
        b.results["mar_reference/status"] = {"skipped": str(error)}
        print(f"  mar_reference: skipped: {error}", flush=True)
        return
    import timm

    b.results["mar_reference/status"] = {
        "code": str(reference_code),
        "commit": reference_mar.MAR_COMMIT,
        "files": ", ".join(reference_mar.MAR_FILES),
        "timm": timm.__version__,
        "config": dict(config),
        "model": reference_mar.describe(config),
    }
    pipe = reference_mar.our_pipeline(reference, config)
    b.results["mar_reference/agreement"] = _mar_agreement(reference, pipe, config, b.device, min(steps))
    cached = make_cache({})
    for batch in batches:
        labels = torch.tensor(_labels(batch, config["num_classes"]), device=b.device)
        for k in steps:
            fns = {
                "ours": partial(_mar_call, pipe, labels.tolist(), k),
                "reference": partial(reference_mar.reference_sample, reference, labels, k, GUIDANCE, MAR_TEMPERATURE),
                "cached": partial(_mar_call, pipe, labels.tolist(), k, cached),
            }
            rows, times = measure_interleaved(b, fns)
            info = dict(config="mar", batch=batch, steps=k, guidance=GUIDANCE, temperature=MAR_TEMPERATURE)
            for name, row in rows.items():
                extra = {"cache": dataclasses.asdict(cached)} if name == "cached" else {}
                b.add(f"mar_reference/b{batch}_s{k}_{name}", row, **info, **extra)
            ours = paired_ratio(times["ours"], times["reference"])
            cache = paired_ratio(times["ours"], times["cached"])
            b.results[f"mar_reference/ratio_b{batch}_s{k}"] = {
                "batch": batch, "steps": k,
                "ours_over_reference_median": ours["median"], "ours_over_reference_min": ours["min"],
                "ours_over_reference_max": ours["max"],
                "speedup": paired_ratio(times["reference"], times["ours"])["median"],
                "cached": cache["median"], "cached_min": cache["min"], "cached_max": cache["max"],
            }  # fmt: skip


def _mar_agreement(reference, pipe, config: dict, device, steps: int, batch: int = 2) -> dict:
    """Their sampler with given orders and seeded Gaussian draws, ours with the same draws in our layout: the
    largest token difference, absolute and relative to the largest token (random weights grow MAR's chain)."""
    from research.reference.reference_mar import noise_in_our_layout, reference_sample_logged

    g = torch.Generator().manual_seed(0)
    n = config["grid_size"] ** 2
    labels = torch.tensor(_labels(batch, config["num_classes"]), device=device)
    orders = torch.argsort(torch.rand(batch, n, generator=g), dim=1).to(device)
    theirs, draws = reference_sample_logged(reference, labels, orders, steps, GUIDANCE, MAR_TEMPERATURE)
    noise = noise_in_our_layout(draws, orders, steps, config["num_sampling_steps"]).to(device)
    ours = pipe.sample_tokens(labels, orders, noise, steps, GUIDANCE, temperature=MAR_TEMPERATURE)
    diff = (ours - theirs).abs().max().item()
    largest = theirs.abs().max().item()
    return {"max_abs_diff": diff, "max_abs_token": largest, "relative": diff / largest, "batch": batch,
            "steps": steps, "guidance": GUIDANCE, "temperature": MAR_TEMPERATURE}  # fmt: skip


# ------------------------------------------------------------------------------ section: cache


def bench_cache(b, pipes: dict[str, tuple], batches, steps, cache_fields: dict, profile_batch: int = 16) -> None:
    """Exact against cached, compiled and cached + compiled sampling (``output_type="latent"``,
    guidance 3, temperature 0.7), each (batch, steps) in alternating rounds.

    Args:
        pipes: ``{name: (pipeline, description)}``.
        cache_fields: the cached variants' ``SamplingCache`` fields.
        profile_batch: where the compiled step is not faster than eager at this batch, profile both.

    Rows: ``cache/<name>_b<B>_s<K>_<variant>`` (times; the compiled rows' `compile_first_call_s` is
    their first call, compilation included), ``cache/speedup_<name>_b<B>_s<K>`` (exact / variant per
    round: median, min, max; `flops_exact` and `flops_cached`: FLOPs of one call), ``cache/parts_<name>_b1_s<K>``
    (batch 1: where exact's and cached's time goes, :func:`time_parts`), ``cache/compiled_status_<name>``
    (whether the compiled step is available, else why not) and ``cache/compile_profile_<name>``.
    """
    from research.benchmarks.sampling_flops import count_flops

    cached = make_cache(cache_fields)
    for name, (pipe, description) in pipes.items():
        compiled, status = _compiled_copy(pipe)
        b.results[f"cache/compiled_status_{name}"] = status
        for batch in batches:
            labels = _labels(batch, pipe.transformer.config.num_classes)
            for k in steps:
                fns = {"exact": partial(_call, pipe, labels, k), "cached": partial(_call, pipe, labels, k, cached)}
                first_calls = {}
                if compiled is not None:
                    fns["compiled"] = partial(_call, compiled, labels, k)
                    fns["cached_compiled"] = partial(_call, compiled, labels, k, cached)
                    first_calls = _first_calls(
                        b, fns, ("compiled", "cached_compiled"), f"cache/compiled_status_{name}"
                    )
                    if "compiled" not in fns:
                        compiled = None  # it failed: the status row says why; the next cells skip it
                flops = {variant: count_flops(fns[variant]) for variant in ("exact", "cached")}
                rows, times = measure_interleaved(b, fns)
                info = dict(config=description, batch=batch, steps=k, guidance=GUIDANCE)
                for variant, row in rows.items():
                    if variant in first_calls:
                        row["compile_first_call_s"] = first_calls[variant]
                    b.add(f"cache/{name}_b{batch}_s{k}_{variant}", row, variant=variant, **info,
                          **({"cache": dataclasses.asdict(cached)} if "cached" in variant else {}))  # fmt: skip
                speedups = {"config": name, "batch": batch, "steps": k, "flops_exact": flops["exact"],
                            "flops_cached": flops["cached"]}  # fmt: skip
                for variant in rows:
                    if variant != "exact":
                        ratio = paired_ratio(times["exact"], times[variant])
                        speedups.update({variant: ratio["median"], f"{variant}_min": ratio["min"],
                                         f"{variant}_max": ratio["max"]})  # fmt: skip
                b.results[f"cache/speedup_{name}_b{batch}_s{k}"] = speedups
                if batch == 1:
                    b.results[f"cache/parts_{name}_b{batch}_s{k}"] = {
                        "config": name, "batch": batch, "steps": k,
                        **{variant: time_parts(fns[variant], pipe) for variant in ("exact", "cached")},
                    }  # fmt: skip
                if batch == profile_batch and k == min(steps) and "compiled" in rows and speedups["compiled"] <= 1.0:
                    b.results[f"cache/compile_profile_{name}"] = compile_profile(pipe, compiled, labels, k)


# What `time_parts` times: the pipeline component and method for each part of a run.
PARTS = {
    "lite_hybrid": ("lite_hybrid", "forward"),
    "backbone_full": ("transformer", "forward"),
    "backbone_cached": ("transformer", "forward_partial"),
    "head": ("energy_head", "sample"),
}


def time_parts(fn: Callable, pipe, repeats: int = 3) -> dict:
    """Where the time of ``fn()`` (a sampling call of `pipe`) goes: milliseconds in each of :data:`PARTS`
    (LiteHybrid; the backbone's full passes, exact or refreshing; its cached passes; the head), `rest` (all
    else: the step loop, orders and noise) and `total`, each the median over `repeats` calls. Each method is
    wrapped by a timer on the instance for the calls, then restored; on a CPU the work is synchronous, so the
    wall clock is the part's."""
    import time

    spent = {part: 0.0 for part in PARTS}

    def timed(part, method):
        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            try:
                return method(*args, **kwargs)
            finally:
                spent[part] += time.perf_counter() - start

        return wrapper

    runs = []
    for part, (component, name) in PARTS.items():
        module = getattr(pipe, component)
        setattr(module, name, timed(part, getattr(module, name)))
    try:
        for _ in range(repeats):
            spent.update(dict.fromkeys(PARTS, 0.0))
            start = time.perf_counter()
            fn()
            total = time.perf_counter() - start
            runs.append({"total": total, **spent, "rest": total - sum(spent.values())})
    finally:
        for component, name in PARTS.values():
            delattr(getattr(pipe, component), name)
    return {part: 1e3 * statistics.median(run[part] for run in runs) for part in runs[0]}


def _compiled_copy(pipe):
    """A copy of `pipe` with the compiled step on, and a status row; (None, why) where it cannot be made."""
    if not hasattr(pipe, "enable_compiled_step"):
        return None, {"available": False, "why": "this pipeline has no enable_compiled_step()"}
    compiled = copy.deepcopy(pipe)
    try:
        compiled.enable_compiled_step()
    except Exception as error:  # any failure of torch.compile's setup is a result to report, not a crash
        return None, {"available": False, "why": f"enable_compiled_step() failed: {type(error).__name__}: {error}"}
    return compiled, {"available": True, "torch": torch.__version__}


def _first_calls(b, fns: dict, names, status_key: str) -> dict[str, float]:
    """Call each of `names` once, timed (the compiled step's compilation); one that fails is removed
    from `fns` and the failure recorded in ``b.results[status_key]``."""
    seconds = {}
    for name in names:
        try:
            seconds[name] = b._once(fns[name])
        except Exception as error:  # compilation errors (inductor, no compiler) are results, not crashes
            del fns[name]
            b.results[status_key] = {
                "available": False,
                "why": f"{name} failed: {type(error).__name__}: {str(error)[:300]}",
            }
    return seconds


def compile_profile(eager_pipe, compiled_pipe, labels, steps: int, top: int = 8) -> dict:
    """One exact generation with each pipeline under ``torch.profiler``: total and the top operators
    by self time (the why, where the compiled step is not faster)."""
    from torch.profiler import ProfilerActivity, profile

    out = {"batch": len(labels), "steps": steps}
    for name, pipe in (("eager", eager_pipe), ("compiled", compiled_pipe)):
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
        with profile(activities=activities) as prof:
            _call(pipe, labels, steps)
        events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
        out[f"{name}_self_cpu_ms"] = sum(e.self_cpu_time_total for e in events) / 1e3
        out[f"{name}_top"] = "; ".join(
            f"{e.key} {e.self_cpu_time_total / 1e3:.1f} ms x{e.count}" for e in events[:top]
        )
    return out


# ------------------------------------------------------------------------------ section: quality


def quality_points(
    steps, single_steps: int, seeds=(0,), variants=("token_cache", "condition_cache", "compiled")
) -> list[dict]:
    """Exact and cached at each of `steps`, from each sampling seed of `seeds`; each of `variants` at
    `single_steps`, from the first seed."""
    points = [{"variant": v, "steps": k, "seed": seed} for k in steps for seed in seeds for v in ("exact", "cached")]
    points += [{"variant": v, "steps": single_steps, "seed": seeds[0]} for v in variants]
    return [{**p, "name": f"{p['variant']}_s{p['steps']}_seed{p['seed']}"} for p in points]


def run_point(path: Path, settings: dict, measure: Callable[[], dict]) -> tuple[dict, bool]:
    """A quality point's results JSON: read back when it is finished (same `settings`), else
    ``measure()``'s payload written with provenance.

    Returns:
        ``(record, skipped)``.

    Raises:
        ValueError: `path` holds a finished point made with other settings (named, both values).
    """
    from parscale_ear_hf.results import load_results, write_results

    record = load_results(path)
    if record is not None and "metrics" in record:
        changed = {k: (record["settings"].get(k), v) for k, v in settings.items() if record["settings"].get(k) != v}
        if changed:
            detail = "; ".join(f"{k}: {a!r} there, {b!r} now" for k, (a, b) in sorted(changed.items()))
            raise ValueError(
                f"bench_sampling: {str(path)!r} holds this point made with other settings ({detail}); delete it or "
                "pass another --quality-dir."
            )
        return record, True
    return write_results(path, {"metric": "sampling_quality", "settings": settings, **measure()}), False


def point_row(record: dict, results_file: str) -> dict:
    """A point's flat row for the measurements: FID / sFID / demo-FID, seconds per image."""
    inception, digit = record["metrics"].get("inception", {}), record["metrics"].get("digit", {})
    return {
        "variant": record["settings"]["variant"],
        "steps": record["settings"]["steps"],
        "fid": inception.get("fid"),
        "sfid": inception.get("sfid"),
        "demo_fid": digit.get("demo_fid"),
        "seconds_per_image": record.get("seconds_per_image"),
        "images_per_class": record["settings"].get("images_per_class"),
        "seed": record["settings"].get("seed"),
        "results_file": results_file,
    }


def cache_flags(cache) -> list[str]:
    """`parscale-ear eval`'s flags for a :class:`SamplingCache` (none: exact sampling).

    Raises:
        ValueError: a field the eval command has no flag for is not at its default.
    """
    if cache is None:
        return []
    flags = ["--token-cache", "--token-share", str(cache.token_share)] if cache.token_cache else []
    flags += ["--condition-cache"] if cache.condition_cache else []
    default = type(cache)()
    unflagged = {
        f.name: getattr(cache, f.name)
        for f in dataclasses.fields(cache)
        if f.name not in ("token_cache", "token_share", "condition_cache", "refresh_every")
        and getattr(cache, f.name) != getattr(default, f.name)
    }
    if unflagged:
        raise ValueError(f"bench_sampling: `parscale-ear eval` has no flag for the cache fields {unflagged}.")
    if cache.enabled and cache.refresh_every is not None:  # None: the eval's default, by the step count
        flags += ["--cache-refresh-every", str(cache.refresh_every)]
    return flags if cache.enabled else []


def eval_flags(args, kind: str, steps: int, guidance: float, work: Path, seed: int = 0) -> list[str]:
    """`parscale-ear eval`'s flags common to every point: data, extractor, samples, steps, guidance, where."""
    flags = ["--extractor", kind, "--dataset", args.quality_dataset, "--split", args.quality_split,
             "--reference-cache-dir", args.reference_cache_dir,
             "--images-per-class", str(args.quality_images_per_class), "--batch-size", str(args.quality_batch_size),
             "--steps", str(steps), "--guidance", str(guidance), "--seed", str(seed),
             "--output-dir", str(work / kind), "--results-file", str(work / f"{kind}.json")]  # fmt: skip
    flags += ["--classifier", args.classifier] if kind == "digit" else []
    if kind == "inception" and args.inception_weights:
        flags += ["--inception-weights", args.inception_weights]
    return flags


def run_cli(command: str, flags: list[str]) -> dict:
    """``parscale-ear <command> <flags>`` in a fresh process, its output passed through; the results JSON it
    wrote. Run again, it resumes from the features it saved.

    Raises:
        RuntimeError: it failed; the message has its last line of error output.
    """
    argv, env = cli_process(command, *flags)
    with subprocess.Popen(argv, stderr=subprocess.PIPE, text=True, env=env) as process:
        last = ""
        for line in process.stderr:
            sys.stderr.write(line)
            last = line.strip() or last
    if process.returncode:
        raise RuntimeError(f"`parscale-ear {command}` failed (exit {process.returncode}): {last}")
    return json.loads(Path(flags[flags.index("--results-file") + 1]).read_text(encoding="utf-8"))


def score_point(
    args, kinds, model: str, steps: int, guidance: float, extra: list[str], work: Path, seed: int = 0
) -> dict:
    """A point scored by `parscale-ear eval` once per extractor (the same seeds: the same samples).

    Returns:
        The point's payload: `metrics` per extractor, `seconds_per_image` (the eval's median over batches
        of the pipeline calls' seconds per image, at `--quality-batch-size`; the smaller of the runs, which
        time the same calls), `timing` per run and `eval_results` (their results files).
    """
    metrics, timing, files = {}, {}, {}
    for kind in kinds:
        flags = ["--model", model, *eval_flags(args, kind, steps, guidance, work, seed), *extra]
        record = run_cli("eval", flags)
        metrics[kind], timing[kind], files[kind] = record["metrics"], record["timing"], str(work / f"{kind}.json")
    seconds = [t["median_batch_seconds_per_image"] for t in timing.values() if "median_batch_seconds_per_image" in t]
    return {
        "metrics": metrics,
        "seconds_per_image": min(seconds, default=None),
        "timing": timing,
        "eval_results": files,
    }


def bench_quality(b, args) -> None:
    """The `quality` section (see the module docstring): each point scored by `parscale-ear eval`; rows
    ``quality/<point>``, ``quality/floor``, ``quality/dit_status`` and ``quality/dit_s<K>``."""
    from parscale_ear_hf.evaluation.extractors import choose_extractor

    kinds = [choose_extractor("bench quality", kind, args.inception_weights) for kind in args.quality_extractors]
    out_dir, work_dir = Path(args.quality_dir), Path(args.quality_work_dir)
    b.results["quality/floor"] = quality_floor(args, kinds, out_dir)
    common = {
        "images_per_class": args.quality_images_per_class,
        "batch_size": args.quality_batch_size,
        "dataset": args.quality_dataset,
        "split": args.quality_split,
        "extractors": kinds,
    }
    points = quality_points(args.quality_steps, args.quality_single_steps, args.quality_seeds, args.quality_singles)
    for point in points:
        cache = variant_cache(point["variant"], args.sampling_cache)
        compiled = VARIANTS[point["variant"]][1]
        extra = ["--temperature", str(TEMPERATURE), *cache_flags(cache), *(["--compile"] if compiled else [])]
        settings = {"model": args.demo_model, "variant": point["variant"], "steps": point["steps"],
                    "guidance_scale": GUIDANCE, "temperature": TEMPERATURE, "cache": describe_cache(cache),
                    "compiled": compiled, "seed": point["seed"], **common}  # fmt: skip
        measure = partial(score_point, args, kinds, args.demo_model, point["steps"], GUIDANCE, extra,
                          work_dir / point["name"], point["seed"])  # fmt: skip
        _add_point(b, out_dir / f"{point['name']}.json", point["name"], settings, measure)
    if not (Path(args.dit_model) / "model_index.json").is_file():
        b.results["quality/dit_status"] = {"absent": f"{args.dit_model} holds no saved pipeline (model_index.json)"}
        print(f"  quality/dit: absent ({args.dit_model})", flush=True)
        return
    failures = {}
    for k in args.dit_steps:
        settings = {"model": args.dit_model, "variant": "dit", "steps": k, "guidance_scale": args.dit_guidance,
                    "seed": 0, **common}  # fmt: skip
        measure = partial(score_point, args, kinds, args.dit_model, k, args.dit_guidance, [], work_dir / f"dit_s{k}")
        try:
            _add_point(b, out_dir / f"dit_s{k}.json", f"dit_s{k}", settings, measure)
        except RuntimeError as error:  # a DiT that cannot be scored is reported; ours raise
            failures[f"dit_s{k}"] = str(error)
    b.results["quality/dit_status"] = {"model": args.dit_model, "steps": list(args.dit_steps), **failures}


def _add_point(b, path: Path, name: str, settings: dict, measure: Callable[[], dict]) -> None:
    print(f"  quality/{name}: ...", flush=True)
    record, skipped = run_point(path, settings, measure)
    print(f"  quality/{name}: {'finished earlier, skipped' if skipped else 'measured'}", flush=True)
    b.results[f"quality/{name}"] = point_row(record, str(path))


def quality_floor(args, kinds, out_dir: Path) -> dict:
    """Real train images against the held-out reference (and the VAE's reconstructions), per extractor,
    by ``parscale-ear eval-vae ... --baseline-split``: the FID that sample noise alone gives."""
    from parscale_ear_hf.results import load_results

    row = {}
    for kind in kinds:
        path = out_dir / f"floor_{kind}.json"
        record = load_results(path)
        if record is None:
            flags = ["--vae", args.demo_model, "--vae-subfolder", "vae", "--dataset", args.quality_dataset,
                     "--split", args.quality_split, "--baseline-split", args.quality_baseline_split,
                     "--extractor", kind, "--reference-cache-dir", args.reference_cache_dir,
                     "--results-file", str(path), "--device", args.device]  # fmt: skip
            flags += ["--classifier", args.classifier] if kind == "digit" else []
            if kind == "inception" and args.inception_weights:
                flags += ["--inception-weights", args.inception_weights]
            record = run_cli("eval-vae", flags)
        prefix = "demo_" if kind == "digit" else ""
        suffix = f"_real_{args.quality_baseline_split}"
        for metric in ("fid", "sfid"):
            if f"{prefix}{metric}{suffix}" in record["metrics"]:
                row[f"{prefix}{metric}_real"] = record["metrics"][f"{prefix}{metric}{suffix}"]
        row[f"{kind}_results_file"] = str(path)
    row["real_split"] = args.quality_baseline_split
    return row


# ------------------------------------------------------------------------------ the sections


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The flags of the `reference`, `cache` and `quality` sections."""
    group = parser.add_argument_group("sampling sections (reference, mar_reference, cache, quality)")
    group.add_argument("--reference-code", default=None,
                       help="a checkout of the authors' EAR (shaochenze/EAR at 9256a9f, with models/ear.py), outside "
                       "this repository; needs `pip install --no-deps timm==1.0.31`")  # fmt: skip
    group.add_argument("--mar-reference-code", default=os.environ.get("MAR_REFERENCE_CODE"),
                       help="a checkout of the authors' MAR (LTH14/mar at fe470ac, with models/mar.py), outside this "
                       "repository (default: $MAR_REFERENCE_CODE); needs timm and scipy")  # fmt: skip
    group.add_argument("--mar-batches", nargs="+", type=int, default=[1], help="batches of the mar_reference section")
    group.add_argument("--sampling-configs", nargs="+", choices=sorted(CONFIGS), default=["demo", "mid"])
    group.add_argument("--sampling-batches", nargs="+", type=int, default=[1, 16])
    group.add_argument("--sampling-steps", nargs="+", type=int, default=[16, 64])
    group.add_argument(
        "--sampling-cache",
        type=json.loads,
        default=DEFAULT_CACHE,
        help="SamplingCache fields of the cached variants, as JSON (default: SamplingCache's defaults)",
    )
    group.add_argument("--quality-steps", nargs="+", type=int, default=[8, 16, 32])
    group.add_argument("--quality-single-steps", type=int, default=16, help="steps of each cache alone, and compiled")
    group.add_argument(
        "--quality-singles",
        nargs="*",
        choices=("token_cache", "condition_cache", "compiled"),
        default=["token_cache", "condition_cache", "compiled"],
        help="variants scored at --quality-single-steps (none: leave the flag empty)",
    )
    group.add_argument(
        "--quality-seeds", nargs="+", type=int, default=[0, 1], help="sampling seeds of each exact and cached point"
    )
    group.add_argument("--quality-images-per-class", type=int, default=100)
    group.add_argument("--quality-batch-size", type=int, default=100)
    group.add_argument(
        "--quality-extractors", nargs="+", choices=("inception", "digit"), default=["inception", "digit"]
    )
    group.add_argument("--quality-dataset", default="data/mnist_demo")
    group.add_argument("--quality-split", default="heldout")
    group.add_argument("--quality-baseline-split", default="train", help="real images of the floor")
    group.add_argument("--quality-dir", default="results/sampling_quality", help="one results JSON per point")
    group.add_argument("--quality-work-dir", default="runs/sampling_quality", help="partial features (resume)")
    group.add_argument("--classifier", default="models/digit_classifier")
    group.add_argument("--inception-weights", default=None)
    group.add_argument("--reference-cache-dir", default="runs/fid_refs")
    group.add_argument("--dit-model", default="runs/demo_dit/pipeline", help="a saved DiTPipeline (absent: recorded)")
    group.add_argument("--dit-steps", nargs="+", type=int, default=[8, 16, 32, 64], help="its DPM-Solver++ steps")
    group.add_argument("--dit-guidance", type=float, default=1.5, help="DiT's FID setting (DiT paper: 1.5)")
    return parser


def _pipelines(b, args) -> dict[str, tuple]:
    """The `cache` section's pipelines: the demo model and the mid-size config (random weights, LiteHybrid on)."""
    from parscale_ear_hf.models import EARTransformer, EnergyHead, LiteHybrid, LiteVAE
    from parscale_ear_hf.pipeline_parscale_ear import ParScaleEARPipeline

    pipes = {}
    for name in args.sampling_configs:
        if name == "demo":
            pipe = ParScaleEARPipeline.from_pretrained(args.demo_model)
            t = pipe.transformer.config
            description = (f"{args.demo_model} ({t.grid_size}x{t.grid_size}x{t.in_channels} tokens, width "
                           f"{t.hidden_size}, {t.num_layers} layers)")  # fmt: skip
        else:
            c = CONFIGS[name]
            torch.manual_seed(0)
            transformer = EARTransformer(
                in_channels=c["in_channels"], grid_size=c["grid_size"], num_classes=c["num_classes"],
                hidden_size=c["hidden_size"], num_layers=c["num_layers"], num_heads=c["num_heads"],
                buffer_size=c["buffer_size"],
            )  # fmt: skip
            head = EnergyHead(condition_dim=c["hidden_size"], token_channels=c["in_channels"], width=c["head_width"],
                              depth=c["head_depth"], noise_dim=c["noise_dim"])  # fmt: skip
            pipe = ParScaleEARPipeline(
                vae=LiteVAE(sample_size=c["grid_size"] * 16, latent_channels=c["in_channels"]),
                lite_hybrid=LiteHybrid(in_channels=c["in_channels"], grid_size=c["grid_size"], coarse_grid_size=4),
                transformer=transformer,
                energy_head=head,
            )
            description = (f"{name}: {c['grid_size']}x{c['grid_size']}x{c['in_channels']} tokens, width "
                           f"{c['hidden_size']}, {c['num_layers']} layers, random weights")  # fmt: skip
        pipe.set_progress_bar_config(disable=True)
        pipes[name] = (pipe.to(b.device, b.dtype), description)
    return pipes


def run_section(section: str, b, args) -> None:
    """One of the sections, as `benchmark.run` calls it."""
    if section == "reference":
        configs = {name: CONFIGS[name] for name in args.sampling_configs}
        bench_reference(b, args.reference_code, configs, args.sampling_batches, args.sampling_steps)
    elif section == "mar_reference":
        bench_mar_reference(b, args.mar_reference_code, MAR_CONFIG, args.mar_batches, args.sampling_steps)
    elif section == "cache":
        bench_cache(b, _pipelines(b, args), args.sampling_batches, args.sampling_steps, args.sampling_cache)
    elif section == "quality":
        bench_quality(b, args)
    else:
        raise ValueError(f"bench_sampling: unknown section {section!r}; accepted: {', '.join(SECTIONS)}.")


# ------------------------------------------------------------------------------ targets


def _rows(m: dict, prefix: str) -> dict:
    return {k[len(prefix) :]: v for k, v in m.items() if k.startswith(prefix)}


def best_cached_speedup(row: dict) -> float:
    """The faster cached variant (eager, or with the compiled step) against the faster exact one, from a
    ``cache/speedup_*`` row's ratios of eager exact over each variant: a variant's time is exact's over its ratio."""
    cached = max(row["cached"], row.get("cached_compiled", 0.0))
    return cached / max(1.0, row.get("compiled", 1.0))


def check_targets(m: dict) -> dict:
    """The issue's targets from the measurements: per target the measured value, the bound and
    whether it is met (None: not measured; `note` says why, or where the profile is).

    - cached >= 2.5x exact, per config: the worst (batch, steps) of the measured ones, each the faster cached
      variant against the faster exact one (:func:`best_cached_speedup`);
    - cached FID at most 5% above exact at the same steps (Inception FID; demo-FID beside it): the worst step count;
    - exact >= 1.2x the authors' sampler at batch 1, per config: the worst step count;
    - compiled faster than eager at batch 16, per config: the worst step count (else the profile says why).
    """
    targets = {}
    speedups = _rows(m, "cache/speedup_")
    for config in sorted({row["config"] for row in speedups.values()} | set(CONFIGS)):
        rows = [row for row in speedups.values() if row["config"] == config]
        targets[f"cached_speedup_{config}"] = _target(
            f"cached sampling faster than exact at the same steps, the faster of eager and compiled on each side "
            f"({config}, worst of batch x steps)",
            min((best_cached_speedup(row) for row in rows if "cached" in row), default=None), CACHED_SPEEDUP,
        )  # fmt: skip
        status = m.get(f"cache/compiled_status_{config}", {})
        available = status.get("available", True)
        compiled = [row["compiled"] for row in rows if row["batch"] == 16 and "compiled" in row and available]
        target = _target(f"compiled step faster than eager at batch 16 ({config}, worst of steps)",
                         min(compiled, default=None), 1.0, strict=True)  # fmt: skip
        if not available:
            target["note"] = status["why"]
        elif target["met"] is False and f"cache/compile_profile_{config}" in m:
            target["note"] = f"profile: `cache/compile_profile_{config}`"
        targets[f"compiled_speedup_b16_{config}"] = target
    groups = seed_groups({k: v for k, v in _rows(m, "quality/").items() if "variant" in v})
    for metric, label in (("fid", "Inception FID"), ("demo_fid", "demo-FID")):
        increases = [g[f"{metric}_change"] for g in groups if g["variant"] == "cached"]
        increases = [value for value in increases if value is not None]
        targets[f"cached_{metric}_increase"] = _target(
            f"cached {label} relative increase over exact at the same steps (mean over seeds; worst step count)",
            max(increases, default=None), CACHED_FID_INCREASE, at_most=True,
        )  # fmt: skip
    status = m.get("reference/status", {})
    ratios = _rows(m, "reference/ratio_") if "skipped" not in status else {}
    for config in sorted({row["config"] for row in ratios.values()} | set(CONFIGS)):
        values = [max(row["speedup"], row.get("speedup_compiled", 0.0)) for row in ratios.values()
                  if row["config"] == config and row["batch"] == 1]  # fmt: skip
        what = "exact sampler (eager or compiled, the faster) faster than the authors' sample_tokens at batch 1"
        target = _target(f"{what} ({config}, worst of steps)", min(values, default=None), REFERENCE_SPEEDUP)
        if "skipped" in status:
            target["note"] = f"reference skipped: {status['skipped']}"
        targets[f"reference_speedup_b1_{config}"] = target
    return targets


def seed_groups(points: dict) -> list[dict]:
    """The quality points `points` (rows by name) as one row per (variant, steps), in plot order: each metric's
    mean over the sampling seeds (`<metric>_range`: min, max; None with one seed) and, but for exact and DiT, its
    relative change against exact from the same seed and steps (`<metric>_change`, mean; `_change_range`)."""
    groups, exact = {}, {}
    for row in points.values():
        groups.setdefault((row["variant"], row["steps"]), []).append(row)
        if row["variant"] == "exact":
            exact[row["steps"], row.get("seed", 0)] = row
    out = []
    for (variant, steps), rows in groups.items():
        group = {"variant": variant, "steps": steps, "seeds": sorted(r.get("seed", 0) for r in rows),
                 "images_per_class": rows[0].get("images_per_class")}  # fmt: skip
        for metric in ("fid", "sfid", "demo_fid", "seconds_per_image"):
            values = [r[metric] for r in rows if r.get(metric) is not None]
            group[metric] = statistics.fmean(values) if values else None
            group[f"{metric}_range"] = (min(values), max(values)) if len(values) > 1 else None
            pairs = [(r, exact.get((steps, r.get("seed", 0)))) for r in rows if variant not in ("exact", "dit")]
            changes = [(r[metric] - e[metric]) / e[metric] for r, e in pairs
                       if e is not None and None not in (r.get(metric), e.get(metric))]  # fmt: skip
            group[f"{metric}_change"] = statistics.fmean(changes) if changes else None
            group[f"{metric}_change_range"] = (min(changes), max(changes)) if len(changes) > 1 else None
        out.append(group)
    return sorted(out, key=_plot_order)


def _target(what: str, value, bound: float, at_most: bool = False, strict: bool = False) -> dict:
    if value is None:
        met = None
    elif at_most:
        met = value <= bound
    else:
        met = value > bound if strict else value >= bound
    return {"what": what, "value": value, "bound": bound, "at_most": at_most, "strict": strict, "met": met}


def target_lines(targets: dict) -> list[str]:
    """One printable line per target: PASS / FAIL / NOT MEASURED, the value, the bound, any note."""
    lines = []
    for t in targets.values():
        verdict = {True: "PASS", False: "FAIL", None: "NOT MEASURED"}[t["met"]]
        value = "-" if t["value"] is None else f"{t['value']:.3g}"
        sign = "<=" if t["at_most"] else (">" if t["strict"] else ">=")
        note = f" ({t['note']})" if t.get("note") else ""
        lines.append(f"{verdict}: {t['what']}: {value} (bound {sign} {t['bound']:g}){note}")
    return lines


def targets_table(targets: dict) -> list[str]:
    lines = ["| target | measured | bound | met |", "|---|---:|---:|---|"]
    for t in targets.values():
        value = "not measured" if t["value"] is None else f"{t['value']:.3g}"
        met = {None: "-", True: "yes", False: "**no**"}[t["met"]]
        note = f" ({t['note']})" if t.get("note") else ""
        sign = "<=" if t["at_most"] else (">" if t["strict"] else ">=")
        lines.append(f"| {t['what']} | {value} | {sign} {t['bound']:g} | {met}{note} |")
    return lines


# ------------------------------------------------------------------------------ report


def has_sampling_rows(record: dict | None) -> bool:
    return record is not None and any(k.split("/")[0] in SECTIONS for k in record["measurements"])


def _times(value) -> str:
    return "-" if value is None else f"{value:.2f}x"


def _fmt(value, digits: str = ".3g") -> str:
    return "-" if value is None else format(value, digits)


def speed_tables(m: dict) -> list[str]:
    """Markdown: the reference comparison (or why it was skipped) and exact / cached / compiled."""
    lines = []
    status = m.get("reference/status")
    if status is not None and "skipped" in status:
        lines += [f"Authors' sampler: **skipped** ({status['skipped']}).", ""]
    elif status is not None:
        lines += [
            f"Authors' sampler: `EAR.sample_tokens` of shaochenze/EAR at {status['commit']} ({status['files']}, "
            f"timm {status['timm']}), same config and weights, fp32, guidance {GUIDANCE}, temperature {TEMPERATURE}; "
            'ours is `pipe(..., output_type="latent")`. Alternating rounds; ratio per round.',
            "",
            "The last column is the speed-up that the arithmetic alone allows: the authors' FLOPs over ours, counted "
            "by FlopCounterMode around the same calls (matmul-class ops and attention; no elementwise op).",
            "",
            "`compiled` is ours with `pipe.enable_compiled_step()` (the same FLOPs; the authors' sampler has no "
            "compiled step): its speed-up over theirs, median of the rounds' ratios.",
            "",
            "| config | batch | steps | ours | authors' | ours / authors' (median, min-max) | speed-up | speed-up, "
            "compiled | FLOPs, authors' / ours |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for row in _rows(m, "reference/ratio_").values():
            prefix = f"reference/{row['config']}_b{row['batch']}_s{row['steps']}"
            lines.append(
                f"| {row['config']} | {row['batch']} | {row['steps']} | {_ms(m[prefix + '_ours'])} | "
                f"{_ms(m[prefix + '_reference'])} | {row['ours_over_reference_median']:.3f} "
                f"({row['ours_over_reference_min']:.3f}-{row['ours_over_reference_max']:.3f}) | "
                f"{row['speedup']:.2f}x | {_times(row.get('speedup_compiled'))} | "
                f"{_flop_ratio(row, 'flops_reference', 'flops_ours')} |"
            )
        agreement = _rows(m, "reference/agreement_")
        if agreement:
            lines += ["", "Same orders and noise, largest |ours - authors'| token difference: " + ", ".join(
                f"{config} {row['max_abs_diff']:.2g} ({row['steps']} steps)" for config, row in agreement.items()
            ) + "."]  # fmt: skip
        for key, row in _rows(m, "reference/compiled_status_").items():
            if not row.get("available", True):
                lines.append(f"Compiled step unavailable ({key}): {row['why']}.")
        lines.append("")
    lines += mar_table(m)
    speedups = _rows(m, "cache/speedup_")
    if speedups:
        variants = [v for v in SPEED_VARIANTS[1:] if any(v in row for row in speedups.values())]
        lines += [
            "Exact against the caches and the compiled step (median, min-max of exact / variant per round). The "
            "last column is what the caches save in arithmetic: exact's FLOPs over cached's, counted as above.",
            "",
            "| config | batch | steps | exact | "
            + " | ".join(f"{v} (x exact)" for v in variants)
            + " | FLOPs, exact / cached |",
            "|---|---:|---:|---:|" + "---:|" * (len(variants) + 1),
        ]
        for row in speedups.values():
            exact = m[f"cache/{row['config']}_b{row['batch']}_s{row['steps']}_exact"]
            cells = [
                f"{row[v]:.2f}x ({row[f'{v}_min']:.2f}-{row[f'{v}_max']:.2f})" if v in row else "-" for v in variants
            ]
            cells.append(_flop_ratio(row, "flops_exact", "flops_cached"))
            lines.append(f"| {row['config']} | {row['batch']} | {row['steps']} | {_ms(exact)} | {' | '.join(cells)} |")
        lines += parts_table(m)
        configs = {v["config"] for k, v in m.items() if k.startswith("cache/") and "median_s" in v}
        lines += ["", "Configs: " + "; ".join(sorted(configs)) + "."]
        for key, row in _rows(m, "cache/compiled_status_").items():
            if not row.get("available", True):
                lines.append(f"Compiled step unavailable ({key}): {row['why']}.")
        for key, row in _rows(m, "cache/compile_profile_").items():
            lines += [
                "",
                f"Profile of one generation ({key}, batch {row['batch']}, {row['steps']} steps): eager "
                f"{row['eager_self_cpu_ms']:.0f} ms, compiled {row['compiled_self_cpu_ms']:.0f} ms of self CPU time.",
                f"- eager, top operators: {row['eager_top']}",
                f"- compiled, top operators: {row['compiled_top']}",
            ]
    return lines


def mar_table(m: dict) -> list[str]:
    """Markdown: the MAR comparison (or why it was skipped); its first line names the model measured."""
    status = m.get("mar_reference/status")
    if status is None:
        return []
    if "skipped" in status:
        return [f"Authors' MAR sampler: **skipped** ({status['skipped']}).", ""]
    lines = [
        f"MAR, a random-weight config (not a released checkpoint): {status['model']}. Ours: MAR's backbone and "
        f'diffusion head in our pipeline, LiteHybrid off, `pipe(..., output_type="latent")`; authors\': '
        f"`MAR.sample_tokens` of LTH14/mar at {status['commit']} (timm {status['timm']}), the same weights, fp32, "
        f"guidance {GUIDANCE} (linear), temperature {MAR_TEMPERATURE}; cached: `SamplingCache()`'s defaults. "
        "Alternating rounds; ratios per round.",
        "",
        "| batch | steps | ours exact | authors' | ours / authors' (median, min-max) | ours cached | cached speed-up "
        "(x exact) |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in _rows(m, "mar_reference/ratio_").values():
        prefix = f"mar_reference/b{row['batch']}_s{row['steps']}"
        lines.append(
            f"| {row['batch']} | {row['steps']} | {_ms(m[prefix + '_ours'])} | {_ms(m[prefix + '_reference'])} | "
            f"{row['ours_over_reference_median']:.3f} ({row['ours_over_reference_min']:.3f}-"
            f"{row['ours_over_reference_max']:.3f}) | {_ms(m[prefix + '_cached'])} | {row['cached']:.2f}x "
            f"({row['cached_min']:.2f}-{row['cached_max']:.2f}) |"
        )
    agreement = m.get("mar_reference/agreement")
    if agreement:
        lines += ["", f"Same orders and Gaussian draws ({agreement['steps']} steps, batch {agreement['batch']}): "
                  f"largest |ours - authors'| token difference {agreement['max_abs_diff']:.2g} (tokens up to "
                  f"{agreement['max_abs_token']:.2g}: random weights grow MAR's diffusion chain)."]  # fmt: skip
    return [*lines, ""]


def parts_table(m: dict) -> list[str]:
    """Markdown: where a batch-1 run's time goes (``cache/parts_*``), and the most any cheaper cached pass allows."""
    rows = _rows(m, "cache/parts_")
    if not rows:
        return []
    lines = [
        "",
        "Where a batch-1 run's time goes, in ms (median of 3 calls; backbone full passes: exact's, or the caches' "
        "refreshes). `bound`: exact's total over cached's total less its cached backbone passes, the speed-up the "
        "caches would reach if those passes cost nothing.",
        "",
        "| config | steps | sampler | total | LiteHybrid | backbone, full passes | backbone, cached passes | head "
        "| rest | bound |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows.values():
        exact, cached = row["exact"], row["cached"]
        bound = exact["total"] / (cached["total"] - cached["backbone_cached"])
        for variant, parts in (("exact", exact), ("cached", cached)):
            cells = " | ".join(f"{parts[p]:.0f}" for p in ("total", *PARTS, "rest"))
            last = f"{bound:.2f}x" if variant == "cached" else ""
            lines.append(f"| {row['config']} | {row['steps']} | {variant} | {cells} | {last} |")
    return lines


def _flop_ratio(row: dict, numerator: str, denominator: str) -> str:
    """`row[numerator] / row[denominator]` as a speed-up, or "-" for a row measured before FLOPs were counted."""
    return f"{row[numerator] / row[denominator]:.2f}x" if numerator in row and denominator in row else "-"


def _ms(row: dict) -> str:
    return f"{row['median_s'] * 1e3:.3g} ms"


def quality_table(m: dict) -> list[str]:
    """Markdown: each quality point (FID, sFID, demo-FID, seconds per image, change against exact), the floor."""
    groups = seed_groups({k: v for k, v in _rows(m, "quality/").items() if "variant" in v})
    if not groups:
        return []
    lines = [
        "| sampler | steps | seeds | seconds / image | FID | sFID | demo-FID | FID vs exact | demo-FID vs exact |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for row in groups:
        cells = [_spread(row, metric, ".4g") for metric in ("fid", "sfid", "demo_fid")]
        changes = [_spread(row, f"{metric}_change", "+.1%") for metric in ("fid", "demo_fid")]
        lines.append(
            f"| {'DiTPipeline' if row['variant'] == 'dit' else row['variant']} | {row['steps']} | "
            f"{', '.join(map(str, row['seeds']))} | {_fmt(row['seconds_per_image'])} | {' | '.join(cells)} | "
            f"{' | '.join(changes)} |"
        )
    floor = m.get("quality/floor")
    if floor:
        lines.append(
            f"| real `{floor['real_split']}` images (floor) | - | - | - | {_fmt(floor.get('fid_real'), '.4g')} | "
            f"{_fmt(floor.get('sfid_real'), '.4g')} | {_fmt(floor.get('demo_fid_real'), '.4g')} | - | - |"
        )
    lines += [
        "",
        f"{groups[0].get('images_per_class', '?')} samples per class per sampling seed. With several seeds a cell "
        "is the mean over them (min to max); a change against exact pairs each seed with exact's from the same seed "
        "(the same orders and noise). With one seed there is no seed-to-seed spread, so a difference of a few "
        "percent between two rows may be noise. Seconds per image: the eval's median over its batches of the "
        "pipeline calls alone (decoding included, feature extraction not).",
    ]
    dit = m.get("quality/dit_status", {})
    if "absent" in dit:
        lines += ["", f"DiTPipeline: absent ({dit['absent']})."]
    failed = {k: v for k, v in dit.items() if k.startswith("dit_s")}
    if failed:
        lines += ["", "DiTPipeline points that failed: " + "; ".join(f"{k}: {v}" for k, v in failed.items())]
    return lines


def _spread(row: dict, key: str, digits: str) -> str:
    """`row[key]` formatted, with its (min-max) over seeds when there are several."""
    if row.get(key) is None:
        return "-"
    spread = row.get(f"{key}_range")
    return format(row[key], digits) + ("" if spread is None else f" ({spread[0]:{digits}} to {spread[1]:{digits}})")


def _plot_order(row: dict) -> tuple:
    """Exact, cached, each cache alone, compiled, then DiT; by steps within each."""
    order = [*VARIANTS, "dit"]
    return (order.index(row["variant"]) if row["variant"] in order else len(order), row["steps"])


def sampling_markdown(record: dict) -> str:
    m = record["measurements"]
    targets = check_targets(m)
    blocks = [
        f"Sampling speed and quality, profile `{record['profile']}` on {record['device_name'] or record['device']} "
        f"({record['dtype']}); median (min-max) of alternating rounds.",
        "\n".join(targets_table(targets)),
        "\n".join(speed_tables(m)).strip(),
        "\n".join(quality_table(m)),
    ]
    return "\n\n".join(block for block in blocks if block)


def plot_speed_quality(record: dict, path: Path) -> bool:
    """FID and demo-FID against seconds per image: ours exact and cached (a line over step counts),
    each cache alone and compiled, DiTPipeline, and the real-data floor. False: nothing to plot."""
    m = record["measurements"]
    points = seed_groups({k: v for k, v in _rows(m, "quality/").items() if "variant" in v})
    if not points:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    floor = m.get("quality/floor", {})
    for ax, metric, label in zip(axes, ("fid", "demo_fid"), ("Inception FID", "demo-FID (digit classifier)")):
        for variant in sorted({p["variant"] for p in points}, key=lambda v: _plot_order({"variant": v, "steps": 0})):
            rows = sorted(
                (p for p in points if p["variant"] == variant and p[metric] is not None and p["seconds_per_image"]),
                key=lambda p: p["steps"],
            )
            if not rows:
                continue
            x, y = [p["seconds_per_image"] for p in rows], [p[metric] for p in rows]
            name = "DiTPipeline" if variant == "dit" else f"ours, {variant}"
            color = f"C{_plot_order({'variant': variant, 'steps': 0})[0]}"
            ax.plot(x, y, marker="s" if variant == "dit" else "o", color=color, label=name)
            for p in rows:
                ax.annotate(str(p["steps"]), (p["seconds_per_image"], p[metric]), fontsize=7,
                            textcoords="offset points", xytext=(3, 3))  # fmt: skip
        real = floor.get(f"{metric}_real")
        if real is not None:
            ax.axhline(real, color="grey", linestyle="--", label=f"real {floor['real_split']} images (floor)")
        ax.set_xscale("log")
        ax.set_xlabel("seconds per image (labels: steps)")
        ax.set_ylabel(label)
        if ax.lines:
            ax.legend(fontsize=7)
    fig.suptitle(f"speed vs quality, {record['device_name'] or record['device']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def report_paths(json_path: str | Path) -> tuple[Path, Path]:
    json_path = Path(json_path)
    return (
        json_path.with_name(f"{json_path.stem}_sampling.md"),
        json_path.with_name(f"{json_path.stem}_sampling.png"),
    )


def write_report(json_path: str | Path) -> str | None:
    """From a benchmark results JSON with sampling rows: ``<stem>_sampling.md`` and ``.png`` beside it;
    returns the Markdown (None, writing nothing, when the JSON has no sampling rows)."""
    from parscale_ear_hf.results import load_results

    record = load_results(json_path)
    if not has_sampling_rows(record):
        return None
    markdown_path, plot_path = report_paths(json_path)
    markdown = sampling_markdown(record)
    if plot_speed_quality(record, plot_path):
        markdown += f"\n\n![speed vs quality]({plot_path.name})"
    markdown_path.write_text(markdown + "\n", encoding="utf-8")
    return markdown


def readme_section(results_dir: str | Path) -> str:
    """The `sampling-speed` block of docs/benchmarks.md: per profile measured, where and when, the targets, the
    headline tables and the plot; how to run each section."""
    from parscale_ear_hf.results import load_results, machine_summary

    how = (
        "Run with `python examples/benchmark.py --sections reference cache --reference-code DIR` (DIR: a clone of "
        "shaochenze/EAR checked out at 9256a9f, outside this repository, and `pip install --no-deps timm==1.0.31`; "
        "without them the reference rows say skipped), `python examples/benchmark.py --sections mar_reference "
        "--mar-reference-code DIR` (DIR: LTH14/mar at fe470ac, e.g. `git archive` of it; timm and scipy) and "
        "`python examples/benchmark.py --sections quality` "
        "(`--dit-model` names the DiT folder), then `python examples/update_readme.py`."
    )
    parts = []
    for profile in ("gpu", "cpu"):
        path = Path(results_dir) / f"benchmark_{profile}.json"
        record = load_results(path)
        if not has_sampling_rows(record):
            continue
        m = record["measurements"]
        sections = {s: p for s, p in record["section_provenance"].items() if s in SECTIONS}
        markdown_path, plot_path = report_paths(path)
        blocks = [
            f"**{profile.upper()}** ({record['dtype']}, {machine_summary(record['provenance']['machine'])}, "
            f"{section_revisions({'section_provenance': sections})}). "
            f"Full report: [`results/{markdown_path.name}`](results/{markdown_path.name}).",
            "\n".join(targets_table(check_targets(m))),
            "\n".join(speed_tables(m)).strip(),
            "\n".join(quality_table(m)),
            f"![speed vs quality, {profile}](results/{plot_path.name})" if plot_path.is_file() else "",
        ]
        parts.append("\n\n".join(block for block in blocks if block))
    lead = (
        "**Sampling speed and its cost in quality** (exact, cached, compiled; the authors' EAR and MAR samplers; "
        "DiTPipeline)."
    )
    if not parts:
        return f"{lead} _Not measured yet._ {how}"
    return "\n\n".join([lead, *parts, how])


def section_revisions(record: dict) -> str:
    """Which sections were measured at which revision (sections can be rerun one at a time)."""
    by_revision: dict[str, list[str]] = {}
    for section, prov in record["section_provenance"].items():
        by_revision.setdefault(short_revision({"provenance": prov}), []).append(section)
    return "; ".join(f"{', '.join(sections)} at `{rev}`" for rev, sections in by_revision.items())
