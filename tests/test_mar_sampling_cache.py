"""LazyMAR's caches (`SamplingCache`) on MAR's backbone (`MARTransformer`), at the level of `SamplingCacheState`.

`sample` below is the pipeline's sampling loop (`ParScaleEARPipeline._sample_tokens`: `mask_schedule`,
`predicting_steps`, random orders, the linear guidance schedule, exact steps with sorted predictions, cached
steps through `SamplingCacheState.hidden`) with a stand-in head that takes guidance mixed before it, as EAR's:
a token is ``tanh(z W + noise)``, one fixed projection, so that every token depends on its ``z`` and errors in
``z`` reach the later steps, as they do through a real head (the pipeline tests at the end use MAR's head).
The backbone is a tiny MAR (4x4 tokens of 4 channels, encoder 24x3, decoder 32x3, 4 buffer positions) with
every weight perturbed from MAR's init (non-zero biases and LayerNorm shifts).

Bound (`rounding_bound`), as `conftest.float32_rounding_bound`: a cached pass that recomputes everything
differs from the exact one only in the order of float32 sums (the encoder's keys in another order, the
guidance passes in other batches, BLAS blocking by shape). Two orders of a K-term sum differ by at most
K eps times the sum of |terms|; activations are O(1) after every LayerNorm; a token is the end of a chain of
(Linear layers of the backbone and head) per step, times the steps: bound = steps x layers x max fan-in x eps,
3.3e-3 at 8 steps. Measured (this CPU): a refresh at every step 0 without guidance and 2.7e-6 with it (the
two passes in separate batches), token_share=1 between refreshes 7e-7 to 4.6e-6; a real error, a cached step that
reuses stale features, moves tokens by 0.26 to 0.32 (refresh_every=4,
`test_between_refreshes_the_caches_change_the_tokens_a_little`), 100x the bound.
"""

import pytest
import torch

from parscale_ear_hf import DiffusionHead, ParScaleEARPipeline, SamplingCache
from parscale_ear_hf.models.lite_hybrid import LiteHybrid
from parscale_ear_hf.models.mar_transformer import MARTokenCache, MARTransformer
from parscale_ear_hf.pipeline_parscale_ear import mask_schedule, mix_guidance, predicting_steps
from parscale_ear_hf.sampling_cache import SamplingCacheState, check_cache, gather_rows

from conftest import float32_rounding_bound, tiny_components

GRID, CHANNELS, BUFFER = 4, 4, 4
N = GRID**2


def tiny_mar(seed: int = 0) -> MARTransformer:
    torch.manual_seed(seed)
    transformer = MARTransformer(
        in_channels=CHANNELS,
        grid_size=GRID,
        num_classes=10,
        encoder_hidden_size=24,
        encoder_num_layers=3,
        encoder_num_heads=2,
        decoder_hidden_size=32,
        decoder_num_layers=3,
        decoder_num_heads=4,
        buffer_size=BUFFER,
    )
    with torch.no_grad():
        for param in transformer.parameters():
            param.add_(0.1 * torch.randn_like(param))
    return transformer.eval()


def lite_hybrid(on: bool = False) -> LiteHybrid:
    torch.manual_seed(1)
    hybrid = LiteHybrid(
        in_channels=CHANNELS,
        grid_size=GRID,
        coarse_grid_size=2,
        hidden_dim=16,
        num_heads=2,
        use_coarse=on,
        use_fine=on,
    )
    with torch.no_grad():
        for name, param in hybrid.named_parameters():
            if name.endswith("_gate"):
                param.normal_(std=0.5)  # so that the LiteHybrid changes the known tokens at every step
    return hybrid.eval()


HEAD = torch.randn(32, CHANNELS, generator=torch.Generator().manual_seed(2)) / 32**0.5


def inputs(labels, seeds):
    """Per image: its order and its noise from its own generator, as the pipeline draws them."""
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    orders = torch.stack([torch.randperm(N, generator=g) for g in gens])
    noise = torch.stack([torch.randn(N, CHANNELS, generator=g) for g in gens])
    return torch.tensor(labels), orders, noise


@torch.no_grad()
def sample(transformer, cache=None, labels=(1, 2, 3), seeds=(10, 11, 12), steps=8, cfg=3.0, hybrid=None):
    hybrid = hybrid or lite_hybrid()
    labels, orders, noise = inputs(labels, seeds)
    batch = len(labels)
    tokens = torch.zeros(batch, N, CHANNELS)
    mask = torch.ones(batch, N, dtype=torch.bool)
    null = torch.full_like(labels, transformer.null_class) if cfg > 1 else None
    state = SamplingCacheState(cache, hybrid, transformer, steps) if cache and cache.enabled else None
    num_masked = last_pass = N
    for step in predicting_steps(steps, N):
        num_next = mask_schedule(step, steps, N, num_masked)
        mask_next = torch.zeros_like(mask).scatter_(1, orders[:, :num_next], True)
        cfg_k = 1 + (cfg - 1) * (N - max(1, num_next)) / N
        if state is None:
            predict = orders[:, num_next:num_masked].sort(dim=1).values
            x = hybrid(tokens, mask)
            if null is None:
                z_cond, z_uncond = gather_rows(transformer(x, labels, mask), predict), None
            else:
                h = transformer(torch.cat([x, x]), torch.cat([labels, null]), torch.cat([mask, mask]))
                z_cond, z_uncond = (gather_rows(part, predict) for part in h.chunk(2))
        else:
            predict = orders[:, num_next:num_masked]
            recompute = orders[:, num_next:last_pass]
            z_cond, z_uncond = state.hidden(step, tokens, mask, labels, null, recompute, predict)
        z = z_cond if z_uncond is None else mix_guidance(z_cond, z_uncond, cfg_k)
        tokens.scatter_(
            1, predict.unsqueeze(-1).expand(-1, -1, CHANNELS), torch.tanh(z @ HEAD + gather_rows(noise, predict))
        )
        last_pass = num_masked
        mask, num_masked = mask_next, num_next
    return tokens


def rounding_bound(transformer, steps=8):
    linears = [m for m in transformer.modules() if isinstance(m, torch.nn.Linear)]
    chain = steps * (len(linears) + 1)  # + the head's projection
    return chain * max(m.in_features for m in linears) * torch.finfo(torch.float32).eps


def block_inputs(block, monkeypatch) -> list:
    """`(rows, positions)` of every input of `block` from now on."""
    seen, original = [], block.forward

    def spy(x, kv_cache=None, positions=None, queries=None):
        seen.append(tuple(x.shape[:2]))
        return original(x, kv_cache, positions, queries)

    monkeypatch.setattr(block, "forward", spy)
    return seen


def test_a_full_pass_filling_the_cache_is_the_exact_pass():
    transformer = tiny_mar()
    tokens, labels = torch.randn(2, N, CHANNELS), torch.tensor([1, 5])
    mask = torch.zeros(2, N, dtype=torch.bool).scatter_(1, torch.stack([torch.randperm(N)[:9] for _ in "ab"]), True)
    with torch.no_grad():
        assert torch.equal(
            transformer(tokens, labels, mask, cache=MARTokenCache(1)), transformer(tokens, labels, mask)
        )


def test_both_caches_off_is_bit_identical_to_exact_sampling():
    transformer = tiny_mar()
    exact = sample(transformer)
    assert torch.equal(sample(transformer, SamplingCache(token_cache=False, condition_cache=False)), exact)
    # Without guidance the condition cache has nothing to do, and the full passes are the exact ones.
    exact = sample(transformer, cfg=1.0)
    assert torch.equal(sample(transformer, SamplingCache(token_cache=False), cfg=1.0), exact)


@pytest.mark.parametrize("hybrid_on", [False, True])
@pytest.mark.parametrize("cfg", [1.0, 3.0])
@pytest.mark.parametrize("token_cache,condition_cache", [(True, True), (True, False), (False, True)])
def test_a_refresh_at_every_step_is_exact_sampling(hybrid_on, cfg, token_cache, condition_cache):
    transformer = tiny_mar()
    exact = sample(transformer, cfg=cfg, hybrid=lite_hybrid(hybrid_on))
    cache = SamplingCache(token_cache=token_cache, condition_cache=condition_cache, refresh_every=1)
    cached = sample(transformer, cache, cfg=cfg, hybrid=lite_hybrid(hybrid_on))
    assert (cached - exact).abs().max() < rounding_bound(transformer)


@pytest.mark.parametrize("hybrid_on", [False, True])
@pytest.mark.parametrize("cfg", [1.0, 3.0])
def test_token_cache_recomputing_every_position_is_exact_sampling(hybrid_on, cfg):
    # token_share=1: both stacks recompute every position above full_layers, in cached steps too.
    transformer = tiny_mar()
    exact = sample(transformer, cfg=cfg, hybrid=lite_hybrid(hybrid_on))
    cache = SamplingCache(token_share=1.0, condition_cache=False, refresh_every=100)
    cached = sample(transformer, cache, cfg=cfg, hybrid=lite_hybrid(hybrid_on))
    assert (cached - exact).abs().max() < rounding_bound(transformer)


@pytest.mark.parametrize("token_cache,condition_cache", [(True, True), (True, False), (False, True)])
def test_between_refreshes_the_caches_change_the_tokens_a_little(token_cache, condition_cache):
    transformer = tiny_mar()
    exact = sample(transformer, steps=12)
    cached = sample(transformer, SamplingCache(token_cache, 0.25, condition_cache, refresh_every=4), steps=12)
    other_seed = sample(transformer, steps=12, seeds=(20, 21, 22))
    change, seed_change = (cached - exact).norm(), (other_seed - exact).norm()
    assert (cached - exact).abs().max() > 1e-2  # the caches did skip work
    assert change < 0.5 * seed_change  # but the tokens stay those of the same images


def test_token_cache_recomputes_only_the_chosen_positions(monkeypatch):
    transformer = tiny_mar()
    encoder = block_inputs(transformer.encoder_blocks[1], monkeypatch)  # above full_layers=1
    decoder = block_inputs(transformer.decoder_blocks[1], monkeypatch)
    sample(transformer, SamplingCache(token_share=0.25, refresh_every=100), labels=(1,), seeds=(10,), cfg=1.0)
    masked = [N]
    for step in range(8):
        masked.append(mask_schedule(step, 8, N, masked[-1]))
    predicted = [a - b for a, b in zip(masked, masked[1:])]
    assert predicted == [1, 1, 1, 2, 3, 2, 3, 3]  # the cosine schedule at 8 steps over 16 tokens
    known = [sum(predicted[:i]) for i in range(8)]
    # Step 0 is the full pass: the buffer alone in the encoder, every position in the decoder.
    assert encoder[0] == (1, BUFFER) and decoder[0] == (1, BUFFER + N)
    for i in range(1, 8):
        new, before = predicted[i - 1], BUFFER + known[i - 1]  # decoded by the last step / in the encoder before
        assert encoder[i] == (1, new + round(0.25 * before)), i
        must = predicted[i] + new
        assert decoder[i] == (1, must + round(0.25 * (BUFFER + N - must))), i


def test_condition_cache_skips_the_unconditional_pass_between_refreshes(monkeypatch):
    transformer = tiny_mar()
    rows = block_inputs(transformer.decoder_blocks[0], monkeypatch)
    sample(transformer, SamplingCache(token_cache=False, refresh_every=4), labels=(1, 2), seeds=(10, 11))
    # A refresh (steps 0 and 4) runs both passes as one batch (4 rows), the other steps the conditional one only.
    assert [r for r, _ in rows] == [4, 2, 2, 2, 4, 2, 2, 2]
    rows.clear()
    sample(transformer, labels=(1, 2), seeds=(10, 11))
    assert [r for r, _ in rows] == [4] * 8


def test_image_is_the_same_alone_or_inside_a_batch_with_caches():
    transformer = tiny_mar()
    cache = SamplingCache(token_share=0.25, refresh_every=3)
    labels, seeds = (3, 7, 3), (10, 11, 12)
    batch = sample(transformer, cache, labels, seeds)
    bound = rounding_bound(transformer)
    for i, (label, seed) in enumerate(zip(labels, seeds)):
        alone = sample(transformer, cache, (label,), (seed,))
        assert (alone[0] - batch[i]).abs().max() < bound
    assert (batch[0] - batch[2]).abs().max() > 10 * bound


def test_partial_pass_over_unchanged_inputs_equals_the_full_pass():
    # Nothing changed since the full pass, so every cached key, value and output is current: exact at any share.
    transformer = tiny_mar()
    tokens, labels = torch.randn(2, N, CHANNELS), torch.tensor([1, 5])
    orders = torch.stack([torch.randperm(N) for _ in "ab"])
    mask = torch.zeros(2, N, dtype=torch.bool).scatter_(1, orders[:, :9], True)
    cache = MARTokenCache(full_layers=1)
    with torch.no_grad():
        full = transformer(tokens, labels, mask, cache=cache)
        partial = transformer.forward_partial(tokens, labels, mask, cache, orders[:, :5], num_out=3, extra_share=0.0)
    assert (partial - gather_rows(full, orders[:, :3])).abs().max() < 1e-5  # fan-in 128 x 6 layers x eps


def test_partial_pass_recomputing_every_position_equals_the_full_pass():
    # Tokens became known since the full pass: they join the encoder; with a share of 1 everything is recomputed.
    transformer = tiny_mar()
    tokens, labels = torch.randn(2, N, CHANNELS), torch.tensor([1, 5])
    orders = torch.stack([torch.randperm(N) for _ in "ab"])
    before = torch.zeros(2, N, dtype=torch.bool).scatter_(1, orders[:, :12], True)
    mask = torch.zeros(2, N, dtype=torch.bool).scatter_(1, orders[:, :9], True)
    cache = MARTokenCache(full_layers=1)
    with torch.no_grad():
        transformer(tokens, labels, before, cache=cache)
        partial = transformer.forward_partial(tokens, labels, mask, cache, orders[:, :12], num_out=9, extra_share=1.0)
        full = transformer(tokens, labels, mask)
    assert (partial - gather_rows(full, orders[:, :9])).abs().max() < 1e-5
    assert cache.slots.shape == (2, BUFFER + 7)  # the 3 new tokens joined the encoder's sequence


def test_partial_pass_refuses_a_known_token_masked_again():
    transformer = tiny_mar()
    tokens, labels = torch.randn(1, N, CHANNELS), torch.tensor([1])
    cache = MARTokenCache(full_layers=1)
    with torch.no_grad():
        transformer(tokens, labels, torch.arange(N).unsqueeze(0) < 8, cache=cache)
        with pytest.raises(ValueError, match="known at the cache's last pass"):
            transformer.forward_partial(
                tokens, labels, torch.arange(N).unsqueeze(0) >= 8, cache, torch.arange(8)[None], 8, 0.0
            )


def test_partial_pass_refuses_a_cache_of_other_rows():
    transformer = tiny_mar()
    tokens, labels, mask = torch.randn(2, N, CHANNELS), torch.tensor([1, 2]), torch.ones(2, N, dtype=torch.bool)
    cache = MARTokenCache(full_layers=1)
    with torch.no_grad():
        transformer(tokens[:1], labels[:1], mask[:1], cache=cache)
        with pytest.raises(ValueError, match="holds 1 batch rows, this pass 2"):
            transformer.forward_partial(tokens, labels, mask, cache, torch.arange(4).repeat(2, 1), 4, 0.0)


@pytest.mark.parametrize("encoder_layers,decoder_layers", [(3, 2), (2, 3)])
def test_check_cache_limits_full_layers_by_the_shallower_stack(encoder_layers, decoder_layers):
    transformer = MARTransformer(
        in_channels=CHANNELS,
        grid_size=GRID,
        num_classes=10,
        encoder_hidden_size=24,
        encoder_num_layers=encoder_layers,
        encoder_num_heads=2,
        decoder_hidden_size=32,
        decoder_num_layers=decoder_layers,
        decoder_num_heads=4,
        buffer_size=BUFFER,
    )
    check_cache(SamplingCache(full_layers=1), transformer)
    check_cache(SamplingCache(token_cache=False, full_layers=2), transformer)  # full_layers unused
    with pytest.raises(ValueError, match=r"full_layers` is 2 .* MARTransformer works on stacks of 2 blocks"):
        check_cache(SamplingCache(full_layers=2), transformer)
    with pytest.raises(TypeError, match="SamplingCache or None"):
        check_cache("lazy", transformer)


# The pipeline: MAR's backbone and diffusion head (5 sampling steps, guidance on its noise prediction at every
# one), the LiteHybrid off, as a converted MAR checkpoint runs. With perturbed, untrained weights the head's
# sampler chain grows the tokens to ~6e4 (its first step divides by sqrt(alpha_bar) of t = 999), so float32
# rounding there is relative: the bound is `conftest.float32_rounding_bound` relative to the largest token.
# Measured: at most 9e-7 relative (0.06 on 6.7e4) for a refresh at every step or token_share=1, against a bound
# of 1e-2; the default caches move the tokens by 0.19 relative (7% of what another seed does).


def mar_pipeline() -> ParScaleEARPipeline:
    components = tiny_components()
    torch.manual_seed(3)
    head = DiffusionHead(condition_dim=32, token_channels=CHANNELS, width=32, depth=2, num_sampling_steps=5)
    with torch.no_grad():
        for param in head.parameters():  # MAR's head starts at exactly 0: make it depend on z and the noise
            param.add_(0.1 * torch.randn_like(param))
    components.update(lite_hybrid=lite_hybrid(), transformer=tiny_mar(), energy_head=head)
    pipe = ParScaleEARPipeline(**components)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def relative_error(actual, expected):
    return ((actual - expected).abs().max() / expected.abs().max()).item()


def run(pipe, labels=(1, 2, 3), seeds=(10, 11, 12), steps=8, cfg=3.0, **kwargs):
    generator = [torch.Generator().manual_seed(s) for s in seeds]
    return pipe(list(labels), steps, cfg, generator=generator, output_type="latent", **kwargs).images


def test_pipeline_with_both_caches_off_is_bit_identical_to_exact_sampling():
    pipe = mar_pipeline()
    assert torch.equal(run(pipe, cache=SamplingCache(token_cache=False, condition_cache=False)), run(pipe))


@pytest.mark.parametrize("cfg", [1.0, 3.0])
@pytest.mark.parametrize(
    "cache",
    [
        SamplingCache(refresh_every=1),
        SamplingCache(condition_cache=False, refresh_every=1),
        SamplingCache(token_cache=False, refresh_every=1),
        SamplingCache(token_share=1.0, condition_cache=False, refresh_every=100),
    ],
)
def test_pipeline_refreshing_or_recomputing_everything_is_exact_sampling(cfg, cache):
    pipe = mar_pipeline()
    exact = run(pipe, cfg=cfg)
    assert relative_error(run(pipe, cfg=cfg, cache=cache), exact) < float32_rounding_bound(pipe, num_inference_steps=8)


def test_pipeline_with_the_default_caches_samples_nearly_the_same_images():
    pipe = mar_pipeline()
    exact = run(pipe, steps=12)
    cached = run(pipe, steps=12, cache=SamplingCache())
    other_seed = run(pipe, steps=12, seeds=(20, 21, 22))
    assert cached.shape == exact.shape and bool(cached.isfinite().all())
    assert relative_error(cached, exact) > 1e-3  # the caches skipped work
    assert (cached - exact).norm() < 0.5 * (other_seed - exact).norm()


def test_the_compiled_step_is_refused_on_mars_backbone():
    # MAR's encoder grows with the tokens known, which one graph cannot hold: a clear error, not one from dynamo at
    # the first step; the pipeline still samples eagerly.
    pipe = mar_pipeline()
    with pytest.raises(TypeError, match="compiled step is for EARTransformer backbones; this pipeline's is a MARTr"):
        pipe.enable_compiled_step()
    assert pipe._compiled_hidden is None and pipe._compiled_partial is None
    assert torch.equal(run(pipe, steps=4), run(pipe, steps=4))
