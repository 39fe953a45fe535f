"""Saving and loading: folders, components, the offline Hub cache, remote code, bad files, misfits.

Nothing here touches the network: every test that could reach the Hub runs with
``HF_HUB_OFFLINE`` on and sockets refused, against a Hugging Face cache built by hand in a
temporary folder with the standard layout (``models--org--name/{blobs,refs,snapshots}``).
"""

import fnmatch
import hashlib
import json
import os
import shutil
import socket
import sys
import warnings
from pathlib import Path
from types import SimpleNamespace

import diffusers.pipelines.pipeline_utils as pipeline_utils
import diffusers.utils.dynamic_modules_utils as dynamic_modules_utils
import diffusers.utils.hub_utils as hub_utils
import huggingface_hub.constants as hf_constants
import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, DiffusionPipeline
from huggingface_hub.errors import LocalEntryNotFoundError

import parscale_ear_hf.saving as saving
from parscale_ear_hf import EARTransformer, EnergyHead, LiteHybrid, LiteVAE, ParScaleEARPipeline
from parscale_ear_hf.saving import MANIFEST_NAME, WEIGHT_HASHES

from conftest import (
    ID2LABEL,
    TINY_VAE_CONFIG,
    flip_middle_bytes,
    float32_rounding_bound,
    tiny_components,
    tiny_pipeline,
    tree_hashes,
)

REPO_ID = "parscale-tests/tiny-ear"
COMMIT = "0123456789abcdef0123456789abcdef01234567"
COMPONENTS = ("vae", "lite_hybrid", "transformer", "energy_head")
COMPONENT_CLASSES = {
    "vae": LiteVAE,
    "lite_hybrid": LiteHybrid,
    "transformer": EARTransformer,
    "energy_head": EnergyHead,
}
WEIGHTS = "diffusion_pytorch_model.safetensors"
ENTRY_NAME = "pipeline_parscale_ear.py"
ENTRY_SOURCE = Path(__file__).resolve().parents[1] / "pipelines" / ENTRY_NAME
PICKLE_SUFFIXES = {".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt"}
GUIDANCE = (1.0, 3.0)  # 1 disables classifier-free guidance


# ---------------------------------------------------------------- helpers


def generate(pipe, guidance_scale=3.0, seed=0, labels=(0, 3, 7)):
    pipe.set_progress_bar_config(disable=True)
    return pipe(
        list(labels),
        num_inference_steps=4,
        guidance_scale=guidance_scale,
        output_type="np",
        generator=torch.Generator().manual_seed(seed),
    ).images


def assert_same_images(a, b):
    """Same weights, same shapes, same process: the same float32 operations give the same bits."""
    assert a.shape == b.shape
    assert np.array_equal(a, b)


def copy_folder(src, dst) -> Path:
    shutil.copytree(src, dst)
    return Path(dst)


def edit_config(folder, component, **values):
    path = Path(folder) / component / "config.json"
    config = json.loads(path.read_text())
    config.update(values)
    path.write_text(json.dumps(config, indent=2))


def assert_same_state_dict(a: torch.nn.Module, b: torch.nn.Module):
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for key in sa:
        assert sa[key].dtype == sb[key].dtype, key
        assert torch.equal(sa[key], sb[key]), key


def public_config(config) -> dict:
    """The config as its config.json holds it (tuples become lists), without private `_` keys."""
    return json.loads(json.dumps({k: v for k, v in dict(config).items() if not k.startswith("_")}))


def populate_hub_cache(cache: Path, folder: Path, repo_id=REPO_ID, commit=COMMIT) -> Path:
    """Put `folder` into `cache` as huggingface_hub stores a downloaded repo: blobs, symlinked snapshot, refs/main."""
    repo_dir = cache / ("models--" + repo_id.replace("/", "--"))
    blobs, snapshot = repo_dir / "blobs", repo_dir / "snapshots" / commit
    blobs.mkdir(parents=True, exist_ok=True)
    for src in sorted(p for p in folder.rglob("*") if p.is_file()):
        data = src.read_bytes()
        blob = blobs / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        link = snapshot / src.relative_to(folder)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (repo_dir / "refs").mkdir()
    (repo_dir / "refs" / "main").write_text(commit)
    return snapshot


def tiny_autoencoder_kl(latent_channels=4):
    """A diffusers AutoencoderKL with a down factor of 4: the 4x4 token grid decodes to 16x16."""
    torch.manual_seed(0)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=latent_channels,
        block_out_channels=(8, 16, 16),
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        layers_per_block=1,
        norm_num_groups=4,
        sample_size=16,
    )


def _refuse_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise OSError("test_loading.py: network access is disabled")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """One saved pipeline shared by the module, with its reference images; it must never change."""
    pipe = tiny_pipeline()
    folder = tmp_path_factory.mktemp("saved") / "pipeline"
    pipe.save_pretrained(folder)
    images = {g: generate(pipe, g) for g in GUIDANCE}
    before = tree_hashes(folder)
    yield SimpleNamespace(pipe=pipe, folder=folder, images=images)
    # Loading (in any test below) never writes into the folder it reads.
    assert tree_hashes(folder) == before


@pytest.fixture(scope="module")
def resaved(saved, tmp_path_factory):
    loaded = ParScaleEARPipeline.from_pretrained(saved.folder)
    folder = tmp_path_factory.mktemp("resaved") / "pipeline"
    loaded.save_pretrained(folder)
    return SimpleNamespace(pipe=loaded, folder=folder)


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """Offline mode with an empty HF cache in tmp_path; returns the cache folder.

    huggingface_hub reads HF_HUB_OFFLINE and HF_HUB_CACHE once, at import, into
    ``huggingface_hub.constants``: set the environment (for anything reading it later) and patch
    the constants (for what already read it). Sockets are refused as well.
    """
    cache = tmp_path / "hf_cache"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(cache))
    _refuse_network(monkeypatch)
    return cache


@pytest.fixture
def modules_cache(monkeypatch, tmp_path):
    """Where diffusers copies remote code (HF_MODULES_CACHE, read at import): a fresh tmp folder."""
    path = tmp_path / "hf_modules"
    monkeypatch.setenv("HF_MODULES_CACHE", str(path))
    monkeypatch.setattr(dynamic_modules_utils, "HF_MODULES_CACHE", str(path))
    monkeypatch.setattr(sys, "path", list(sys.path))  # diffusers appends the cache to sys.path
    before = set(sys.modules)
    yield path
    for name in set(sys.modules) - before:
        if name.startswith("diffusers_modules"):
            del sys.modules[name]


@pytest.fixture
def fake_hub(monkeypatch):
    """Record each upload: the folder's files at the moment of the upload, and the repo and commit options.

    `pipe.push_to_hub` is diffusers' (a temporary folder, its generic card, `_upload_folder`);
    `save_pretrained(..., push_to_hub=True)` of the pipeline and of each component is ours (`create_repo` +
    `upload_folder` of the finished folder).
    """
    uploads, repos = [], {}

    class Card:
        def save(self, path):
            Path(path).write_text("# model card\n")

    def create_repo(repo_id, **kwargs):
        repos[repo_id] = kwargs
        return SimpleNamespace(repo_id=repo_id)

    def record(folder, repo_id, **kwargs):
        root = Path(folder)
        files = {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}
        uploads.append(SimpleNamespace(repo_id=repo_id, files=files, options={**repos[repo_id], **kwargs}))

    for module in (pipeline_utils, hub_utils):
        monkeypatch.setattr(module, "create_repo", create_repo)
        monkeypatch.setattr(module, "load_or_create_model_card", lambda *a, **k: Card())
        monkeypatch.setattr(module, "populate_model_card", lambda card, *a, **k: card)
    monkeypatch.setattr(
        ParScaleEARPipeline, "_upload_folder", lambda self, folder, repo_id, **k: record(folder, repo_id, **k)
    )
    monkeypatch.setattr(saving, "create_repo", create_repo)
    monkeypatch.setattr(
        saving, "upload_folder", lambda *, folder_path, repo_id, **k: record(folder_path, repo_id, **k)
    )
    _refuse_network(monkeypatch)
    return uploads


# ---------------------------------------------------------------- 1. pipeline save / load


def test_save_writes_safetensors_configs_and_entry_file(saved):
    files = tree_hashes(saved.folder)
    assert not [f for f in files if Path(f).suffix in PICKLE_SUFFIXES]
    weight_files = sorted(f for f in files if f.endswith((".safetensors", *PICKLE_SUFFIXES)))
    assert weight_files == sorted(f"{c}/{WEIGHTS}" for c in COMPONENTS)
    for component in COMPONENTS:
        assert (saved.folder / component / "config.json").is_file()
        assert (saved.folder / component / WEIGHTS).is_file()
    assert not [f for f in files if f.endswith(".tmp")]  # the atomic rewrite left nothing behind

    # The Hub entry file is the package's own pipelines/ file, byte for byte.
    assert (saved.folder / ENTRY_NAME).read_bytes() == ENTRY_SOURCE.read_bytes()
    index = json.loads((saved.folder / "model_index.json").read_text())
    assert index["_class_name"] == ["pipeline_parscale_ear", "ParScaleEARPipeline"]
    for component, cls in COMPONENT_CLASSES.items():
        assert index[component][1] == cls.__name__
    assert index["id2label"] == {str(k): v for k, v in ID2LABEL.items()}


def test_save_refuses_pickle_serialization(tmp_path):
    with pytest.raises(ValueError, match="safe_serialization"):
        tiny_pipeline().save_pretrained(tmp_path / "out", safe_serialization=False)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("as_str", [False, True], ids=["Path", "str"])
def test_pipeline_round_trip_gives_identical_images(saved, as_str):
    loaded = ParScaleEARPipeline.from_pretrained(str(saved.folder) if as_str else saved.folder)
    assert type(loaded) is ParScaleEARPipeline
    for component, cls in COMPONENT_CLASSES.items():
        assert type(getattr(loaded, component)) is cls
        assert_same_state_dict(getattr(saved.pipe, component), getattr(loaded, component))
    for g in GUIDANCE:
        assert_same_images(generate(loaded, g), saved.images[g])
    # The comparison is meaningful: other weights give other images.
    assert np.abs(generate(tiny_pipeline(seed=1)) - saved.images[3.0]).max() > 1e-3


def test_round_trip_keeps_id2label_and_labels(saved):
    loaded = ParScaleEARPipeline.from_pretrained(saved.folder)
    assert loaded.id2label == ID2LABEL
    assert loaded.labels == saved.pipe.labels
    assert loaded.get_label_ids(["digit 3", "number 7"]) == [3, 7]
    assert_same_images(generate(loaded, labels=["digit 0", "number 3", "digit 7"]), saved.images[3.0])


def test_round_trip_without_id2label(tmp_path):
    pipe = ParScaleEARPipeline(**tiny_components())
    pipe.save_pretrained(tmp_path / "p")
    assert json.loads((tmp_path / "p" / "model_index.json").read_text())["id2label"] is None
    loaded = ParScaleEARPipeline.from_pretrained(tmp_path / "p")
    assert loaded.id2label is None and loaded.labels == {}
    assert_same_images(generate(loaded), generate(pipe))


def test_round_trip_with_parscale_streams(tmp_path):
    pipe = tiny_pipeline(parscale_n=2)
    pipe.save_pretrained(tmp_path / "p")
    loaded = ParScaleEARPipeline.from_pretrained(tmp_path / "p")
    assert loaded.transformer.config.parscale_n == 2
    assert_same_state_dict(pipe.transformer, loaded.transformer)
    assert_same_images(generate(loaded), generate(pipe))


def test_resave_keeps_id2label_class_name_and_configs(saved, resaved):
    """DiTPipeline drops id2label when a loaded pipeline is saved again; this one must not."""
    first = json.loads((saved.folder / "model_index.json").read_text())
    second = json.loads((resaved.folder / "model_index.json").read_text())
    assert second == first
    assert second["id2label"] == {str(k): v for k, v in ID2LABEL.items()}
    assert (resaved.folder / ENTRY_NAME).read_bytes() == ENTRY_SOURCE.read_bytes()
    for component in COMPONENTS:
        a = json.loads((saved.folder / component / "config.json").read_text())
        b = json.loads((resaved.folder / component / "config.json").read_text())
        assert a == b, component
        # Same tensors give the same safetensors file.
        assert (saved.folder / component / WEIGHTS).read_bytes() == (resaved.folder / component / WEIGHTS).read_bytes()
    again = ParScaleEARPipeline.from_pretrained(resaved.folder)
    assert again.id2label == ID2LABEL
    assert_same_images(generate(again), saved.images[3.0])


@pytest.mark.parametrize("name", ["model_index.json", *(f"{c}/config.json" for c in COMPONENTS)])
def test_resave_writes_identical_json(saved, resaved, name):
    assert (resaved.folder / name).read_text() == (saved.folder / name).read_text()


# ---------------------------------------------------------------- 2. components alone


@pytest.mark.parametrize("name", COMPONENTS)
def test_component_round_trip(tmp_path, name):
    component = tiny_components(parscale_n=2)[name]  # parscale_n=2: the stream parameters are saved too
    component.save_pretrained(tmp_path / name)
    assert sorted(p.name for p in (tmp_path / name).iterdir()) == [MANIFEST_NAME, "config.json", WEIGHTS]
    assert sorted(p.name for p in tmp_path.iterdir()) == [name]  # no temporary folder left beside it
    cls = COMPONENT_CLASSES[name]
    loaded = cls.from_pretrained(tmp_path / name)
    assert type(loaded) is cls
    assert public_config(loaded.config) == public_config(component.config)
    assert_same_state_dict(component, loaded)


# ---------------------------------------------------------------- 3. offline Hub cache


@pytest.mark.parametrize(
    "kwargs",
    [
        {"cache_dir": True},
        {"cache_dir": True, "local_files_only": True},
        {"cache_dir": True, "revision": COMMIT},
        {},  # the cache from HF_HUB_CACHE alone
    ],
    ids=["cache_dir", "local_files_only", "revision=commit", "HF_HUB_CACHE"],
)
def test_load_repo_id_from_offline_hub_cache(saved, offline, kwargs):
    populate_hub_cache(offline, saved.folder)
    kwargs = {**kwargs, **({"cache_dir": str(offline)} if kwargs.get("cache_dir") else {})}
    loaded = ParScaleEARPipeline.from_pretrained(REPO_ID, **kwargs)
    assert type(loaded) is ParScaleEARPipeline and loaded.id2label == ID2LABEL
    for g in GUIDANCE:
        assert_same_images(generate(loaded, g), saved.images[g])


@pytest.mark.parametrize("local_files_only", [False, True])
def test_repo_id_missing_from_offline_cache_raises(saved, offline, local_files_only):
    populate_hub_cache(offline, saved.folder)  # a cache that holds another repo
    with pytest.raises(LocalEntryNotFoundError) as info:
        ParScaleEARPipeline.from_pretrained(
            "parscale-tests/not-cached", cache_dir=str(offline), local_files_only=local_files_only
        )
    assert isinstance(info.value, OSError)
    assert "'parscale-tests/not-cached'" in str(info.value)
    assert repr(str(offline)) in str(info.value)  # the cache folder searched
    assert not (offline / "models--parscale-tests--not-cached" / "snapshots").exists()


def test_repo_id_missing_from_offline_cache_names_hf_hub_cache(offline):
    with pytest.raises(LocalEntryNotFoundError) as info:
        ParScaleEARPipeline.from_pretrained("parscale-tests/not-cached")
    assert "'parscale-tests/not-cached'" in str(info.value) and repr(hf_constants.HF_HUB_CACHE) in str(info.value)
    assert hf_constants.HF_HUB_CACHE == str(offline)


def test_repo_id_download_fetches_the_manifest_and_checks_it(saved, offline, tmp_path, monkeypatch):
    """The snapshot holds checksums.sha256 (allow_patterns), and a damaged blob in the cache is refused."""
    folder = copy_folder(saved.folder, tmp_path / "p")
    damaged = folder / "energy_head" / WEIGHTS
    data = bytearray(damaged.read_bytes())
    data[len(data) // 2 : len(data) // 2 + 64] = bytes(b ^ 0xFF for b in data[len(data) // 2 : len(data) // 2 + 64])
    damaged.write_bytes(bytes(data))
    snapshot = populate_hub_cache(offline, folder)
    saved_state = saved.pipe.energy_head.state_dict()
    patterns = []

    def recording_snapshot_download(repo_id, allow_patterns, **kwargs):
        patterns.extend(allow_patterns)
        return snapshot_download(repo_id, allow_patterns=allow_patterns, **kwargs)

    snapshot_download = saving.snapshot_download
    monkeypatch.setattr(saving, "snapshot_download", recording_snapshot_download)
    with pytest.raises(OSError, match=r"refusing to load .*energy_head/diffusion_pytorch_model\.safetensors"):
        ParScaleEARPipeline.from_pretrained(REPO_ID)
    assert any(fnmatch.fnmatch(MANIFEST_NAME, p) for p in patterns)
    assert (snapshot / MANIFEST_NAME).is_file()
    loaded = ParScaleEARPipeline.from_pretrained(REPO_ID, verify_checksums=False)
    damage_loaded = [k for k, v in loaded.energy_head.state_dict().items() if not torch.equal(v, saved_state[k])]
    assert damage_loaded  # without the check, the damaged weights load silently


def test_missing_local_folder_error_is_clear(tmp_path, offline):
    missing = tmp_path / "no_such_pipeline"
    with pytest.raises((OSError, ValueError)) as info:
        ParScaleEARPipeline.from_pretrained(missing)
    message = str(info.value)
    assert str(missing) in message
    phrases = (
        "not an existing folder",
        "not a valid local path",
        "does not exist",
        "no such",
        "not a local",
        "not a directory",
        "local folder",
    )
    assert any(p in message.lower() for p in phrases), message


@pytest.mark.parametrize("source", ["folder", "hub cache"])
def test_pickle_weights_beside_safetensors_are_never_read(saved, tmp_path, offline, source):
    folder = copy_folder(saved.folder, tmp_path / "p")
    for component in COMPONENTS:  # unreadable pickles: loading one would raise
        (folder / component / "diffusion_pytorch_model.bin").write_bytes(b"not a pickle")
    if source == "folder":
        loaded = ParScaleEARPipeline.from_pretrained(folder)
    else:
        populate_hub_cache(offline, folder)
        loaded = ParScaleEARPipeline.from_pretrained(REPO_ID, cache_dir=str(offline))
    assert_same_images(generate(loaded), saved.images[3.0])


# ---------------------------------------------------------------- 4. DiffusionPipeline + remote code


def test_diffusion_pipeline_loads_folder_with_trust_remote_code(saved, modules_cache):
    loaded = DiffusionPipeline.from_pretrained(saved.folder, trust_remote_code=True)
    assert type(loaded) is ParScaleEARPipeline
    assert (modules_cache / "diffusers_modules" / "local" / ENTRY_NAME).is_file()
    assert loaded.id2label == ID2LABEL
    for g in GUIDANCE:
        assert_same_images(generate(loaded, g), saved.images[g])


@pytest.mark.parametrize("local_files_only", [False, True])
def test_diffusion_pipeline_loads_repo_id_from_offline_cache(saved, offline, modules_cache, local_files_only):
    populate_hub_cache(offline, saved.folder)
    loaded = DiffusionPipeline.from_pretrained(
        REPO_ID, trust_remote_code=True, cache_dir=str(offline), local_files_only=local_files_only
    )
    assert type(loaded) is ParScaleEARPipeline
    assert_same_images(generate(loaded), saved.images[3.0])


def test_diffusion_pipeline_without_trust_remote_code_refuses(saved, modules_cache):
    with pytest.raises(ValueError, match="trust_remote_code"):
        DiffusionPipeline.from_pretrained(saved.folder)


@pytest.mark.parametrize("entry", ["poisoned", "removed"])
def test_own_class_needs_no_remote_code(saved, tmp_path, modules_cache, entry):
    """ParScaleEARPipeline.from_pretrained never runs (or needs) the entry file."""
    folder = copy_folder(saved.folder, tmp_path / "p")
    if entry == "removed":
        (folder / ENTRY_NAME).unlink()
    else:
        (folder / ENTRY_NAME).write_text("raise RuntimeError('the Hub entry file was executed')\n")
    loaded = ParScaleEARPipeline.from_pretrained(folder)  # no trust_remote_code
    assert type(loaded) is ParScaleEARPipeline
    assert_same_images(generate(loaded), saved.images[3.0])
    assert not modules_cache.exists()


# ---------------------------------------------------------------- 5. bad files


def truncate(path: Path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def garbage(path: Path):
    path.write_bytes(b"this is not a safetensors file" * 20)


def empty(path: Path):
    path.write_bytes(b"")


@pytest.mark.parametrize("verify", [True, False], ids=["manifest", "safetensors"])
@pytest.mark.parametrize("damage", [truncate, garbage, empty], ids=["truncated", "garbage", "empty"])
def test_corrupt_weights_raise_and_leave_folder_unchanged(saved, tmp_path, damage, verify):
    """The manifest check names the file first; without it, the safetensors error does."""
    folder = copy_folder(saved.folder, tmp_path / "p")
    damage(folder / "transformer" / WEIGHTS)
    before = tree_hashes(folder)
    weights = str(folder / "transformer" / WEIGHTS)
    with pytest.raises(OSError) as info:
        ParScaleEARPipeline.from_pretrained(folder, verify_checksums=verify)
    assert weights in str(info.value) and "load" in str(info.value).lower()
    assert (MANIFEST_NAME in str(info.value)) == verify
    with pytest.raises(OSError, match="transformer"):
        EARTransformer.from_pretrained(folder, subfolder="transformer", verify_checksums=verify)
    assert tree_hashes(folder) == before


# Every way of loading saved weights: (name, source kinds it takes, load(source, **kwargs)). `source` is the
# pipeline's folder, or REPO_ID in an offline Hub cache; "component folder" loads `<source>/transformer` itself,
# as DiffusionPipeline.from_pretrained does for each component.
LOADERS = {
    "ParScaleEARPipeline": lambda source, **k: ParScaleEARPipeline.from_pretrained(source, **k),
    "DiffusionPipeline + remote code": lambda source, **k: DiffusionPipeline.from_pretrained(
        source, trust_remote_code=True, **k
    ),
    "component, subfolder": lambda source, **k: EARTransformer.from_pretrained(source, subfolder="transformer", **k),
    "component folder": lambda source, **k: EARTransformer.from_pretrained(Path(source) / "transformer", **k),
}


def damaged_source(saved, tmp_path, offline, source: str, record: str):
    """A copy of the saved pipeline with flipped bytes inside the transformer's weights, as a folder or in the
    offline Hub cache; `record` keeps both hash records, only the manifest (a folder saved before the configs
    held hashes), or only the configs' hashes (a cache filled by diffusers' own download, which skips the
    manifest). Returns (what to pass the loader, the damaged file as the loader sees it)."""
    folder = copy_folder(saved.folder, tmp_path / "p")
    flip_middle_bytes(folder / "transformer" / WEIGHTS)
    if record == "manifest only":
        for name in COMPONENTS:
            config = json.loads((folder / name / "config.json").read_text())
            del config[WEIGHT_HASHES]
            (folder / name / "config.json").write_text(json.dumps(config))
    elif record == "configs only":
        (folder / MANIFEST_NAME).unlink()
    if source == "folder":
        return folder, folder / "transformer" / WEIGHTS
    snapshot = populate_hub_cache(offline, folder)
    return (snapshot if source == "snapshot folder" else REPO_ID), snapshot / "transformer" / WEIGHTS


@pytest.mark.parametrize("record", ["both", "manifest only", "configs only"])
@pytest.mark.parametrize("source", ["folder", "hub cache"])
@pytest.mark.parametrize("loader", LOADERS)
def test_every_loading_path_refuses_a_flipped_byte_naming_the_file(
    saved, tmp_path, offline, modules_cache, loader, source, record
):
    if loader == "component folder" and source == "hub cache":
        source = "snapshot folder"  # a repo id has no component folder of its own: its snapshot's
    if record == "manifest only" and source != "folder":
        pytest.skip("a repo in the cache without hashes in its configs is a repo saved before they existed")
    where, damaged = damaged_source(saved, tmp_path, offline, source, record)
    with pytest.raises(OSError) as info:
        LOADERS[loader](where)
    message = str(info.value)
    assert "refusing to load" in message and str(damaged) in message
    assert hashlib.sha256(damaged.read_bytes()).hexdigest() in message
    if loader != "DiffusionPipeline + remote code":  # diffusers passes on no loader option
        loaded = LOADERS[loader](where, verify_checksums=False)
        assert loaded is not None


@pytest.mark.parametrize("source", ["folder", "hub cache"])
def test_a_component_saved_alone_refuses_a_flipped_byte(tmp_path, offline, source):
    head = tiny_components()["energy_head"]
    head.save_pretrained(tmp_path / "head")
    flip_middle_bytes(tmp_path / "head" / WEIGHTS)
    (tmp_path / "head" / MANIFEST_NAME).unlink()  # the hash in its config.json is enough
    where = tmp_path / "head"
    damaged = where / WEIGHTS
    if source == "hub cache":
        damaged = populate_hub_cache(offline, where, repo_id="parscale-tests/head") / WEIGHTS
        where = "parscale-tests/head"
    with pytest.raises(OSError, match=f"refusing to load {damaged}"):
        EnergyHead.from_pretrained(where)
    unchecked = EnergyHead.from_pretrained(where, verify_checksums=False).state_dict()
    assert any(not torch.equal(unchecked[k], v) for k, v in head.state_dict().items())  # the damage is real


def test_configs_record_their_weights_hashes_and_models_do_not_keep_them(saved):
    for name in COMPONENTS:
        config = json.loads((saved.folder / name / "config.json").read_text())
        digest = hashlib.sha256((saved.folder / name / WEIGHTS).read_bytes()).hexdigest()
        assert config[WEIGHT_HASHES] == {WEIGHTS: digest}
    loaded = ParScaleEARPipeline.from_pretrained(saved.folder)
    component = EARTransformer.from_pretrained(saved.folder, subfolder="transformer")
    for config in [getattr(loaded, name).config for name in COMPONENTS] + [component.config]:
        assert WEIGHT_HASHES not in config


def test_a_changed_weights_file_after_training_gets_new_hashes(saved, tmp_path):
    """A save records the hashes of what it wrote, not the ones the model was loaded with."""
    model = EARTransformer.from_pretrained(saved.folder, subfolder="transformer")
    with torch.no_grad():
        next(model.parameters()).add_(1.0)
    model.save_pretrained(tmp_path / "t")
    digest = hashlib.sha256((tmp_path / "t" / WEIGHTS).read_bytes()).hexdigest()
    assert json.loads((tmp_path / "t" / "config.json").read_text())[WEIGHT_HASHES] == {WEIGHTS: digest}
    EARTransformer.from_pretrained(tmp_path / "t")


@pytest.mark.parametrize("component", COMPONENTS)
def test_missing_component_folder_names_the_component_and_the_folder(saved, tmp_path, component):
    folder = copy_folder(saved.folder, tmp_path / "p")
    shutil.rmtree(folder / component)
    with pytest.raises(FileNotFoundError) as info:
        ParScaleEARPipeline.from_pretrained(folder, verify_checksums=False)
    message = str(info.value)
    assert f"`{component}`" in message and COMPONENT_CLASSES[component].__name__ in message
    assert str(folder / component) in message
    # A component given by the caller is not read from the folder.
    loaded = ParScaleEARPipeline.from_pretrained(
        folder, verify_checksums=False, **{component: getattr(saved.pipe, component)}
    )
    assert_same_images(generate(loaded), saved.images[3.0])


def test_missing_weights_file_raises(saved, tmp_path):
    folder = copy_folder(saved.folder, tmp_path / "p")
    (folder / "energy_head" / WEIGHTS).unlink()
    before = tree_hashes(folder)
    with pytest.raises(OSError, match=WEIGHTS.replace(".", r"\.")):
        ParScaleEARPipeline.from_pretrained(folder)
    assert tree_hashes(folder) == before


@pytest.mark.parametrize(
    "edits",
    [
        {"transformer": {"hidden_size": 64}},
        {"transformer": {"hidden_size": 64}, "energy_head": {"condition_dim": 64}},  # configs fit, weights do not
        {"energy_head": {"width": 16}},
    ],
    ids=["transformer.hidden_size", "hidden_size+condition_dim", "energy_head.width"],
)
def test_config_that_does_not_match_weights_raises(saved, tmp_path, edits):
    folder = copy_folder(saved.folder, tmp_path / "p")
    for component, values in edits.items():
        edit_config(folder, component, **values)
    before = tree_hashes(folder)
    with pytest.raises(ValueError, match=r"expected shape .* but got") as from_pipeline:
        ParScaleEARPipeline.from_pretrained(folder)
    # The pipeline stops at the first of the edited components that it loads.
    [first] = [c for c in edits if f"{COMPONENT_CLASSES[c].__name__}.from_pretrained(" in str(from_pipeline.value)]
    with pytest.raises(ValueError, match="expected shape") as alone:
        COMPONENT_CLASSES[first].from_pretrained(folder, subfolder=first)
    for info in (from_pipeline, alone):
        message = str(info.value)
        # The class, its folder and the tensors; and no advice to load random weights in their place.
        assert f"{COMPONENT_CLASSES[first].__name__}.from_pretrained(" in message and first in message
        assert any(f"`{key}` expected shape" in message for key in getattr(saved.pipe, first).state_dict())
        assert "ignore_mismatched_sizes" not in message and "Cannot load  " not in message
    assert tree_hashes(folder) == before


@pytest.mark.parametrize("num_layers", [1, 3])
def test_config_with_other_layer_count_raises(saved, tmp_path, num_layers):
    folder = copy_folder(saved.folder, tmp_path / "p")
    edit_config(folder, "transformer", num_layers=num_layers)
    with pytest.raises(ValueError, match=r"do not match config.json.*blocks\.[12]\."):
        ParScaleEARPipeline.from_pretrained(folder)


@pytest.mark.parametrize(
    "component, field, value, names",
    [
        ("transformer", "num_heads", 0, ["`num_heads`"]),
        ("transformer", "hidden_size", 30, ["`hidden_size`", "`num_heads`"]),
        ("transformer", "dropout", 1.5, ["`dropout`"]),
        ("lite_hybrid", "grid_size", -1, ["`grid_size`"]),
        ("lite_hybrid", "use_fine", "yes", ["`use_fine`"]),
        ("energy_head", "noise_dim", 0, ["`noise_dim`"]),
        ("vae", "latent_channels", 0, ["`latent_channels`"]),
    ],
)
def test_invalid_config_value_raises_naming_the_field(saved, tmp_path, component, field, value, names):
    folder = copy_folder(saved.folder, tmp_path / "p")
    edit_config(folder, component, **{field: value})
    before = tree_hashes(folder)
    with pytest.raises(ValueError) as info:
        ParScaleEARPipeline.from_pretrained(folder)
    message = str(info.value)
    assert COMPONENT_CLASSES[component].__name__ in message
    assert repr(value) in message
    for name in names:
        assert name in message
    assert tree_hashes(folder) == before


def test_invalid_id2label_in_model_index_raises(saved, tmp_path):
    folder = copy_folder(saved.folder, tmp_path / "p")
    index = json.loads((folder / "model_index.json").read_text())
    index["id2label"] = {"99": "no such class"}
    (folder / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match="id2label.*'99'"):
        ParScaleEARPipeline.from_pretrained(folder)


# ---------------------------------------------------------------- 6. components that do not fit


def _lite_vae(latent_channels):
    return LiteVAE(**{**TINY_VAE_CONFIG, "latent_channels": latent_channels})


MISFITS = {
    "energy_head.condition_dim": (
        "energy_head",
        lambda: EnergyHead(condition_dim=16, token_channels=4, width=32, depth=2, noise_dim=8),
        ("energy_head.config.condition_dim=16", "transformer.config.hidden_size=32"),
    ),
    "energy_head.token_channels": (
        "energy_head",
        lambda: EnergyHead(condition_dim=32, token_channels=8, width=32, depth=2, noise_dim=8),
        ("energy_head.config.token_channels=8", "transformer.config.in_channels=4"),
    ),
    "lite_hybrid.grid_size": (
        "lite_hybrid",
        lambda: LiteHybrid(in_channels=4, grid_size=8, coarse_grid_size=2, hidden_dim=16, num_heads=2),
        ("lite_hybrid.config.grid_size=8", "transformer.config.grid_size=4"),
    ),
    "lite_hybrid.in_channels": (
        "lite_hybrid",
        lambda: LiteHybrid(in_channels=8, grid_size=4, coarse_grid_size=2, hidden_dim=16, num_heads=2),
        ("lite_hybrid.config.in_channels=8", "transformer.config.in_channels=4"),
    ),
    "vae.latent_channels": (
        "vae",
        lambda: _lite_vae(8),
        ("vae.config.latent_channels=8", "transformer.config.in_channels=4"),
    ),
    "AutoencoderKL.latent_channels": (
        "vae",
        lambda: tiny_autoencoder_kl(8),
        ("vae.config.latent_channels=8", "transformer.config.in_channels=4"),
    ),
    "transformer.hidden_size": (
        "transformer",
        lambda: EARTransformer(
            in_channels=4, grid_size=4, num_classes=10, hidden_size=64, num_layers=1, num_heads=4, buffer_size=4
        ),
        ("energy_head.config.condition_dim=32", "transformer.config.hidden_size=64"),
    ),
}


@pytest.mark.parametrize("case", list(MISFITS))
def test_components_that_do_not_fit_raise_naming_both_fields(case):
    slot, make, names = MISFITS[case]
    components = tiny_components()
    components[slot] = make()
    with pytest.raises(ValueError) as info:
        ParScaleEARPipeline(**components)
    for name in names:
        assert name in str(info.value)


@pytest.mark.parametrize("slot", COMPONENTS)
@pytest.mark.parametrize("wrong", ["Linear", "NoneType", "swapped"])
def test_component_of_wrong_type_raises_type_error(slot, wrong):
    components = tiny_components()
    other = "energy_head" if slot == "transformer" else "transformer"
    replacement = {"Linear": torch.nn.Linear(4, 4), "NoneType": None, "swapped": components[other]}[wrong]
    components[slot] = replacement
    with pytest.raises(TypeError) as info:
        ParScaleEARPipeline(**components)
    assert f"`{slot}`" in str(info.value)
    assert type(replacement).__name__ in str(info.value)


# ---------------------------------------------------------------- 7. diffusers AutoencoderKL as the vae


def test_autoencoder_kl_vae_runs_and_round_trips(tmp_path, modules_cache):
    components = tiny_components()
    components["vae"] = tiny_autoencoder_kl()
    pipe = ParScaleEARPipeline(**components, id2label=ID2LABEL)
    assert pipe.vae_scale_factor == 4
    images = generate(pipe)
    assert images.shape == (3, 16, 16, 3)
    assert np.isfinite(images).all() and images.min() >= 0 and images.max() <= 1

    pipe.save_pretrained(tmp_path / "p")
    assert json.loads((tmp_path / "p" / "model_index.json").read_text())["vae"] == ["diffusers", "AutoencoderKL"]
    assert sorted(p.name for p in (tmp_path / "p" / "vae").iterdir()) == ["config.json", WEIGHTS]
    assert not [f for f in tree_hashes(tmp_path / "p") if Path(f).suffix in PICKLE_SUFFIXES]

    for loaded in (
        ParScaleEARPipeline.from_pretrained(tmp_path / "p"),
        DiffusionPipeline.from_pretrained(tmp_path / "p", trust_remote_code=True),
    ):
        assert type(loaded) is ParScaleEARPipeline
        assert type(loaded.vae) is AutoencoderKL
        assert_same_state_dict(pipe.vae, loaded.vae)
        assert_same_images(generate(loaded), images)


# ---------------------------------------------------------------- pushing to the Hub (faked, offline)


def test_push_to_hub_uploads_entry_file_and_safetensors(fake_hub):
    tiny_pipeline().push_to_hub(REPO_ID)
    [upload] = fake_hub
    assert upload.repo_id == REPO_ID
    assert upload.files[ENTRY_NAME] == ENTRY_SOURCE.read_bytes()
    assert json.loads(upload.files["model_index.json"])["_class_name"] == [
        "pipeline_parscale_ear",
        "ParScaleEARPipeline",
    ]
    assert sorted(f for f in upload.files if f.endswith(".safetensors")) == sorted(
        f"{c}/{WEIGHTS}" for c in COMPONENTS
    )
    assert not [f for f in upload.files if Path(f).suffix in PICKLE_SUFFIXES]


def test_save_pretrained_push_to_hub_uploads_entry_file(fake_hub, tmp_path):
    tiny_pipeline().save_pretrained(str(tmp_path / "p"), push_to_hub=True, repo_id=REPO_ID)
    [upload] = fake_hub
    assert ENTRY_NAME in upload.files
    assert json.loads(upload.files["model_index.json"])["_class_name"] == [
        "pipeline_parscale_ear",
        "ParScaleEARPipeline",
    ]
    assert "README.md" not in upload.files  # no generic card of diffusers' own push


def test_save_pretrained_push_to_hub_uploads_the_folders_model_card(fake_hub, tmp_path):
    """A card written into the folder (`write_model_card`) is the README that reaches the Hub."""
    folder = tmp_path / "tiny-ear"
    pipe = tiny_pipeline()
    pipe.save_pretrained(folder)
    card = "---\nlibrary_name: diffusers\ntags:\n- parscale-ear\n---\n\n# tiny-ear, its own card\n"
    (folder / "README.md").write_text(card)
    options = {"token": "hf_test", "private": True, "commit_message": "card and weights", "create_pr": True}
    pipe.save_pretrained(folder, push_to_hub=True, **options)
    [upload] = fake_hub
    assert upload.repo_id == "tiny-ear"  # the folder's name when no repo_id is given
    assert upload.files["README.md"] == card.encode()
    assert sorted(upload.files) == sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    assert {k: upload.options[k] for k in options} == options
    assert upload.options["exist_ok"] is True


def test_repo_id_loads_offline_in_a_fresh_process(saved, tmp_path):
    """As a user runs it: HF_HUB_OFFLINE=1 and HF_HUB_CACHE set before anything is imported."""
    import subprocess

    cache = tmp_path / "hf_cache"
    populate_hub_cache(cache, saved.folder)
    np.save(tmp_path / "expected.npy", saved.images[3.0])
    bound = float32_rounding_bound(saved.pipe, num_inference_steps=4)
    script = (
        "import numpy as np, torch\n"
        "from parscale_ear_hf import ParScaleEARPipeline\n"
        f"pipe = ParScaleEARPipeline.from_pretrained({REPO_ID!r})\n"
        "pipe.set_progress_bar_config(disable=True)\n"
        "images = pipe([0, 3, 7], num_inference_steps=4, guidance_scale=3.0, output_type='np',\n"
        "              generator=torch.Generator().manual_seed(0)).images\n"
        # Another process may run another number of threads, hence sum in another order.
        f"assert np.abs(images - np.load({str(tmp_path / 'expected.npy')!r})).max() < {bound!r}\n"
        "print('loaded offline')\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache)}
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "loaded offline" in proc.stdout


@pytest.mark.parametrize("keyword", ["dtype", "torch_dtype"])
def test_dtype_is_taught_and_torch_dtype_still_loads(saved, keyword):
    """diffusers >= 0.40 takes `dtype=` (the README's spelling); `torch_dtype=` still works, with its deprecation."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded = ParScaleEARPipeline.from_pretrained(saved.folder, **{keyword: torch.bfloat16})
        component = EARTransformer.from_pretrained(saved.folder, subfolder="transformer", **{keyword: torch.bfloat16})
    assert {getattr(loaded, name).dtype for name in COMPONENTS} == {torch.bfloat16} == {component.dtype}
    deprecations = [w for w in caught if "torch_dtype" in str(w.message)]
    assert bool(deprecations) == (keyword == "torch_dtype")
