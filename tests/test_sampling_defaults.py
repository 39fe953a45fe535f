"""A pipeline's saved sampling defaults (`sampling_defaults`): what ``pipe(...)``, ``sample_tokens``, the CLI, the
evaluation and the web demo use for a sampling argument left out. A pipeline converted from MAR saves MAR's
temperature (1.0), so that ``pipe(labels)`` samples as MAR does, not at EAR's 0.7."""

import json

import pytest
import torch

from parscale_ear_hf import ParScaleEARPipeline, cli
from parscale_ear_hf.app import DemoApp, Request

from conftest import ID2LABEL, tiny_components


def latents(pipe, **kwargs):
    return pipe([3, 7], num_inference_steps=4, generator=torch.Generator().manual_seed(0), output_type="latent",
                **kwargs).images  # fmt: skip


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A tiny pipeline saved with MAR's temperature as its default."""
    folder = tmp_path_factory.mktemp("defaults") / "pipe"
    pipe = ParScaleEARPipeline(**tiny_components(), id2label=ID2LABEL, sampling_defaults={"temperature": 1.0})
    pipe.save_pretrained(folder)
    return folder


def test_a_left_out_argument_takes_the_saved_default_and_a_given_one_wins(saved):
    pipe = ParScaleEARPipeline.from_pretrained(saved)
    pipe.set_progress_bar_config(disable=True)
    assert json.loads((saved / "model_index.json").read_text())["sampling_defaults"] == {"temperature": 1.0}
    assert pipe.sampling_defaults == {
        "num_inference_steps": 64, "guidance_scale": 3.0, "guidance_schedule": "linear", "temperature": 1.0
    }  # fmt: skip
    left_out, at_one, at_ear = latents(pipe), latents(pipe, temperature=1.0), latents(pipe, temperature=0.7)
    assert torch.equal(left_out, at_one) and not torch.equal(left_out, at_ear)
    # sample_tokens too; and a pipeline without saved defaults samples at EAR's 0.7.
    ids, orders = torch.tensor([3]), torch.arange(16)[None]
    noise = torch.randn(1, 16, *pipe.energy_head.noise_shape, generator=torch.Generator().manual_seed(1))
    tokens = pipe.sample_tokens(ids, orders, noise, 4, 3.0)
    assert torch.equal(tokens, pipe.sample_tokens(ids, orders, noise, 4, 3.0, temperature=1.0))
    assert not torch.equal(tokens, pipe.sample_tokens(ids, orders, noise, 4, 3.0, temperature=0.7))
    plain = ParScaleEARPipeline(**pipe.components, id2label=ID2LABEL)
    assert plain.sampling_defaults["temperature"] == 0.7 and torch.equal(latents(plain), at_ear)
    # from_pretrained can override what was saved, and save_pretrained keeps it.
    other = ParScaleEARPipeline.from_pretrained(saved, sampling_defaults={"guidance_schedule": "constant"})
    assert other.sampling_defaults["guidance_schedule"] == "constant" and other.sampling_defaults["temperature"] == 0.7


@pytest.mark.parametrize(
    ("defaults", "error", "message"),
    [
        ({"temp": 1.0}, ValueError, r"unknown key\(s\) \['temp'\]; accepted: num_inference_steps, guidance_scale"),
        ({"temperature": -1.0}, ValueError, r"`sampling_defaults` \{'temperature': -1.0\}: .*`temperature`"),
        ({"guidance_schedule": "cosine"}, ValueError, r"`sampling_defaults` .*`guidance_schedule` must be one of"),
        ({"num_inference_steps": 0}, ValueError, r"`sampling_defaults` .*`num_inference_steps`"),
        ([("temperature", 1.0)], TypeError, r"`sampling_defaults` must be a dict or None"),
    ],
)
def test_bad_defaults_are_refused_at_construction_naming_them(defaults, error, message):
    with pytest.raises(error, match=message):
        ParScaleEARPipeline(**tiny_components(), sampling_defaults=defaults)


def test_the_cli_and_the_web_demo_use_the_pipelines_default_unless_given(saved, tmp_path, capsys):
    out = tmp_path / "grid.png"
    cli.main(["generate", "--model", str(saved), "--labels", "3", "--steps", "4", "--output", str(out)])
    assert "guidance 3.0, temperature 1.0," in capsys.readouterr().out
    cli.main(["generate", "--model", str(saved), "--labels", "3", "--steps", "4", "--temperature", "0.5",
              "--output", str(out)])  # fmt: skip
    assert "temperature 0.5," in capsys.readouterr().out
    fields = dict(images_per_class=1, steps=4, guidance=3.0, seed=0)
    app = DemoApp([str(saved)])
    left_out = app.generate(Request(str(saved), "3", temperature=None, **fields))
    given = app.generate(Request(str(saved), "3", temperature=1.0, **fields))
    assert left_out["settings"]["temperature"] == 1.0 and "temperature=1.0," in left_out["snippet"]
    assert left_out["images"][0][0].tobytes() == given["images"][0][0].tobytes()
