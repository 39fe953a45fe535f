"""A small dataset shaped like ImageNet, made on the spot: JPEGs of mixed sizes and aspect ratios, labels over
1,000 classes, written as an image folder, parquet and webdataset shards (the three forms the data loader reads).

The pictures are smooth random colour fields with a few ellipses: what matters here is the file format, the
sizes and the labels, not the content.
"""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import PIL.Image
import PIL.ImageDraw

NUM_CLASSES = 1000
# (width, height) as ImageNet's photos come: landscape, portrait, square, panoramic, large; all at least 256.
SIZES = [(500, 375), (375, 500), (640, 480), (256, 256), (1000, 300), (1024, 683), (333, 500), (800, 600)]


def _picture(rng: np.random.Generator, width: int, height: int) -> PIL.Image.Image:
    coarse = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
    image = PIL.Image.fromarray(coarse).resize((width, height), PIL.Image.BICUBIC)
    draw = PIL.ImageDraw.Draw(image)
    for _ in range(3):
        x, y = rng.integers(0, width - 40), rng.integers(0, height - 40)
        w, h = rng.integers(20, max(21, width - x)), rng.integers(20, max(21, height - y))
        draw.ellipse((x, y, x + w, y + h), fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
    return image


def labels_for(count: int, seed: int = 0) -> list[int]:
    """``count`` labels over 1,000 classes, the first and the last class among them."""
    rng = np.random.default_rng(seed)
    labels = [0, NUM_CLASSES - 1, *rng.integers(1, NUM_CLASSES - 1, count - 2).tolist()]
    return labels[:count]


def write_imagenet_like(root: str | Path, count: int = 24, seed: int = 0, shards: int = 2) -> dict[str, Path]:
    """Write ``count`` JPEGs three ways under ``root``; returns the folders: ``imagefolder`` (``train/<class>/``,
    classes named like ImageNet's synsets), ``parquet`` (``train-*.parquet``, a `ClassLabel` of 1,000 names) and
    ``webdataset`` (``train-*.tar`` shards of ``<key>.jpg`` + ``<key>.cls``), and ``labels.json``."""
    import datasets

    root = Path(root)
    rng = np.random.default_rng(seed)
    labels = labels_for(count, seed)
    jpegs = []
    for i in range(count):
        buffer = io.BytesIO()
        _picture(rng, *SIZES[i % len(SIZES)]).save(buffer, format="JPEG", quality=90)
        jpegs.append(buffer.getvalue())

    folder = root / "imagefolder" / "train"
    for i, (label, data) in enumerate(zip(labels, jpegs)):
        (folder / f"n{label:08d}").mkdir(parents=True, exist_ok=True)
        (folder / f"n{label:08d}" / f"img_{i:04d}.JPEG").write_bytes(data)

    names = [f"n{c:08d}" for c in range(NUM_CLASSES)]
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=names)})
    table = datasets.Dataset.from_dict(
        {"image": [{"bytes": d, "path": f"img_{i:04d}.JPEG"} for i, d in enumerate(jpegs)], "label": labels},
        features=features,
    )
    (root / "parquet").mkdir(parents=True, exist_ok=True)
    table.to_parquet(root / "parquet" / "train-00000-of-00001.parquet")

    (root / "webdataset").mkdir(parents=True, exist_ok=True)
    per_shard = -(-count // shards)
    for s in range(shards):
        with tarfile.open(root / "webdataset" / f"train-{s:06d}.tar", "w") as tar:
            for i in range(s * per_shard, min(count, (s + 1) * per_shard)):
                for suffix, data in (("jpg", jpegs[i]), ("cls", str(labels[i]).encode())):
                    info = tarfile.TarInfo(f"{i:06d}.{suffix}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    (root / "labels.json").write_text(json.dumps(labels))
    return {
        "imagefolder": root / "imagefolder",
        "parquet": root / "parquet",
        "webdataset": root / "webdataset",
        "labels": root / "labels.json",
    }
