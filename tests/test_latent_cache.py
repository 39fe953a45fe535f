"""`parscale_ear_hf.training.latent_cache`: round trip, flips, sharding over ranks, errors, posterior samples,
the cache's copy of its VAE and the check of a VAE passed in its place."""

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import datasets
import numpy as np
import PIL.Image
import pytest
import torch
from diffusers import AutoencoderKL

from parscale_ear_hf import LiteVAE
from parscale_ear_hf.data import image_loader
from parscale_ear_hf.saving import weights_fingerprint
from parscale_ear_hf.training.latent_cache import (
    INFO_FILE,
    add_arguments,
    encode_to_cache,
    load_cache_vae,
    load_latent_cache,
    load_vae,
    run,
    sample_latents,
    write_cache_info,
)

from conftest import TINY_VAE_CONFIG

NAMES = ["zero", "one", "two"]


@pytest.fixture(scope="module")
def dataset():
    rng = np.random.default_rng(0)
    images = [PIL.Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)) for _ in range(7)]
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=NAMES)})
    return datasets.Dataset.from_dict({"image": images, "label": [i % 3 for i in range(7)]}, features)


@pytest.fixture(scope="module")
def vae():
    torch.manual_seed(0)
    return LiteVAE(**TINY_VAE_CONFIG, scaling_factor=1.5, shift_factor=0.25).eval()


def reference_moments(vae, dataset, flip=False):
    """Moments of every image of ``dataset`` encoded one at a time, `(N, 2C, h, w)`."""
    images = next(iter(image_loader(dataset, 16, 3, batch_size=len(dataset))))["pixel_values"]
    if flip:
        images = images.flip(-1)
    with torch.no_grad():
        return torch.cat([vae.encode(x[None]).latent_dist.parameters for x in images])


def test_round_trip_with_flips_over_two_ranks(vae, dataset, tmp_path):
    for rank in (0, 1):
        count = encode_to_cache(
            vae, dataset, tmp_path, image_size=16, channels=3, batch_size=3, hflip=True, rank=rank, world_size=2
        )
        assert count == (4 if rank == 0 else 3)
    written = write_cache_info(tmp_path, 2, vae="tiny", scaling_factor=1.5, shift_factor=0.25, hflip=True)
    cache, info = load_latent_cache(tmp_path)

    assert info == written
    assert info["count"] == 7 and info["num_shards"] == 2
    assert (info["latent_channels"], info["grid_size"], info["num_classes"]) == (4, 4, 3)
    assert info["id2label"] == {"0": "zero", "1": "one", "2": "two"}
    assert (info["vae"], info["scaling_factor"], info["shift_factor"], info["hflip"]) == ("tiny", 1.5, 0.25, True)
    # Every example exactly once, in the dataset's order, with its label and moments.
    assert cache[:]["label"].tolist() == list(dataset["label"])
    assert cache[:]["moments"].shape == (7, 8, 4, 4) and cache[:]["moments"].dtype == torch.float32
    torch.testing.assert_close(cache[:]["moments"], reference_moments(vae, dataset), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(
        cache[:]["moments_flip"], reference_moments(vae, dataset, flip=True), atol=1e-5, rtol=1e-5
    )
    assert cache.features["label"].names == NAMES


def test_no_flip_column_by_default(vae, dataset, tmp_path):
    encode_to_cache(vae, dataset, tmp_path, image_size=16, channels=3, batch_size=4)
    write_cache_info(tmp_path, 1)
    cache, info = load_latent_cache(tmp_path)
    assert cache.column_names == ["moments", "label"] and info["count"] == 7


def test_labels_without_class_names_and_streamed_source(vae, dataset, tmp_path):
    plain = dataset.cast_column("label", datasets.Value("int64")).to_iterable_dataset(num_shards=1)
    encode_to_cache(vae, plain, tmp_path, image_size=16, channels=3, batch_size=4)
    info = write_cache_info(tmp_path, 1)
    assert info["num_classes"] == 3 and info["id2label"] == {"0": "0", "1": "1", "2": "2"}


def test_cache_errors(vae, dataset, tmp_path):
    with pytest.raises(FileNotFoundError, match="is not a folder; run cache_latents.py first"):
        load_latent_cache(tmp_path / "nope")
    encode_to_cache(vae, dataset, tmp_path, image_size=16, channels=3)
    with pytest.raises(FileNotFoundError, match=f"has no {INFO_FILE}, so the cache is incomplete"):
        load_latent_cache(tmp_path)
    (tmp_path / INFO_FILE).write_text(json.dumps({"num_shards": 2}))
    with pytest.raises(FileNotFoundError, match=r"lists 2 shards .* but lacks \['shard-00001'\]"):
        load_latent_cache(tmp_path)


def test_sample_latents_statistics():
    mean = torch.tensor([0.5, -1.0]).reshape(1, 2, 1, 1).expand(4000, 2, 3, 3)
    logvar = torch.log(torch.tensor([0.25, 4.0])).reshape(1, 2, 1, 1).expand(4000, 2, 3, 3)
    moments = torch.cat([mean, logvar], dim=1)
    z = sample_latents(moments, scaling_factor=2.0, shift_factor=0.5, generator=torch.Generator().manual_seed(0))
    assert z.shape == (4000, 2, 3, 3)
    # (mean + std * eps - shift) * scale: means (0, -3), stds (1, 4).
    torch.testing.assert_close(z.mean(dim=(0, 2, 3)), torch.tensor([0.0, -3.0]), atol=0.05, rtol=0)
    torch.testing.assert_close(z.std(dim=(0, 2, 3)), torch.tensor([1.0, 4.0]), atol=0.05, rtol=0.02)
    again = sample_latents(moments, 2.0, 0.5, generator=torch.Generator().manual_seed(0))
    assert torch.equal(z, again)


@pytest.mark.parametrize("vae_class", [LiteVAE, AutoencoderKL])
def test_run_from_saved_vae_and_dataset(vae, dataset, tmp_path, vae_class):
    if vae_class is LiteVAE:
        model = vae
    else:
        torch.manual_seed(0)
        model = AutoencoderKL(
            block_out_channels=(8, 8), down_block_types=("DownEncoderBlock2D",) * 2,
            up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=4, sample_size=16,
        )  # fmt: skip
    model.save_pretrained(tmp_path / "vae")
    datasets.DatasetDict({"train": dataset}).save_to_disk(tmp_path / "data")
    parser = add_arguments(argparse.ArgumentParser())
    args = parser.parse_args(
        ["--vae", str(tmp_path / "vae"), "--dataset", str(tmp_path / "data"), "--output-dir", str(tmp_path / "cache"),
         "--no-hflip"]
    )  # fmt: skip
    info = run(args)
    cache, loaded = load_latent_cache(tmp_path / "cache")
    assert info == loaded and info["count"] == 7 and info["vae_class"] == vae_class.__name__
    assert info["image_size"] == 16 and info["hflip"] is False and info["split"] == "train"
    assert info["scaling_factor"] == model.config.scaling_factor
    torch.testing.assert_close(cache[:]["moments"], reference_moments(model, dataset), atol=1e-5, rtol=1e-5)


def test_cache_latents_flips_by_default():
    """ImageNet-style data gets MAR's and EAR's horizontal flips unless --no-hflip (the MNIST demo passes it)."""
    parser = add_arguments(argparse.ArgumentParser())
    required = ["--vae", "v", "--dataset", "d", "--output-dir", "o"]
    assert parser.parse_args(required).hflip is True
    assert parser.parse_args([*required, "--no-hflip"]).hflip is False


@pytest.mark.slow
def test_two_processes_write_two_shards_and_one_info(vae, dataset, tmp_path):
    vae.save_pretrained(tmp_path / "vae")
    datasets.DatasetDict({"train": dataset}).save_to_disk(tmp_path / "data")
    script = Path(__file__).resolve().parents[1] / "examples" / "cache_latents.py"
    args = ["--vae", tmp_path / "vae", "--dataset", tmp_path / "data", "--output-dir", tmp_path / "cache", "--hflip"]
    subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script)]
        + [str(a) for a in args],
        check=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True,
    )  # fmt: skip
    cache, info = load_latent_cache(tmp_path / "cache")
    assert info["num_shards"] == 2 and info["count"] == 7 and info["hflip"] is True
    assert cache[:]["label"].tolist() == list(dataset["label"])
    torch.testing.assert_close(cache[:]["moments"], reference_moments(vae, dataset), atol=1e-5, rtol=1e-5)


def test_cache_latents_subcommand_runs_the_examples_implementation(vae, dataset, tmp_path, capsys):
    from parscale_ear_hf.cli import main

    vae.save_pretrained(tmp_path / "vae")
    datasets.DatasetDict({"train": dataset}).save_to_disk(tmp_path / "data")
    main(["cache-latents", "--vae", str(tmp_path / "vae"), "--dataset", str(tmp_path / "data"),
          "--output-dir", str(tmp_path / "cache"), "--hflip"])  # fmt: skip
    cache, info = load_latent_cache(tmp_path / "cache")
    assert info["count"] == 7 and info["hflip"] is True and "moments_flip" in cache.column_names
    assert capsys.readouterr().out.strip().endswith(f"cached 7 examples, latents 4x4x4 -> {tmp_path / 'cache'}")


def test_missing_vae_paths_say_so(vae, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    for path in (str(tmp_path / "nope"), "./nope", "../nope", "runs/vae"):
        expected = (
            rf"load_vae: --vae='{re.escape(path)}' does not exist\. Accepted: "
            r"a folder written by `save_pretrained`.*--vae-subfolder vae, or a Hub repo id"
        )
        with pytest.raises(FileNotFoundError, match=expected):
            load_vae(path)
    vae.save_pretrained(tmp_path / "pipe" / "vae")
    (tmp_path / "pipe" / "model_index.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match=r"'pipe' has no config.json \(a pipeline folder: add --vae-subfolder"):
        load_vae("pipe")
    with pytest.raises(FileNotFoundError, match=r"'pipe/decoder' has no config.json\. Accepted"):
        load_vae("pipe", "decoder")
    assert isinstance(load_vae("pipe", "vae"), LiteVAE)


def test_unreachable_hub_vae_names_the_repo(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # never ask the network
    with pytest.raises(OSError, match=r"--vae='owner/no-such-vae' is not a local folder, and the Hub repo "
                       r"'owner/no-such-vae' \(subfolder 'vae'\) could not be read"):  # fmt: skip
        load_vae("owner/no-such-vae", "vae")


def test_the_cache_keeps_a_copy_of_its_vae_and_refuses_another_in_its_place(vae, dataset, tmp_path):
    vae.save_pretrained(tmp_path / "vae")
    datasets.DatasetDict({"train": dataset}).save_to_disk(tmp_path / "data")
    args = ["--vae", str(tmp_path / "vae"), "--dataset", str(tmp_path / "data"), "--output-dir", str(tmp_path / "c")]
    info = run(add_arguments(argparse.ArgumentParser()).parse_args(args))
    assert (info["vae"], info["vae_folder"], info["vae_class"]) == (str(tmp_path / "vae"), "vae", "LiteVAE")
    assert info["vae_config"]["scaling_factor"] == 1.5 and info["vae_weights_sha256"] == weights_fingerprint(vae)
    assert weights_fingerprint(load_cache_vae("train", tmp_path / "c", info)) == weights_fingerprint(vae)
    # The VAE that encoded the cache may stand in for the copy; another one is refused, naming what differs.
    assert weights_fingerprint(
        load_cache_vae("train", tmp_path / "c", info, str(tmp_path / "vae"))
    ) == weights_fingerprint(vae)
    torch.manual_seed(1)
    LiteVAE(**TINY_VAE_CONFIG, scaling_factor=1.5, shift_factor=0.25).save_pretrained(tmp_path / "retrained")
    expected = (
        rf"train: --vae '{re.escape(str(tmp_path / 'retrained'))}' is not the VAE that encoded the latent cache "
        rf"'{re.escape(str(tmp_path / 'c'))}'; the cache vs --vae: weights sha256 {weights_fingerprint(vae)} vs "
        rf"[0-9a-f]{{64}}\. Accepted: the cache's VAE; leave --vae out to use the cache's copy "
        rf"'{re.escape(str(tmp_path / 'c' / 'vae'))}'"
    )
    with pytest.raises(ValueError, match=expected):
        load_cache_vae("train", tmp_path / "c", info, str(tmp_path / "retrained"))
    shutil.copytree(tmp_path / "vae", tmp_path / "rescaled")
    config = json.loads((tmp_path / "rescaled" / "config.json").read_text())
    (tmp_path / "rescaled" / "config.json").write_text(json.dumps({**config, "scaling_factor": 2.0}))
    with pytest.raises(ValueError, match=r"the cache vs --vae: config scaling_factor 1\.5 vs 2\.0\. Accepted"):
        load_cache_vae("train", tmp_path / "c", info, str(tmp_path / "rescaled"))
    shutil.rmtree(tmp_path / "c" / "vae")
    expected = (
        rf"train: the latent cache '{re.escape(str(tmp_path / 'c'))}' lacks its copy of its VAE .* cache-latents was "
        rf"given --vae '{re.escape(str(tmp_path / 'vae'))}'\. Pass --vae with that VAE"
    )
    with pytest.raises(FileNotFoundError, match=expected):
        load_cache_vae("train", tmp_path / "c", info)


def test_a_cache_without_a_copy_of_its_vae_loads_it_from_where_it_was_made(vae, dataset, tmp_path, monkeypatch):
    """A cache written before caches kept their VAE records only the path that cache-latents was given."""
    monkeypatch.chdir(tmp_path)
    vae.save_pretrained(tmp_path / "runs" / "vae" / "vae")
    encode_to_cache(vae, dataset, tmp_path / "cache", image_size=16, channels=3)
    info = write_cache_info(tmp_path / "cache", 1, vae="runs/vae/vae", vae_class="LiteVAE", scaling_factor=1.5)
    assert weights_fingerprint(load_cache_vae("train", "cache", info)) == weights_fingerprint(vae)
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    expected = (
        r"train: the latent cache '\.\./cache' was written before caches kept a copy of their VAE and records it only "
        rf"as cache-latents was given it, --vae 'runs/vae/vae', which does not load from the working directory "
        rf"'{re.escape(str(tmp_path / 'elsewhere'))}' .*\. Run from the folder the cache was made in, pass --vae with "
        r"that VAE"
    )
    with pytest.raises(FileNotFoundError, match=expected):
        load_cache_vae("train", "../cache", info)
    assert weights_fingerprint(load_cache_vae("train", "../cache", info, "../runs/vae/vae")) == weights_fingerprint(
        vae
    )
    torch.manual_seed(0)
    kl = AutoencoderKL(block_out_channels=(8,), latent_channels=4, norm_num_groups=4, sample_size=16)
    kl.save_pretrained(tmp_path / "kl")
    expected = (
        r"the cache vs --vae: class 'LiteVAE' vs 'AutoencoderKL'\. Accepted: the cache's VAE; pass the VAE that "
        r"cache-latents was given \('runs/vae/vae'\)"
    )
    with pytest.raises(ValueError, match=expected):
        load_cache_vae("train", "../cache", info, str(tmp_path / "kl"))
