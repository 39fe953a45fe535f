"""What sampling one 256x256 image costs in arithmetic, and what that allows on an H100: computed, not measured.

For EAR-B/L/H (``examples/configs/ear_{b,l,h}.json``, ParScale P = 1 and 2) at 64 and 16 steps, exact and with
the default sampling caches, with guidance 3.0 (EAR's evaluation setting, linear schedule) and the KL-16 VAE's
decoder (``examples/configs/kl16_vae.json``):

- FLOPs per image, counted by ``torch.utils.flop_counter.FlopCounterMode`` while the pipeline's own
  ``__call__(output_type="pt")`` runs on the meta device (random-weight components, no memory, no arithmetic):
  the real sampling loop, so the caches' skipped work is what they really skip. FlopCounterMode counts the
  matmul-class ops (linear, bmm, convolution, attention), 2 FLOPs per multiply-accumulate, and no elementwise op
  (norms, activations, softmax, the guidance mix). A step callback marks where each step ends.
- weights read per step: the bytes of every parameter an op takes, once per op, at 2 bytes (bf16); an
  embedding table counts whole. Activations and the token cache's keys and values are not counted.
- the H100 lower bound: FLOPs at the dense bf16 peak; the roofline at batch b, per step
  ``max(FLOPs / peak, weight bytes / (HBM bandwidth * b))`` summed over the steps and the decoding; the
  prediction at a stated MFU (compute only; the bandwidth stays at its peak, which favours small batches), and
  the smallest batch at which it reaches the target.

    python examples/sampling_flops.py                   # writes results/sampling_flops.json (~10 min on 2 cores)
    python examples/sampling_flops.py --measure         # on a GPU: results/sampling_speed_gpu.json (bench_gpu.sh)
    python examples/update_readme.py                    # the `sampling-flops` table of docs/benchmarks.md

Kernel launches are not in the model: an eager step of EAR-B launches a few hundred kernels, which at batch 1
costs more than its arithmetic (``pipe.enable_compiled_step(mode="reduce-overhead")`` captures them in a CUDA
graph). ``--measure`` times the same rows on a GPU.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import time
from pathlib import Path

import torch
from diffusers import AutoencoderKL
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from parscale_ear_hf.models import EARTransformer, EnergyHead, LiteHybrid
from parscale_ear_hf.pipeline_parscale_ear import ParScaleEARPipeline, SamplingCache, mask_schedule, predicting_steps
from parscale_ear_hf.results import format_number, git_revision, load_results, machine_summary, short_revision

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs"
MODELS = {"ear_b": "EAR-B", "ear_l": "EAR-L", "ear_h": "EAR-H"}
# What EAR's tokens are: MAR's KL-16 VAE on 256x256 ImageNet.
IMAGENET = {"in_channels": 16, "grid_size": 16, "num_classes": 1000}
GUIDANCE, TEMPERATURE = 3.0, 0.7
BF16_BYTES = 2
# NVIDIA H100 SXM5 datasheet: 989 TFLOP/s dense bf16 tensor core (1,979 with 2:4 sparsity), 3.35 TB/s HBM3.
H100 = {
    "name": "NVIDIA H100 SXM5 (80 GB)",
    "bf16_dense_tflops": 989.0,
    "hbm_tb_per_s": 3.35,
    "source": "NVIDIA H100 Tensor Core GPU datasheet: bf16 tensor core 1,979 TFLOP/s with sparsity, 989 dense; "
    "HBM3 3.35 TB/s (SXM5)",
}
TARGET_MS = 12.0  # the seed's A2 target: end to end, per image, on an H100
# The MFU of the prediction, and the range around it. Well-tuned compute-bound transformer work on an H100 in bf16
# with fused attention (training, LLM prefill) reaches about 40-55%; these steps are short sequences (320 positions)
# of narrow matrices (768-1280), run eagerly, so 40% needs a large batch and is the optimistic end for them.
MFU, MFU_RANGE = 0.40, (0.30, 0.50)
# Host time per op that eager PyTorch spends launching it (an order of magnitude, assumed, not measured): at small
# batches the launches, not the arithmetic, set the pace; CUDA graphs (`enable_compiled_step(mode=
# "reduce-overhead")`) remove most of it.
LAUNCH_US = 5.0
# A tiny stand-in with the same structure, for the GPU script's CPU rehearsal (`--tiny`): measures nothing.
TINY = {
    "model": {
        "transformer": {"hidden_size": 32, "num_layers": 2, "num_heads": 2, "buffer_size": 4},
        "energy_head": {"width": 32, "depth": 2, "noise_dim": 8},
    },
    "data": {"in_channels": 4, "grid_size": 4, "num_classes": 10},
    "vae": {
        "latent_channels": 4, "block_out_channels": [8, 8, 8], "down_block_types": ["DownEncoderBlock2D"] * 3,
        "up_block_types": ["UpDecoderBlock2D"] * 3, "layers_per_block": 1, "norm_num_groups": 4, "sample_size": 16,
    },
}  # fmt: skip


def default_cache(num_inference_steps: int) -> SamplingCache:
    """The sampling caches' default settings at `num_inference_steps`: ``SamplingCache()``'s, with `refresh_every`
    resolved by :meth:`SamplingCache.refresh_every_at` (4 at 8 steps, 8 at 16 or more)."""
    return SamplingCache(refresh_every=SamplingCache().refresh_every_at(num_inference_steps))


def model_config(name: str, parscale_n: int, config_dir: str | os.PathLike = CONFIG_DIR) -> dict:
    """``<config_dir>/<name>.json`` with ``transformer.parscale_n`` set (how P = 2 of EAR-L/H is derived)."""
    path = Path(config_dir) / f"{name}.json"
    if not path.is_file():
        raise FileNotFoundError(f"sampling_flops: no {path}; pass --config-dir, the folder of {sorted(MODELS)}.")
    config = json.loads(path.read_text(encoding="utf-8"))
    config["transformer"] = {**config.get("transformer", {}), "parscale_n": parscale_n}
    return config


def vae_config(path: str | os.PathLike = CONFIG_DIR / "kl16_vae.json") -> dict:
    return {k: v for k, v in json.loads(Path(path).read_text(encoding="utf-8")).items() if not k.startswith("_")}


def build_pipeline(config: dict, vae: dict, data: dict = IMAGENET, device="meta", dtype=None) -> ParScaleEARPipeline:
    """The pipeline of a model config (sections ``lite_hybrid``, ``transformer``, ``energy_head``) and an
    ``AutoencoderKL`` config, with random weights, built on `device` (meta: shapes only)."""
    channels = data["in_channels"]
    with torch.device(device):
        pipe = ParScaleEARPipeline(
            vae=AutoencoderKL(**vae),
            lite_hybrid=LiteHybrid(in_channels=channels, grid_size=data["grid_size"], **config.get("lite_hybrid", {})),
            transformer=EARTransformer(**data, **config["transformer"]),
            energy_head=EnergyHead(
                condition_dim=config["transformer"].get("hidden_size", 768), token_channels=channels,
                **config["energy_head"],
            ),
        )  # fmt: skip
    if dtype is not None:  # nn.Module's own `to`: diffusers' warns about fp32 modules these components do not have
        for component in (pipe.vae, pipe.lite_hybrid, pipe.transformer, pipe.energy_head):
            torch.nn.Module.to(component, dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe


class OpTally(TorchDispatchMode):
    """What the ops under it would cost a GPU besides their FLOPs: `weight_bytes`, the bytes of the parameters they
    read (each once per op that takes it, at `bytes_per_element` whatever dtype it runs in; a linear layer reads
    its weight through one transpose and its bias in one addmm; a view of a parameter counts the elements it
    shows, so the query rows and the key-value rows of one qkv weight add up to the weight once), and
    `launches`, the ops that are not views (about the kernels eager PyTorch launches)."""

    def __init__(self, modules: list[torch.nn.Module], bytes_per_element: int = BF16_BYTES):
        super().__init__()
        self.bytes_per_element = bytes_per_element
        self.sizes = {id(p): p.numel() * bytes_per_element for m in modules for p in m.parameters()}
        self.weight_bytes = self.launches = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        leaves = tree_leaves((args, kwargs))
        read = [self.sizes[id(a)] for a in leaves if isinstance(a, torch.Tensor) and id(a) in self.sizes]
        out = func(*args, **kwargs)
        if read and func.is_view and isinstance(out, torch.Tensor):
            self.weight_bytes += out.numel() * self.bytes_per_element
        else:
            self.weight_bytes += sum(read)
        self.launches += not func.is_view
        return out


def count_sampling(pipe: ParScaleEARPipeline, num_inference_steps: int, cache: SamplingCache | None, batch: int = 1):
    """FLOPs, weight bytes and op launches of ``pipe(..., output_type="pt")`` per step and for the decoding.

    Returns:
        ``step_flops``, ``step_weight_bytes``, ``step_launches`` (lists, one per step run), ``decode_flops``,
        ``decode_weight_bytes``, ``decode_launches`` and ``flops_by_op``. FLOPs are per image (divided by
        `batch`); weight bytes and launches per call, whatever the batch.
    """
    marks = []

    def mark_step(pipe, i, step, tensors):
        marks.append((flops.get_total_flops(), tally.weight_bytes, tally.launches))
        return tensors

    flops = FlopCounterMode(display=False, custom_mapping=CPU_ATTENTION)
    tally = OpTally([pipe.vae, pipe.lite_hybrid, pipe.transformer, pipe.energy_head])
    with flops, tally:
        pipe([0] * batch, num_inference_steps=num_inference_steps, guidance_scale=GUIDANCE, temperature=TEMPERATURE,
             output_type="pt", cache=cache, callback_on_step_end=mark_step)  # fmt: skip
    ends = [(0, 0, 0), *marks, (flops.get_total_flops(), tally.weight_bytes, tally.launches)]
    deltas = [[b - a for a, b in zip(start, end)] for start, end in zip(ends, ends[1:])]
    steps, decode = deltas[:-1], deltas[-1]
    return {
        "step_flops": [f // batch for f, _, _ in steps],
        "step_weight_bytes": [w for _, w, _ in steps],
        "step_launches": [n for _, _, n in steps],
        "decode_flops": decode[0] // batch,
        "decode_weight_bytes": decode[1],
        "decode_launches": decode[2],
        "flops_by_op": {str(op): n // batch for op, n in flops.get_flop_counts()["Global"].items()},
    }


def _cpu_attention_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


# FlopCounterMode counts attention on the meta device (which runs it as bmm) and by the GPU kernels' names, but
# not as the CPU kernel that real CPU tensors run: that one is counted here by the same formula.
CPU_ATTENTION = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_attention_flops}


def count_flops(fn) -> int:
    """FLOPs of ``fn()`` under ``torch.no_grad`` as FlopCounterMode counts them (matmul-class ops, 2 per
    multiply-accumulate), attention included on any device."""
    counter = FlopCounterMode(display=False, custom_mapping=CPU_ATTENTION)
    with counter, torch.no_grad():
        fn()
    return counter.get_total_flops()


def exact_count_by_step_shape(pipe: ParScaleEARPipeline, num_inference_steps: int, batch: int = 1) -> int:
    """FLOPs per image of guided exact sampling and decoding, from one count per distinct step shape: for each
    number of tokens a step predicts, one guided backbone pass (both passes as one batch, its last block at those
    tokens only, as exact sampling runs it) and the head on them; the decoder once; summed over the schedule.
    Equals :func:`count_sampling`'s total."""
    n, grid, device = pipe.grid_size**2, pipe.grid_size, pipe.device
    transformer, head = pipe.transformer, pipe.energy_head
    tokens = torch.zeros(2 * batch, n, transformer.config.in_channels, device=device)
    mask = torch.ones(2 * batch, n, dtype=torch.bool, device=device)
    labels = torch.zeros(2 * batch, dtype=torch.long, device=device)

    def step_flops(predicted: int) -> int:
        positions = torch.arange(predicted, device=device).expand(2 * batch, -1)
        z = torch.zeros(batch * predicted, transformer.config.hidden_size, device=device)
        noise = torch.zeros(batch * predicted, *head.noise_shape, device=device)
        return count_flops(
            lambda: transformer(pipe.lite_hybrid(tokens, mask), labels, mask, positions=positions)
        ) + count_flops(lambda: head.sample(z, TEMPERATURE, noise=noise))

    latents = torch.zeros(batch, transformer.config.in_channels, grid, grid, device=device)
    total, masked, cost = count_flops(lambda: pipe.decode_latents(latents)), n, {}
    for step in predicting_steps(num_inference_steps, n):
        masked_next = mask_schedule(step, num_inference_steps, n, masked)
        predicted = masked - masked_next
        cost.setdefault(predicted, step_flops(predicted))
        total, masked = total + cost[predicted], masked_next
    return total // batch


# ------------------------------------------------------------------------------------------ the H100's arithmetic


def seconds_per_image(row: dict, batch: float, mfu: float = 1.0, launch_s: float = 0.0, hardware: dict = H100):
    """Roofline time per image at `batch`: per step (and the decoding) ``max(FLOPs / (mfu * peak), weight bytes /
    (bandwidth * batch))`` plus ``launches * launch_s / batch``, summed. ``batch=float("inf")`` leaves the
    compute alone."""
    peak, bandwidth = mfu * hardware["bf16_dense_tflops"] * 1e12, hardware["hbm_tb_per_s"] * 1e12
    costs = [
        *zip(row["step_flops"], row["step_weight_bytes"], row["step_launches"]),
        (row["decode_flops"], row["decode_weight_bytes"], row["decode_launches"]),
    ]
    return sum(max(f / peak, w / (bandwidth * batch)) + n * launch_s / batch for f, w, n in costs)


def batch_for_target(row: dict, target_s: float, mfu: float, launch_s: float = 0.0, hardware: dict = H100):
    """The smallest batch at which :func:`seconds_per_image` is at most `target_s`; None when no batch reaches it."""

    def time_at(batch):
        return seconds_per_image(row, batch, mfu, launch_s, hardware)

    if time_at(float("inf")) > target_s:
        return None
    high = 1
    while time_at(high) > target_s:
        high *= 2
    low = high // 2  # above the target (or 0)
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (low, middle) if time_at(middle) <= target_s else (middle, high)
    return high


def h100_figures(row: dict, target_ms: float = TARGET_MS, mfus=(MFU, *MFU_RANGE), launch_us: float = LAUNCH_US):
    """The computed H100 figures of a counted row (ms per image; batches for `target_ms`, without and with
    eager PyTorch's host time per launched op)."""
    target_s, launch_s = target_ms / 1e3, launch_us / 1e6
    return {
        "lower_bound_ms": 1e3 * seconds_per_image(row, float("inf")),
        "batch1_bound_ms": 1e3 * seconds_per_image(row, 1),
        "predicted_ms": {f"{m:g}": 1e3 * seconds_per_image(row, float("inf"), m) for m in mfus},
        "batch_for_target": {f"{m:g}": batch_for_target(row, target_s, m) for m in mfus},
        "batch_for_target_eager": {f"{m:g}": batch_for_target(row, target_s, m, launch_s) for m in mfus},
        "eager_launch_ms_at_batch1": 1e3 * launch_s * (sum(row["step_launches"]) + row["decode_launches"]),
    }


# ------------------------------------------------------------------------------------------ the command


def count_row(name: str, parscale_n: int, num_inference_steps: int, cached: bool, args) -> dict:
    """One row of the results: a config, P, a step count, exact or cached; counted and put on the H100."""
    pipe = build_pipeline(model_config(name, parscale_n, args.config_dir), vae_config(args.vae_config))
    cache = default_cache(num_inference_steps) if cached else None
    row = {
        "model": MODELS.get(name, name),
        "config": name,
        "parscale_n": parscale_n,
        "num_inference_steps": num_inference_steps,
        "sampling": "cached" if cached else "exact",
        "cache": None if cache is None else dataclasses.asdict(cache),
        **count_sampling(pipe, num_inference_steps, cache, args.batch),
    }
    row["sampling_flops"] = sum(row["step_flops"])
    row["flops_per_image"] = row["sampling_flops"] + row["decode_flops"]
    row["h100"] = h100_figures(row, args.target_ms)
    return row


def count(args: argparse.Namespace) -> dict:
    """Every row, and the check of the per-step-shape shortcut on EAR-B at 16 steps, as a results payload."""
    rows = []
    for name in args.models:
        for parscale_n in args.parscale:
            for steps in args.steps:
                for cached in (False, True):
                    rows.append(count_row(name, parscale_n, steps, cached, args))
                    r = rows[-1]
                    print(f"{r['model']} P={parscale_n} {steps} steps {r['sampling']}: "
                          f"{r['flops_per_image'] / 1e12:.3f} TFLOP/image", flush=True)  # fmt: skip
    check = {"model": "EAR-B", "parscale_n": 1, "num_inference_steps": 16, "sampling": "exact"}
    full = next((r for r in rows if all(r[k] == v for k, v in check.items())), None)
    if full is not None:
        pipe = build_pipeline(model_config("ear_b", 1, args.config_dir), vae_config(args.vae_config))
        check.update(full_count=full["flops_per_image"], per_step_shape=exact_count_by_step_shape(pipe, 16))
        check["equal"] = check["full_count"] == check["per_step_shape"]
    return {
        "metric": "sampling_flops",
        "what": "computed, not measured: FLOPs counted on the meta device, H100 times derived from them",
        "method": "FlopCounterMode (matmul-class ops, 2 FLOPs per multiply-accumulate, no elementwise ops) around "
        "ParScaleEARPipeline.__call__(output_type='pt') on the meta device, random weights; weight bytes: "
        "each parameter once per op that takes it, at 2 bytes (bf16)",
        "count_batch": args.batch,
        "guidance_scale": GUIDANCE,
        "guidance_schedule": "linear",
        "temperature": TEMPERATURE,
        "vae": os.path.basename(args.vae_config),
        "hardware": H100,
        "target_ms": args.target_ms,
        "mfu": MFU,
        "mfu_range": list(MFU_RANGE),
        "launch_us": LAUNCH_US,
        "shortcut_check": check if full is not None else None,
        "rows": rows,
    }


def row_key(row: dict) -> tuple:
    """What names a measured row, whatever its batch: model, streams, steps, exact or cached."""
    return row["model"], row["parscale_n"], row["num_inference_steps"], row["sampling"]


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def measure(args: argparse.Namespace, previous: dict | None = None, save=None) -> dict:
    """Seconds per image of the same rows on `args.device` (bf16 on a GPU), ``pipe(..., output_type="pt")`` end
    to end, at each of `args.batches`; a row's larger batches are skipped once a call takes over `args.budget_s`.

    Resumable and sized to a budget: the rows of `previous` (an earlier record of this function) made on the same
    device and sizes are kept and not measured again; once `args.total_budget_s` seconds have passed, no row
    starts, and the record's `not_measured` names the rows left for a later run. `save` (if given) gets the record
    after every row, so that a run stopped from outside keeps what it measured."""
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    data, vae = (TINY["data"], TINY["vae"]) if args.tiny else (IMAGENET, vae_config(args.vae_config))
    record = {
        "metric": "sampling_seconds_per_image",
        "device_name": device_name(device),
        "sizes": "tiny (--tiny: checks the code path, measures nothing)" if args.tiny else "ImageNet-256 configs",
        "dtype": str(dtype).removeprefix("torch."),
        "guidance_scale": GUIDANCE,
        "temperature": TEMPERATURE,
    }
    same = previous is not None and all(previous.get(k) == record[k] for k in ("device_name", "sizes", "dtype"))
    record.update(rows=list(previous["rows"]) if same else [], not_measured=[])
    done = {row_key(r) for r in record["rows"]}
    budget = getattr(args, "total_budget_s", None)
    deadline = None if budget is None else time.monotonic() + budget
    revision = git_revision()
    for name in args.models:
        for parscale_n in args.parscale:
            todo = [(steps, cache) for steps in args.steps for cache in (None, default_cache(steps))]
            todo = [(k, c) for k, c in todo if (MODELS.get(name, name), parscale_n, k, _sampling(c)) not in done]
            if not todo:
                continue
            pipe = None
            for steps, cache in todo:
                if deadline is not None and time.monotonic() > deadline:
                    record["not_measured"].append(
                        f"{MODELS.get(name, name)} P={parscale_n} {steps} steps {_sampling(cache)}: the run's "
                        f"--total-budget-s {budget:g} was spent; run again to continue"
                    )
                    continue
                if pipe is None:
                    config = model_config(name, parscale_n, args.config_dir)
                    if args.tiny:
                        config = {**config, **{k: {**config[k], **v} for k, v in TINY["model"].items()}}
                    pipe = build_pipeline(config, vae, data, device, dtype)
                record["rows"].extend(_time_row(pipe, name, parscale_n, steps, cache, args, revision))
                if save is not None:
                    save(record)
            del pipe
    return record


def _sampling(cache) -> str:
    return "exact" if cache is None else "cached"


def _time_row(pipe, name, parscale_n, steps, cache, args, revision: str) -> list[dict]:
    """One row's timings, one per batch of `args.batches` (the first call of each warms up), made at `revision`."""
    rows = []
    for batch in args.batches:
        times = []
        for _ in range(1 + args.repeats):
            start = time.perf_counter()
            pipe([0] * batch, num_inference_steps=steps, guidance_scale=GUIDANCE, temperature=TEMPERATURE,
                 output_type="pt", cache=cache)  # fmt: skip
            if pipe.device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        rows.append({
            "model": MODELS.get(name, name), "parscale_n": parscale_n, "num_inference_steps": steps,
            "sampling": _sampling(cache), "batch": batch,
            "seconds_per_image": statistics.median(times[1:]) / batch, "first_call_s": times[0],
            "git_revision": revision,
        })  # fmt: skip
        if times[-1] > args.budget_s:
            break
    return rows


# ------------------------------------------------------------------------------------------ the table


def _batch_cell(batches: dict, mfu: float, low: float, high: float) -> str:
    """`batches` by MFU: the one at `mfu`, then at `high` and `low` ("none": no batch reaches the target)."""

    def shown(m):
        return "none" if batches[f"{m:g}"] is None else f"{batches[f'{m:g}']:,}"

    if all(b is None for b in batches.values()):
        return "none"
    return f"{shown(mfu)} ({high:.0%}: {shown(high)}, {low:.0%}: {shown(low)})"


def _target_summary(record: dict) -> str:
    """Which rows can reach the target, and at what batch, in one sentence."""
    mfu, target, rows = record["mfu"], record["target_ms"], record["rows"]
    reach = [r for r in rows if r["h100"]["batch_for_target"][f"{mfu:g}"] is not None]
    named = [
        f"{r['model']} P={r['parscale_n']} at {r['num_inference_steps']} steps, {r['sampling']} (batch "
        f"{r['h100']['batch_for_target'][f'{mfu:g}']:,}; {r['h100']['batch_for_target_eager'][f'{mfu:g}']:,} "
        "with eager launches)"
        for r in reach
    ]
    beyond_peak = sum(r["h100"]["lower_bound_ms"] > target for r in rows)
    return (
        f"At {mfu:.0%} MFU {len(reach)} of the {len(rows)} rows can reach {target:g} ms per image: "
        f"{'; '.join(named) or 'none'}. {beyond_peak} rows cannot even at the dense peak with any batch: their "
        "FLOPs alone take longer."
    )


def flops_table(record: dict) -> str:
    """The Markdown table of a :func:`count` record, and its notes."""
    mfu, (low, high), target = record["mfu"], record["mfu_range"], record["target_ms"]
    lines = [
        f"| model | P | steps | sampling | TFLOP / image | lower bound, ms | batch-1 bound, ms | predicted at "
        f"{mfu:.0%} MFU, ms | batch for {target:g} ms at {mfu:.0%} MFU | the same with eager "
        "launches |",
        "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in record["rows"]:
        h = r["h100"]
        lines.append(
            f"| {r['model']} | {r['parscale_n']} | {r['num_inference_steps']} | {r['sampling']} | "
            f"{r['flops_per_image'] / 1e12:.2f} | {h['lower_bound_ms']:.1f} | {h['batch1_bound_ms']:.1f} | "
            f"{h['predicted_ms'][f'{mfu:g}']:.1f} | {_batch_cell(h['batch_for_target'], mfu, low, high)} | "
            f"{_batch_cell(h['batch_for_target_eager'], mfu, low, high)} |"
        )
    return "\n".join(lines) + "\n\n" + "\n".join(f"- {note}" for note in _table_notes(record))


def _table_notes(record: dict) -> list[str]:
    hardware, mfu, target = record["hardware"], record["mfu"], record["target_ms"]
    decode = sorted({r["decode_flops"] for r in record["rows"]})
    cache = next((r["cache"] for r in record["rows"] if r["cache"]), None)
    launches = [r["h100"]["eager_launch_ms_at_batch1"] for r in record["rows"]]
    notes = [
        _target_summary(record),
        f"FLOPs per image include the KL-16 decoder's {', '.join(format_number(d / 1e9) for d in decode)} GFLOP. "
        f"Lower bound: those FLOPs at the dense bf16 peak ({hardware['bf16_dense_tflops']:g} TFLOP/s). Batch-1 "
        f"bound: per step the larger of that and the step's weights (bf16) read at {hardware['hbm_tb_per_s']:g} "
        f"TB/s. Predicted: at {mfu:.0%} MFU, with a batch large enough that the weights' reads do not count. Batch: "
        f"the smallest at which that roofline, at the MFU, reaches {target:g} ms per image (none: no batch does); "
        f"with eager launches it also pays {record['launch_us']:g} us of host time per op launched (assumed), "
        f"{min(launches):.0f}-{max(launches):.0f} ms per call here, shared by the batch.",
        f"Guidance {record['guidance_scale']:g} ({record['guidance_schedule']} schedule), temperature "
        f"{record['temperature']:g}, FLOPs counted at batch {record['count_batch']}.",
    ]
    if cache:
        notes.append(
            f"Cached: `SamplingCache({', '.join(f'{k}={v}' for k, v in cache.items())})`, the defaults at these step "
            "counts (`refresh_every` by the step count: `SamplingCache.refresh_every_at`)."
        )
    check = record["shortcut_check"]
    if check:
        notes.append(
            f"The per-step-shape shortcut (each distinct step shape counted once, summed over the schedule) "
            f"{'equals' if check['equal'] else 'differs from'} the full count on {check['model']}, exact, at "
            f"{check['num_inference_steps']} steps ({check['full_count']:,} FLOPs)."
        )
    return notes


def readme_section(results_dir: str | os.PathLike) -> str:
    """The `sampling-flops` block of docs/benchmarks.md, from ``sampling_flops.json`` and, when a GPU measured the
    rows, ``sampling_speed_gpu.json``."""
    record = load_results(Path(results_dir, "sampling_flops.json"))
    if record is None:
        return "_Not computed yet: `python examples/sampling_flops.py` writes it._"
    parts = [
        f"_Computed, not measured: FLOPs counted by FlopCounterMode around the pipeline's sampling on the meta "
        f"device, H100 times derived from them at its datasheet peaks; from `results/sampling_flops.json`, written "
        f"by `python examples/sampling_flops.py` at {short_revision(record)}._",
        flops_table(record),
    ]
    measured = load_results(Path(results_dir, "sampling_speed_gpu.json"))
    if measured is None:
        parts.append("_Measured: not yet; `bash examples/bench_gpu.sh` times the same rows on an NVIDIA GPU._")
    else:
        parts.append(measured_table(measured))
    return "\n\n".join(parts)


def measured_table(record: dict) -> str:
    """The Markdown table of a :func:`measure` record."""
    # A resumed run keeps earlier runs' rows: each row names the revision that measured it.
    revisions = sorted({r.get("git_revision", record["provenance"]["git_revision"])[:12] for r in record["rows"]})
    lines = [
        f"**Measured** ({record['sizes']}; {record['dtype']}, {record.get('device_name', 'GPU')}, "
        f"{machine_summary(record['provenance']['machine'])}, at {', '.join(revisions)}): ms per image, end to end.",
        "",
        "| model | P | steps | sampling | batch | ms / image |",
        "|---|---:|---:|---|---:|---:|",
    ]
    for r in record["rows"]:
        lines.append(
            f"| {r['model']} | {r['parscale_n']} | {r['num_inference_steps']} | {r['sampling']} | {r['batch']} | "
            f"{1e3 * r['seconds_per_image']:.1f} |"
        )
    if record.get("not_measured"):
        lines += ["", "Not measured yet: " + "; ".join(record["not_measured"]) + "."]
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--models", nargs="+", default=list(MODELS), help="config stems in --config-dir")
    parser.add_argument("--parscale", type=int, nargs="+", default=[1, 2], help="ParScale streams P")
    parser.add_argument("--steps", type=int, nargs="+", default=[64, 16], help="num_inference_steps")
    parser.add_argument("--config-dir", default=os.fspath(CONFIG_DIR))
    parser.add_argument("--vae-config", default=os.fspath(CONFIG_DIR / "kl16_vae.json"), help="AutoencoderKL config")
    parser.add_argument("--batch", type=int, default=1, help="batch the FLOPs are counted at (per image: the same)")
    parser.add_argument("--target-ms", type=float, default=TARGET_MS, help="ms per image to find a batch for")
    parser.add_argument("--output", default=None, help="results JSON (default: results/sampling_flops.json, or "
                        "results/sampling_speed_gpu.json with --measure)")  # fmt: skip
    gpu = parser.add_argument_group("--measure: time the rows instead (bench_gpu.sh)")
    gpu.add_argument("--measure", action="store_true", help="time pipe(...) end to end on --device")
    gpu.add_argument("--device", default="cuda")
    gpu.add_argument("--batches", type=int, nargs="+", default=[1, 16, 64])
    gpu.add_argument("--repeats", type=int, default=2, help="timed calls after one warm-up call")
    gpu.add_argument("--budget-s", type=float, default=10.0, help="skip a row's larger batches past this call time")
    gpu.add_argument(
        "--total-budget-s", type=float, default=None,
        help="start no row after this many seconds (the rest: `not_measured`; a rerun continues)",
    )  # fmt: skip
    gpu.add_argument("--tiny", action="store_true", help="tiny stand-in configs (the CPU rehearsal)")
    return parser
