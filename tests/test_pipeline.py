"""ParScaleEARPipeline sampling: outputs, determinism, guidance, schedule, callbacks, bad input."""

import numpy as np
import PIL.Image
import pytest
import torch

from parscale_ear_hf.pipeline_parscale_ear import mask_schedule

from conftest import float32_rounding_bound, tiny_pipeline


def gen(seed):
    return torch.Generator().manual_seed(seed)


def run(pipe, labels=(1, 2), **kwargs):
    kwargs.setdefault("num_inference_steps", 4)
    kwargs.setdefault("output_type", "np")
    kwargs.setdefault("generator", gen(0))
    return pipe(list(labels), **kwargs).images


@pytest.mark.parametrize("steps", [1, 2, 4, 7, 16, 64, 256])
def test_mask_schedule_reveals_every_token_once(steps):
    n = 256 if steps > 16 else 16
    masked, seen = n, 0
    for step in range(steps):
        nxt = mask_schedule(step, steps, n, masked)
        assert 0 <= nxt < masked  # at least one token per step
        seen += masked - nxt
        masked = nxt
    assert masked == 0 and seen == n


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
        (dict(class_labels=[]), r"class_labels"),
        (dict(num_inference_steps=0), r"num_inference_steps.*\[1, 16\]"),
        (dict(num_inference_steps=17), r"num_inference_steps.*got 17"),
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
        (dict(callback_on_step_end_tensor_inputs=["latents"]), r"callback_on_step_end_tensor_inputs"),
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
