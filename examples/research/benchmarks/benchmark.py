"""Speed and memory of every part and of the whole pipeline, beside the alternatives, as ratios
measured in one run (`examples/benchmark.py`).

Every measurement warms up, then repeats (median, min, max), with CUDA-event timing and peak
allocated memory on a GPU, wall-clock on a CPU. On a CPU, the batch and ParScale sweeps measure
peak memory in a fresh process per configuration (a process's peak resident size cannot be
reset). fp32 on CPU, bf16 weights on GPU.

Profiles: "gpu" times everything at the ImageNet-256 default configs (`--tiny`: small stand-ins, to check
the code paths on a CPU). "cpu" keeps the defaults
wherever one CPU can afford it (components, heads, VAE encoders, LiteHybrid share, FLOP/s) and
uses the named smaller configs for the generation-scale sweeps; every row records its config.
Minute-long CPU measurements (a 64-step ImageNet image, the DiT comparison) run once, unwarmed.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch

from parscale_ear_hf.info import count_parameters
from parscale_ear_hf.models import DiffusionHead, EARTransformer, EnergyHead, LiteHybrid, LiteVAE
from parscale_ear_hf.models._checks import check_device, check_int
from research.benchmarks import bench_sampling

# The targets, checked by the output (never by timed tests).
TARGETS = {
    "energy_vs_diffusion_speedup": ("energy head faster than the 100-step diffusion head, per token group", 50.0),
    "litevae_encoder_speedup": ("LiteVAE encoder faster than the SD-VAE encoder (256x256, batch 8)", 4.0),
    "litevae_encoder_param_ratio": ("SD-VAE encoder parameters / LiteVAE encoder parameters", 5.0),
    "lite_hybrid_share_batch8": ("LiteHybrid time / transformer forward at batch 8 (at most)", 0.03),
    "transformer_peak_fraction_batch32": ("transformer forward at batch 32: achieved / matmul peak FLOP/s", 0.5),
}
SD_VAE_CONFIG = dict(
    block_out_channels=(128, 256, 512, 512),
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    layers_per_block=2,
    latent_channels=4,
    sample_size=256,
)
# The ParScale sweep of the "cpu" profile: a 192-wide, 6-layer backbone at the default 16x16 grid.
DEMO_MODEL = "models/mnist_demo"


@dataclass(frozen=True)
class Sizes:
    """The component configs (keyword arguments; empty: the ImageNet-256 defaults) and sweep sizes of a run."""

    name: str
    vae: dict
    hybrid: dict
    transformer: dict
    head: dict
    sd_vae: dict
    matmul: tuple[int, ...]
    batches: tuple[int, ...]
    hybrid_batches: tuple[int, ...]
    head_tokens: tuple[int, ...]
    parscale_batches: tuple[int, ...]
    parscale_streams: tuple[int, ...]
    steps: int
    dit_steps: int


FULL = Sizes("ImageNet-256 defaults", {}, {}, {}, {}, SD_VAE_CONFIG, (4096, 8192), (1, 4, 8, 16, 32, 64),
             (1, 8, 32), (32, 256), (1, 32), (1, 2, 4, 8), 64, 50)  # fmt: skip
# `--tiny`: every default config replaced by a small one with the same structure, so that a CPU runs every code
# path of a GPU run (bench_gpu.sh's CPU mode) in seconds. Its numbers measure nothing worth reporting.
TINY = Sizes(
    "tiny (--tiny: checks the code paths, measures nothing)",
    vae=dict(
        sample_size=16,
        levels=2,
        latent_channels=4,
        encoder_channels=(8, 8),
        encoder_layers_per_level=1,
        aggregation_channels=16,
        aggregation_layers=1,
        decoder_block_out_channels=(8, 16, 16),
        decoder_layers_per_block=1,
        norm_num_groups=4,
    ),  # fmt: skip
    hybrid=dict(in_channels=4, grid_size=4, coarse_grid_size=2, hidden_dim=16, num_heads=2),
    transformer=dict(in_channels=4, grid_size=4, hidden_size=32, num_layers=2, num_heads=4, buffer_size=4),
    head=dict(condition_dim=32, token_channels=4, width=32, depth=2, noise_dim=8),
    sd_vae=dict(
        block_out_channels=(8, 16),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=16,
    ),  # fmt: skip
    matmul=(128, 256),
    batches=(1, 2),
    hybrid_batches=(1, 2),
    head_tokens=(4,),
    parscale_batches=(1,),
    parscale_streams=(1, 2),
    steps=4,
    dit_steps=2,
)
SMALL_TRANSFORMER = dict(hidden_size=192, num_layers=6, num_heads=6, buffer_size=16)


class Bench:
    """Timing with warm-up and repeats on one device and dtype; collects rows into `results`."""

    def __init__(
        self,
        device: str,
        dtype: torch.dtype,
        repeats: int,
        budget_s: float,
        progress: bool = True,
        sizes: Sizes = FULL,
    ):
        self.device, self.dtype, self.repeats, self.budget_s = torch.device(device), dtype, repeats, budget_s
        self.sizes = sizes
        self.cuda = self.device.type == "cuda"
        self.progress = progress
        self.compile = False
        self.probe_memory = False  # CPU peak memory, each in a fresh process (seconds per probe)
        self.results: dict[str, dict] = {}

    def _once(self, fn) -> float:
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize(self.device)
            return start.elapsed_time(end) / 1000
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start

    @torch.no_grad()
    def measure(self, fn, warmup: int = 1, repeats: int | None = None) -> dict:
        """Median / min / max seconds of `fn()` over repeats after `warmup` calls. The number of
        repeats shrinks (to at least 2) when one call would overrun the per-measurement budget."""
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
        first = None
        for _ in range(warmup):
            first = self._once(fn)
        repeats = repeats or self.repeats
        if first is not None and first * repeats > self.budget_s:
            repeats = max(2, int(self.budget_s / max(first, 1e-9)))
        times = [self._once(fn) for _ in range(repeats)]
        row = {
            "median_s": statistics.median(times),
            "min_s": min(times),
            "max_s": max(times),
            "repeats": len(times),
            "warmup": warmup,
        }
        row["peak_memory_mib"] = torch.cuda.max_memory_allocated(self.device) / 2**20 if self.cuda else None
        return row

    def add(self, name: str, row: dict, **info) -> dict:
        self.results[name] = {**row, **info}
        if self.progress:
            print(f"  {name}: {row['median_s'] * 1e3:.2f} ms (median of {row['repeats']})", flush=True)
        return self.results[name]

    def cpu_memory(self, spec: dict) -> dict:
        """On a CPU with `probe_memory`: :func:`cpu_peak_memory` of `spec`; else nothing."""
        if self.cuda or not self.probe_memory:
            return {}
        return {"peak_memory_mib": cpu_peak_memory(spec), "memory": "CPU: peak RSS of a fresh process"}

    def module(self, module: torch.nn.Module) -> torch.nn.Module:
        module = module.to(self.device, self.dtype).eval()
        return torch.compile(module) if self.compile and isinstance(module, EARTransformer) else module

    def randn(self, *shape) -> torch.Tensor:
        return torch.randn(*shape, device=self.device, dtype=self.dtype)


def transformer_flops(config: dict, batch: int) -> int:
    """FLOPs of one transformer forward at `batch` (mask half full), counted on the meta device
    by ``torch.utils.flop_counter`` (no memory, no compute)."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        model = EARTransformer(**config).eval()
        n = model.num_tokens
        tokens = torch.zeros(batch, n, model.config.in_channels)
        labels, mask = torch.zeros(batch, dtype=torch.long), torch.zeros(batch, n, dtype=torch.bool)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(tokens, labels, mask)
    return counter.get_total_flops()


def cpu_peak_memory(spec: dict) -> float:
    """Peak memory of one call on the CPU, MiB, measured in a fresh process (a process's peak
    resident size cannot be reset): peak RSS over building the model and calling it, minus the RSS
    before, so it counts weights and activations as CUDA's max_memory_allocated does.

    Args:
        spec: ``{"kind": "transformer", "config": {...}, "batch": B}`` (one forward, mask half
            full) or ``{"kind": "pipeline", "model": folder, "batch": B, "steps": S}`` (a generation).
    """
    code = (
        "import json, sys; sys.path.insert(0, sys.argv[2]); "
        "from research.benchmarks.benchmark import _memory_probe; print(_memory_probe(sys.argv[1]))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, json.dumps(spec), str(Path(__file__).resolve().parents[2])],
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())},
    )
    if done.returncode:
        raise RuntimeError(f"cpu_peak_memory: the probe of {spec} failed:\n{done.stderr[-2000:]}")
    return float(done.stdout.strip().splitlines()[-1])


def _peak_rss() -> int:
    """This process's peak resident size (VmHWM), bytes."""
    with open("/proc/self/status", encoding="utf-8") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))


def _memory_probe(spec_json: str) -> float:
    import psutil

    spec = json.loads(spec_json)
    # Imports may have peaked above what the process holds now: reset the high-water mark (Linux).
    with open("/proc/self/clear_refs", "w", encoding="utf-8") as f:
        f.write("5")
    before = psutil.Process().memory_info().rss
    torch.manual_seed(0)
    batch = spec["batch"]
    with torch.no_grad():
        if spec["kind"] == "transformer":
            model = EARTransformer(**spec["config"]).eval()
            n = model.num_tokens
            model(torch.randn(batch, n, model.config.in_channels), torch.zeros(batch, dtype=torch.long),
                  _mask(batch, n, "cpu"))  # fmt: skip
        else:
            from parscale_ear_hf.pipeline_parscale_ear import ParScaleEARPipeline

            pipe = ParScaleEARPipeline.from_pretrained(spec["model"])
            pipe.set_progress_bar_config(disable=True)
            labels = [i % pipe.transformer.config.num_classes for i in range(batch)]
            pipe(labels, num_inference_steps=spec["steps"], output_type="pt")
    return (_peak_rss() - before) / 2**20


def _mask(batch: int, n: int, device, fraction: float = 0.5) -> torch.Tensor:
    """A mask with `fraction` of the tokens unknown, as in the middle of sampling."""
    order = torch.rand(batch, n, generator=torch.Generator().manual_seed(0)).argsort(dim=1)
    return (order < int(fraction * n)).to(device)


def _tokens_per_step(n: int, steps: int = 64) -> int:
    """Tokens of one image sampled per step on average (256 tokens in 64 steps: 4)."""
    return max(1, n // steps)


# ------------------------------------------------------------------------------ sections


def bench_components(b: Bench, batch: int) -> None:
    """Each component at the ImageNet-256 defaults (or `b.sizes`)."""
    s = b.sizes
    vae, hybrid = b.module(LiteVAE(**s.vae)), b.module(LiteHybrid(**s.hybrid))
    transformer, head = b.module(EARTransformer(**s.transformer)), b.module(EnergyHead(**s.head))
    size, grid = vae.config.sample_size, transformer.config.grid_size
    image = b.randn(batch, 3, size, size)
    latents = b.randn(batch, vae.config.latent_channels, grid, grid)
    n = transformer.num_tokens
    tokens, mask = b.randn(batch, n, transformer.config.in_channels), _mask(batch, n, b.device)
    labels = torch.zeros(batch, dtype=torch.long, device=b.device)
    z = b.randn(batch * _tokens_per_step(n), transformer.config.hidden_size)
    info = dict(config=s.name, batch=batch)
    b.add("component/vae_encode", b.measure(lambda: vae.encode(image).latent_dist.mode()), **info)
    b.add("component/vae_decode", b.measure(lambda: vae.decode(latents).sample), **info)
    b.add("component/lite_hybrid", b.measure(lambda: hybrid(tokens, mask)), **info)
    b.add("component/transformer_forward", b.measure(lambda: transformer(tokens, labels, mask)), **info)
    b.add("component/energy_head_sample", b.measure(lambda: head.sample(z, 0.7)), tokens=z.shape[0], **info)


def _slow_runs(b: Bench) -> dict:
    """Minute-long measurements on a CPU run once, without warm-up (the row records it); GPU: 1 + 3."""
    return dict(warmup=1, repeats=3) if b.cuda else dict(warmup=0, repeats=1)


def bench_full_image(b: Bench, guidance: float = 3.0) -> None:
    """One image from class label to pixels, default configs (or `b.sizes`), with guidance."""
    pipe, steps = _default_pipeline(b), b.sizes.steps
    row = b.measure(
        lambda: pipe([1], num_inference_steps=steps, guidance_scale=guidance, output_type="pt"), **_slow_runs(b)
    )
    b.add("pipeline/full_image", row, config=b.sizes.name, batch=1, steps=steps, guidance=guidance)


def _default_pipeline(b: Bench, transformer_config: dict | None = None):
    from parscale_ear_hf.pipeline_parscale_ear import ParScaleEARPipeline

    s = b.sizes
    transformer = EARTransformer(**{**s.transformer, **(transformer_config or {})})
    grid = transformer.config.grid_size
    vae = LiteVAE(**{**s.vae, "sample_size": grid * 2 ** LiteVAE(**s.vae).config.levels})
    pipe = ParScaleEARPipeline(
        vae=vae,
        lite_hybrid=LiteHybrid(**{**s.hybrid, "grid_size": grid, "coarse_grid_size": min(4, grid)}),
        transformer=transformer,
        energy_head=EnergyHead(**{**s.head, "condition_dim": transformer.config.hidden_size}),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(b.device, b.dtype)


def bench_heads(b: Bench, token_counts: tuple[int, ...]) -> None:
    """Energy head vs MAR's diffusion head (100 steps), same width and depth, per token group."""
    energy = b.module(EnergyHead(**b.sizes.head))
    cfg = energy.config
    diffusion = b.module(
        DiffusionHead(
            condition_dim=cfg.condition_dim, token_channels=cfg.token_channels, width=cfg.width, depth=cfg.depth
        )
    )
    for m in token_counts:
        z = b.randn(m, cfg.condition_dim)
        e = b.add(f"heads/energy_{m}", b.measure(lambda: energy.sample(z, 0.7)), tokens=m, config=b.sizes.name)
        d = b.add(
            f"heads/diffusion_{m}",
            b.measure(lambda: diffusion.sample(z, 1.0), repeats=3),
            tokens=m,
            steps=diffusion.config.num_sampling_steps,
            config=b.sizes.name,
        )
        b.results[f"heads/speedup_{m}"] = {"ratio": d["median_s"] / e["median_s"], "tokens": m}
    b.results["heads/parameters"] = {"energy": count_parameters(energy), "diffusion": count_parameters(diffusion)}


def bench_vae_encoders(b: Bench, batch: int = 8) -> None:
    """LiteVAE's encoder vs the Stable Diffusion VAE encoder (random weights), 256x256."""
    from diffusers import AutoencoderKL

    lite, sd = b.module(LiteVAE(**b.sizes.vae)), b.module(AutoencoderKL(**b.sizes.sd_vae))
    image = b.randn(batch, 3, lite.config.sample_size, lite.config.sample_size)
    lite_row = b.add("vae/litevae_encoder", b.measure(lambda: lite.encode(image).latent_dist.mode()), batch=batch)
    sd_row = b.add("vae/sd_vae_encoder", b.measure(lambda: sd.encode(image).latent_dist.mode()), batch=batch)
    lite_params = count_parameters(lite.encoder)
    # The SD-VAE encode path is its encoder plus the 1x1 quant_conv to the posterior moments.
    sd_params = count_parameters(sd.encoder) + count_parameters(sd.quant_conv)
    b.results["vae/encoder_comparison"] = {
        "litevae_parameters": lite_params,
        "sd_vae_parameters": sd_params,
        "param_ratio": sd_params / lite_params,
        "speedup": sd_row["median_s"] / lite_row["median_s"],
        "batch": batch,
    }


def bench_hybrid_share(b: Bench, batches: tuple[int, ...]) -> None:
    """LiteHybrid's time as a share of one transformer forward (defaults), and the forward's FLOP/s."""
    hybrid, transformer = b.module(LiteHybrid(**b.sizes.hybrid)), b.module(EARTransformer(**b.sizes.transformer))
    n = transformer.num_tokens
    for batch in batches:
        tokens, mask = b.randn(batch, n, transformer.config.in_channels), _mask(batch, n, b.device)
        labels = torch.zeros(batch, dtype=torch.long, device=b.device)
        h = b.add(f"hybrid/lite_hybrid_b{batch}", b.measure(lambda: hybrid(tokens, mask)), batch=batch)
        t = b.add(f"hybrid/transformer_b{batch}", b.measure(lambda: transformer(tokens, labels, mask)), batch=batch)
        flops = transformer_flops(b.sizes.transformer, batch)
        b.results[f"hybrid/share_b{batch}"] = {"ratio": h["median_s"] / t["median_s"], "batch": batch}
        b.results[f"flops/transformer_b{batch}"] = {
            "flops": flops,
            "flop_per_s": flops / t["median_s"],
            "batch": batch,
        }


def bench_matmul_peak(b: Bench) -> None:
    """The machine's matmul peak in this dtype: the best of a few square sizes."""
    best = None
    for size in b.sizes.matmul if b.sizes is TINY or b.cuda else (1024, 2048, 4096):
        x, y = b.randn(size, size), b.randn(size, size)
        row = b.measure(lambda: x @ y, warmup=2, repeats=5)
        rate = 2 * size**3 / row["median_s"]
        if best is None or rate > best["flop_per_s"]:
            best = {"flop_per_s": rate, "size": size, "dtype": str(b.dtype)}
    b.results["flops/matmul_peak"] = best


def bench_batch_scaling(
    b: Bench, pipe, batches: tuple[int, ...], steps: int, config: str, model_path: str | None = None
) -> None:
    """Full generation (guidance on) at growing batch: time per image and peak memory (on a CPU,
    probed from `model_path`, the folder `pipe` was loaded from)."""
    for batch in batches:
        labels = [i % pipe.transformer.config.num_classes for i in range(batch)]
        row = b.measure(lambda: pipe(labels, num_inference_steps=steps, output_type="pt"), repeats=3)
        if model_path is not None:
            row.update(b.cpu_memory({"kind": "pipeline", "model": model_path, "batch": batch, "steps": steps}))
        b.add(
            f"batch/b{batch}",
            {**row, "seconds_per_image": row["median_s"] / batch},
            batch=batch,
            steps=steps,
            config=config,
        )


def bench_parscale(b: Bench, base: dict, batches: tuple[int, ...], streams: tuple[int, ...]) -> None:
    """Transformer forward with P streams, beside one stream made deeper or wider to the same FLOPs."""
    base = {k: v for k, v in base.items() if not k.startswith("_")}
    for batch in batches:
        for p in streams:
            variants = {"parscale": dict(base, parscale_n=p)}
            if p > 1:
                variants["deeper"] = dict(base, num_layers=base["num_layers"] * p)
                width = int(round(base["hidden_size"] * p**0.5 / base["num_heads"])) * base["num_heads"]
                variants["wider"] = dict(base, hidden_size=width)
            for kind, config in variants.items():
                with b.device:  # built where it runs: the 8x deeper default is 1.4B parameters
                    model = b.module(EARTransformer(**config))
                n = model.num_tokens
                tokens, mask = b.randn(batch, n, model.config.in_channels), _mask(batch, n, b.device)
                labels = torch.zeros(batch, dtype=torch.long, device=b.device)
                row = b.measure(lambda: model(tokens, labels, mask))
                row.update(b.cpu_memory({"kind": "transformer", "config": config, "batch": batch}))
                b.add(
                    f"parscale/{kind}_p{p}_b{batch}",
                    row,
                    batch=batch,
                    streams=p,
                    kind=kind,
                    parameters=count_parameters(model),
                    flops=transformer_flops(config, batch),
                    config=config,
                )


def bench_dit(b: Bench, guidance: float = 4.0) -> None:
    """Our pipeline vs diffusers' DiTPipeline with a DiT of about the same parameter count (random
    weights, SD-VAE), 256x256, one image, guidance on both; `b.sizes` gives the steps of each."""
    steps_ear, steps_dit = b.sizes.steps, b.sizes.dit_steps
    from diffusers import AutoencoderKL, DDIMScheduler, DiTPipeline, DiTTransformer2DModel

    pipe = _default_pipeline(b)
    ours = sum(count_parameters(m) for m in (pipe.lite_hybrid, pipe.transformer, pipe.energy_head))
    # DiT's released configs: 4 latent channels in, 8 out (noise and learned variance), patch 2.
    dit_config = dict(num_attention_heads=12, attention_head_dim=64, in_channels=4, out_channels=8)
    if b.sizes is TINY:
        dit_config.update(num_attention_heads=2, attention_head_dim=8, sample_size=b.sizes.sd_vae["sample_size"] // 2)
    with torch.device("meta"):
        sizes = {n: count_parameters(DiTTransformer2DModel(**dit_config, num_layers=n)) for n in range(1, 33)}
    layers = min(sizes, key=lambda k: abs(sizes[k] - ours))
    dit = DiTPipeline(
        transformer=DiTTransformer2DModel(**dit_config, num_layers=layers),
        vae=AutoencoderKL(**b.sizes.sd_vae),
        scheduler=DDIMScheduler(),
    ).to(b.device, b.dtype)
    dit.set_progress_bar_config(disable=True)
    one = _slow_runs(b)
    e = b.add(
        "dit/ours",
        b.measure(lambda: pipe([1], num_inference_steps=steps_ear, guidance_scale=guidance, output_type="pt"), **one),
        steps=steps_ear,
        parameters=ours,
    )
    d = b.add(
        "dit/dit",
        b.measure(lambda: dit([1], num_inference_steps=steps_dit, guidance_scale=guidance, output_type="np"), **one),
        steps=steps_dit,
        parameters=sizes[layers],
        layers=layers,
    )
    b.results["dit/ratio"] = {"dit_over_ours": d["median_s"] / e["median_s"]}


# ------------------------------------------------------------------------------ the run


def check_targets(results: dict) -> dict:
    """Each target of the issue: the measured value, the bound and whether it is met (None: not measured)."""
    values = {
        "energy_vs_diffusion_speedup": min(
            (v["ratio"] for k, v in results.items() if k.startswith("heads/speedup_")), default=None
        ),
        "litevae_encoder_speedup": results.get("vae/encoder_comparison", {}).get("speedup"),
        "litevae_encoder_param_ratio": results.get("vae/encoder_comparison", {}).get("param_ratio"),
        "lite_hybrid_share_batch8": results.get("hybrid/share_b8", {}).get("ratio"),
        "transformer_peak_fraction_batch32": (
            results["flops/transformer_b32"]["flop_per_s"] / results["flops/matmul_peak"]["flop_per_s"]
            if "flops/transformer_b32" in results and "flops/matmul_peak" in results
            else None
        ),
    }
    checked = {}
    for key, (what, bound) in TARGETS.items():
        value = values[key]
        at_most = key == "lite_hybrid_share_batch8"
        met = None if value is None else (value <= bound if at_most else value >= bound)
        checked[key] = {"what": what, "value": value, "bound": bound, "at_most": at_most, "met": met}
    return checked


SECTIONS = ("components", "full_image", "heads", "vae", "hybrid", "matmul", "batch", "parscale", "dit",
            *bench_sampling.SECTIONS)  # fmt: skip
# Sampling speed and quality (bench_sampling.py): long, so run only when named.
ON_REQUEST = bench_sampling.SECTIONS


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--profile", choices=("cpu", "gpu"), default=None, help="default: by --device")
    parser.add_argument(
        "--sections", nargs="+", choices=SECTIONS, default=None, help=f"default: all but {', '.join(ON_REQUEST)}"
    )
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--budget-s", type=float, default=30.0, help="fewer repeats when one call is this slow")
    parser.add_argument("--compile", action="store_true", help="torch.compile the transformer (GPU)")
    parser.add_argument(
        "--no-memory-probe", action="store_true", help="CPU: skip the fresh-process peak-memory probes"
    )
    parser.add_argument(
        "--demo-model",
        default=DEMO_MODEL,
        help="the model of the cpu profile's batch section and of the cache / quality sections' 'demo' config "
        "(default: %(default)s)",
    )
    parser.add_argument("--output", default=None, help="results JSON (default: results/benchmark_<profile>.json)")
    parser.add_argument(
        "--merge-from",
        default=None,
        metavar="FILE",
        help="measure nothing: take the --sections' rows, each section with its provenance, from FILE (the same "
        "profile's results, e.g. of a run in another checkout) into --output, then write the reports",
    )
    parser.add_argument(
        "--tiny",
        action="store_true",
        help="small stand-ins for every default config and sweep: checks a GPU run's code paths on a CPU in "
        "seconds (bench_gpu.sh's CPU mode); measures nothing worth reporting",
    )
    return bench_sampling.add_arguments(parser)


def check_args(args: argparse.Namespace, profile: str, sections: list[str]) -> None:
    """Refuse, before anything is measured, counts that measure nothing and a --demo-model that is missing or,
    given, that no chosen section reads."""
    check_device("bench", "--device", args.device)
    if args.tiny and args.output is None:
        raise ValueError(
            "bench: --tiny needs --output: its numbers measure nothing worth reporting, so they never replace the "
            f"results/benchmark_{profile}.json of a real run."
        )
    check_int("bench", "--repeats", args.repeats, 1)
    if not (math.isfinite(args.budget_s) and args.budget_s > 0):
        raise ValueError(f"bench: `--budget-s` must be a finite number of seconds above 0, got {args.budget_s!r}.")
    for flag in ("sampling_batches", "mar_batches", "sampling_steps", "quality_steps"):
        for value in getattr(args, flag):
            check_int("bench", "--" + flag.replace("_", "-"), value, 1)
    for flag in ("quality_single_steps", "quality_images_per_class", "quality_batch_size"):
        check_int("bench", "--" + flag.replace("_", "-"), getattr(args, flag), 1)
    readers = ["batch"] if profile == "cpu" else []
    if "demo" in args.sampling_configs:
        readers += ["cache", "quality"]
    if not set(readers) & set(sections):
        if args.demo_model != DEMO_MODEL:
            raise ValueError(
                f"bench: --demo-model {args.demo_model!r} is read only by the cpu profile's `batch` section and by "
                f"the `cache` and `quality` sections with --sampling-configs demo; the chosen sections {sections} "
                f"(profile {profile}) do not read it: add one of them, or leave --demo-model out."
            )
        return
    if not os.path.isfile(os.path.join(args.demo_model, "model_index.json")):
        raise FileNotFoundError(
            f"bench: --demo-model {args.demo_model!r} is not a pipeline folder (no model_index.json there); pass "
            "a folder written by ParScaleEARPipeline.save_pretrained, e.g. models/mnist_demo."
        )


def run(args: argparse.Namespace) -> dict:
    """Measure the profile's sections, merge them into the results JSON (sections not run keep their
    earlier values, each with its own provenance), and write the Markdown table and the plot."""
    from parscale_ear_hf.results import git_revision, load_results, provenance, write_results

    profile = args.profile or ("gpu" if args.device.startswith("cuda") else "cpu")
    sections = args.sections or [section for section in SECTIONS if section not in ON_REQUEST]
    if getattr(args, "merge_from", None):
        return merge_sections(args.merge_from, args.output or f"results/benchmark_{profile}.json", args.sections)
    check_args(args, profile, sections)
    dtype = torch.bfloat16 if profile == "gpu" else torch.float32
    sizes = TINY if args.tiny else FULL
    bench = Bench(args.device, dtype, args.repeats, args.budget_s, sizes=sizes)
    bench.compile = args.compile
    bench.probe_memory = not args.no_memory_probe
    torch.manual_seed(0)
    gpu = profile == "gpu"
    plans = {
        "components": lambda: bench_components(bench, batch=8 if gpu else 1),
        "full_image": lambda: bench_full_image(bench),
        "heads": lambda: bench_heads(bench, sizes.head_tokens),
        "vae": lambda: bench_vae_encoders(bench, batch=8),
        "hybrid": lambda: bench_hybrid_share(bench, sizes.hybrid_batches),
        "matmul": lambda: bench_matmul_peak(bench),
        "batch": lambda: _batch_section(bench, args, gpu),
        "parscale": lambda: bench_parscale(
            bench,
            dict(EARTransformer(**sizes.transformer).config) if gpu or args.tiny else SMALL_TRANSFORMER,
            sizes.parscale_batches,
            sizes.parscale_streams,
        ),
        "dit": lambda: bench_dit(bench),
        **{section: partial(bench_sampling.run_section, section, bench, args) for section in ON_REQUEST},
    }
    output = Path(args.output or f"results/benchmark_{profile}.json")
    previous = load_results(output) or {}
    measured = dict(previous.get("measurements", {}))
    section_provenance = dict(previous.get("section_provenance", {}))
    device_name = torch.cuda.get_device_name(0) if args.device.startswith("cuda") else None
    # The code that runs is the one imported now: a commit made while the sections run must not be named.
    revision = git_revision()
    for section in sections:
        print(f"[{section}]", flush=True)
        start = len(bench.results)
        plans[section]()
        # A section run again replaces its rows: none of its earlier rows stays under this run's provenance.
        for key in section_rows(measured, section_provenance.get(section), section):
            del measured[key]
        rows = list(bench.results)[start:]
        measured.update({key: bench.results[key] for key in rows})
        section_provenance[section] = {**provenance(), "git_revision": revision, "rows": rows}
        payload = {
            "metric": "benchmark",
            "profile": profile,
            "sizes": sizes.name,
            "device": args.device,
            "device_name": device_name,
            "dtype": str(dtype),
            "measurements": measured,
            "targets": check_targets(measured),
            "sampling_targets": bench_sampling.check_targets(measured),
            "section_provenance": section_provenance,
        }
        # Written after every section, so a failure later keeps what was measured.
        record = write_results(output, payload)
    print(write_reports(output))
    if bench_sampling.write_report(output) is not None:
        print("\n".join(bench_sampling.target_lines(record["sampling_targets"])))
    return record


def section_rows(measured: dict, provenance: dict | None, section: str) -> list[str]:
    """The keys of `measured` that `section` wrote: those its `provenance` lists, or, in results written before
    sections listed their rows, those named ``<section>/...`` (some sections also write ``flops/...`` rows)."""
    listed = (provenance or {}).get("rows")
    if listed is not None:
        return [key for key in listed if key in measured]
    return [key for key in measured if key.startswith(f"{section}/")]


def merge_sections(source: str | os.PathLike, output: str | os.PathLike, sections: list[str] | None) -> dict:
    """Replace the rows of `sections` in `output` by those of `source`, each section keeping the provenance it
    was measured under (the machine and revision of `source`'s run), and write the reports: how runs made in
    parallel (other checkouts, other sections) join one results file.

    Raises:
        ValueError: no --sections, either file missing or of another profile, or a section `source` never ran.
    """
    from parscale_ear_hf.results import load_results, write_results

    if not sections:
        raise ValueError("bench --merge-from: name the sections to take with --sections.")
    record, other = load_results(output), load_results(source)
    for path, loaded in ((output, record), (source, other)):
        if loaded is None:
            raise ValueError(f"bench --merge-from: {str(path)!r} holds no results (run the benchmark first).")
    if other["profile"] != record["profile"]:
        raise ValueError(
            f"bench --merge-from: {str(source)!r} is of the {other['profile']} profile, {str(output)!r} of the "
            f"{record['profile']} one; merge only results of one profile."
        )
    missing = [s for s in sections if s not in other.get("section_provenance", {})]
    if missing:
        raise ValueError(f"bench --merge-from: {str(source)!r} has no section(s) {missing}; it ran "
                         f"{sorted(other.get('section_provenance', {}))}.")  # fmt: skip
    measured, section_provenance = dict(record["measurements"]), dict(record["section_provenance"])
    for section in sections:
        taken = section_rows(other["measurements"], other["section_provenance"][section], section)
        if not taken:
            raise ValueError(
                f"bench --merge-from: {str(source)!r} lists no rows of section {section!r} (written before sections "
                f"recorded their rows, and none is named '{section}/...'); run the section again there or here."
            )
        for key in section_rows(measured, section_provenance.get(section), section):
            del measured[key]
        measured.update({key: other["measurements"][key] for key in taken})
        section_provenance[section] = other["section_provenance"][section]
    payload = {k: v for k, v in record.items() if k != "provenance"}
    payload.update(measurements=measured, section_provenance=section_provenance, targets=check_targets(measured),
                   sampling_targets=bench_sampling.check_targets(measured))  # fmt: skip
    merged = write_results(output, payload)
    print(write_reports(output))
    bench_sampling.write_report(output)
    return merged


def _batch_section(b: Bench, args, gpu: bool) -> None:
    from parscale_ear_hf.pipeline_parscale_ear import ParScaleEARPipeline

    if gpu:
        pipe, config, steps = _default_pipeline(b), b.sizes.name, b.sizes.steps
    else:
        pipe = ParScaleEARPipeline.from_pretrained(args.demo_model).to(b.device, b.dtype)
        pipe.set_progress_bar_config(disable=True)
        config, steps = f"{args.demo_model} (32x32, 8x8 tokens)", 16
    bench_batch_scaling(b, pipe, b.sizes.batches, steps, config, None if gpu else args.demo_model)


# ------------------------------------------------------------------------------ reporting


def write_reports(path: str | Path) -> str:
    """From a benchmark results JSON, its Markdown table (``.md``) and scaling plot (``.png``) beside
    it; returns the Markdown."""
    from parscale_ear_hf.results import load_results

    path = Path(path)
    record = load_results(path)
    markdown = benchmark_markdown(record)
    path.with_suffix(".md").write_text(markdown + "\n", encoding="utf-8")
    plot_scaling(record, path.with_suffix(".png"))
    return markdown


def _ms(row: dict) -> str:
    return f"{row['median_s'] * 1e3:.3g} ms ({row['min_s'] * 1e3:.3g}-{row['max_s'] * 1e3:.3g})"


def targets_table(record: dict) -> list[str]:
    """Markdown rows of :func:`check_targets`' verdicts."""
    lines = ["| target | measured | bound | met |", "|---|---:|---:|---|"]
    for t in record["targets"].values():
        value = "not measured" if t["value"] is None else f"{t['value']:.3g}"
        met = {None: "-", True: "yes", False: "**no**"}[t["met"]]
        lines.append(f"| {t['what']} | {value} | {'<=' if t['at_most'] else '>='} {t['bound']:g} | {met} |")
    return lines


def benchmark_markdown(record: dict) -> str:
    """The results as Markdown: targets first, then every measurement with its conditions."""
    m = record["measurements"]
    lines = [
        f"Profile `{record['profile']}` on {record['device_name'] or record['device']} ({record['dtype']}); "
        "median (min-max) of the repeats.",
        "",
        *targets_table(record),
    ]
    lines += ["", "| measurement | time | conditions | peak memory |", "|---|---:|---|---:|"]
    for key, row in m.items():
        if "median_s" not in row:
            continue
        conditions = ", ".join(
            f"{k}={v}" for k, v in row.items()
            if k not in ("median_s", "min_s", "max_s", "repeats", "warmup", "peak_memory_mib", "config")
        )  # fmt: skip
        if isinstance(row.get("config"), str):
            conditions = f"{row['config']}; {conditions}"
        memory = f"{row['peak_memory_mib']:.0f} MiB" if row.get("peak_memory_mib") is not None else "-"
        lines.append(f"| `{key}` | {_ms(row)} | {conditions} | {memory} |")
    ratios = {k: v for k, v in m.items() if "median_s" not in v}
    if ratios:
        lines += ["", "| derived | values |", "|---|---|"]
        for key, row in ratios.items():
            values = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items())
            lines.append(f"| `{key}` | {values} |")
    return "\n".join(lines)


def plot_scaling(record: dict, path: Path) -> None:
    """Batch scaling (time per image) and ParScale scaling (forward time vs streams) as one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    m = record["measurements"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    rows = [v for k, v in m.items() if k.startswith("batch/")]
    if rows:
        left.plot(*zip(*sorted((v["batch"], v["seconds_per_image"]) for v in rows)), marker="o")
        left.set_xscale("log", base=2)
        left.set_xlabel("batch")
        left.set_ylabel("seconds per image")
        left.set_title(f"full generation, {rows[0]['steps']} steps\n{rows[0]['config']}", fontsize=9)
    for kind in ("parscale", "deeper", "wider"):
        for b in (1, 32):
            points = sorted(
                (v["streams"], v["median_s"] * 1e3)
                for k, v in m.items()
                if k.startswith(f"parscale/{kind}_") and v["batch"] == b
            )
            if kind != "parscale":
                base = [(v["streams"], v["median_s"] * 1e3) for k, v in m.items()
                        if k.startswith("parscale/parscale_p1_") and v["batch"] == b]  # fmt: skip
                points = sorted(base + points)
            if points:
                right.plot(*zip(*points), marker="o", label=f"{kind}, batch {b}")
    right.set_xscale("log", base=2)
    right.set_yscale("log")
    right.set_xlabel("P (streams) or FLOP multiple")
    right.set_ylabel("transformer forward, ms")
    sizes = {v["config"]["hidden_size"] for k, v in m.items() if k.startswith("parscale/parscale_p1")}
    right.set_title(f"ParScale vs deeper / wider (P=1 width {', '.join(map(str, sizes))})", fontsize=9)
    if right.lines:
        right.legend(fontsize=7)
    fig.suptitle(f"{record['profile']} profile, {record['device_name'] or record['device']}, {record['dtype']}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _mib(row: dict) -> str:
    return "" if row.get("peak_memory_mib") is None else f", {row['peak_memory_mib']:.0f} MiB"


def _scaling_facts(m: dict) -> list[str]:
    """Headline lines of the batch and ParScale sweeps: time and, where measured, peak memory."""
    facts = []
    batch = sorted((v for k, v in m.items() if k.startswith("batch/")), key=lambda v: v["batch"])
    if batch:
        ends = " -> ".join(
            f"batch {v['batch']}: {v['seconds_per_image'] * 1e3:.0f} ms/image{_mib(v)}" for v in (batch[0], batch[-1])
        )
        facts.append(f"generation ({batch[0]['config']}, {batch[0]['steps']} steps), {ends}")
    rows = [v for k, v in m.items() if k.startswith("parscale/")]
    top = max((v["streams"] for v in rows), default=1)
    for b in sorted({v["batch"] for v in rows}):
        same = {v["kind"]: v for v in rows if v["batch"] == b and v["streams"] == top}
        if len(same) == 3:
            facts.append(
                f"P={top} at batch {b} (width {same['parscale']['config']['hidden_size']}): ParScale "
                f"{same['parscale']['median_s'] * 1e3:.0f} ms{_mib(same['parscale'])}, "
                f"{same['parscale']['parameters'] / 1e6:.1f}M parameters; {top}x deeper "
                f"{same['deeper']['median_s'] * 1e3:.0f} ms{_mib(same['deeper'])}, "
                f"{same['deeper']['parameters'] / 1e6:.1f}M; wider "
                f"{same['wider']['median_s'] * 1e3:.0f} ms{_mib(same['wider'])}, "
                f"{same['wider']['parameters'] / 1e6:.1f}M"
            )
    return facts


def performance_section(results_dir: str | Path) -> str:
    """The Performance section of docs/benchmarks.md: per results/benchmark_<profile>.json, the machine and
    revision, the targets, the headline ratios and the scaling plot; the full table is linked."""
    from parscale_ear_hf.results import load_results, machine_summary

    parts = []
    for profile in ("gpu", "cpu"):
        path = Path(results_dir) / f"benchmark_{profile}.json"
        record = load_results(path)
        if record is None:
            if profile == "gpu":
                parts.append("_GPU: not run yet; `bash examples/bench_gpu.sh` on an NVIDIA GPU writes it._")
            continue
        m = record["measurements"]
        lines = [
            f"**{profile.upper()} profile** ({record['dtype']}, {machine_summary(record['provenance']['machine'])}, "
            f"{bench_sampling.section_revisions(record)}). "
            f"Full table: [`results/{path.stem}.md`](results/{path.stem}.md).",
            "",
            *targets_table(record),
        ]
        facts = []
        for key, row in m.items():
            if key.startswith("heads/speedup_"):
                facts.append(f"energy head vs 100-step diffusion head, {row['tokens']} tokens: {row['ratio']:.1f}x")
            elif key.startswith("hybrid/share_"):
                facts.append(f"LiteHybrid / transformer forward at batch {row['batch']}: {100 * row['ratio']:.2f}%")
        facts += _scaling_facts(m)
        if "dit/ratio" in m:
            facts.append(
                f"DiTPipeline (50 DDIM steps) / ours (64 steps), one image: {m['dit/ratio']['dit_over_ours']:.2f}x"
            )
        if "flops/matmul_peak" in m:
            peak = m["flops/matmul_peak"]["flop_per_s"]
            facts.append(f"matmul peak {peak / 1e9:.1f} GFLOP/s")
            for key, row in m.items():
                if key.startswith("flops/transformer_b"):
                    facts.append(
                        f"transformer forward at batch {row['batch']}: {row['flop_per_s'] / 1e9:.1f} GFLOP/s "
                        f"({100 * row['flop_per_s'] / peak:.0f}% of peak)"
                    )
        lines += ["", *[f"- {fact}" for fact in facts]]
        if path.with_suffix(".png").is_file():
            lines += ["", f"![{profile} scaling](results/{path.stem}.png)"]
        parts.append("\n".join(lines))
    return "\n\n".join(parts)
