"""MAR's KL-16 VAE becomes a diffusers AutoencoderKL that computes what MAR's `models/vae.py` computes.

`tests/fixtures/kl16_reference/` holds numbers recorded from MAR's own code (LTH14/mar at fe470ac,
by the `make_fixture.py` there) at a small config of the KL-16 family: its weights under their
LDM names, images and latents, MAR's posterior moments and decodes in float32 and in float64;
and the key list of the full KL-16 (every key and shape of MAR's model at its real config).

Bounds. In float64 ours and MAR's agree to 1e-12 (measured 5.5e-15): the mapping is exact, since a
wrong tensor anywhere moves the outputs by O(0.1). In float32 the bound is 1e-5 (absolute, outputs
of size up to 1.5): float32 rounding only. MAR's own float32 outputs are up to 1.8e-6 from its
float64 ones (recorded in the fixture), ours up to 2.6e-6 (a different summation order: diffusers'
attention is a Linear and SDPA where MAR has 1x1 convs and bmm), so the two differ by at most
about 4.5e-6, some 40 float32 ulps at 1.5 over the ~20 layers in a row; 1e-5 leaves a factor of 2
for other BLAS blockings. A transposed attention projection moves the outputs by > 1e-3.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL
from safetensors.torch import load_file
from test_convert import save_checkpoint
from test_ear_reference import EAR

from parscale_ear_hf import EARTransformer, EnergyHead, ParScaleEARPipeline
from parscale_ear_hf.cli import main
from parscale_ear_hf.convert import EAR_LATENT_SCALE, ear_key
from parscale_ear_hf.convert_vae import (
    KL16_CONFIG,
    autoencoder_from_ldm,
    ldm_key,
    ldm_shape,
    mar_vae_config,
    read_ldm_checkpoint,
)

ROOT = Path(__file__).parent.parent
FIXTURE = Path(__file__).parent / "fixtures" / "kl16_reference"
RECORD = json.loads((FIXTURE / "config.json").read_text())
SMALL = RECORD["small"]
SMALL_CONFIG = mar_vae_config(
    [SMALL["ch"] * m for m in SMALL["ch_mult"]], SMALL["num_res_blocks"], SMALL["embed_dim"], SMALL["resolution"]
)
TENSORS = load_file(FIXTURE / "tensors.safetensors")
ATOL_FLOAT32, ATOL_FLOAT64 = 1e-5, 1e-12  # see the module docstring


def mar_weights() -> dict:
    """MAR's small model's state dict, LDM names (stored as float8 values; MAR ran on them in float32)."""
    return {k: v.float() for k, v in load_file(FIXTURE / "weights.safetensors").items()}


def outputs(autoencoder, dtype=torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """``(moments, decoded)`` of the fixture's images and latents, as MAR's fixture recorded them."""
    autoencoder = autoencoder.to(dtype)
    with torch.no_grad():
        moments = autoencoder.encode(TENSORS["images"].to(dtype)).latent_dist.parameters
        return moments, autoencoder.decode(TENSORS["latents"].to(dtype)).sample


def ldm_state_dict(autoencoder) -> dict:
    """A diffusers AutoencoderKL's weights under their LDM names and shapes (the converter's table, backwards)."""
    levels = len(autoencoder.config.block_out_channels)
    return {ldm_key(k, levels): v.reshape(ldm_shape(v.shape)) for k, v in autoencoder.state_dict().items()}


def shapes_only(config: dict) -> dict:
    """The LDM keys and shapes of the MAR-style VAE of ``config``, as meta tensors (no memory, no data)."""
    with torch.device("meta"):
        return ldm_state_dict(AutoencoderKL(**config))


@pytest.fixture(scope="module")
def kl16(tmp_path_factory):
    """A full-size KL-16 checkpoint as MAR ships kl16.ckpt ({"model": state_dict}, LDM names), random weights;
    and the diffusers state dict it was made from."""
    torch.manual_seed(0)
    autoencoder = AutoencoderKL(**KL16_CONFIG)
    path = tmp_path_factory.mktemp("mar") / "kl16.ckpt"
    torch.save({"model": ldm_state_dict(autoencoder)}, path)
    return path, autoencoder.state_dict()


def test_the_fixture_has_every_kind_of_layer_of_kl16():
    keys = set(mar_weights())
    assert "encoder.down.1.attn.0.q.weight" in keys  # attention in the encoder's last level
    assert {"encoder.mid.attn_1.q.weight", "decoder.mid.attn_1.q.weight", "encoder.down.0.downsample.conv.weight",
            "decoder.up.1.upsample.conv.weight"} <= keys  # fmt: skip
    assert {"encoder.down.1.block.0.nin_shortcut.weight", "decoder.up.0.block.0.nin_shortcut.weight"} <= keys
    assert not any(k.startswith("decoder.up.") and ".attn." in k for k in keys)  # as MAR builds its Decoder
    full = json.loads((FIXTURE / "kl16_keys.json").read_text())
    assert sorted({k.split(".attn")[0] for k in full if ".attn" in k}) == [
        "decoder.mid", "encoder.down.4", "encoder.mid"
    ]  # fmt: skip


def test_converted_weights_encode_and_decode_as_mars_vae():
    autoencoder = autoencoder_from_ldm(mar_weights(), SMALL_CONFIG)
    for dtype, suffix, atol in ((torch.float32, "", ATOL_FLOAT32), (torch.float64, "_float64", ATOL_FLOAT64)):
        for name, ours in zip(("moments", "decoded"), outputs(autoencoder, dtype)):
            theirs = TENSORS[name + suffix]
            assert ours.shape == theirs.shape and ours.dtype == theirs.dtype
            err = (ours - theirs).abs().max().item()
            assert err <= atol, f"{name} in {dtype}: max |ours - MAR's| = {err:.3g} > {atol}"
    # The bound has teeth: a (C, C) projection taken transposed, as a wrong reshape would, is far outside it.
    weights = mar_weights()
    weights["encoder.down.1.attn.0.q.weight"] = weights["encoder.down.1.attn.0.q.weight"].transpose(0, 1)
    moments, _ = outputs(autoencoder_from_ldm(weights, SMALL_CONFIG))
    assert (moments - TENSORS["moments"]).abs().max() > 100 * ATOL_FLOAT32


def test_every_key_of_kl16_maps_to_a_diffusers_parameter_of_its_shape():
    recorded = {k: tuple(v) for k, v in json.loads((FIXTURE / "kl16_keys.json").read_text()).items()}
    mapped = {k: tuple(v.shape) for k, v in shapes_only(KL16_CONFIG).items()}
    assert len(mapped) == len(recorded) == 312  # one LDM key per diffusers parameter, none left out
    assert mapped == recorded


def test_every_layout_of_a_checkpoint_is_read_and_ldm_loss_keys_are_ignored(tmp_path):
    weights = mar_weights()
    losses = {"loss.logvar": torch.zeros(()), "loss.discriminator.main.0.weight": torch.zeros(64, 3, 4, 4)}
    for layout, content in (("model", {"model": weights}), ("state_dict", {"state_dict": {**weights, **losses},
                            "global_step": 3}), ("bare", weights)):  # fmt: skip
        torch.save(content, tmp_path / f"{layout}.ckpt")
        autoencoder = autoencoder_from_ldm(read_ldm_checkpoint(tmp_path / f"{layout}.ckpt"), SMALL_CONFIG)
        moments, _ = outputs(autoencoder)
        assert (moments - TENSORS["moments"]).abs().max() <= ATOL_FLOAT32, layout


def test_a_checkpoint_of_another_architecture_is_refused_with_the_keys_named():
    kl8 = mar_vae_config((128, 256, 512, 512), 2, 4, 256)  # LDM's / SD's KL-8: embed_dim 4, ch_mult (1, 2, 4, 4)
    kl8["down_block_types"] = ("DownEncoderBlock2D",) * 4  # without attention in its levels
    with pytest.raises(ValueError) as info:
        autoencoder_from_ldm(shapes_only(kl8), source="kl8.ckpt")
    message = str(info.value)
    assert message.startswith("kl8.ckpt is not the VAE to convert; keys 68 missing (`encoder.down.3.downsample.conv")
    assert "140 of another shape (`encoder.down.1.block.0.conv1.weight` (256, 128, 3, 3) where (128, 128" in message
    assert "4 unexpected (`decoder.up.0.block.0.nin_shortcut.bias`" in message
    assert "Accepted: an LDM KL-VAE as MAR's models/vae.py builds it, with channels (128, 128, 256, 256" in message

    vq = shapes_only(KL16_CONFIG)  # LDM's VQ-f16: the same network around a codebook of 16384 x 8
    vq.update({"quantize.embedding.weight": torch.empty(16384, 8), "quant_conv.weight": torch.empty(8, 8, 1, 1),
               "encoder.conv_out.weight": torch.empty(8, 512, 3, 3)})  # fmt: skip
    with pytest.raises(ValueError, match=r"`encoder\.conv_out\.weight` \(8, 512, 3, 3\) where \(32, 512, 3, 3\) is "
                       r"needed.*1 unexpected \(`quantize\.embedding\.weight`\)\. It has a VQ codebook"):  # fmt: skip
        autoencoder_from_ldm(vq)

    weights = mar_weights()
    del weights["decoder.up.0.block.1.norm2.bias"]
    weights["decoder.up.1.attn.0.q.weight"] = torch.zeros(64, 64, 1, 1)  # the attention MAR's decoder lacks
    with pytest.raises(ValueError, match=r"keys 1 missing \(`decoder\.up\.0\.block\.1\.norm2\.bias`\); 1 unexpected "
                       r"\(`decoder\.up\.1\.attn\.0\.q\.weight`\)"):  # fmt: skip
        autoencoder_from_ldm(weights, SMALL_CONFIG)


def test_files_that_are_not_kl_vae_checkpoints_are_named(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("ran code from a checkpoint",))

    torch.save({"model": mar_weights()}, tmp_path / "good.ckpt")
    cases = {
        "random.ckpt": torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(0)).byte().numpy(),
        "truncated.ckpt": (tmp_path / "good.ckpt").read_bytes()[:100_000],
    }
    for name, content in cases.items():
        (tmp_path / name).write_bytes(bytes(content))
        with pytest.raises(ValueError, match=f"{tmp_path / name} is not a PyTorch checkpoint"):
            read_ldm_checkpoint(tmp_path / name)
    torch.save({"model": mar_weights(), "callbacks": Evil()}, tmp_path / "evil.ckpt")
    with pytest.raises(ValueError, match="never rebuilds other objects") as info:
        read_ldm_checkpoint(tmp_path / "evil.ckpt")
    assert "weights_only" not in str(info.value)
    torch.save({"epoch": 3, "optimizer": {"lr": 1.0}}, tmp_path / "no_weights.ckpt")
    with pytest.raises(ValueError, match=r"holds no state dict of tensors \(found \['epoch', 'optimizer'\]\); "
                       r"accepted: \{'model': state_dict\}"):  # fmt: skip
        read_ldm_checkpoint(tmp_path / "no_weights.ckpt")


def test_cli_and_example_script_write_the_shipped_config_and_the_checkpoints_tensors(tmp_path, kl16, capsys):
    checkpoint, weights = kl16
    main(["convert-vae", "--checkpoint", str(checkpoint), "--output-dir", str(tmp_path / "a")])
    assert "256x256 images -> 16x16x16 latents, scaling_factor 0.2325" in capsys.readouterr().out
    command = [sys.executable, str(ROOT / "examples" / "convert_vae.py"), "--checkpoint", str(checkpoint),
               "--output-dir", str(tmp_path / "b"), "--scaling-factor", "0.5"]  # fmt: skip
    proc = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr

    shipped = json.loads((ROOT / "examples" / "configs" / "kl16_vae.json").read_text())
    for folder, scale in (("a", EAR_LATENT_SCALE), ("b", 0.5)):
        written = json.loads((tmp_path / folder / "config.json").read_text())
        assert written.pop("scaling_factor") == scale
        assert {k: v for k, v in written.items() if k != "_diffusers_version"} == {
            k: v for k, v in shipped.items() if k not in ("_diffusers_version", "scaling_factor")
        }
    assert shipped["scaling_factor"] == EAR_LATENT_SCALE
    saved = load_file(tmp_path / "a" / "diffusion_pytorch_model.safetensors")
    assert saved.keys() == weights.keys() and all(torch.equal(saved[k], weights[k]) for k in weights)


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--scaling-factor", "0"], "`--scaling-factor` must be a finite number above 0, got 0.0"),
        (["--scaling-factor", "inf"], "`--scaling-factor` must be a finite number above 0, got inf"),
        (["--checkpoint", "/nope/kl16.ckpt"], "--checkpoint '/nope/kl16.ckpt' is not a file; pass MAR's kl16.ckpt"),
        (["--output-dir", "FILE"], "is a file; pass a folder to write"),
    ],
)
def test_bad_flags_are_refused_before_the_checkpoint_is_read(tmp_path, monkeypatch, capsys, flags, message):
    checkpoint = tmp_path / "kl16.ckpt"
    torch.save({"model": mar_weights()}, checkpoint)
    (tmp_path / "file").write_text("")
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("the checkpoint was read"))
    argv = ["convert-vae", "--checkpoint", str(checkpoint), "--output-dir", str(tmp_path / "o")]
    with pytest.raises(SystemExit) as exit_info:
        main([*argv, *[str(tmp_path / "file") if f == "FILE" else f for f in flags]])
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    assert err.startswith("parscale-ear convert-vae: error:") and err.count("\n") == 1 and message in err, err


def ear_checkpoint_for_kl16(path: Path) -> Path:
    """A tiny EAR checkpoint (main_ear.py's format and names) on KL-16's 16x16 grid of 16-channel tokens."""
    torch.manual_seed(0)
    transformer = EARTransformer(in_channels=16, grid_size=16, num_classes=10, hidden_size=32, num_layers=1,
                                 num_heads=4, buffer_size=EAR["buffer_size"])  # fmt: skip
    energy_head = EnergyHead(condition_dim=32, token_channels=16, width=32, depth=1, noise_dim=8)
    weights = {}
    for component, model in (("transformer", transformer), ("energy_head", energy_head)):
        for key, tensor in model.state_dict().items():
            if key == "class_embedding.weight":  # the authors keep the null class apart
                weights["class_emb.weight"], weights["fake_latent"] = tensor[:-1], tensor[-1:]
            else:
                weights[ear_key(component, key)] = tensor
    return save_checkpoint(path, weights)


def test_convert_takes_kl16_ckpt_as_the_vae_and_the_pipeline_makes_256px_images(tmp_path, kl16, capsys):
    vae_checkpoint, weights = kl16
    ear = ear_checkpoint_for_kl16(tmp_path / "checkpoint-last.pth")
    main(["convert", "--checkpoint", str(ear), "--vae", str(vae_checkpoint), "--output-dir", str(tmp_path / "ear"),
          "--num-heads", "4"])  # fmt: skip
    assert "16x16 tokens" in capsys.readouterr().out
    pipe = ParScaleEARPipeline.from_pretrained(tmp_path / "ear")
    assert pipe.vae.config.scaling_factor == EAR_LATENT_SCALE
    vae = pipe.vae.state_dict()
    assert all(torch.equal(vae[k], weights[k]) for k in weights)
    images = pipe([3], num_inference_steps=1, generator=torch.Generator().manual_seed(0), output_type="np").images
    assert images.shape == (1, 256, 256, 3) and images.min() >= 0 and images.max() <= 1 and images.std() > 0


def test_convert_refuses_a_vae_checkpoint_that_is_not_there(tmp_path, monkeypatch, capsys):
    ear = ear_checkpoint_for_kl16(tmp_path / "checkpoint-last.pth")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("a checkpoint was read"))
    with pytest.raises(SystemExit):
        main(["convert", "--checkpoint", str(ear), "--vae", "kl16.ckpt", "--output-dir", "o"])
    err = capsys.readouterr().err
    assert "--vae 'kl16.ckpt' is not a diffusers AutoencoderKL folder (no config.json there) nor a checkpoint" in err
