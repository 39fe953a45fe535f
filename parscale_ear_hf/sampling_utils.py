"""The plumbing of `ParScaleEARPipeline`'s sampling loop, apart from the algorithm: per-image randomness, the
checks of :meth:`~parscale_ear_hf.pipeline_parscale_ear.ParScaleEARPipeline.sample_tokens`' tensors, the warning
for skipped steps, scatter indices and what a step callback returns."""

from __future__ import annotations

import warnings

import torch

from .models.ear_transformer import latents_to_tokens


def uniform(batch: int, shape: tuple[int, ...], generator, device) -> torch.Tensor:
    """``U[0, 1)`` of shape `(batch, *shape)`; with a list of generators, row i comes from generator i alone."""
    if isinstance(generator, list):
        rows = [torch.rand(shape, generator=g, device=g.device) for g in generator]
        return torch.stack(rows).to(device)
    gen_device = generator.device if generator is not None else device
    return torch.rand((batch, *shape), generator=generator, device=gen_device).to(device)


def check_sampling_tensors(
    class_ids: torch.Tensor, orders: torch.Tensor, noise: torch.Tensor, num_tokens: int, noise_shape: tuple
) -> None:
    """Raise naming the argument unless `class_ids` is `(B,)` with B >= 1, `orders` `(B, N)` and `noise`
    `(B, N, *noise_shape)`."""
    if class_ids.dim() != 1 or len(class_ids) == 0:
        raise ValueError(
            f"ParScaleEARPipeline.sample_tokens: `class_ids` must be a 1-d tensor of B >= 1 class ids, got "
            f"shape {tuple(class_ids.shape)}."
        )
    batch = len(class_ids)
    for name, value, shape in (
        ("orders", orders, (batch, num_tokens)),
        ("noise", noise, (batch, num_tokens, *noise_shape)),
    ):
        if tuple(value.shape) != shape:
            raise ValueError(
                f"ParScaleEARPipeline.sample_tokens: `{name}` must have shape {shape} for {batch} images of "
                f"N = {num_tokens} tokens, got {tuple(value.shape)}."
            )


def warn_skipped_steps(num_inference_steps: int, num_run: int, num_tokens: int) -> None:
    """Warn, at the caller of ``pipe(...)`` or ``pipe.sample_tokens(...)``, when fewer steps run than were asked."""
    if num_run < num_inference_steps:
        warnings.warn(
            f"ParScaleEARPipeline: num_inference_steps={num_inference_steps} but only {num_run} steps "
            f"predict tokens for N = {num_tokens} tokens; the other {num_inference_steps - num_run} (once one token "
            "is left, before the last step) predict nothing, as in EAR, and are skipped.",
            stacklevel=5,  # here, the pipeline's sampling loop, `__call__` or `sample_tokens`, torch.no_grad
        )


def expand_to(positions: torch.Tensor, width: int) -> torch.Tensor:
    """Index `(B, T)` -> `(B, T, width)` for gather / scatter along dim 1."""
    return positions.unsqueeze(-1).expand(-1, -1, width)


def tokens_from_callback(outputs: dict, local: dict, step: int) -> torch.Tensor:
    """The tokens `(B, N, C)` after a step callback that got `local` and returned `outputs`."""
    # Callbacks commonly return their inputs unchanged (diffusers' examples do), so only a new
    # tensor replaces the tokens; in-place edits need nothing: `latents` is a view of `tokens`.
    # Compared with the pipeline's own tensors: a callback may have put new ones in the dict it got.
    new = {k: outputs[k] for k in ("tokens", "latents") if k in outputs and outputs[k] is not local[k]}
    if len(new) == 2:
        raise ValueError(
            f"ParScaleEARPipeline: `callback_on_step_end` returned both a new `tokens` and a new `latents` at "
            f"step {step}; return a new tensor for one of them only (the other unchanged, or left out)."
        )
    if "latents" in new:
        return latents_to_tokens(new["latents"])
    return new.get("tokens", local["tokens"])
