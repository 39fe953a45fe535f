r"""GPU memory and time of ImageNet-256 training, predicted from training steps measured on the CPU.

    parscale-ear plan        # writes results/gpu_plan.json and, from it, docs/gpu_plan.md

For the shipped ImageNet-256 generator configs (``examples/configs/ear_b.json``, ``ear_l.json``, ``ear_h.json``
and EAR-B with ParScale streams, ``ear_b_p2.json``, ``ear_b_p4.json``), read as ``train --model-config`` reads
them, it reports: parameters per component (counted); the fp32 training state (weights, gradients, AdamW's two
moments, the EMA); activation memory per image and training FLOPs per image (measured on the CPU); and, predicted
from those, the largest batch per 80 GB GPU with and without gradient checkpointing, the gradient accumulation
that gives EAR's global batch of 2048 on 1 and on 8 GPUs, and the GPU-hours of EAR's 800 epochs at a stated MFU.

How activation memory is measured. One training step, ``EARTrainingModel.energy_loss`` (backbone, head with its
``score_batch_mul`` copies, energy score) and its backward pass, runs on real CPU tensors under bf16 autocast, the
precision of ``train --mixed-precision bf16`` on a GPU, with every token masked (the most head rows a batch can
have: the mask ratio is drawn up to 1). ``torch.autograd.graph.saved_tensors_hooks`` sees every tensor autograd
keeps for the backward pass; the sum of their distinct storages (views of one storage count once; parameters and
buffers are left out, they are the weights) is the activation memory at the end of the forward pass, where a
step's activations peak. Under gradient checkpointing the same hook sees what checkpointing keeps: each block's
input. Where the CPU would keep other tensors than a GPU does, the measurement makes it keep the GPU's:

- autocast: CPU and CUDA autocast lower the same matmul-class ops (linear, attention) to bf16, but CUDA also runs
  ``layer_norm``, vector norms, ``pow`` and ``softmax`` in fp32, where the CPU has no rule and keeps the input's
  dtype (torch registers an AutocastCUDA kernel for these and no AutocastCPU one): the energy head's layer norms,
  whose inputs are bf16, keep fp32 copies on a GPU. While measuring, :func:`cuda_autocast_policy` gives the CPU
  CUDA's rule for the ops of this step.
- attention: with dropout, CUDA's flash kernel keeps q, k, v, the output and a log-sum-exp (the dropout mask is
  regenerated from a seed), while the CPU's fused kernel refuses dropout and falls back to the math path, which
  keeps (B, heads, L, L) probabilities and masks. The measurement sets the attention dropout to 0, so the CPU runs
  its fused kernel, which keeps what CUDA's keeps; the other dropouts stay on (their masks are kept alike).

The backbone and the head are stacks of identical blocks, so every figure is linear in their depths and in the
batch: each config is measured at batch 1 and 2 with 1 or 2 backbone blocks and 1 or 2 head blocks, and extended
to its depth (exact; a test compares the extension with a full-depth measurement). FLOPs are counted by
``torch.utils.flop_counter.FlopCounterMode`` on the same steps (forward and backward, matmul-class ops; the CPU's
fused attention counted with the formula of CUDA's flash attention), at the mean number of masked tokens.

What a GPU adds and the CPU cannot show (CUDA context, cuBLAS and NCCL workspaces, the caching allocator's
fragmentation, gradient temporaries in the backward pass) is a stated headroom, not a measurement.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import json
import math
import os
import re
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import torch
from torch.utils import flop_counter

from .info import count_parameters
from .models._checks import check_float, check_int
from .results import short_revision, write_results
from .training.generator import build_components
from .training.objectives import EARTrainingModel

GIB = 2**30
# The shipped configs the plan reads, by file stem, with their names in the tables.
PLAN_MODELS = {
    "ear_b": "EAR-B",
    "ear_l": "EAR-L",
    "ear_h": "EAR-H",
    "ear_b_p2": "EAR-B, ParScale P=2",
    "ear_b_p4": "EAR-B, ParScale P=4",
}
CONFIG_DIR = Path(__file__).resolve().parents[1] / "examples" / "configs"
# What `train` reads from a latent cache, for EAR's tokens: MAR's KL-16 VAE on 256x256 ImageNet (16x16x16).
IMAGENET_LATENTS = {"latent_channels": 16, "grid_size": 16, "num_classes": 1000}
IMAGENET_TRAIN_IMAGES = 1_281_167
# EAR's README: 32 GPUs, --batch_size 32 per GPU, --accumulation_steps 2: 2048 images per update, 750 + 50 epochs.
AUTHORS_SETUP = {
    "gpus": 32,
    "per_gpu_batch": 32,
    "gradient_accumulation_steps": 2,
    "global_batch": 2048,
    "precision": "fp16 autocast with a gradient scaler",
    "epochs": 800,
}
# (backbone blocks, head blocks) of the measured steps; every figure is linear in both.
DEPTHS = ((1, 1), (2, 1), (1, 2))
# Blocks whose activations a backward pass holds beyond the saved tensors: the gradient temporaries of one block,
# and under checkpointing also the recomputed block.
BLOCKS_IN_FLIGHT = {"no_checkpointing": 1, "grad_checkpointing": 2}
MODES = tuple(BLOCKS_IN_FLIGHT)

# The ops of a training step that CUDA's autocast recasts and the CPU's leaves alone, with CUDA's rule: "fp32"
# casts the inputs, "fp32_output" computes and returns fp32 (CUDA's fp32_set_opt_dtype). tests/test_plan.py
# checks that these are exactly the step's such ops.
CUDA_AUTOCAST_RULES = {
    "layer_norm": "fp32",
    "pow.Tensor_Scalar": "fp32",
    "linalg_vector_norm": "fp32_output",
    "softmax.int": "fp32_output",
}


@contextlib.contextmanager
def cuda_autocast_policy():
    """Within it, CPU autocast treats the ops of :data:`CUDA_AUTOCAST_RULES` as CUDA autocast does."""
    below_autocast = torch._C.DispatchKeySet(torch._C.DispatchKey.AutocastCPU)
    library = torch.library.Library("aten", "IMPL")

    def kernel_for(name: str, rule: str):
        packet, _, overload = name.partition(".")
        op = getattr(getattr(torch.ops.aten, packet), overload or "default")
        dtype_at = [argument.name for argument in op._schema.arguments].index("dtype") if rule == "fp32_output" else 0

        def fp32(value):
            return value.float() if isinstance(value, torch.Tensor) and value.is_floating_point() else value

        def kernel(*args, **kwargs):
            with torch._C._ExcludeDispatchKeyGuard(below_autocast):
                if rule == "fp32":
                    return op(*map(fp32, args), **kwargs)
                if len(args) > dtype_at:  # an output dtype the caller chose is kept, as CUDA keeps it
                    args = (*args[:dtype_at], args[dtype_at] or torch.float32, *args[dtype_at + 1 :])
                else:
                    kwargs = {**kwargs, "dtype": kwargs.get("dtype") or torch.float32}
                return op(*args, **kwargs)

        return kernel

    try:
        for name, rule in CUDA_AUTOCAST_RULES.items():
            library.impl(name, kernel_for(name, rule), "AutocastCPU")
        yield
    finally:
        library._destroy()


def _flash_attention_flops(query, key, value, *args, out_shape=None, **kwargs) -> int:
    return flop_counter.sdpa_flop_count(query, key, value)


def _flash_attention_backward_flops(grad_out, query, key, value, *args, out_shape=None, **kwargs) -> int:
    return flop_counter.sdpa_backward_flop_count(grad_out, query, key, value)


# FlopCounterMode counts CUDA's fused attention kernels but not the CPU's: the same formulas for the CPU's.
CPU_ATTENTION_FLOPS = {
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _flash_attention_flops,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: _flash_attention_backward_flops,
}


@dataclasses.dataclass(frozen=True)
class StepCost:
    """What one forward + backward pass costs.

    Attributes:
        saved_bytes: bytes of the distinct storages autograd keeps for the backward pass, at the end of the forward.
        flops: FLOPs of the forward and backward passes (matmul-class ops, as FlopCounterMode counts them).
    """

    saved_bytes: int
    flops: int


def measure_step(step: Callable[[], torch.Tensor], exclude: Iterable[torch.Tensor] = ()) -> StepCost:
    """Run ``loss = step()`` and ``loss.backward()`` once, and measure them.

    Args:
        step: the forward pass; returns a scalar loss.
        exclude: tensors whose storages are not activations (the parameters and buffers).

    Returns:
        The :class:`StepCost`: storages saved for backward (each once, however many views of it were saved) and
        the FLOPs of both passes.
    """
    excluded = {t.untyped_storage()._cdata for t in exclude}
    saved: dict[int, torch.UntypedStorage] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage._cdata not in excluded:
            saved[storage._cdata] = storage  # held, so that no other storage reuses its address meanwhile
        return tensor

    with flop_counter.FlopCounterMode(display=False, custom_mapping=CPU_ATTENTION_FLOPS) as counter:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            loss = step()
        saved_bytes = sum(storage.nbytes() for storage in saved.values())
        loss.backward()
    return StepCost(saved_bytes, counter.get_total_flops())


def expected_mask_ratio(mask_ratio_min: float, mask_ratio_std: float) -> float:
    """Mean of EAR's training mask ratio: a normal (mean 1, sd ``mask_ratio_std``) truncated to [mask_ratio_min, 1]."""
    normal = torch.distributions.Normal(0.0, 1.0)
    low = torch.tensor((mask_ratio_min - 1.0) / mask_ratio_std, dtype=torch.float64)
    high = torch.tensor(0.0, dtype=torch.float64)
    density = normal.log_prob(low).exp() - normal.log_prob(high).exp()
    return float(1.0 + mask_ratio_std * density / (normal.cdf(high) - normal.cdf(low)))


def training_model(
    model_config: dict,
    latents: dict = IMAGENET_LATENTS,
    *,
    num_layers: int | None = None,
    head_depth: int | None = None,
    score_batch_mul: int = 2,
) -> EARTrainingModel:
    """The :class:`EARTrainingModel` that ``train --model-config`` builds from ``model_config`` on a latent cache
    described by ``latents`` (``latent_channels``, ``grid_size``, ``num_classes``), optionally with fewer blocks."""
    model_config = json.loads(json.dumps(model_config))
    if num_layers is not None:
        model_config.setdefault("transformer", {})["num_layers"] = num_layers
    if head_depth is not None:
        model_config.setdefault("energy_head", {})["depth"] = head_depth
    flags = argparse.Namespace(parscale_n=None, no_coarse=False, no_fine=False, latents="the ImageNet-256 latents")
    parts = build_components(model_config, latents, flags)
    return EARTrainingModel(*parts, score_batch_mul=score_batch_mul)


def ear_training_step(
    model_config: dict,
    *,
    batch: int,
    num_layers: int | None = None,
    head_depth: int | None = None,
    masked: int | None = None,
    grad_checkpointing: bool = False,
    latents: dict = IMAGENET_LATENTS,
    score_batch_mul: int = 2,
) -> tuple[EARTrainingModel, Callable[[], torch.Tensor]]:
    """One bf16 training step of ``model_config`` on the CPU: the model, and its forward pass (returns the loss).

    Args:
        batch: images B; the step trains on random tokens `(B, N, C)` and labels `(B,)`.
        num_layers, head_depth: backbone and head blocks, in place of the config's.
        masked: masked tokens per image, M / B (default: all N).
        grad_checkpointing: recompute the blocks in the backward pass.
        latents: ``latent_channels`` C, ``grid_size`` (N = grid_size**2) and ``num_classes``, as a latent cache's.
        score_batch_mul: copies of each masked token in the energy score (head rows: 2 x this x M).
    """
    torch.manual_seed(0)
    model = training_model(
        model_config, latents, num_layers=num_layers, head_depth=head_depth, score_batch_mul=score_batch_mul
    ).train()
    if grad_checkpointing:
        model.enable_gradient_checkpointing()
    for block in model.transformer.blocks:
        block.attn.dropout = 0.0  # the CPU's fused kernel then keeps what CUDA's keeps with dropout
    n = latents["grid_size"] ** 2
    masked = n if masked is None else masked
    tokens = torch.randn(batch, n, latents["latent_channels"])
    labels = torch.randint(latents["num_classes"], (batch,))
    mask = torch.zeros(batch, n, dtype=torch.bool)
    mask[:, :masked] = True
    noise = model.energy_head.draw_noise(2 * score_batch_mul * batch * masked, dtype=torch.float32)

    def step() -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return model.energy_loss(tokens, labels, mask, noise=noise)

    return model, step


def measure_ear_step(model_config: dict, **step_options) -> StepCost:
    """The :class:`StepCost` of :func:`ear_training_step` (same arguments), with the tensors a GPU would keep (CUDA's
    autocast rules, see the module docstring)."""
    model, step = ear_training_step(model_config, **step_options)
    with cuda_autocast_policy():
        return measure_step(step, exclude=[*model.parameters(), *model.buffers()])


def at_depth(values: Sequence[float], num_layers: int, head_depth: int) -> float:
    """A figure measured at the :data:`DEPTHS` points, at ``num_layers`` backbone and ``head_depth`` head blocks."""
    base, one_more_layer, one_more_head_block = values
    return base + (num_layers - 1) * (one_more_layer - base) + (head_depth - 1) * (one_more_head_block - base)


def measure_config(model_config: dict, latents: dict = IMAGENET_LATENTS, score_batch_mul: int = 2) -> dict:
    """Activation bytes and training FLOPs of ``model_config``, measured on the CPU (:func:`measure_ear_step`).

    Returns:
        ``activation_bytes``: per mode (:data:`MODES`), ``per_image`` and ``fixed`` (kept whatever the batch,
        e.g. autocast's bf16 copies of the weights) at the config's depth, and, without checkpointing, the bytes
        per image of one ``backbone_block`` and one ``head_block``; ``train_flops_per_image``: ``model`` (no
        recomputation) and ``with_recompute`` (gradient checkpointing), at the mean number of masked tokens.
    """
    with torch.device("meta"):
        full = training_model(model_config, latents)
    num_layers, head_depth = full.transformer.config.num_layers, full.energy_head.config.depth
    n = latents["grid_size"] ** 2
    ratio = expected_mask_ratio(full.transformer.config.mask_ratio_min, full.transformer.config.mask_ratio_std)
    activations, flops = {}, {}
    for mode in MODES:
        checkpointing = mode == "grad_checkpointing"
        step = functools.partial(
            measure_ear_step,
            model_config,
            grad_checkpointing=checkpointing,
            latents=latents,
            score_batch_mul=score_batch_mul,
        )
        one, two = ([step(batch=batch, num_layers=d, head_depth=h).saved_bytes for d, h in DEPTHS] for batch in (1, 2))
        per_image = [b - a for a, b in zip(one, two)]
        activations[mode] = {
            "per_image": at_depth(per_image, num_layers, head_depth),
            "fixed": at_depth([a - p for a, p in zip(one, per_image)], num_layers, head_depth),
        }
        if not checkpointing:
            activations[mode]["backbone_block_per_image"] = per_image[1] - per_image[0]
            activations[mode]["head_block_per_image"] = per_image[2] - per_image[0]
        flops["with_recompute" if checkpointing else "model"] = at_depth(
            [step(batch=1, num_layers=d, head_depth=h, masked=round(n * ratio)).flops for d, h in DEPTHS],
            num_layers,
            head_depth,
        )
    return {
        "activation_bytes": activations,
        "train_flops_per_image": flops,
        "masked_tokens": {"for_memory": n, "for_flops": round(n * ratio), "mean_mask_ratio": ratio},
    }


# ------------------------------------------------------------------------------------------ the predictions


def state_bytes(parameters: int, gpus: int) -> dict[str, int]:
    """fp32 training state per GPU: weights (the master copy autocast casts from), gradients, AdamW's two moments,
    the EMA and, on several GPUs, DDP's gradient buckets (accelerate's default: not views of the gradients)."""
    state = {
        "weights": 4 * parameters,
        "gradients": 4 * parameters,
        "adamw_moments": 8 * parameters,
        "ema": 4 * parameters,
    }
    if gpus > 1:
        state["ddp_buckets"] = 4 * parameters
    return state


def activation_bytes_at(batch: int, activations: dict, mode: str) -> float:
    """Activation bytes at a step's peak for ``batch`` images per GPU: the tensors kept for backward, and the
    :data:`BLOCKS_IN_FLIGHT` of the larger block (backbone or head).

    Args:
        activations: :func:`measure_config`'s ``activation_bytes``.
        mode: one of :data:`MODES`.
    """
    plain = activations["no_checkpointing"]
    block = max(plain["backbone_block_per_image"], plain["head_block_per_image"])
    per_image = activations[mode]["per_image"] + BLOCKS_IN_FLIGHT[mode] * block
    return activations[mode]["fixed"] + batch * per_image


def largest_batch(budget_bytes: float, state: float, activations: dict, mode: str) -> int:
    """The most images per GPU whose ``state`` and activations (:func:`activation_bytes_at`) fit in
    ``budget_bytes``; 0 if none."""
    fixed = activation_bytes_at(0, activations, mode)
    per_image = activation_bytes_at(1, activations, mode) - fixed
    return max(0, math.floor((budget_bytes - state - fixed) / per_image))


def accumulation(max_batch: int, gpus: int, global_batch: int) -> dict | None:
    """Per-GPU batch (the largest power of two that fits and divides ``global_batch / gpus``) and the gradient
    accumulation steps that reach ``global_batch``; None when not even one image fits."""
    if max_batch < 1:
        return None
    per_gpu = 1 << (min(max_batch, global_batch // gpus).bit_length() - 1)
    while (global_batch // gpus) % per_gpu:
        per_gpu //= 2
    return {
        "per_gpu_batch": per_gpu,
        "gradient_accumulation_steps": global_batch // (gpus * per_gpu),
        "batch_size_flag": gpus * per_gpu,  # train's --batch-size counts all processes
    }


def predict(measured: dict, parameters: int, args: argparse.Namespace) -> dict:
    """The GPU figures of one config from its CPU measurements (:func:`measure_config`) and the flags."""
    activations = measured["activation_bytes"]
    budget = tensor_budget_bytes(args)
    gpu_counts = sorted({*args.gpus, AUTHORS_SETUP["gpus"]})
    state = {gpus: state_bytes(parameters, gpus) for gpus in gpu_counts}
    batches = {
        mode: {str(g): largest_batch(budget, sum(state[g].values()), activations, mode) for g in args.gpus}
        for mode in MODES
    }
    plans = {
        mode: {str(g): accumulation(batches[mode][str(g)], g, args.global_batch) for g in args.gpus} for mode in MODES
    }
    images = args.epochs * IMAGENET_TRAIN_IMAGES
    flops = measured["train_flops_per_image"]
    hours = {
        mode: images * flops["model" if mode == "no_checkpointing" else "with_recompute"]
        / (args.mfu * args.peak_tflops * 1e12) / 3600
        for mode in MODES
    }  # fmt: skip
    authors = AUTHORS_SETUP
    authors_bytes = sum(state[authors["gpus"]].values()) + activation_bytes_at(
        authors["per_gpu_batch"], activations, "no_checkpointing"
    )
    return {
        "state_gib_per_gpu": {str(g): {k: v / GIB for k, v in state[g].items()} for g in args.gpus},
        "largest_batch_per_gpu": batches,
        "global_batch_plan": plans,
        "gpu_hours": hours,
        "authors_setup_gib_per_gpu": authors_bytes / GIB,
        "authors_setup_fits": authors_bytes <= budget,
    }


def tensor_budget_bytes(args: argparse.Namespace) -> float:
    """Bytes a GPU leaves for tensors: its memory less the reserve, less the fragmentation share."""
    return (args.gpu_memory_gib - args.reserved_gib) * GIB * (1 - args.fragmentation)


# ------------------------------------------------------------------------------------------ the command


def load_plan_configs(config_dir: str | os.PathLike, names: Sequence[str]) -> dict[str, dict]:
    """The model configs ``<config_dir>/<name>.json`` as ``train --model-config`` reads them, by name."""
    configs = {}
    for name in names:
        path = Path(config_dir) / f"{name}.json"
        if not path.is_file():
            raise FileNotFoundError(
                f"plan: --config-dir {os.fspath(config_dir)!r} has no {path.name}; pass the folder that holds the "
                f"shipped ImageNet configs ({', '.join(f'{n}.json' for n in PLAN_MODELS)}), examples/configs in a "
                "checkout."
            )
        with open(path, encoding="utf-8") as f:
            configs[name] = json.load(f)
    return configs


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The flags of :func:`run`."""
    parser.add_argument(
        "--config-dir", default=os.fspath(CONFIG_DIR), help="folder of the model configs (default: examples/configs)"
    )
    parser.add_argument(
        "--models",
        nargs="+",
        choices=list(PLAN_MODELS),
        default=list(PLAN_MODELS),
        help="configs to plan (file stems)",
    )
    parser.add_argument("--score-batch-mul", type=int, default=2, help="train's --score-batch-mul (EAR's recipe: 2)")
    gpu = parser.add_argument_group("the GPU (defaults: an 80 GB H100 SXM)")
    gpu.add_argument(
        "--gpu-memory-gib", type=float, default=79.6, help="memory of one GPU (80 GB H100: 81,559 MiB = 79.6 GiB)"
    )
    gpu.add_argument(
        "--reserved-gib",
        type=float,
        default=2.0,
        help="left to the CUDA context, cuBLAS and NCCL workspaces and anything outside PyTorch's allocator",
    )
    gpu.add_argument(
        "--fragmentation",
        type=float,
        default=0.10,
        help="share of the rest lost to the caching allocator's fragmentation",
    )
    gpu.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak (H100 SXM: 989 TFLOP/s)")
    gpu.add_argument("--mfu", type=float, default=0.40, help="model FLOPs utilisation assumed for the GPU-hours")
    gpu.add_argument("--gpus", type=int, nargs="+", default=[1, 8], help="GPU counts to plan the global batch for")
    run_args = parser.add_argument_group("the run (defaults: EAR's)")
    run_args.add_argument("--epochs", type=int, default=800, help="epochs of ImageNet (EAR: 750 + 50)")
    run_args.add_argument("--global-batch", type=int, default=2048, help="images per update (EAR: 2048)")
    out = parser.add_argument_group("output")
    out.add_argument("--output", default="results/gpu_plan.json", help="results JSON")
    out.add_argument("--markdown", default="docs/gpu_plan.md", help="Markdown page generated from the JSON")
    return parser


def _validate(args: argparse.Namespace) -> None:
    check_int("plan", "--score-batch-mul", args.score_batch_mul)
    check_float("plan", "--gpu-memory-gib", args.gpu_memory_gib, 1e-3, math.inf)
    check_float("plan", "--reserved-gib", args.reserved_gib, 0.0, args.gpu_memory_gib, high_inclusive=False)
    check_float("plan", "--fragmentation", args.fragmentation, 0.0, 1.0, high_inclusive=False)
    check_float("plan", "--peak-tflops", args.peak_tflops, 1e-3, math.inf)
    check_float("plan", "--mfu", args.mfu, 1e-6, 1.0)
    check_int("plan", "--epochs", args.epochs)
    check_int("plan", "--global-batch", args.global_batch)
    for gpus in args.gpus:
        check_int("plan", "--gpus", gpus)
        if args.global_batch % gpus:
            raise ValueError(
                f"plan: --global-batch {args.global_batch} is not a multiple of --gpus {gpus}; give GPU counts that "
                "divide it."
            )


def run(args: argparse.Namespace) -> dict:
    """Measure the configs on the CPU, predict their GPU memory and time, write the JSON and the Markdown page."""
    _validate(args)
    configs = load_plan_configs(args.config_dir, args.models)
    latents = IMAGENET_LATENTS
    models = {}
    for name, model_config in configs.items():
        with torch.device("meta"):
            model = training_model(model_config, latents)
        parameters = {
            part: count_parameters(getattr(model, part)) for part in ("lite_hybrid", "transformer", "energy_head")
        }
        parameters["total"] = sum(parameters.values())
        measured = measure_config(model_config, latents, score_batch_mul=args.score_batch_mul)
        models[name] = {
            "name": PLAN_MODELS[name],
            "config_file": _shown_path(Path(args.config_dir) / f"{name}.json"),
            "parameters": parameters,
            "measured_on_cpu": measured,
            "predicted": predict(measured, parameters["total"], args),
        }
        print(f"plan: {PLAN_MODELS[name]} measured")
    payload = {
        "metric": "gpu_training_plan",
        "labels": {
            "parameters": "counted",
            "measured_on_cpu": "measured on CPU: one bf16 training step per depth and batch (see `method`)",
            "predicted": "predicted for GPUs from the CPU measurements and the `assumptions`; not run on a GPU",
        },
        "method": _markdown(__doc__.split("How activation memory is measured. ", 1)[1].strip()),
        "assumptions": {
            "latents": latents,
            "precision": "bf16 autocast (train --mixed-precision bf16), fp32 weights, gradients, AdamW and EMA",
            "score_batch_mul": args.score_batch_mul,
            "gpu_memory_gib": args.gpu_memory_gib,
            "reserved_gib": args.reserved_gib,
            "fragmentation": args.fragmentation,
            "tensor_budget_gib": tensor_budget_bytes(args) / GIB,
            "blocks_in_flight": BLOCKS_IN_FLIGHT,
            "peak_tflops": args.peak_tflops,
            "mfu": args.mfu,
            "epochs": args.epochs,
            "train_images": IMAGENET_TRAIN_IMAGES,
            "global_batch": args.global_batch,
            "gpus": args.gpus,
        },
        "authors_setup": AUTHORS_SETUP,
        "models": models,
    }
    record = write_results(args.output, payload)
    Path(args.markdown).parent.mkdir(parents=True, exist_ok=True)
    Path(args.markdown).write_text(plan_markdown(record, args.output), encoding="utf-8")
    print(plan_markdown_tables(record))
    print(f"plan: wrote {args.output} and {args.markdown}")
    return record


def _shown_path(path: Path) -> str:
    """``path`` relative to the working directory when it lies below it (the results file is committed)."""
    path = path.resolve()
    return os.fspath(path.relative_to(Path.cwd()) if path.is_relative_to(Path.cwd()) else path)


def _markdown(text: str) -> str:
    """A docstring's reST literals and references as Markdown code."""
    return re.sub(r":func:`(\w+)`", r"`parscale_ear_hf.plan.\1`", text).replace("``", "`")


# ------------------------------------------------------------------------------------------ the page


def _gib(value: float) -> str:
    return f"{value / GIB:.2f}"


def _plan_cell(plan: dict | None) -> str:
    if plan is None:
        return "does not fit"
    return f"{plan['per_gpu_batch']} x {plan['gradient_accumulation_steps']}"


def plan_markdown_tables(record: dict) -> str:
    """The two tables of :func:`plan_markdown`: measured on the CPU, and predicted for GPUs."""
    a = record["assumptions"]
    gpus = [str(g) for g in a["gpus"]]
    per_gpus = " / ".join(f"{g} GPU{'' if g == '1' else 's'}" for g in gpus)
    authors = record["authors_setup"]
    measured_columns = [
        "model",
        "parameters (backbone + head)",
        "activations / image, GiB: no ckpt / ckpt",
        "one backbone block / one head block, MiB per image",
        "fixed, GiB: no ckpt / ckpt",
        "training GFLOP / image: model / with recompute",
    ]
    predicted_columns = [
        "model",
        f"fp32 state / GPU, GiB ({per_gpus})",
        f"largest batch / GPU, no ckpt ({per_gpus})",
        f"largest batch / GPU, ckpt ({per_gpus})",
        *(
            f"batch {a['global_batch']} on {g} GPU{'' if g == '1' else 's'}: per-GPU batch x accumulation, no ckpt "
            "/ ckpt"
            for g in gpus
        ),
        f"GPU-hours for {a['epochs']} epochs: no ckpt / ckpt",
        f"authors' {authors['gpus']} GPUs x {authors['per_gpu_batch']} (x {authors['gradient_accumulation_steps']} "
        "accumulation): GiB / GPU",
    ]

    def header(columns: list[str]) -> list[str]:
        return ["| " + " | ".join(columns) + " |", "|---|" + "---:|" * (len(columns) - 1)]

    measured, predicted = header(measured_columns), header(predicted_columns)
    for model in record["models"].values():
        params = model["parameters"]
        act = model["measured_on_cpu"]["activation_bytes"]
        flops = model["measured_on_cpu"]["train_flops_per_image"]
        plain, ckpt = act["no_checkpointing"], act["grad_checkpointing"]
        measured.append(
            f"| {model['name']} | {params['total'] / 1e6:.1f}M ({params['transformer'] / 1e6:.1f}M + "
            f"{params['energy_head'] / 1e6:.1f}M) | {_gib(plain['per_image'])} / {_gib(ckpt['per_image'])} | "
            f"{plain['backbone_block_per_image'] / 2**20:.1f} / {plain['head_block_per_image'] / 2**20:.1f} | "
            f"{_gib(plain['fixed'])} / {_gib(ckpt['fixed'])} | {flops['model'] / 1e9:.0f} / "
            f"{flops['with_recompute'] / 1e9:.0f} |"
        )
        p = model["predicted"]
        batches, plans = p["largest_batch_per_gpu"], p["global_batch_plan"]
        fits = "" if p["authors_setup_fits"] else " (does not fit)"
        cells = [
            model["name"],
            " / ".join(f"{sum(p['state_gib_per_gpu'][g].values()):.1f}" for g in gpus),
            *(" / ".join(str(batches[mode][g]) for g in gpus) for mode in MODES),
            *(" / ".join(_plan_cell(plans[mode][g]) for mode in MODES) for g in gpus),
            " / ".join(f"{p['gpu_hours'][mode]:,.0f}" for mode in MODES),
            f"{p['authors_setup_gib_per_gpu']:.1f}{fits}",
        ]
        predicted.append("| " + " | ".join(cells) + " |")
    return "\n".join(["Measured on CPU:", "", *measured, "", "Predicted for GPUs (not run on a GPU):", "", *predicted])


def plan_markdown(record: dict, source: str) -> str:
    """The page docs/gpu_plan.md, generated from the results JSON ``record`` (read from ``source``)."""
    a = record["assumptions"]
    authors = record["authors_setup"]
    return "\n".join(
        [
            "# GPU plan for ImageNet-256 training (predicted)",
            "",
            f"Generated by `parscale-ear plan` from `{source}` (revision {short_revision(record)}); do not edit by "
            "hand. Parameters are counted; activation memory and FLOPs are **measured on CPU**; everything about "
            "GPUs is **predicted** from those measurements and the assumptions below, not run on a GPU.",
            "",
            plan_markdown_tables(record),
            "",
            "## Assumptions",
            "",
            f"- Configs: `examples/configs/<model>.json`, built as `train --model-config` builds them on KL-16 "
            f"latents ({a['latents']['grid_size']}x{a['latents']['grid_size']}x{a['latents']['latent_channels']}, "
            f"{a['latents']['num_classes']} classes); parameters are the backbone's and the head's (LiteHybrid is "
            "off, the VAE is not trained).",
            f"- Precision: {a['precision']}; `--score-batch-mul {a['score_batch_mul']}`.",
            "- Activations per image: kept for the backward pass, every token masked (the worst batch: the mask "
            "ratio is drawn up to 1). Fixed: kept whatever the batch, chiefly autocast's bf16 copies of the weights "
            "(2 B per parameter; with checkpointing they are recast inside each recomputed block). One block: what "
            "one backbone or head block keeps per image.",
            f"- GPU memory {a['gpu_memory_gib']} GiB, less {a['reserved_gib']} GiB reserved (CUDA context, cuBLAS "
            f"and NCCL workspaces), less {100 * a['fragmentation']:.0f}% for allocator fragmentation: "
            f"{a['tensor_budget_gib']:.1f} GiB for tensors.",
            "- At the peak of a step: the fp32 state (weights 4 B, gradients 4 B, AdamW moments 8 B, EMA 4 B per "
            "parameter; DDP's gradient buckets another 4 B on several GPUs), the activations kept for backward, "
            "and those of "
            f"{a['blocks_in_flight']['no_checkpointing']} block (gradient temporaries) without checkpointing, "
            f"{a['blocks_in_flight']['grad_checkpointing']} blocks (the recomputed one too) with it. The optimizer "
            "step comes after the activations are freed, so its temporaries (a few bytes per parameter) stay below "
            "this peak.",
            "- The per-GPU batch of a plan is the largest power of two that fits and divides the global batch per GPU;"
            " `train --batch-size` is that times the GPU count (it counts all processes).",
            f"- GPU-hours: {a['epochs']} epochs of {a['train_images']:,} images x training FLOPs per image / "
            f"({a['mfu']:.0%} MFU x {a['peak_tflops']:g} TFLOP/s); with checkpointing the FLOPs include the "
            "recomputation. The FLOPs are at the mean mask ratio.",
            f"- The authors' setup (EAR's README): {authors['gpus']} GPUs, per-GPU batch {authors['per_gpu_batch']}, "
            f"{authors['gradient_accumulation_steps']} accumulation steps, global batch {authors['global_batch']}, "
            f"{authors['precision']}, {authors['epochs']} epochs; its column is our bf16 prediction for that batch.",
            "",
            "## Method",
            "",
            record["method"],
            "",
        ]
    )
