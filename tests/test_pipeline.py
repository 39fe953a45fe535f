"""ParScaleEARPipeline sampling: outputs, determinism, guidance, schedule, callbacks, bad input."""

import numpy as np
import PIL.Image
import pytest
import torch

from parscale_ear_hf.models.ear_transformer import tokens_to_latents
from parscale_ear_hf.pipeline_parscale_ear import mask_schedule, predicting_steps

from conftest import float32_rounding_bound, tiny_pipeline


def gen(seed):
    return torch.Generator().manual_seed(seed)


def run(pipe, labels=(1, 2), **kwargs):
    kwargs.setdefault("num_inference_steps", 4)
    kwargs.setdefault("output_type", "np")
    kwargs.setdefault("generator", gen(0))
    return pipe(list(labels), **kwargs).images


@pytest.mark.parametrize("n,steps", [(16, 1), (16, 2), (16, 4), (16, 7), (16, 16), (256, 64), (256, 256), (16, 40)])
def test_mask_schedule_reveals_every_token_once(n, steps):
    masked, seen = n, 0
    for step in range(steps):
        nxt = mask_schedule(step, steps, n, masked)
        # At least one token per step while more than one is masked (with more steps than
        # tokens, the steps before the last one wait with one token masked).
        assert 0 <= nxt < masked or nxt == masked == 1
        seen += masked - nxt
        masked = nxt
    assert masked == 0 and seen == n


def test_mask_schedule_with_more_steps_than_tokens_is_the_references():
    # EAR: mask_len = max(1, min(masked - 1, floor(N cos(pi/2 (k+1)/K)))); the last step predicts all the rest.
    masked, kept = 4, []
    for k in range(6):
        masked = mask_schedule(k, 6, 4, masked)
        kept.append(masked)
    assert kept == [3, 2, 1, 1, 1, 0]


def test_mask_schedule_is_cosine():
    # After step k of K, floor(N * cos(pi/2 * (k+1)/K)) tokens stay masked (MAR / EAR).
    assert [mask_schedule(k, 4, 256, 256 if k == 0 else 999) for k in range(3)] == [236, 181, 97]


def test_output_types(pipe):
    pil = run(pipe, output_type="pil")
    assert len(pil) == 2 and isinstance(pil[0], PIL.Image.Image) and pil[0].size == (16, 16)
    arr = run(pipe)
    assert arr.shape == (2, 16, 16, 3) and arr.min() >= 0 and arr.max() <= 1
    pt = run(pipe, output_type="pt")
    assert isinstance(pt, torch.Tensor) and pt.shape == (2, 3, 16, 16)
    # The same operations on the same shapes: bit for bit the same numbers.
    assert np.array_equal(pt.permute(0, 2, 3, 1).numpy(), arr)
    latents = run(pipe, output_type="latent")
    assert latents.shape == (2, 4, 4, 4)
    decoded = pipe.image_processor.postprocess(pipe.decode_latents(latents), output_type="np")
    # The pipeline decodes a strided view, this a contiguous copy: the convolutions may sum in another order.
    assert np.abs(decoded - arr).max() < float32_rounding_bound(pipe, num_inference_steps=0)
    as_tuple = pipe([1, 2], num_inference_steps=4, generator=gen(0), output_type="np", return_dict=False)
    assert isinstance(as_tuple, tuple) and np.array_equal(as_tuple[0], arr)


def test_decode_uses_scaling_and_shift(pipe):
    latents = torch.randn(1, 4, 4, 4)
    pipe.vae.register_to_config(scaling_factor=2.0, shift_factor=0.5)
    expected = pipe.vae.decode(latents / 2.0 + 0.5).sample
    assert torch.equal(pipe.decode_latents(latents), expected)


def test_same_seed_same_images_other_seed_other_images(pipe):
    a, b, c = run(pipe), run(pipe), run(pipe, generator=gen(1))
    assert np.array_equal(a, b)
    assert np.abs(a - c).max() > 1e-3


@pytest.mark.parametrize("parscale_n,guidance", [(1, 1.0), (1, 3.0), (2, 3.0)])
def test_image_is_the_same_alone_or_inside_a_batch(parscale_n, guidance):
    pipe = tiny_pipeline(parscale_n=parscale_n)
    labels, seeds = [3, 7, 3], [10, 11, 12]
    batch = run(pipe, labels, generator=[gen(s) for s in seeds], guidance_scale=guidance)
    # Alone, BLAS may sum in another order than inside the batch: equal up to float32 rounding.
    bound = float32_rounding_bound(pipe, num_inference_steps=4)
    for i, (label, seed) in enumerate(zip(labels, seeds)):
        alone = run(pipe, [label], generator=[gen(seed)], guidance_scale=guidance)
        assert np.abs(alone[0] - batch[i]).max() < bound
    assert np.abs(batch[0] - batch[2]).max() > 10 * bound  # same class, other seed: another image


def test_class_names_and_num_images_per_class(pipe):
    by_id = run(pipe, [3, 5])
    by_name = run(pipe, ["digit 3", "number 5"])
    assert np.array_equal(by_id, by_name)
    assert pipe.get_label_ids(["number 2", "digit 9"]) == [2, 9]
    assert run(pipe, [1, 2], num_images_per_class=3).shape[0] == 6


def test_guidance_mixes_conditional_and_unconditional_hidden_states(pipe):
    emb = pipe.transformer.class_embedding.weight
    unguided = run(pipe, [4], guidance_scale=1.0)
    guided = run(pipe, [4], guidance_scale=4.0)
    assert np.abs(unguided - guided).max() > 1e-3
    with torch.no_grad():
        emb[pipe.transformer.null_class] = emb[4]  # h_uncond == h_cond: cfg*h + (1-cfg)*h == h
    # Equal up to the rounding of cfg*h + (1-cfg)*h, carried through the later layers.
    assert np.abs(run(pipe, [4], guidance_scale=4.0) - unguided).max() < float32_rounding_bound(pipe, 4)


def test_guidance_schedule_and_temperature_change_the_output(pipe):
    linear = run(pipe, guidance_scale=3.0, guidance_schedule="linear")
    constant = run(pipe, guidance_scale=3.0, guidance_schedule="constant")
    assert np.abs(linear - constant).max() > 1e-3
    assert np.abs(run(pipe, temperature=0.7) - run(pipe, temperature=1.0)).max() > 1e-3
    assert np.isfinite(run(pipe, temperature=0.0)).all()


def test_callback_sees_tokens_revealed_by_the_schedule_and_can_edit_them(pipe):
    seen = []

    def callback(p, step, timestep, tensors):
        seen.append((step, int(tensors["mask"][0].sum())))
        return {"tokens": torch.zeros_like(tensors["tokens"])}

    latents = run(
        pipe,
        [1],
        output_type="latent",
        num_inference_steps=4,
        callback_on_step_end=callback,
        callback_on_step_end_tensor_inputs=["tokens", "mask"],
    )
    assert [s for s, _ in seen] == [0, 1, 2, 3]
    assert [m for _, m in seen] == [mask_schedule(k, 4, 16, [16, 15, 11, 6][k]) for k in range(4)]
    assert torch.count_nonzero(latents) == 0  # the last step's edit is what came out


def test_sampling_puts_components_in_eval_mode_and_restores_training(pipe):
    pipe.transformer.train()
    pipe.vae.eval()
    assert np.array_equal(run(pipe), run(pipe))  # dropout would make these differ
    assert pipe.transformer.training and not pipe.vae.training


def test_to_dtype_moves_every_component(pipe):
    pipe.to("cpu", torch.float64)
    assert all(m.dtype == torch.float64 for m in (pipe.vae, pipe.lite_hybrid, pipe.transformer, pipe.energy_head))
    assert run(pipe, output_type="pt").dtype == torch.float64


def test_progress_bar_reports_steps(pipe, capsys):
    pipe.set_progress_bar_config(disable=False)
    run(pipe, num_inference_steps=3)
    assert "3/3" in capsys.readouterr().err


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(class_labels=[10]), r"class label 10 .*\[0, 9\]"),
        (dict(class_labels=[-1]), r"class label -1"),
        (dict(class_labels=[1.5]), r"class label 1.5"),
        (dict(class_labels=["cat"]), r"unknown class name.*'cat'.*accepted names"),
        (dict(class_labels=[]), r"`class_labels` must hold at least one int or name, got \[\]"),
        (dict(class_labels=[[]]), r"`class_labels` must hold at least one int or name, got \[\[\]\]"),
        (dict(class_labels=[[1], [10]]), r"class label 10 .*\[0, 9\]"),
        (dict(class_labels=None), r"class label None .*\[0, 9\]"),
        (dict(num_inference_steps=0), r"`num_inference_steps` must be an integer >= 1, got 0"),
        (dict(num_inference_steps=2.0), r"num_inference_steps"),
        (dict(temperature=-0.1), r"temperature.*>= 0"),
        (dict(temperature=float("inf")), r"`temperature` must be a finite number >= 0.0, got inf"),
        (dict(temperature=float("nan")), r"`temperature` must be a finite number >= 0.0, got nan"),
        (dict(guidance_scale=0.5), r"guidance_scale.*>= 1"),
        (dict(guidance_scale=float("inf")), r"`guidance_scale` must be a finite number >= 1.0, got inf"),
        (dict(guidance_scale=float("nan")), r"`guidance_scale` must be a finite number >= 1.0, got nan"),
        (dict(class_labels=[True]), r"class label True"),
        (dict(guidance_schedule="cosine"), r"guidance_schedule.*linear"),
        (dict(output_type="jpg"), r"output_type.*'pil'"),
        (dict(num_images_per_class=0), r"num_images_per_class"),
        (dict(generator=[torch.Generator()]), r"1 generators for 2 images"),
        (
            dict(callback_on_step_end_tensor_inputs=["latents", "noise"]),
            r"`callback_on_step_end_tensor_inputs` \['noise'\] not in \['tokens', 'latents', 'mask'\]",
        ),
    ],
)
def test_bad_input_fails_before_any_sampling(pipe, monkeypatch, kwargs, match):
    calls = []
    monkeypatch.setattr(pipe.transformer, "forward", lambda *a, **k: calls.append(1))
    args = dict(class_labels=[1, 2], num_inference_steps=4, output_type="np")
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        pipe(**args)
    assert calls == []


@pytest.mark.parametrize("generator", ["abc", 0, [torch.Generator(), "abc"]], ids=["str", "int", "list with str"])
def test_generator_of_wrong_type_raises_naming_it(pipe, monkeypatch, generator):
    calls = []
    monkeypatch.setattr(pipe.transformer, "forward", lambda *a, **k: calls.append(1))
    with pytest.raises(TypeError, match=r"`generator` must be a torch.Generator, a list of them .* got"):
        pipe([1, 2], num_inference_steps=4, output_type="np", generator=generator)
    assert calls == []


def test_numpy_and_tensor_integers_are_class_labels(pipe):
    by_int = run(pipe, [3, 5])
    assert np.array_equal(run(pipe, [np.int64(3), np.int32(5)]), by_int)
    assert np.array_equal(run(pipe, np.array([3, 5]).tolist()), by_int)
    assert np.array_equal(
        pipe(np.int64(3), num_inference_steps=4, output_type="np", generator=gen(0)).images, run(pipe, [3])
    )
    assert pipe.class_ids(torch.tensor([3, 5])) == [3, 5]


def test_names_need_id2label():
    from parscale_ear_hf import ParScaleEARPipeline

    from conftest import tiny_components

    bare = ParScaleEARPipeline(**tiny_components())
    with pytest.raises(ValueError, match="no `id2label`"):
        bare(["digit 1"], num_inference_steps=2)


def record_calls(monkeypatch, module, method, keep):
    """Wrap ``module.method`` so that each call appends ``keep(args, output)`` to the returned list."""
    calls, original = [], getattr(module, method)

    def recording(*args, **kwargs):
        out = original(*args, **kwargs)
        calls.append(keep(args, out))
        return out

    monkeypatch.setattr(module, method, recording)
    return calls


def record_sampling(pipe, monkeypatch):
    """Backbone outputs, head conditions z, and the masks after each step (all ones before the first)."""
    hidden = record_calls(monkeypatch, pipe.transformer, "forward", lambda args, out: out)
    zs = record_calls(monkeypatch, pipe.energy_head, "sample", lambda args, out: args[0])
    masks = [torch.ones(2, 16, dtype=torch.bool)]
    return hidden, zs, masks


def check_mixing(hidden, zs, masks, cfgs):
    """Step k's head input is cfg_k * h_cond + (1 - cfg_k) * h_uncond at the predicted tokens (None: no guidance).

    The exact step's backbone returns the hidden states of the predicted tokens only, in raster order."""
    assert [h.shape[0] for h in hidden] == [2 if cfg is None else 4 for cfg in cfgs]
    for k, cfg in enumerate(cfgs):
        to_predict = masks[k] & ~masks[k + 1]
        assert hidden[k].shape[1] * 2 == int(to_predict.sum())
        if cfg is None:
            expected = hidden[k].flatten(0, 1)
        else:
            h_cond, h_uncond = hidden[k].chunk(2)
            expected = (cfg * h_cond + (1 - cfg) * h_uncond).flatten(0, 1)
        # The same float operations on the same numbers: bit for bit.
        assert torch.equal(zs[k], expected)


@pytest.mark.parametrize(
    "schedule,cfgs",
    # EAR: cfg_k = 1 + (cfg - 1) (N - max(1, m_k)) / N with m_k = 14, 11, 6, 0 tokens masked after
    # each of 4 steps (N = 16, cfg = 3): the last step uses 1 + 2 * 15/16 = 2.875, not 3.
    [("linear", [1.25, 1.625, 2.25, 2.875]), ("constant", [3.0, 3.0, 3.0, 3.0])],
)
def test_guidance_schedule_is_the_references(pipe, monkeypatch, schedule, cfgs):
    hidden, zs, masks = record_sampling(pipe, monkeypatch)

    def callback(p, step, timestep, tensors):
        masks.append(tensors["mask"].clone())
        return {}

    run(
        pipe,
        guidance_scale=3.0,
        guidance_schedule=schedule,
        callback_on_step_end=callback,
        callback_on_step_end_tensor_inputs=["mask"],
    )
    assert [int(m[0].sum()) for m in masks[1:]] == [14, 11, 6, 0]
    check_mixing(hidden, zs, masks, cfgs)


@pytest.mark.parametrize("start,after", [(3.0, 1.0), (3.0, 0.0), (1.0, 3.0)], ids=["off", "zero", "on"])
def test_a_callback_setting_guidance_scale_changes_the_next_steps(pipe, monkeypatch, start, after):
    # diffusers' dynamic guidance: a callback sets `pipe._guidance_scale`; <= 1 drops the unconditional pass.
    hidden, zs, masks = record_sampling(pipe, monkeypatch)

    def callback(p, step, timestep, tensors):
        masks.append(tensors["mask"].clone())
        if step == 1:
            p._guidance_scale = after
        return {}

    run(pipe, guidance_scale=start, callback_on_step_end=callback, callback_on_step_end_tensor_inputs=["mask"])
    # Linear schedule with m_k = 14, 11, 6, 0: cfg_k = 1 + (cfg - 1) * (2, 5, 10, 15) / 16.
    linear = {1.0: None, 0.0: None, 3.0: [1.25, 1.625, 2.25, 2.875]}
    cfgs = [
        None if linear[scale] is None else linear[scale][k] for k, scale in enumerate([start, start, after, after])
    ]
    check_mixing(hidden, zs, masks, cfgs)
    assert pipe.guidance_scale == after and pipe.do_classifier_free_guidance == (after > 1)


def test_call_sets_diffusers_properties(pipe):
    seen = []

    def callback(p, step, timestep, tensors):
        seen.append((p.num_timesteps, p.guidance_scale, p.do_classifier_free_guidance, p.interrupt))
        return {}

    run(pipe, guidance_scale=2.5, num_inference_steps=5, callback_on_step_end=callback)
    assert seen == [(5, 2.5, True, False)] * 5
    run(pipe, guidance_scale=1.0)
    assert (pipe.num_timesteps, pipe.guidance_scale, pipe.do_classifier_free_guidance) == (4, 1.0, False)


def test_interrupt_skips_the_remaining_steps(pipe, monkeypatch):
    hidden = record_calls(monkeypatch, pipe.transformer, "forward", lambda args, out: out)
    steps = []

    def callback(p, step, timestep, tensors):
        steps.append(step)
        p._interrupt = step == 1
        return {}

    latents = run(pipe, [1], output_type="latent", callback_on_step_end=callback)
    assert steps == [0, 1] and len(hidden) == 2
    # The 11 tokens still masked after step 1 were never sampled: they are the zeros of the start.
    assert int((latents[0] == 0).all(dim=0).sum()) == 11
    assert int((latents[0] != 0).all(dim=0).sum()) == 5
    # The next call starts without the interrupt.
    run(pipe, [1])
    assert len(hidden) == 2 + 4 and not pipe.interrupt


def test_callback_latents_are_the_tokens_and_a_new_one_replaces_them(pipe):
    revealed = {}

    def callback(p, step, timestep, tensors):
        assert torch.equal(tensors["latents"], tokens_to_latents(tensors["tokens"], 4))
        if step == 1:
            revealed["mask"] = ~tensors["mask"]
            return {**tensors, "latents": torch.full_like(tensors["latents"], 0.5)}
        return tensors  # the inputs, unchanged: they change nothing

    inputs = ["tokens", "latents", "mask"]
    latents = run(pipe, output_type="latent", callback_on_step_end=callback, callback_on_step_end_tensor_inputs=inputs)
    # Tokens revealed by steps 0 and 1 are never sampled again; the 11 others are sampled after the edit.
    before = tokens_to_latents(revealed["mask"].unsqueeze(-1), 4).expand_as(latents)
    assert int(revealed["mask"][0].sum()) == 5
    assert (latents[before] == 0.5).all() and (latents[~before] != 0.5).all()


def test_callback_returning_its_inputs_or_editing_latents_in_place(pipe):
    plain = run(pipe, output_type="latent")
    inputs = ["tokens", "latents", "mask"]

    def unchanged(p, step, timestep, tensors):
        return tensors

    assert torch.equal(
        run(pipe, output_type="latent", callback_on_step_end=unchanged, callback_on_step_end_tensor_inputs=inputs),
        plain,
    )

    def zero_in_place(p, step, timestep, tensors):
        if step == p.num_timesteps - 1:
            tensors["latents"].zero_()  # a view of the tokens
        return {}

    latents = run(
        pipe, output_type="latent", callback_on_step_end=zero_in_place, callback_on_step_end_tensor_inputs=inputs
    )
    assert torch.count_nonzero(plain) > 0 and torch.count_nonzero(latents) == 0

    def replace_in_the_dict(p, step, timestep, tensors):
        # diffusers' common test: put a new tensor into the dict it got, and return that dict.
        if step == p.num_timesteps - 1:
            tensors["latents"] = torch.zeros_like(tensors["latents"])
        return tensors

    latents = run(
        pipe, output_type="latent", callback_on_step_end=replace_in_the_dict, callback_on_step_end_tensor_inputs=inputs
    )
    assert torch.count_nonzero(latents) == 0

    def both_new(p, step, timestep, tensors):
        return {"tokens": tensors["tokens"].clone(), "latents": tensors["latents"].clone()}

    with pytest.raises(ValueError, match=r"returned both a new `tokens` and a new `latents` at step 0"):
        run(pipe, callback_on_step_end=both_new, callback_on_step_end_tensor_inputs=inputs)


@pytest.mark.parametrize(
    "labels",
    [[[3], [5]], ((3,), (5,)), torch.tensor([[3], [5]]), np.array([[3, 5]]), [["digit 3"], np.int64(5)]],
    ids=["nested list", "nested tuple", "2-d tensor", "2-d array", "mixed"],
)
def test_nested_class_labels_are_flattened(pipe, labels):
    # DiTPipeline accepts [[1], [1]] (diffusers' common tests batch labels that way).
    assert pipe.class_ids(labels) == [3, 5]
    assert np.array_equal(
        pipe(labels, num_inference_steps=4, output_type="np", generator=gen(0)).images, run(pipe, [3, 5])
    )


def test_more_steps_than_tokens_skip_the_steps_that_predict_nothing(pipe, monkeypatch):
    hidden = record_calls(monkeypatch, pipe.transformer, "forward", lambda args, out: out)
    masked, steps = [], []

    def callback(p, i, step, tensors):
        masked.append(int(tensors["mask"][0].sum()))
        steps.append((i, step, p.num_timesteps))
        return {}

    with pytest.warns(UserWarning, match=r"num_inference_steps=20 but only 16 steps predict tokens for N = 16"):
        latents = run(
            pipe,
            num_inference_steps=20,
            output_type="latent",
            callback_on_step_end=callback,
            callback_on_step_end_tensor_inputs=["tokens", "mask"],
        )
    # One token per step down to the last one, which waits for the last step (as in EAR); steps 15-18 would
    # predict nothing and do not run.
    assert masked == [15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0]
    assert steps == [(i, i, 16) for i in range(15)] + [(15, 19, 16)]
    assert len(hidden) == 16
    assert torch.count_nonzero(latents) == latents.numel()


@pytest.mark.parametrize("num_tokens", [1, 4, 16, 256])
@pytest.mark.parametrize("num_steps", [1, 2, 7, 16, 17, 64, 300])
def test_predicting_steps_are_the_schedules_steps_that_predict(num_steps, num_tokens):
    masked, expected = num_tokens, []
    for step in range(num_steps):
        after = mask_schedule(step, num_steps, num_tokens, masked)
        if after < masked:
            expected.append(step)
        masked = after
    assert predicting_steps(num_steps, num_tokens) == expected


def test_a_million_steps_cost_what_the_tokens_need(pipe, monkeypatch):
    """Time must not grow with steps that predict nothing: 10**6 steps on 16 tokens run 16 steps."""
    hidden = record_calls(monkeypatch, pipe.transformer, "forward", lambda args, out: out)
    with pytest.warns(UserWarning, match="the other 999984"):
        images = run(pipe, num_inference_steps=10**6)
    assert pipe.num_timesteps == 16 and len(hidden) == 16
    # Past N steps the schedule predicts one token per step, then the last: the same images for any such K.
    with pytest.warns(UserWarning):
        assert np.array_equal(images, run(pipe, num_inference_steps=10**6 + 7))


def test_the_skipped_steps_warning_points_at_the_callers_line(pipe):
    noise = torch.zeros(1, 16, *pipe.energy_head.noise_shape)
    with pytest.warns(UserWarning, match="predict nothing") as warned:
        pipe([1], num_inference_steps=20, output_type="latent", generator=gen(0))
        pipe.sample_tokens(torch.tensor([1]), torch.arange(16)[None], noise, 20, 1.0)
    # Not the pipeline's own files, nor torch.no_grad's wrapper: the two calls above, one line apart.
    assert [w.filename for w in warned] == [__file__, __file__]
    assert warned[1].lineno == warned[0].lineno + 1


def test_sample_tokens_reveals_in_the_given_order_with_each_tokens_noise(pipe):
    ids = torch.tensor([1, 2])
    orders = torch.stack([torch.randperm(16, generator=gen(s)) for s in (1, 2)])
    noise = pipe.energy_head.noise_from_uniform(torch.rand(2, 16, *pipe.energy_head.noise_shape, generator=gen(3)))
    masks = []

    def callback(p, step, timestep, tensors):
        masks.append(tensors["mask"].clone())
        return {}

    tokens = pipe.sample_tokens(
        ids, orders, noise, 4, 3.0, callback_on_step_end=callback, callback_on_step_end_tensor_inputs=["mask"]
    )
    assert tokens.shape == (2, 16, 4)
    # While m tokens are masked, they are orders[:, :m] (EAR's mask_by_order).
    for mask, m in zip(masks, [14, 11, 6, 0]):
        assert torch.equal(mask, torch.zeros(2, 16, dtype=torch.bool).scatter_(1, orders[:, :m], True))
    # noise[b, n] samples token n of image b: new noise for the last token of image 0 changes only it.
    last = orders[0, 0]
    other = noise.clone()
    other[0, last] = pipe.energy_head.noise_from_uniform(torch.rand(noise.shape[2:], generator=gen(4)))
    changed = (pipe.sample_tokens(ids, orders, other, 4, 3.0) != tokens).any(dim=-1)
    assert changed.nonzero().tolist() == [[0, int(last)]]


@pytest.mark.parametrize(
    "name,shape,match",
    [
        ("class_ids", (2, 1), r"`class_ids` must be a 1-d tensor of B >= 1 class ids, got shape \(2, 1\)"),
        ("orders", (2, 15), r"`orders` must have shape \(2, 16\) for 2 images of N = 16 tokens, got \(2, 15\)"),
        ("noise", (2, 16, 4), r"`noise` must have shape \(2, 16, 8\) for 2 images of N = 16 tokens, got \(2, 16, 4\)"),
    ],
)
def test_sample_tokens_refuses_wrong_shapes(pipe, name, shape, match):
    args = {
        "class_ids": torch.tensor([1, 2]),
        "orders": torch.stack([torch.randperm(16)] * 2),
        "noise": torch.zeros(2, 16, 8),
    }
    args[name] = torch.zeros(shape, dtype=args[name].dtype)
    with pytest.raises(ValueError, match=match):
        pipe.sample_tokens(**args, num_inference_steps=4, guidance_scale=3.0)


def test_call_checks_its_arguments_once_and_sample_tokens_checks_them_when_called_directly(pipe, monkeypatch):
    calls = []
    check_inputs = type(pipe).check_inputs

    def counting(self, *args, **kwargs):
        calls.append(args)
        return check_inputs(self, *args, **kwargs)

    monkeypatch.setattr(type(pipe), "check_inputs", counting)
    run(pipe, num_inference_steps=2, output_type="latent")
    assert len(calls) == 1
    ids, orders, noise = torch.tensor([1, 2]), torch.stack([torch.randperm(16)] * 2), torch.zeros(2, 16, 8)
    pipe.sample_tokens(ids, orders, noise, 2, 3.0)
    assert len(calls) == 2
    for bad, match in [({"num_inference_steps": 0}, "num_inference_steps"), ({"temperature": -1.0}, "temperature")]:
        with pytest.raises(ValueError, match=match):
            pipe.sample_tokens(ids, orders, noise, **{"num_inference_steps": 2, "guidance_scale": 3.0, **bad})
