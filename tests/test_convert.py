"""The converter: a checkpoint in the format of the authors' main_ear.py becomes a saved pipeline.

The tiny checkpoint is built from the reference fixture (tests/fixtures/ear_reference/): its
state dict is the authors' model's own, key names included, saved as main_ear.py saves it.
"""

import argparse
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL
from safetensors.torch import load_file
from test_ear_reference import ATOL, CASES, EAR, FIXTURE, assert_matches

from parscale_ear_hf import ParScaleEARPipeline
from parscale_ear_hf.cli import main
from parscale_ear_hf.convert import EAR_LATENT_SCALE, convert_ear_checkpoint, read_ear_checkpoint

ROOT = Path(__file__).parent.parent


def ear_weights() -> dict:
    return load_file(FIXTURE / "reference_weights.safetensors")


def save_checkpoint(path: Path, weights: dict, ema_weights: dict | None = None, **args) -> Path:
    """What main_ear.py's misc.save_model writes: {model, model_ema, optimizer, epoch, scaler, args};
    ``args`` entries given as None are left out."""
    run_args = dict(model="ear_tiny", buffer_size=EAR["buffer_size"], label_drop_prob=EAR["label_drop_prob"],
                    proj_dropout=EAR["proj_dropout"], mask_ratio_min=EAR["mask_ratio_min"], blr=1e-4)  # fmt: skip
    run_args = {k: v for k, v in {**run_args, **args}.items() if v is not None}
    torch.save(
        {
            "model": weights,
            "model_ema": ema_weights if ema_weights is not None else weights,
            "optimizer": {"state": {0: {"step": torch.tensor(3.0)}}, "param_groups": [{"lr": 1e-4, "params": [0]}]},
            "epoch": 3,
            "scaler": {"scale": 65536.0, "growth_factor": 2.0, "backoff_factor": 0.5, "growth_interval": 2000},
            "args": argparse.Namespace(**run_args),
        },
        path,
    )
    return path


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory):
    """A tiny diffusers AutoencoderKL: 16x16 RGB images, 4x4x4 latents (the fixture's token grid)."""
    folder = tmp_path_factory.mktemp("vae") / "kl"
    torch.manual_seed(0)
    AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(8, 8, 8),
        latent_channels=EAR["vae_embed_dim"],
        norm_num_groups=4,
        sample_size=16,
    ).save_pretrained(folder)
    return folder


def hidden_states(pipe) -> torch.Tensor:
    with torch.no_grad():
        return pipe.transformer.eval()(CASES["hidden.tokens"], CASES["hidden.labels"], CASES["hidden.mask"])


def test_converted_pipeline_is_the_reference(tmp_path, vae_dir):
    raw = ear_weights()
    ema = {k: v + 0.01 for k, v in raw.items()}  # tells the two state dicts apart
    checkpoint = save_checkpoint(tmp_path / "checkpoint-last.pth", raw, ema)
    convert_ear_checkpoint(checkpoint, vae_dir, tmp_path / "ema", num_heads=EAR["decoder_num_heads"])
    convert_ear_checkpoint(checkpoint, vae_dir, tmp_path / "raw", weights="model", num_heads=EAR["decoder_num_heads"])
    pipe = ParScaleEARPipeline.from_pretrained(tmp_path / "raw")
    assert_matches(hidden_states(pipe), CASES["hidden.out"], "hidden states of the converted pipeline")
    ema_pipe = ParScaleEARPipeline.from_pretrained(tmp_path / "ema")
    assert (hidden_states(ema_pipe) - CASES["hidden.out"]).abs().max() > 100 * ATOL  # the default is model_ema
    assert torch.equal(ema_pipe.energy_head.out.bias, ema["scoreloss.net.final_layer.linear.bias"])

    t, h, lite = pipe.transformer.config, pipe.energy_head.config, pipe.lite_hybrid.config
    assert (t.hidden_size, t.num_layers, t.num_heads, t.grid_size, t.buffer_size) == (32, 2, 4, 4, EAR["buffer_size"])
    # Training-only fields come from the checkpoint's args (the fixture's differ from our defaults).
    from_args = (EAR["label_drop_prob"], EAR["proj_dropout"], EAR["mask_ratio_min"])
    assert (t.class_dropout_prob, t.dropout, t.mask_ratio_min) == from_args
    assert t.mlp_activation == "gelu" and h.block_norm_affine and not h.temperature_scales_final_layer
    assert not (lite.use_coarse or lite.use_fine)
    assert pipe.vae.config.scaling_factor == EAR_LATENT_SCALE
    images = pipe([1], num_inference_steps=4, generator=torch.Generator().manual_seed(0), output_type="np").images
    assert images.shape == (1, 16, 16, 3)


def test_cli_and_example_script_convert(tmp_path, vae_dir, capsys):
    checkpoint = save_checkpoint(tmp_path / "c.pth", ear_weights())
    main(["convert", "--checkpoint", str(checkpoint), "--vae", str(vae_dir), "--output-dir", str(tmp_path / "a"),
          "--num-heads", "4"])  # fmt: skip
    assert "wrote" in capsys.readouterr().out
    command = [sys.executable, str(ROOT / "examples" / "convert_ear_checkpoint.py"), "--checkpoint", str(checkpoint),
               "--vae", str(vae_dir), "--output-dir", str(tmp_path / "b"), "--num-heads", "4"]  # fmt: skip
    proc = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    for folder in ("a", "b"):
        assert_matches(
            hidden_states(ParScaleEARPipeline.from_pretrained(tmp_path / folder)), CASES["hidden.out"], folder
        )


def test_a_missing_key_is_named(tmp_path, vae_dir):
    weights = ear_weights()
    del weights["decoder_blocks.1.mlp.fc2.bias"]
    checkpoint = save_checkpoint(tmp_path / "c.pth", weights)
    with pytest.raises(ValueError, match=r"`decoder_blocks\.1\.mlp\.fc2\.bias` is missing"):
        convert_ear_checkpoint(checkpoint, vae_dir, tmp_path / "out", num_heads=4)
    assert not (tmp_path / "out").exists()


def test_a_tensor_of_another_shape_is_named_with_both_shapes(tmp_path, vae_dir):
    weights = ear_weights()
    weights["scoreloss.net.res_blocks.0.mlp.2.weight"] = torch.zeros(32, 16)
    checkpoint = save_checkpoint(tmp_path / "c.pth", weights)
    with pytest.raises(ValueError, match=r"`scoreloss\.net\.res_blocks\.0\.mlp\.2\.weight` has shape \(32, 16\), "
                       r"but energy_head\.blocks\.0\.mlp\.2\.weight needs \(32, 32\)"):  # fmt: skip
        convert_ear_checkpoint(checkpoint, vae_dir, tmp_path / "out", num_heads=4)


def test_an_unexpected_key_is_named(tmp_path, vae_dir):
    weights = ear_weights()
    weights["diffloss.net.time_embed.weight"] = torch.zeros(2)  # e.g. a MAR checkpoint
    checkpoint = save_checkpoint(tmp_path / "c.pth", weights)
    with pytest.raises(ValueError, match=r"belong to no parameter.*diffloss\.net\.time_embed\.weight"):
        convert_ear_checkpoint(checkpoint, vae_dir, tmp_path / "out", num_heads=4)


def test_config_that_the_shapes_do_not_show_comes_from_args_or_flags(tmp_path, vae_dir):
    checkpoint = save_checkpoint(tmp_path / "c.pth", ear_weights())
    with pytest.raises(ValueError, match=r"hidden size 32 .* pass --num-heads"):
        convert_ear_checkpoint(checkpoint, vae_dir, tmp_path / "out")
    with pytest.raises(ValueError, match=r"20 positions; minus buffer_size=64 .* --buffer-size"):
        no_buffer_arg = save_checkpoint(tmp_path / "d.pth", ear_weights(), buffer_size=None)
        convert_ear_checkpoint(no_buffer_arg, vae_dir, tmp_path / "out", num_heads=4)
    # EAR-B's name in args gives its 12 heads; 32 is not divisible by 12, which the config refuses.
    with pytest.raises(ValueError, match="`hidden_size`=32 must be divisible by `num_heads`=12"):
        ear_base = save_checkpoint(tmp_path / "e.pth", ear_weights(), model="ear_base")
        convert_ear_checkpoint(ear_base, vae_dir, tmp_path / "out")


def test_checkpoints_are_read_without_unpickling_code(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("ran code from a checkpoint",))

    path = tmp_path / "evil.pth"
    torch.save({"model": ear_weights(), "args": Evil()}, path)
    with pytest.raises(ValueError, match="never rebuilds other objects") as info:
        read_ear_checkpoint(path)
    assert "weights_only" not in str(info.value)  # torch's advice to turn the check off is not passed on
    with pytest.raises(ValueError, match="`--weights` must be one of"):
        read_ear_checkpoint(path, weights="ema")
    no_ema = tmp_path / "no_ema.pth"
    torch.save({"model": ear_weights(), "model_ema": None}, no_ema)
    with pytest.raises(ValueError, match="has no `model_ema` state dict"):
        read_ear_checkpoint(no_ema)
    state, args = read_ear_checkpoint(no_ema, weights="model")
    assert sorted(state) == sorted(ear_weights()) and args == {}


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--num-heads", "0"], "`--num-heads` must be an integer >= 1, got 0"),
        (["--buffer-size", "0"], "`--buffer-size` must be an integer >= 1, got 0"),
        (["--vae-scaling-factor", "0"], "`--vae-scaling-factor` must be a finite number above 0, got 0.0"),
        (["--vae-scaling-factor", "nan"], "`--vae-scaling-factor` must be a finite number above 0, got nan"),
        (["--vae", "/nope/kl16"], "--vae '/nope/kl16' is not a diffusers AutoencoderKL folder"),
        (["--checkpoint", "/nope/c.pth"], "--checkpoint '/nope/c.pth' is not a file"),
    ],
)
def test_bad_flags_are_refused_before_the_checkpoint_is_read(tmp_path, vae_dir, monkeypatch, capsys, flags, message):
    checkpoint = save_checkpoint(tmp_path / "c.pth", ear_weights())
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("the checkpoint was read"))
    argv = ["convert", "--checkpoint", str(checkpoint), "--vae", str(vae_dir), "--output-dir", str(tmp_path / "o")]
    with pytest.raises(SystemExit) as exit_info:
        main([*argv, *flags])
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, err
    assert not (tmp_path / "o").exists()


def test_a_file_of_random_bytes_is_named_without_torchs_advice(tmp_path, vae_dir, capsys):
    path = tmp_path / "random.pth"
    path.write_bytes(
        torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(0)).byte().numpy().tobytes()
    )
    with pytest.raises(SystemExit):
        main(["convert", "--checkpoint", str(path), "--vae", str(vae_dir), "--output-dir", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert f"{path} is not a PyTorch checkpoint" in err and "weights_only" not in err
