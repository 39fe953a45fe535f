"""The local `evaluate` modules for FID and the Inception Score (`parscale_ear_hf.evaluate_metrics`):
loaded by path with the network blocked, they give `parscale_ear_hf.evaluation`'s numbers."""

import socket
from pathlib import Path

import datasets
import evaluate
import numpy as np
import pytest
import torch

from parscale_ear_hf.evaluate_metrics import metric_path
from parscale_ear_hf.evaluation import (
    IS_SPLITS,
    feature_statistics,
    frechet_distance,
    inception_score,
    load_extractor,
)

CLASSIFIER = Path(__file__).resolve().parents[1] / "models" / "digit_classifier"


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    """As under HF_HUB_OFFLINE=1 HF_EVALUATE_OFFLINE=1 HF_DATASETS_OFFLINE=1, and any connection fails:
    the modules must load from their local scripts alone."""

    def refuse(*args, **kwargs):
        raise OSError("network access in an offline test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(evaluate.config, "HF_EVALUATE_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True)


@pytest.fixture
def load(tmp_path):
    def load(name, config_name=None):
        return evaluate.load(metric_path(name), config_name, cache_dir=str(tmp_path))

    return load


def random_features(seed, n=200, d=16, scale=1.0, shift=0.0):
    rng = np.random.default_rng(seed)
    mixing = rng.normal(size=(d, d)) / np.sqrt(d)
    return (rng.normal(size=(n, d)) @ mixing * scale + shift).astype(np.float32)


def fid_by_hand(a, b):
    return frechet_distance(*feature_statistics(a), *feature_statistics(b))


@pytest.fixture(scope="module")
def digit_images():
    """Two sets of 1x32x32 uint8 images from different distributions, as the demo classifier takes them."""
    rng = np.random.default_rng(0)
    samples = rng.integers(0, 256, (200, 1, 32, 32), dtype=np.uint8)
    strokes = np.zeros((200, 1, 32, 32), np.uint8)
    strokes[:, :, 8:24, 14:18] = rng.integers(128, 256, (200, 1, 16, 4), dtype=np.uint8)
    return samples, strokes


def test_metric_path_finds_the_scripts_and_names_the_accepted_metrics():
    for name in ("fid", "inception_score"):
        assert (Path(metric_path(name)) / f"{name}.py").is_file()
    with pytest.raises(ValueError, match="'kid'.*accepted: 'fid', 'inception_score'"):
        metric_path("kid")


def test_fid_from_features_is_the_frechet_distance_of_their_statistics(load):
    fid = load("fid")
    a, b = random_features(0), random_features(1, scale=1.5, shift=0.3)
    result = fid.compute(predictions=a, references=b)
    assert list(result) == ["fid"]
    assert result["fid"] == pytest.approx(fid_by_hand(a, b), rel=1e-9)
    assert result["fid"] > 1

    assert abs(fid.compute(predictions=a, references=a)["fid"]) < 1e-6
    # Equal covariances: a shift s of every feature leaves FID = D s^2.
    shifted = [fid.compute(predictions=a, references=a + s)["fid"] for s in (0.25, 0.5, 1.0)]
    assert shifted == pytest.approx([16 * 0.25**2, 16 * 0.5**2, 16 * 1.0**2], abs=1e-4)


def test_fid_add_batch_in_several_batches_equals_one_compute(load):
    a, b = random_features(2), random_features(3, shift=0.5)
    fid = load("fid")
    for start, stop in ((0, 70), (70, 100), (100, 200)):
        fid.add_batch(predictions=list(a[start:stop]), references=b[start:stop])
    assert fid.compute()["fid"] == pytest.approx(load("fid").compute(predictions=a, references=b)["fid"], rel=1e-12)


def by_hand(extractor, images, batch_size):
    """Features and logits of uint8 images `(N, C, H, W)`, in the batches the module uses (bit-equal)."""
    outputs = [extractor(torch.from_numpy(images[i : i + batch_size])) for i in range(0, len(images), batch_size)]
    return torch.cat([out[0] for out in outputs]).numpy(), torch.cat([out[1] for out in outputs]).numpy()


# The demo classifier has ReLU units that never fire on these images, so the covariances are singular.
@pytest.mark.filterwarnings("ignore:Matrix is singular")
def test_images_configs_score_the_digit_classifier_features(load, digit_images):
    samples, strokes = digit_images
    extractor = load_extractor("digit", classifier=CLASSIFIER)
    sample_features, sample_logits = by_hand(extractor, samples, 100)
    stroke_features, _ = by_hand(extractor, strokes, 100)

    result = load("fid", "images").compute(
        predictions=list(samples), references=strokes, extractor="digit", classifier=str(CLASSIFIER), batch_size=100
    )
    assert result == {
        "demo_fid": pytest.approx(fid_by_hand(sample_features, stroke_features), rel=1e-9),
        "extractor": extractor.name,
    }
    assert result["demo_fid"] > 1

    # A loaded extractor works too.
    result = load("inception_score", "images").compute(predictions=samples, extractor=extractor, batch_size=100)
    mean, std = inception_score(sample_logits)
    assert result == {
        "demo_inception_score": pytest.approx(mean, rel=1e-9),
        "demo_inception_score_std": pytest.approx(std, rel=1e-9),
        "extractor": extractor.name,
    }


def test_inception_score_from_logits_is_evaluations_inception_score(load):
    logits = np.random.default_rng(4).normal(scale=3, size=(120, 10)).astype(np.float32)
    module = load("inception_score")
    mean, std = inception_score(logits)
    assert module.compute(predictions=logits) == {
        "inception_score": pytest.approx(mean, rel=1e-9),
        "inception_score_std": pytest.approx(std, rel=1e-9),
    }
    mean, std = inception_score(logits, splits=4)
    assert module.compute(predictions=logits, splits=4)["inception_score"] == pytest.approx(mean, rel=1e-9)


def test_inception_score_of_confident_uniform_predictions_is_the_number_of_classes(load):
    num_classes = 7
    # Sample i has class i % K, so every split holds every class equally often.
    labels = np.arange(num_classes * IS_SPLITS * 3) % num_classes
    logits = 40.0 * np.eye(num_classes, dtype=np.float32)[labels]
    result = load("inception_score").compute(predictions=logits)
    assert result["inception_score"] == pytest.approx(num_classes, rel=1e-6)
    assert result["inception_score_std"] < 1e-6


def test_bad_inputs_raise_errors_naming_them(load, digit_images):
    with pytest.raises(ValueError, match="16-d features but references 8-d"):
        load("fid").compute(predictions=random_features(0), references=random_features(1, d=8))
    ragged = [np.zeros(16, np.float32)] * 3 + [np.zeros(8, np.float32)]
    with pytest.raises(ValueError, match="rows of predictions differ in shape"):
        load("fid").compute(predictions=ragged, references=random_features(1, n=4))
    with pytest.raises(ValueError, match="apply to the 'images' config"):
        load("fid").compute(predictions=random_features(0), references=random_features(1), extractor="digit")
    with pytest.raises(ValueError, match="unknown config_name 'pixels'; accepted: 'features', 'images'"):
        load("fid", "pixels")

    samples, strokes = digit_images
    with pytest.raises(ValueError, match="'images' config needs a feature network: pass extractor="):
        load("fid", "images").compute(predictions=samples[:20], references=strokes[:20])
    with pytest.raises(ValueError, match="extractor='digit' needs classifier="):
        load("inception_score", "images").compute(predictions=samples[:20], extractor="digit")
    with pytest.raises(ValueError, match="`splits` must be an integer >= 1, got 0"):
        load("inception_score").compute(predictions=np.zeros((20, 10), np.float32), splits=0)


def test_fid_against_a_reference_file_takes_any_number_of_samples(load, tmp_path):
    """The ImageNet protocol compares 50k samples with ADM's stored statistics: no references column."""
    a, b = random_features(4, n=300), random_features(5, n=120, shift=0.2)
    mu, sigma = feature_statistics(b)
    np.savez(tmp_path / "ref.npz", mu=mu, sigma=sigma)
    fid = load("fid", "reference_file")
    result = fid.compute(predictions=a, reference=str(tmp_path / "ref.npz"))
    assert result["fid"] == pytest.approx(fid_by_hand(a, b), rel=1e-9)
    with pytest.raises(ValueError, match="needs reference=PATH"):
        load("fid", "reference_file").compute(predictions=a)
    with pytest.raises(ValueError, match="16-d features but the reference .* 8-d"):
        np.savez(tmp_path / "ref8.npz", mu=np.zeros(8), sigma=np.eye(8))
        load("fid", "reference_file").compute(predictions=a, reference=str(tmp_path / "ref8.npz"))
