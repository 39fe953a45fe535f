"""LazyMAR's caches (`SamplingCache`) and the compiled step of ParScaleEARPipeline."""

import numpy as np
import pytest
import torch

from parscale_ear_hf import DiffusionHead, ParScaleEARPipeline, SamplingCache
from parscale_ear_hf.models.ear_transformer import TokenCache

from conftest import float32_rounding_bound, tiny_components, tiny_pipeline


def gen(seed):
    return torch.Generator().manual_seed(seed)


def run(pipe, labels=(1, 2, 3), steps=8, **kwargs):
    kwargs.setdefault("generator", [gen(10 + i) for i in range(len(labels))])
    kwargs.setdefault("guidance_scale", 3.0)
    return pipe(list(labels), num_inference_steps=steps, output_type="latent", **kwargs).images


def diffusion_head_pipeline():
    components = tiny_components()
    torch.manual_seed(0)
    components["energy_head"] = DiffusionHead(
        condition_dim=32, token_channels=4, width=32, depth=2, num_sampling_steps=5
    )
    pipe = ParScaleEARPipeline(**components)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def full_pass_rows(pipe, monkeypatch) -> list:
    """The batch rows of every full backbone pass (`transformer.forward`) from now on."""
    rows, original = [], pipe.transformer.forward

    def spy(tokens, labels, mask, cache=None, positions=None):
        rows.append(tokens.shape[0])
        return original(tokens, labels, mask, cache, positions)

    monkeypatch.setattr(pipe.transformer, "forward", spy)
    return rows


def test_both_caches_off_is_bit_identical_to_exact_sampling(pipe):
    exact = run(pipe)
    assert torch.equal(run(pipe, cache=SamplingCache(token_cache=False, condition_cache=False)), exact)


@pytest.mark.parametrize("make_pipe", [tiny_pipeline, lambda: tiny_pipeline(parscale_n=2), diffusion_head_pipeline])
@pytest.mark.parametrize("guidance", [1.0, 3.0])
@pytest.mark.parametrize("token_cache,condition_cache", [(True, True), (True, False), (False, True)])
def test_a_refresh_at_every_step_is_exact_sampling(make_pipe, guidance, token_cache, condition_cache):
    # ParScale streams, the LiteHybrid (on in the tiny pipeline) and MAR's diffusion head all work with the caches.
    pipe = make_pipe()
    exact = run(pipe, guidance_scale=guidance)
    cache = SamplingCache(token_cache=token_cache, condition_cache=condition_cache, refresh_every=1)
    cached = run(pipe, guidance_scale=guidance, cache=cache)
    # The refresh runs the guidance passes as separate batches and gathers per image: float rounding only.
    assert (cached - exact).abs().max() < float32_rounding_bound(pipe, num_inference_steps=8)


@pytest.mark.parametrize("token_cache,condition_cache", [(True, True), (True, False), (False, True)])
def test_between_refreshes_the_caches_change_the_samples_a_little(pipe, token_cache, condition_cache):
    exact = run(pipe, steps=12)
    cached = run(pipe, steps=12, cache=SamplingCache(token_cache, 0.25, condition_cache, refresh_every=4))
    other_seed = run(pipe, steps=12, generator=[gen(20 + i) for i in range(3)])
    change, seed_change = (cached - exact).norm(), (other_seed - exact).norm()
    assert change > 1e-4 * exact.norm()  # the caches did skip work
    assert change < 0.5 * seed_change  # but the samples stay the same images


def test_partial_pass_over_unchanged_inputs_equals_the_full_pass(pipe):
    # Nothing changed since the full pass, so every cached key and value is current: exact at any share.
    transformer = pipe.transformer.eval()
    tokens, labels = torch.randn(2, 16, 4), torch.tensor([1, 5])
    mask = torch.rand(2, 16) < 0.5
    cache = TokenCache(full_layers=1)
    with torch.no_grad():
        full = transformer(tokens, labels, mask, cache=cache)
        positions = torch.stack([torch.randperm(16)[:5] for _ in range(2)])
        partial = transformer.forward_partial(tokens, labels, mask, cache, positions, num_out=3, extra_share=0.0)
    expected = full.gather(1, positions[:, :3, None].expand(-1, -1, 32))
    assert (partial - expected).abs().max() < 1e-5  # fan-in 128 x 2 layers x eps: float32 rounding


def test_partial_pass_recomputing_every_position_equals_the_full_pass(pipe):
    # After the inputs change, a partial pass that recomputes every position is a full pass.
    transformer = pipe.transformer.eval()
    tokens, labels = torch.randn(2, 16, 4), torch.tensor([1, 5])
    cache = TokenCache(full_layers=1)
    with torch.no_grad():
        transformer(tokens, labels, torch.ones(2, 16, dtype=torch.bool), cache=cache)
        mask = torch.rand(2, 16) < 0.5
        positions = torch.arange(16).repeat(2, 1)
        partial = transformer.forward_partial(tokens, labels, mask, cache, positions, num_out=16, extra_share=1.0)
        full = transformer(tokens, labels, mask)
        probe = transformer.blocks[0](transformer.embed(tokens, labels, mask))
    assert (partial - full).abs().max() < 1e-5
    assert torch.equal(cache.probe, probe)  # a share of 1: the 4 others (the buffer) too, everything was recomputed


def test_token_cache_recomputes_only_the_chosen_positions(pipe, monkeypatch):
    seen = []
    block = pipe.transformer.blocks[1]
    original = block.forward

    def spy(x, kv_cache=None, positions=None, queries=None):
        seen.append(x.shape[1])
        return original(x, kv_cache, positions, queries)

    monkeypatch.setattr(block, "forward", spy)
    run(pipe, steps=8, guidance_scale=1.0, cache=SamplingCache(token_share=0.25, refresh_every=100))
    # 4 buffer + 16 token positions; refresh at step 0, then per step: predicted + decoded since, plus
    # a quarter of the other positions.
    assert seen[0] == 20
    assert all(n < 20 for n in seen[1:]) and len(seen) > 1
    assert seen[1] == 1 + 1 + round(0.25 * (20 - 2))  # cosine schedule at 8 steps over 16 tokens: 1, then 1


def test_condition_cache_skips_the_unconditional_pass_between_refreshes(pipe, monkeypatch):
    rows = full_pass_rows(pipe, monkeypatch)
    run(pipe, labels=(1, 2), steps=8, cache=SamplingCache(token_cache=False, refresh_every=4))
    # A refresh (steps 0 and 4) runs both passes as one batch (4 rows), the other steps the conditional one only.
    assert rows == [4, 2, 2, 2, 4, 2, 2, 2]
    rows.clear()
    run(pipe, labels=(1, 2), steps=8)
    assert rows == [4] * 8


@pytest.mark.parametrize("steps,every", [(1, 1), (2, 1), (3, 1), (8, 4), (15, 7), (16, 8), (64, 8)])
def test_the_default_refresh_follows_the_step_count(steps, every):
    assert SamplingCache().refresh_every is None
    assert SamplingCache().refresh_every_at(steps) == every
    assert SamplingCache(refresh_every=3).refresh_every_at(steps) == 3


def test_the_default_refreshes_twice_in_8_steps_and_an_explicit_value_is_kept(pipe, monkeypatch):
    rows = full_pass_rows(pipe, monkeypatch)
    run(pipe, labels=(1, 2), steps=8, cache=SamplingCache(token_cache=False))
    # Full passes (both guidance passes as one batch of 4 rows) at steps 0 and 4 only.
    assert rows == [4, 2, 2, 2, 4, 2, 2, 2]
    rows.clear()
    run(pipe, labels=(1, 2), steps=8, cache=SamplingCache(token_cache=False, refresh_every=8))
    assert rows == [4] + [2] * 7
    rows.clear()
    run(pipe, labels=(1, 2), steps=16, cache=SamplingCache(token_cache=False))
    assert rows == ([4] + [2] * 7) * 2


@pytest.mark.parametrize("parscale_n", [1, 2])
def test_image_is_the_same_alone_or_inside_a_batch_with_caches(parscale_n):
    pipe = tiny_pipeline(parscale_n=parscale_n)
    cache = SamplingCache(token_share=0.25, refresh_every=3)
    labels, seeds = [3, 7, 3], [10, 11, 12]
    batch = run(pipe, labels, generator=[gen(s) for s in seeds], cache=cache)
    bound = float32_rounding_bound(pipe, num_inference_steps=8)
    for i, (label, seed) in enumerate(zip(labels, seeds)):
        alone = run(pipe, [label], generator=[gen(seed)], cache=cache)
        assert (alone[0] - batch[i]).abs().max() < bound
    assert (batch[0] - batch[2]).abs().max() > 10 * bound


def test_a_callback_with_new_tokens_refreshes_the_caches(pipe, monkeypatch):
    rows = full_pass_rows(pipe, monkeypatch)

    def replace_at_step_1(pipe_, step, timestep, tensors):
        return {"tokens": tensors["tokens"].clone()} if step == 1 else tensors

    run(
        pipe,
        labels=(1,),
        steps=6,
        guidance_scale=1.0,
        cache=SamplingCache(token_share=0.5, refresh_every=100),
        callback_on_step_end=replace_at_step_1,
    )
    assert len(rows) == 2  # full passes: step 0, and step 2 after the callback's new tokens


@pytest.mark.parametrize(
    "cache,error,match",
    [
        ("lazy", TypeError, "SamplingCache or None"),
        (SamplingCache(full_layers=2), ValueError, "full_layers"),
    ],
)
def test_bad_cache_is_refused_before_sampling(pipe, cache, error, match):
    with pytest.raises(error, match=match):
        run(pipe, cache=cache)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"token_share": 1.5}, "token_share"),
        ({"refresh_every": 0}, "refresh_every"),
        ({"refresh_every": 2.0}, "`refresh_every` must be None \\(by the step count\\) or an integer >= 1"),
        ({"full_layers": 0}, "full_layers"),
        ({"token_cache": 1}, "token_cache"),
    ],
)
def test_sampling_cache_checks_its_fields(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        SamplingCache(**kwargs)


def test_compiled_step_gives_the_eager_images(pipe):
    eager = run(pipe, steps=4)
    pipe.enable_compiled_step()
    try:
        compiled = run(pipe, steps=4)
    finally:
        pipe.disable_compiled_step()
    assert np.abs((compiled - eager).numpy()).max() < 1e-4


@pytest.mark.slow  # torch.compile builds C++ kernels on a CPU: ~20 s when its cache is cold
def test_compiled_cached_passes_give_the_eager_cached_images():
    # ParScale's streams are batch rows inside the compiled pass and mixed there.
    pipe = tiny_pipeline(parscale_n=2)
    cache = SamplingCache(token_share=0.25, refresh_every=4)
    eager = run(pipe, steps=12, cache=cache)
    pipe.enable_compiled_step()
    compiled_pass, calls = pipe._compiled_partial, []
    pipe._compiled_partial = lambda *args, **kwargs: calls.append(1) or compiled_pass(*args, **kwargs)
    try:
        compiled = run(pipe, steps=12, cache=cache)
    finally:
        pipe.disable_compiled_step()
    # 12 steps, full passes at steps 0, 4 and 8: the other 9 ran compiled.
    assert len(calls) == 9
    assert (compiled - eager).abs().max() < float32_rounding_bound(pipe, num_inference_steps=12)
    assert (eager - run(pipe, steps=12)).abs().max() > 1e-3  # a cached run, not an exact one
