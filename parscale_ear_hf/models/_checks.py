"""Config validation shared by the model components.

Every error names the field, the value it got and what would be accepted, so a bad config
fails at construction instead of as a shape error deep inside a forward pass.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

# Only Python ints and floats pass (and their subclasses): config values go into config.json,
# and json cannot write numpy scalars such as np.int64 or np.float32.


def check_int(owner: str, name: str, value, minimum: int = 1, maximum: int | None = None) -> None:
    """Raise unless ``value`` is an int (not a bool) in ``[minimum, maximum]``."""
    ok = isinstance(value, int) and not isinstance(value, bool) and value >= minimum
    if not ok or (maximum is not None and value > maximum):
        accepted = f">= {minimum}" if maximum is None else f"in [{minimum}, {maximum}]"
        raise ValueError(f"{owner}: `{name}` must be an integer {accepted}, got {value!r}.")


def check_float(owner: str, name: str, value, low: float, high: float, *, high_inclusive: bool = True) -> None:
    """Raise unless ``value`` is finite and ``low <= value <= high`` (``< high`` when ``high_inclusive`` is False)."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and low <= value and (value <= high if high_inclusive else value < high)
    if not ok:
        accepted = f">= {low}" if high == float("inf") else f"in [{low}, {high}{']' if high_inclusive else ')'}"
        raise ValueError(f"{owner}: `{name}` must be a finite number {accepted}, got {value!r}.")


def check_bool(owner: str, name: str, value) -> None:
    """Raise unless ``value`` is True or False (not 0 / 1 or a string, which JSON configs could carry)."""
    if not isinstance(value, bool):
        raise ValueError(f"{owner}: `{name}` must be True or False, got {value!r}.")


def check_divisible(owner: str, name: str, value: int, divisor: int, divisor_name: str) -> None:
    """Raise unless ``value`` is a multiple of ``divisor``."""
    if value % divisor != 0:
        raise ValueError(f"{owner}: `{name}`={value} must be divisible by `{divisor_name}`={divisor}.")


def check_int_sequence(owner: str, name: str, value, length: int | None = None) -> None:
    """Raise unless ``value`` is a non-empty sequence of positive ints (of ``length`` if given)."""
    ok = isinstance(value, Sequence) and not isinstance(value, str) and len(value) > 0
    ok = ok and all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in value)
    if ok and length is not None:
        ok = len(value) == length
    if not ok:
        what = f"{length} positive integers" if length is not None else "a non-empty list of positive integers"
        raise ValueError(f"{owner}: `{name}` must be {what}, got {value!r}.")


class StrictLoadingMixin:
    """``from_pretrained`` that refuses weights which do not match the config.

    diffusers only logs missing or unexpected keys, which would leave layers randomly
    initialised without a word (e.g. a config with more layers than the checkpoint), and stops at
    the first tensor of another shape with advice to load random weights instead.
    Put it before ``ModelMixin`` in the bases.
    """

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        want_info = kwargs.pop("output_loading_info", False)
        # Let diffusers go on past tensors of another shape, so that all of them are listed below.
        kwargs["ignore_mismatched_sizes"] = True
        model, info = super().from_pretrained(pretrained_model_name_or_path, output_loading_info=True, **kwargs)
        problems = [f"{k}: {sorted(map(str, info[k]))[:8]}" for k in ("missing_keys", "unexpected_keys") if info[k]]
        if info["mismatched_keys"]:
            shapes = [
                f"`{key}` expected shape {tuple(expected)} but got {tuple(got)}"
                for key, got, expected in sorted(info["mismatched_keys"])
            ]
            more = f", ... ({len(shapes)} tensors)" if len(shapes) > 8 else ""
            problems.append(f"tensors of another shape in the weights: {', '.join(shapes[:8])}{more}")
        if problems:
            where = pretrained_model_name_or_path
            if kwargs.get("subfolder"):
                where = f"{where}/{kwargs['subfolder']}"
            raise ValueError(
                f"{cls.__name__}.from_pretrained({str(where)!r}): the weights do not match config.json "
                f"({'; '.join(problems)}); load them with the config they were saved with."
            )
        return (model, info) if want_info else model


def check_device(owner: str, name: str, device: str) -> None:
    """Raise unless ``device`` names a device that this torch build can use here (cpu, cuda[:i], mps, xpu[:i])."""
    import torch

    try:
        kind = torch.device(device).type
    except RuntimeError:
        kind = None
    backend = {"cuda": torch.cuda, "mps": torch.backends.mps, "xpu": getattr(torch, "xpu", None)}.get(kind)
    usable = kind == "cpu" or (backend is not None and backend.is_available())
    if usable and kind in ("cuda", "xpu") and torch.device(device).index is not None:
        usable = torch.device(device).index < backend.device_count()
    if not usable:
        here = ["cpu"] + [k for k, b in (("cuda", torch.cuda), ("mps", torch.backends.mps)) if b.is_available()]
        build = f"torch {torch.__version__}" + ("" if torch.version.cuda else ", built without CUDA")
        raise ValueError(
            f"{owner}: `{name}` {device!r} is not a device this machine can use ({build}); accepted here: "
            f"{', '.join(here)}."
        )


MIXED_PRECISION_HELP = (
    "autocast: no (fp32) or bf16 (CPUs, and GPUs with native bf16: Ampere, Hopper and newer); fp16 is refused: "
    "use bf16. Default: what `accelerate launch` was configured with (its --mixed_precision or config file), "
    "else no"
)


def check_mixed_precision(owner: str, value, cpu: bool) -> str:
    """``--mixed-precision`` ``value`` as the run will use it; raises, before any work, unless it runs on the
    command's device: the CPU when ``cpu``, else this process's CUDA device.

    ``value`` None (the flag left out) takes what ``accelerate launch`` passes its processes
    (``ACCELERATE_MIXED_PRECISION``, from its ``--mixed_precision`` or ``--config_file``), else "no": a run launched
    with ``examples/accelerate_configs/h100_bf16.yaml`` trains in bf16 without repeating it.

    "no" runs anywhere. "bf16" runs on CPUs (accelerate's CPU autocast) and on GPUs with native bf16
    (``torch.cuda.is_bf16_supported(including_emulation=False)``; emulated bf16 is slower than fp32). "fp16" is
    refused: EAR's per-token gradients (about 1 / the masked tokens of a batch, 3.5e-6 at 28k rows) sit below
    fp16's smallest normal number (6.1e-5), so fp16 needs a gradient scaler, and an exact resume would need its
    state in the checkpoints; bf16 has fp32's exponent range and needs neither. (On a CPU accelerate would not
    even autocast fp16: it would train in fp32 without a word.)
    """
    import os

    import torch

    if value is None:
        value = os.environ.get("ACCELERATE_MIXED_PRECISION", "no")
    if cpu:
        device, accepted = "cpu", ("no", "bf16")
    else:
        device = f"cuda ({torch.cuda.get_device_name()})"
        accepted = ("no", "bf16") if torch.cuda.is_bf16_supported(including_emulation=False) else ("no",)
    if value in accepted:
        return value
    why = {
        "fp16": " (fp16 needs a gradient scaler, whose state our checkpoints do not keep: use bf16, which needs none)",
        "bf16": " (this GPU has no native bf16: torch.cuda.is_bf16_supported(including_emulation=False) is False)",
    }.get(value, "")
    raise ValueError(f"{owner}: `--mixed-precision` must be one of {accepted} on {device}, got {value!r}{why}.")
