"""`parscale_ear_hf.data`: every source kind, the errors, preprocessing, sharding, data order, the demo split."""

import argparse
import io
import tarfile
import warnings
from unittest import mock

import datasets
import numpy as np
import PIL.Image
import pytest
import torch
from datasets.exceptions import DatasetNotFoundError
from huggingface_hub.errors import GatedRepoError, HfHubHTTPError

from parscale_ear_hf.data import (
    StepBatchSampler,
    add_dataset_arguments,
    batch_indices,
    center_crop_arr,
    image_loader,
    image_transform,
    load_dataset_from_args,
    load_image_dataset,
    prepare_mnist_demo,
    shard_for_process,
)

NAMES = ["cat", "dog"]


def random_images(count, size=(12, 10), seed=0):
    """RGB PIL images of width x height ``size`` with random pixels."""
    rng = np.random.default_rng(seed)
    return [PIL.Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)) for _ in range(count)]


def small_dataset(count=6, image="img", label="y"):
    features = datasets.Features({image: datasets.Image(), label: datasets.ClassLabel(names=NAMES)})
    return datasets.Dataset.from_dict({image: random_images(count), label: [i % 2 for i in range(count)]}, features)


def assert_image_label_dataset(dataset, count, streaming=False):
    if streaming:
        assert isinstance(dataset, datasets.IterableDataset)
        examples = list(dataset)
    else:
        assert isinstance(dataset, datasets.Dataset)
        examples = list(dataset)
    assert len(examples) == count
    assert set(examples[0]) == {"image", "label"}
    assert isinstance(examples[0]["image"], PIL.Image.Image)
    assert sorted({e["label"] for e in examples}) == [0, 1]


# ---------------------------------------------------------------- sources


def test_save_to_disk_folder_picks_the_split(tmp_path):
    datasets.DatasetDict({"train": small_dataset(6), "heldout": small_dataset(4)}).save_to_disk(tmp_path / "dd")
    train = load_image_dataset(tmp_path / "dd", image_column="img", label_column="y")
    assert_image_label_dataset(train, 6)
    assert train.features["label"].names == NAMES
    assert_image_label_dataset(
        load_image_dataset(tmp_path / "dd", "heldout", image_column="img", label_column="y", streaming=True),
        4,
        streaming=True,
    )
    with pytest.raises(ValueError, match=r"`split`='validation'.*available splits: \['heldout', 'train'\]"):
        load_image_dataset(tmp_path / "dd", "validation", image_column="img", label_column="y")


def test_image_folder_labels_from_class_folders(tmp_path):
    for i, image in enumerate(random_images(6)):
        folder = tmp_path / "images" / "train" / NAMES[i % 2]
        folder.mkdir(parents=True, exist_ok=True)
        image.save(folder / f"{i}.png")
    dataset = load_image_dataset(tmp_path / "images")
    assert_image_label_dataset(dataset, 6)
    assert dataset.features["label"].names == NAMES
    assert_image_label_dataset(load_image_dataset(tmp_path / "images", streaming=True), 6, streaming=True)


def test_parquet_file_and_folder_with_splits(tmp_path):
    (tmp_path / "pq").mkdir()
    small_dataset(6).to_parquet(tmp_path / "pq" / "train-00000.parquet")
    small_dataset(2).to_parquet(tmp_path / "pq" / "validation-00000.parquet")
    kwargs = dict(image_column="img", label_column="y")
    assert_image_label_dataset(load_image_dataset(tmp_path / "pq", **kwargs), 6)
    assert len(load_image_dataset(tmp_path / "pq", "validation", **kwargs)) == 2
    assert_image_label_dataset(load_image_dataset(tmp_path / "pq" / "train-00000.parquet", **kwargs), 6)
    selected = load_image_dataset(tmp_path / "pq", "validation", data_files={"validation": "val*.parquet"}, **kwargs)
    assert len(selected) == 2


def test_dataset_flags_data_files_make_up_the_split(tmp_path):
    (tmp_path / "pq").mkdir()
    small_dataset(6).to_parquet(tmp_path / "pq" / "part-a.parquet")
    small_dataset(2).to_parquet(tmp_path / "pq" / "part-b.parquet")
    parser = argparse.ArgumentParser()
    add_dataset_arguments(parser)
    flags = "--split heldout --data-files part-b.parquet --image-column img --label-column y"
    args = parser.parse_args(["--dataset", str(tmp_path / "pq"), *flags.split()])
    assert len(load_dataset_from_args(args, "heldout")) == 2
    # Other splits are read as the folder defines them: one "train" split of all files.
    assert len(load_dataset_from_args(args, "train")) == 8


def write_webdataset_shard(path, images, labels):
    """A webdataset tar with `000.jpg` / `000.cls` pairs, as in timm/imagenet-1k-wds."""
    with tarfile.open(path, "w") as tar:
        for i, (image, label) in enumerate(zip(images, labels)):
            buffer = io.BytesIO()
            image.save(buffer, format="JPEG")
            for name, payload in ((f"{i:03d}.jpg", buffer.getvalue()), (f"{i:03d}.cls", str(label).encode())):
                info = tarfile.TarInfo(name)
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))


def test_webdataset_shards_with_column_overrides(tmp_path):
    (tmp_path / "wds").mkdir()
    write_webdataset_shard(tmp_path / "wds" / "train-000.tar", random_images(4), [0, 1, 0, 1])
    write_webdataset_shard(tmp_path / "wds" / "train-001.tar", random_images(2, seed=1), [1, 0])
    kwargs = dict(image_column="jpg", label_column="cls")
    assert_image_label_dataset(load_image_dataset(tmp_path / "wds", **kwargs), 6)
    assert_image_label_dataset(load_image_dataset(tmp_path / "wds", streaming=True, **kwargs), 6, streaming=True)
    assert_image_label_dataset(load_image_dataset(tmp_path / "wds" / "train-000.tar", **kwargs), 4)
    with pytest.raises(ValueError, match=r"`image_column`='image'.*columns are \[.*'jpg'.*'cls'"):
        load_image_dataset(tmp_path / "wds")


def test_hub_id_is_passed_to_load_dataset(monkeypatch):
    seen = {}

    def fake_load_dataset(path, **kwargs):
        seen.update(path=path, **kwargs)
        return small_dataset(3, image="image", label="label")

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    dataset = load_image_dataset("ILSVRC/imagenet-1k", "validation", token="hf_x", data_files=["a.parquet"])
    assert len(dataset) == 3
    assert seen == dict(
        path="ILSVRC/imagenet-1k", split="validation", streaming=False, token="hf_x", data_files=["a.parquet"]
    )


# ---------------------------------------------------------------- errors


def test_missing_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    # Absolute, explicitly relative, data-file-looking, and `existing_folder/name`: all local.
    for source in (str(tmp_path / "nope"), "./nope", "shards/x.tar", "data/mnist_demo"):
        with pytest.raises(FileNotFoundError, match=r"`source`=.* does not exist. Accepted: a folder written by"):
            load_image_dataset(source)


def test_folder_without_data_files(tmp_path):
    (tmp_path / "notes.txt").write_text("no images here")
    with pytest.raises(ValueError, match=r"holds no dataset files \(found suffixes \['.txt'\]\)"):
        load_image_dataset(tmp_path)


def test_empty_dataset(tmp_path, monkeypatch):
    (tmp_path / "empty").mkdir()
    small_dataset(0, image="image", label="label").to_parquet(tmp_path / "empty" / "train.parquet")
    with pytest.raises(ValueError, match=r"empty' \(parquet\) holds no examples"):
        load_image_dataset(tmp_path / "empty")
    with pytest.raises(ValueError, match="split 'train' of .* is empty"):
        load_image_dataset(tmp_path / "empty", streaming=True)
    monkeypatch.setattr(datasets, "load_dataset", mock.Mock(return_value=small_dataset(0, "image", "label")))
    with pytest.raises(ValueError, match="split 'train' of 'owner/name' is empty"):
        load_image_dataset("owner/name")


def test_missing_columns_list_the_columns(tmp_path):
    datasets.DatasetDict({"train": small_dataset(2)}).save_to_disk(tmp_path / "dd")
    with pytest.raises(ValueError, match=r"`image_column`='image' .* columns are \['img', 'y'\].*--image-column"):
        load_image_dataset(tmp_path / "dd", label_column="y")
    with pytest.raises(ValueError, match=r"`label_column`='label' .* columns are \['img', 'y'\].*--label-column"):
        load_image_dataset(tmp_path / "dd", image_column="img")
    # Labels are optional (VAE training).
    assert load_image_dataset(tmp_path / "dd", image_column="img", label_column=None).column_names == ["image"]


def test_image_column_must_hold_images(tmp_path):
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"image": ["a", "b"], "label": [0, 1]})}).save_to_disk(
        tmp_path / "dd"
    )
    with pytest.raises(ValueError, match="holds Value.*not images"):
        load_image_dataset(tmp_path / "dd")


@pytest.mark.parametrize(
    "error, expected",
    [
        (GatedRepoError("gated", response=mock.Mock(status_code=403)), PermissionError),
        (HfHubHTTPError("unauthorized", response=mock.Mock(status_code=401)), PermissionError),
        (DatasetNotFoundError("Dataset 'ILSVRC/imagenet-1k' is a gated dataset on the Hub."), FileNotFoundError),
    ],
)
def test_gated_hub_dataset_says_how_to_pass_a_token(monkeypatch, error, expected):
    def refuse(*args, **kwargs):
        raise error

    monkeypatch.setattr(datasets, "load_dataset", refuse)
    with pytest.raises(expected, match=r"ILSVRC/imagenet-1k.*--hf-token.*HF_TOKEN.*hf auth login"):
        load_image_dataset("ILSVRC/imagenet-1k", streaming=True)


def test_other_hub_http_errors_pass_through(monkeypatch):
    error = HfHubHTTPError("server error", response=mock.Mock(status_code=500))
    monkeypatch.setattr(datasets, "load_dataset", mock.Mock(side_effect=error))
    with pytest.raises(HfHubHTTPError, match="server error"):
        load_image_dataset("owner/name")


# ---------------------------------------------------------------- preprocessing


def test_center_crop_arr_by_hand():
    # 8 wide, 4 high: the short side is already 4, so a 4x4 crop of the middle columns.
    arr = np.arange(32, dtype=np.uint8).reshape(4, 8) * 7
    cropped = center_crop_arr(PIL.Image.fromarray(arr), 4)
    np.testing.assert_array_equal(np.asarray(cropped), arr[:, 2:6])
    # 16x16 -> 4: two box halvings (16 -> 8 -> 4) average 4x4 blocks exactly.
    arr = np.kron(np.arange(16, dtype=np.uint8).reshape(4, 4) * 10, np.ones((4, 4), dtype=np.uint8))
    np.testing.assert_array_equal(np.asarray(center_crop_arr(PIL.Image.fromarray(arr), 4)), arr[::4, ::4])
    # Smaller images are upsampled to the requested size.
    assert center_crop_arr(PIL.Image.fromarray(arr[:3, :5]), 8).size == (8, 8)


def test_image_transform_range_shape_and_mode():
    rgb = PIL.Image.fromarray(np.array([[[0, 0, 0], [255, 255, 255]]] * 2, dtype=np.uint8))  # 2x2
    x = image_transform(2, 3)(rgb)
    assert x.shape == (3, 2, 2) and x.dtype == torch.float32
    torch.testing.assert_close(x[:, :, 0], -torch.ones(3, 2))
    torch.testing.assert_close(x[:, :, 1], torch.ones(3, 2))
    gray = image_transform(8, 1)(random_images(1, size=(20, 12))[0])
    assert gray.shape == (1, 8, 8) and gray.min() >= -1 and gray.max() <= 1
    assert image_transform(4, 3)(PIL.Image.new("L", (4, 4), 128)).shape == (3, 4, 4)
    with pytest.raises(ValueError, match="`channels` must be 1 or 3, got 2"):
        image_transform(8, 2)


def test_image_loader_batches(tmp_path):
    dataset = small_dataset(5).rename_columns({"img": "image", "y": "label"})
    batches = list(image_loader(dataset, 8, 3, batch_size=2))
    assert [b["pixel_values"].shape for b in batches] == [(2, 3, 8, 8), (2, 3, 8, 8), (1, 3, 8, 8)]
    assert torch.cat([b["label"] for b in batches]).tolist() == [0, 1, 0, 1, 0]
    sampler = [[4, 0], [2]]
    batches = list(image_loader(dataset, 8, 1, batch_sampler=sampler))
    torch.testing.assert_close(batches[0]["pixel_values"][1], image_transform(8, 1)(dataset[0]["image"]))
    assert [b["label"].tolist() for b in batches] == [[0, 0], [0]]


def truncated_png(image):
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()[:60]


def test_a_broken_image_is_named_with_its_file(tmp_path):
    for i, image in enumerate(random_images(4)):
        folder = tmp_path / "images" / "train" / NAMES[i % 2]
        folder.mkdir(parents=True, exist_ok=True)
        image.save(folder / f"{i}.png")
    broken = tmp_path / "images" / "train" / "cat" / "2.png"
    broken.write_bytes(truncated_png(random_images(1)[0]))
    dataset = load_image_dataset(tmp_path / "images")
    index = next(i for i, p in enumerate(dataset.cast_column("image", datasets.Image(decode=False))["image"])
                 if p["path"] == str(broken))  # fmt: skip
    # A training-style batch sampler: the index is the dataset's.
    with pytest.raises(ValueError) as info:
        list(image_loader(dataset, 8, 3, batch_sampler=[[index ^ 1], [index, index ^ 1]]))
    message = str(info.value)
    assert f"example {index} of split 'train'" in message and repr(str(broken)) in message
    assert "cannot be decoded" in message and "remove or fix that image" in message


def test_a_broken_embedded_image_is_named_by_index_and_dataset(tmp_path):
    images = [*random_images(3), {"bytes": truncated_png(random_images(1)[0]), "path": None}]
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=NAMES)})
    data = datasets.Dataset.from_dict({"image": images, "label": [0, 1, 0, 1]}, features)
    datasets.DatasetDict({"train": data}).save_to_disk(tmp_path / "dd")
    dataset = load_image_dataset(tmp_path / "dd")
    with pytest.raises(ValueError, match=rf"example 3 of '{tmp_path / 'dd' / 'train'}' cannot be decoded"):
        list(image_loader(dataset, 8, 3, batch_size=2))  # the in-order loader
    with pytest.raises(ValueError, match=r"an example of a stream cannot be decoded \(OSError"):
        list(image_loader(dataset.to_iterable_dataset(), 8, 3, batch_size=2))


def test_resizing_or_converting_warns_once_per_loader():
    gray = [PIL.Image.fromarray(a, mode="L") for a in np.random.default_rng(0).integers(0, 256, (5, 28, 28), np.uint8)]
    dataset = datasets.Dataset.from_dict({"image": gray}, datasets.Features({"image": datasets.Image()}))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        batches = list(image_loader(dataset, 32, 3, batch_size=2, allow_upsampling=True))
    assert [b["pixel_values"].shape for b in batches] == [(2, 3, 32, 32), (2, 3, 32, 32), (1, 3, 32, 32)]
    assert [str(w.message) for w in caught] == [
        "image_loader: images are 28x28 'L'; resizing to 32x32 and converting to 'RGB' (first seen: example 0 of "
        "an in-memory dataset; said once per loader, other images may differ too)."
    ]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        list(image_loader(dataset, 28, 1, batch_size=2))  # nothing to change: nothing said
        list(image_loader(dataset, 28, 3, batch_size=2))
    assert [str(w.message).split(";")[1] for w in caught] == [
        " converting to 'RGB' (first seen: example 0 of an in-memory dataset"
    ]


# ---------------------------------------------------------------- sharding and data order


def test_shard_for_process_map_style_and_iterable():
    dataset = datasets.Dataset.from_dict({"i": list(range(7))})
    parts = [list(shard_for_process(dataset, rank, 2)["i"]) for rank in range(2)]
    assert sorted(parts[0] + parts[1]) == list(range(7))
    iterable = dataset.to_iterable_dataset(num_shards=2)
    parts = [[e["i"] for e in shard_for_process(iterable, rank, 2)] for rank in range(2)]
    assert sorted(parts[0] + parts[1]) == list(range(7)) and parts[0] and parts[1]
    with pytest.raises(ValueError, match="`rank` in \\[0, world_size\\), got rank=2, world_size=2"):
        shard_for_process(dataset, 2, 2)


def test_batch_indices_are_epochs_of_permutations_fixed_by_seed():
    epoch0 = torch.cat([batch_indices(10, 3, i, seed=1) for i in range(3)])  # 3 batches, 1 dropped
    assert len(set(epoch0.tolist())) == 9
    epoch1 = torch.cat([batch_indices(10, 3, i, seed=1) for i in range(3, 6)])
    assert not torch.equal(epoch0, epoch1)
    torch.testing.assert_close(batch_indices(10, 3, 4, seed=1), epoch1[3:6])
    assert not torch.equal(batch_indices(10, 3, 0, seed=2), epoch0[:3])
    with pytest.raises(ValueError, match="batch size 11 is larger than the dataset \\(10 examples\\)"):
        batch_indices(10, 11, 0, seed=0)


def test_step_batch_sampler_splits_each_global_batch_over_ranks():
    full = list(StepBatchSampler(20, 4, seed=0, start=0, stop=6))
    ranks = [list(StepBatchSampler(20, 4, seed=0, start=2, stop=6, rank=r, world_size=2)) for r in range(2)]
    assert [a + b for a, b in zip(*ranks)] == full[2:]
    assert len(ranks[0]) == 4
    with pytest.raises(ValueError, match="global batch size 5 must be divisible by the number of processes 2"):
        StepBatchSampler(20, 5, seed=0, start=0, stop=1, world_size=2)


# ---------------------------------------------------------------- MNIST demo


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return prepare_mnist_demo(tmp_path_factory.mktemp("demo") / "mnist_demo", seed=0)


def test_mnist_demo_split(demo, tmp_path):
    assert {name: len(split) for name, split in demo.items()} == {"train": 4000, "heldout": 1000}
    for name, per_class in (("train", 400), ("heldout", 100)):
        assert np.bincount(demo[name]["label"]).tolist() == [per_class] * 10
    image = demo["train"][0]["image"]
    assert image.mode == "L" and image.size == (32, 32)
    # No image is in both splits.
    as_bytes = {name: {np.asarray(im).tobytes() for im in split["image"]} for name, split in demo.items()}
    assert not as_bytes["train"] & as_bytes["heldout"]
    # Deterministic with the seed; another seed gives another split.
    again = prepare_mnist_demo(tmp_path / "again", seed=0)
    assert np.array_equal(np.asarray(again["heldout"][7]["image"]), np.asarray(demo["heldout"][7]["image"]))
    other = prepare_mnist_demo(tmp_path / "other", seed=1)
    assert {np.asarray(im).tobytes() for im in other["heldout"]["image"]} != as_bytes["heldout"]
    # And it loads through the one loader.
    loaded = load_image_dataset(tmp_path / "again", "heldout")
    assert len(loaded) == 1000 and loaded.features["label"].names == [str(d) for d in range(10)]


@pytest.mark.parametrize("streaming", [False, True])
def test_images_smaller_than_the_image_size_are_refused_naming_the_first_file(tmp_path, streaming):
    for i, (name, size) in enumerate([("cat", (40, 30)), ("dog", (64, 64))]):
        (tmp_path / "imgs" / "train" / name).mkdir(parents=True)
        PIL.Image.new("RGB", size, (i * 60, 0, 0)).save(tmp_path / "imgs" / "train" / name / f"{i}.png")
    dataset = load_image_dataset(tmp_path / "imgs", streaming=streaming)
    with pytest.raises(ValueError, match=r"smaller than --image-size 32: the first, .*0\.png'\), is 40x30") as info:
        image_loader(dataset, 32, 3, batch_size=2)  # refused when the loader is made, before any batch
    assert "--allow-upsampling" in str(info.value) and "at most 30" in str(info.value)
    assert len(list(image_loader(dataset, 30, 3, batch_size=2))) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the resize warning
        assert len(list(image_loader(dataset, 32, 3, batch_size=2, allow_upsampling=True))) == 1


def test_reference_features_refuse_a_first_image_smaller_than_the_image_size(tmp_path):
    from parscale_ear_hf.evaluation.reference import dataset_features

    for i, (name, size) in enumerate([("cat", (40, 30)), ("dog", (64, 64))]):
        (tmp_path / "imgs" / "train" / name).mkdir(parents=True)
        PIL.Image.new("RGB", size, (i * 60, 0, 0)).save(tmp_path / "imgs" / "train" / name / f"{i}.png")
    dataset = load_image_dataset(tmp_path / "imgs", label_column=None)
    # Refused at the first image, before the extractor sees anything (there is none to see it).
    with pytest.raises(ValueError, match=r"dataset_features: the images are smaller than --image-size 32: the first"):
        dataset_features(dataset, image_size=32, channels=3, extractor=None, progress=False)
