"""`parscale-ear convert --mar`: a checkpoint in the format of LTH14/mar's main_mar.py becomes a saved pipeline that
from_pretrained, `parscale-ear generate`, the web demo and `parscale-ear eval` take.

The tiny checkpoint is made here from the MAR reference fixture (tests/fixtures/mar_reference/): MAR's own
state dict, key names included, saved as main_mar.py's misc.save_model saves it.
"""

import argparse
import hashlib
import json
from pathlib import Path

import datasets
import numpy as np
import PIL.Image
import pytest
import torch
from diffusers import AutoencoderKL
from huggingface_hub import ModelCard
from safetensors.torch import load_file

from parscale_ear_hf import DiffusionHead, MARTransformer, ParScaleEARPipeline
from parscale_ear_hf.app import DemoApp, Request
from parscale_ear_hf.cli import main
from parscale_ear_hf.convert import convert_mar_checkpoint, mar_state_dicts
from parscale_ear_hf.digit_classifier import DigitClassifier

FIXTURES = Path(__file__).parent / "fixtures"


def mar_weights() -> dict:
    return load_file(FIXTURES / "mar_reference" / "reference_weights.safetensors")


def save_checkpoint(path: Path, weights: dict, ema_weights: dict, **args) -> Path:
    """What main_mar.py's misc.save_model writes: {model, model_ema, optimizer, epoch, scaler, args}."""
    run_args = dict(model="mar_tiny", num_sampling_steps="100", label_drop_prob=0.1, attn_dropout=0.1,
                    proj_dropout=0.1, mask_ratio_min=0.7, buffer_size=4, blr=1e-4, **args)  # fmt: skip
    torch.save(
        {
            "model": weights,
            "model_ema": ema_weights,
            "optimizer": {"state": {}, "param_groups": [{"lr": 1e-4, "params": [0]}]},
            "epoch": 3,
            "scaler": {"scale": 65536.0},
            "args": argparse.Namespace(**run_args),
        },
        path,
    )
    return path


def tiny_vae(folder: Path, latent_channels: int) -> Path:
    torch.manual_seed(0)
    AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                  block_out_channels=(8, 8), latent_channels=latent_channels, norm_num_groups=4,
                  sample_size=8).save_pretrained(folder)  # fmt: skip
    return folder


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """A MAR-format checkpoint whose `model` and `model_ema` differ, and VAEs of 4 (right) and 8 channels."""
    root = tmp_path_factory.mktemp("mar")
    weights = mar_weights()
    ema = {k: v + 0.01 for k, v in weights.items()}
    return dict(
        checkpoint=save_checkpoint(root / "checkpoint-last.pth", weights, ema),
        weights=weights,
        ema=ema,
        vae=tiny_vae(root / "vae4", 4),
        vae8=tiny_vae(root / "vae8", 8),
    )


@pytest.fixture(scope="module")
def converted(made, tmp_path_factory):
    """The made checkpoint converted by the command, as a user runs it (EMA weights, the default)."""
    out = tmp_path_factory.mktemp("converted") / "mar-tiny"
    main(["convert", "--mar", str(made["checkpoint"]), "--vae", str(made["vae"]), "--output", str(out),
          "--num-heads", "2"])  # fmt: skip
    return out


def test_conversion_writes_a_pipeline_with_the_ema_weights_by_default(converted, made, tmp_path):
    pipe = ParScaleEARPipeline.from_pretrained(converted)
    transformer, head = pipe.transformer, pipe.energy_head
    assert isinstance(transformer, MARTransformer) and isinstance(head, DiffusionHead)
    assert isinstance(pipe.vae, AutoencoderKL) and pipe.vae.config.scaling_factor == 0.2325
    hybrid = pipe.lite_hybrid.config
    assert not hybrid.use_coarse and not hybrid.use_fine  # the identity: MAR has no LiteHybrid
    assert (transformer.config.buffer_size, transformer.config.class_dropout_prob) == (4, 0.1)
    assert head.config.num_sampling_steps == 100
    assert pipe.id2label is None  # 10 classes: not ImageNet's
    assert pipe.sampling_defaults["temperature"] == 1.0  # MAR's, not EAR's 0.7: pipe(labels) samples as MAR does
    expected = mar_state_dicts(made["ema"], transformer, head)
    for name, component in (("transformer", transformer), ("energy_head", head)):
        state = component.state_dict()
        assert sorted(state) == sorted(expected[name])
        assert all(torch.equal(state[k], expected[name][k]) for k in state), name
    record = json.loads((converted / "conversion.json").read_text())
    assert record["checkpoint"] == "checkpoint-last.pth" and record["weights"] == "model_ema"
    assert record["checkpoint_sha256"] == hashlib.sha256(made["checkpoint"].read_bytes()).hexdigest()
    raw = convert_mar_checkpoint(made["checkpoint"], made["vae"], tmp_path / "raw", weights="model", num_heads=2)
    assert torch.equal(raw.transformer.mask_token, made["weights"]["mask_token"])
    assert json.loads((tmp_path / "raw" / "conversion.json").read_text())["weights"] == "model"


def test_the_converted_pipeline_generates_alone_and_in_a_batch(converted):
    pipe = ParScaleEARPipeline.from_pretrained(converted)
    pipe.set_progress_bar_config(disable=True)
    gens = [torch.Generator().manual_seed(i) for i in range(3)]
    batch = pipe([1, 5, 9], num_inference_steps=4, guidance_scale=3.0, temperature=1.0, generator=gens,
                 output_type="np").images  # fmt: skip
    alone = pipe([5], num_inference_steps=4, guidance_scale=3.0, temperature=1.0,
                 generator=[torch.Generator().manual_seed(1)], output_type="np").images  # fmt: skip
    assert batch.shape == (3, 8, 8, 3) and np.isfinite(batch).all()
    np.testing.assert_allclose(batch[1], alone[0], atol=1e-5)


def test_the_cli_and_the_web_demo_generate_with_it(converted, tmp_path, capsys):
    grid = tmp_path / "grid.png"
    # Without --temperature / an empty field: the pipeline's saved default, MAR's 1.0.
    main(["generate", "--model", str(converted), "--labels", "1", "2", "--steps", "4", "--output", str(grid),
          "--device", "cpu"])  # fmt: skip
    assert "temperature 1.0," in capsys.readouterr().out and PIL.Image.open(grid).size[0] > 0
    request = Request(str(converted), "1, 2", images_per_class=1, steps=4, guidance=3.0, temperature=None, seed=5)
    out = DemoApp([str(converted)]).generate(request)
    assert len(out["images"]) == 2 and out["settings"]["class_ids"] == [1, 2]
    assert out["settings"]["temperature"] == 1.0


def test_the_fid_evaluation_scores_it(converted, tmp_path):
    """`parscale-ear eval` on the converted pipeline (a digit classifier stands in for Inception: no download)."""
    torch.manual_seed(0)
    DigitClassifier(in_channels=3, image_size=8, width=4, feature_dim=6, dropout=0.0).save_pretrained(tmp_path / "clf")
    rng = np.random.default_rng(0)
    images = [PIL.Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)) for _ in range(20)]
    datasets.Dataset.from_dict({"image": images, "label": [i % 10 for i in range(20)]}).save_to_disk(tmp_path / "data")
    main(["eval", "--model", str(converted), "--output-dir", str(tmp_path / "eval"), "--extractor", "digit",
          "--classifier", str(tmp_path / "clf"), "--dataset", str(tmp_path / "data"), "--split", "train",
          "--reference-cache-dir", str(tmp_path / "refs"), "--images-per-class", "1", "--batch-size", "5",
          "--steps", "2"])  # fmt: skip
    record = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert record["samples"]["total"] == 10 and record["metrics"]["demo_fid"] > 0
    # No --temperature: the pipeline's (MAR's 1.0) is used, and recorded as such.
    sampling = json.loads((tmp_path / "eval" / "eval_config.json").read_text())["sampling"]
    assert (sampling["temperature"], sampling["guidance_schedule"]) == (1.0, "linear")


def test_the_model_card_states_origin_license_and_paper(converted):
    card = ModelCard.load(converted / "README.md")
    text = str(card)
    assert card.data.license == "mit" and "mar" in card.data.tags
    assert "[LTH14/mar](https://github.com/LTH14/mar)" in text and "`checkpoint-last.pth`" in text
    assert "MAR (encoder 24x2, decoder 32x2)" in text and "`model_ema` (the EMA" in text
    assert "MIT, as [LTH14/mar]" in text and "Tianhong" in text
    assert "Autoregressive Image Generation without Vector Quantization" in text and "2406.11838" in text
    assert 'ParScaleEARPipeline.from_pretrained("' + str(converted) + '")' in text
    assert "guidance_scale=3.0" in text and "temperature=1.0" in text
    assert "MAR-B 2.31 / 281.7" in text and "the authors' figures, not measurements of" in text


def test_a_released_size_is_named_and_imagenet_names_come_from_timm():
    from parscale_ear_hf.convert import imagenet_id2label, mar_model_name

    with torch.device("meta"):
        base = MARTransformer()
    assert mar_model_name(base, {}) == ("mar_base", "MAR-B")
    assert mar_model_name(base, {"model": "mar_large"}) == ("mar_large", "MAR-L")
    names = imagenet_id2label()
    if names is None:
        pytest.skip("timm (its ImageNet class list) is not installed")
    assert len(names) == 1000 and names[0] == "tench, Tinca tinca" and names[207] == "golden retriever"


def failing_convert(capsys, tmp_path, *argv):
    out = tmp_path / "out"
    with pytest.raises(SystemExit):
        main(["convert", *argv, "--output", str(out), "--num-heads", "2"])
    assert not out.exists()  # nothing written
    return capsys.readouterr().err


def test_an_ear_checkpoint_given_as_mar_and_the_reverse_are_named(tmp_path, made, capsys):
    ear = load_file(FIXTURES / "ear_reference" / "reference_weights.safetensors")
    ear_checkpoint = save_checkpoint(tmp_path / "ear.pth", ear, ear)
    err = failing_convert(capsys, tmp_path, "--mar", str(ear_checkpoint), "--vae", str(made["vae"]))
    assert "checkpoint of EAR" in err and "`scoreloss.net.*`" in err and "--mar expects one of MAR" in err
    assert "pass it as --checkpoint" in err
    err = failing_convert(capsys, tmp_path, "--checkpoint", str(made["checkpoint"]), "--vae", str(made["vae"]))
    assert "checkpoint of MAR" in err and "`encoder_blocks.*`" in err and "pass it as --mar" in err


def test_a_vae_of_other_channels_is_named_with_both(tmp_path, made, capsys):
    err = failing_convert(capsys, tmp_path, "--mar", str(made["checkpoint"]), "--vae", str(made["vae8"]))
    assert "tokens of 4 channels" in err and "latent_channels=8" in err and "z_proj.weight (24, 4)" in err


def test_a_truncated_checkpoint_is_named(tmp_path, made, capsys):
    data = made["checkpoint"].read_bytes()
    cut = tmp_path / "cut.pth"
    cut.write_bytes(data[: len(data) // 2])
    err = failing_convert(capsys, tmp_path, "--mar", str(cut), "--vae", str(made["vae"]))
    assert "is not a PyTorch checkpoint" in err and "truncated" in err


def test_a_failed_conversion_leaves_an_existing_output_folder_as_it_was(tmp_path, made, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    for vae in (made["vae8"], tmp_path / "no-such-vae"):
        with pytest.raises(SystemExit):
            main(["convert", "--mar", str(made["checkpoint"]), "--vae", str(vae), "--output", str(out),
                  "--num-heads", "2"])  # fmt: skip
        assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith((".out", "out"))) == ["out"]
        assert [p.name for p in out.iterdir()] == ["notes.txt"] and (out / "notes.txt").read_text() == "mine"
    assert "latent_channels=8" in capsys.readouterr().err


def test_missing_and_unexpected_keys_are_named_by_mars_names(tmp_path, made):
    weights = dict(made["weights"])
    del weights["decoder_blocks.1.mlp.fc2.bias"]
    with pytest.raises(ValueError, match=r"`decoder_blocks\.1\.mlp\.fc2\.bias` is missing"):
        convert_mar_checkpoint(save_checkpoint(tmp_path / "a.pth", weights, weights), made["vae"], tmp_path / "a",
                               num_heads=2)  # fmt: skip
    weights = {**made["weights"], "diffloss.net.extra.weight": torch.zeros(2)}
    with pytest.raises(ValueError, match=r"no parameter .*diffloss\.net\.extra\.weight"):
        convert_mar_checkpoint(save_checkpoint(tmp_path / "b.pth", weights, weights), made["vae"], tmp_path / "b",
                               num_heads=2)  # fmt: skip
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_heads_of_an_unknown_width_must_be_given(tmp_path, made):
    with pytest.raises(ValueError, match="not MAR-B / L / H's .*pass --num-heads"):
        convert_mar_checkpoint(made["checkpoint"], made["vae"], tmp_path / "o")
