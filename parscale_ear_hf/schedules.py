"""The schedules of masked autoregressive sampling that MAR and EAR share: how many tokens stay masked after
each step (:func:`mask_schedule`), which steps predict any (:func:`predicting_steps`), the guidance scale of a
step (:func:`guidance_at`) and guidance mixed on hidden states before EAR's head (:func:`mix_guidance`).
:class:`~parscale_ear_hf.pipeline_parscale_ear.ParScaleEARPipeline`'s loop runs them; they are re-exported there."""

from __future__ import annotations

import math

import torch


def mask_schedule(step: int, num_steps: int, num_tokens: int, num_masked: int) -> int:
    """How many tokens stay masked after ``step`` (0-based) of ``num_steps``: MAR / EAR's cosine schedule.

    Before the last step at least one token stays masked, and at least one is predicted while
    more than one is masked; after the last step nothing is masked. With more steps than tokens,
    once one token is left the steps before the last predict nothing, and the last step predicts
    it (as EAR's ``sample_tokens``).
    """
    if step >= num_steps - 1:
        return 0
    remaining = math.floor(num_tokens * math.cos(math.pi / 2 * (step + 1) / num_steps))
    return max(1, min(num_masked - 1, remaining))


def mix_guidance(h_cond: torch.Tensor, h_uncond: torch.Tensor, cfg: float) -> torch.Tensor:
    """Classifier-free guidance of hidden states before the head, as EAR: ``cfg * h_cond + (1 - cfg) * h_uncond``.

    Taken in float32 and rounded once to `h_cond`'s dtype: at cfg = 3 the two products are about 3x and 2x the
    result and nearly cancel, so in bf16 their own roundings would add up to 5x the result's.
    """
    return (cfg * h_cond.float() + (1 - cfg) * h_uncond.float()).to(h_cond.dtype)


def guidance_at(guidance_scale: float, guidance_schedule: str, num_tokens: int, num_masked_next: int) -> float:
    """The guidance scale of a step that leaves `num_masked_next` tokens masked: MAR / EAR's ``cfg_iter``.

    "linear": ``1 + (cfg - 1) * (N - max(1, m_next)) / N`` (MAR and EAR count at least one masked token, so even
    the last step uses ``1 + (cfg - 1) (N - 1) / N``), in float32 in MAR's order of operations, as they compute
    it (from a float32 `mask_len`); "constant": `cfg`.
    """
    if guidance_schedule == "constant":
        return guidance_scale
    revealed = torch.tensor(float(num_tokens - max(1, num_masked_next)), dtype=torch.float32)
    return (1 + (guidance_scale - 1) * revealed / num_tokens).item()


def predicting_steps(num_steps: int, num_tokens: int) -> list[int]:
    """The steps of :func:`mask_schedule` that predict at least one token, in order.

    While more than one token is masked every step predicts one or more; once one is left, nothing is
    predicted until the last step. So with more steps than tokens the steps between are skipped, and the
    list has at most `num_tokens` entries whatever `num_steps` is.
    """
    steps, masked = [], num_tokens
    for step in range(num_steps):
        if masked == 1 and step < num_steps - 1:
            return [*steps, num_steps - 1]
        steps.append(step)
        masked = mask_schedule(step, num_steps, num_tokens, masked)
    return steps
