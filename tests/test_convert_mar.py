"""`parscale-ear convert --mar`: a checkpoint in the format of LTH14/mar's main_mar.py becomes our components.

The tiny checkpoint is made here from the MAR reference fixture (tests/fixtures/mar_reference/): MAR's own
state dict, key names included, saved as main_mar.py's misc.save_model saves it.
"""

import argparse
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL
from safetensors.torch import load_file

from parscale_ear_hf import DiffusionHead, MARTransformer
from parscale_ear_hf.cli import main
from parscale_ear_hf.convert import convert_mar_checkpoint, mar_state_dicts

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


def test_conversion_round_trips_the_ema_weights_by_default(tmp_path, made, capsys):
    out = tmp_path / "mar"
    main(["convert", "--mar", str(made["checkpoint"]), "--vae", str(made["vae"]), "--output", str(out),
          "--num-heads", "2"])  # fmt: skip
    assert "MAR encoder 24x2 + decoder 32x2" in capsys.readouterr().out
    transformer = MARTransformer.from_pretrained(out / "transformer")
    head = DiffusionHead.from_pretrained(out / "energy_head")
    assert AutoencoderKL.from_pretrained(out / "vae").config.scaling_factor == 0.2325
    assert (transformer.config.buffer_size, transformer.config.class_dropout_prob) == (4, 0.1)
    assert head.config.num_sampling_steps == 100
    expected = mar_state_dicts(made["ema"], transformer, head)
    for name, component in (("transformer", transformer), ("energy_head", head)):
        state = component.state_dict()
        assert sorted(state) == sorted(expected[name])
        assert all(torch.equal(state[k], expected[name][k]) for k in state), name
    raw = convert_mar_checkpoint(made["checkpoint"], made["vae"], tmp_path / "raw", weights="model", num_heads=2)
    assert torch.equal(raw["transformer"].mask_token, made["weights"]["mask_token"])


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
