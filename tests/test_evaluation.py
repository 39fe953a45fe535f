"""FID / IS / precision-recall: the metrics against independent computations, and the sampling
loop's guarantees (same seed same score, two processes = one, a killed run resumes exactly,
bad input fails before any sampling)."""

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import datasets
import numpy as np
import PIL.Image
import pytest
import torch
from scipy.spatial.distance import cdist

from parscale_ear_hf import evaluation as ev
from parscale_ear_hf.digit_classifier import DigitClassifier

from conftest import frechet_by_eigh, tiny_pipeline

REPO = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------ metrics


def _gaussian_features(n, d, seed, shift=0.0):
    rng = np.random.default_rng(seed)
    mixing = rng.normal(size=(d, d)) / np.sqrt(d)
    return rng.normal(size=(n, d)) @ mixing + shift


def test_frechet_distance_matches_independent_computations():
    a, b = _gaussian_features(400, 24, 0), _gaussian_features(300, 24, 1, shift=0.3)
    ours = ev.frechet_distance(*ev.feature_statistics(a), *ev.feature_statistics(b))
    assert ours == pytest.approx(frechet_by_eigh(a, b), rel=1e-6)

    from torchmetrics.image.fid import FrechetInceptionDistance

    class Identity(torch.nn.Module):
        num_features = 24

        def forward(self, x):
            return x

    fid = FrechetInceptionDistance(feature=Identity())
    fid.update(torch.from_numpy(a), real=True)
    fid.update(torch.from_numpy(b), real=False)
    assert ours == pytest.approx(fid.compute().item(), rel=1e-6)
    assert ev.frechet_distance(*ev.feature_statistics(a), *ev.feature_statistics(a)) == pytest.approx(0, abs=1e-8)


def test_frechet_distance_rejects_statistics_of_different_sizes():
    mu, sigma = ev.feature_statistics(_gaussian_features(50, 8, 0))
    with pytest.raises(ValueError, match="shapes do not match"):
        ev.frechet_distance(mu, sigma, mu[:4], sigma[:4, :4])


def test_inception_score_matches_torchmetrics_and_its_bounds():
    from torchmetrics.image.inception import InceptionScore

    logits = np.random.default_rng(0).normal(size=(200, 10)) * 3
    ours, _ = ev.inception_score(logits, splits=1)

    class Identity(torch.nn.Module):
        def forward(self, x):
            return x

    metric = InceptionScore(feature=Identity(), splits=1)
    metric.update(torch.from_numpy(logits))
    assert ours == pytest.approx(metric.compute()[0].item(), rel=1e-6)
    # Confident and balanced over K classes: IS = K. All alike: IS = 1.
    confident = np.eye(10)[np.arange(100) % 10] * 50
    assert ev.inception_score(confident)[0] == pytest.approx(10, rel=1e-6)
    assert ev.inception_score(np.tile(confident[:1], (100, 1)))[0] == pytest.approx(1, rel=1e-6)


def test_precision_recall_match_brute_force(monkeypatch):
    real, fake = _gaussian_features(150, 6, 0), _gaussian_features(120, 6, 1, shift=0.5)

    def brute(manifold, points, k=3):
        radii = np.sort(cdist(manifold, manifold), axis=1)[:, k]
        return (cdist(points, manifold) <= radii[None]).any(axis=1).mean()

    precision, recall = ev.precision_recall(real, fake)
    assert precision == pytest.approx(brute(real, fake))
    assert recall == pytest.approx(brute(fake, real))
    assert 0 < recall < 1 and 0 < precision < 1
    monkeypatch.setattr(ev.metrics, "_block_rows", lambda other: 7)  # many blocks, a ragged last one
    assert ev.precision_recall(real, fake) == (precision, recall)
    assert ev.precision_recall(real, real) == (1.0, 1.0)
    assert ev.precision_recall(real, real + 100) == (0.0, 0.0)


# ------------------------------------------------------------------------------ a tiny evaluation setup


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny 16x16 RGB pipeline, a 3-channel DigitClassifier as the extractor, and a reference
    dataset of 16x16 images saved with `save_to_disk`."""
    root = tmp_path_factory.mktemp("eval")
    tiny_pipeline().save_pretrained(root / "pipe")
    torch.manual_seed(0)
    classifier = DigitClassifier(in_channels=3, image_size=16, width=4, feature_dim=6, dropout=0.0)
    with torch.no_grad():  # spread the untrained features out, so that the metrics are far from 0
        classifier.to_features.weight.mul_(30)
    classifier.save_pretrained(root / "clf")
    rng = np.random.default_rng(0)
    images = [PIL.Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)) for _ in range(40)]
    datasets.Dataset.from_dict({"image": images, "label": [i % 10 for i in range(40)]}).save_to_disk(root / "data")
    return root


def _args(setup, output_dir, **overrides):
    parser = ev.add_arguments(argparse.ArgumentParser())
    argv = [
        "--model", str(setup / "pipe"), "--output-dir", str(output_dir), "--extractor", "digit",
        "--classifier", str(setup / "clf"), "--dataset", str(setup / "data"), "--split", "train",
        "--reference-cache-dir", str(setup / "refs"), "--images-per-class", "2", "--batch-size", "3",
        "--steps", "4",
    ]  # fmt: skip
    for key, value in overrides.items():
        flag = "--" + key.replace("_", "-")
        if flag in argv:
            i = argv.index(flag)
            del argv[i : i + 2]
        if value == "":  # a switch
            argv.append(flag)
        elif value is not None:
            argv += [flag, *str(value).split()]
    return parser.parse_args(argv)


def test_demo_metrics_are_named_as_demo_and_recorded(setup, tmp_path):
    record = ev.run(_args(setup, tmp_path / "a", write_png="", adm_npz=tmp_path / "samples.npz"))
    assert set(record["metrics"]) == {"demo_fid", "demo_is", "demo_is_std", "demo_precision", "demo_recall"}
    assert record["metric"] == "demo_fid" and record["value"] == record["metrics"]["demo_fid"] > 0
    assert record["extractor"]["name"].startswith("demo digit classifier") and record["extractor"]["resize"] == "none"
    assert record["extractor"]["weights_sha1"] == record["reference"]["weights_sha1"] != None  # noqa: E711
    assert record["not_computed"] == {
        "sfid": "not computed: the digit classifier has no spatial features (sFID needs Inception's mixed_6)"
    }
    assert record["samples"]["total"] == 20 and record["reference"]["count"] == 40
    assert record["sampling"]["num_inference_steps"] == 4 and record["provenance"]["git_revision"]
    assert json.loads((tmp_path / "a" / "results.json").read_text())["value"] == record["value"]
    # The optional ADM sample file holds the scored samples, in sample order.
    samples = np.load(tmp_path / "samples.npz")["arr_0"]
    assert samples.shape == (20, 16, 16, 3)
    extractor = ev.load_extractor("digit", classifier=setup / "clf")
    features = ev.collect_features(tmp_path / "a", 20).features
    np.testing.assert_allclose(extractor(torch.from_numpy(samples).permute(0, 3, 1, 2))[0], features, rtol=1e-5)


def test_same_seed_same_score_other_seed_other_score(setup, tmp_path):
    first = ev.run(_args(setup, tmp_path / "a"))["metrics"]
    assert ev.run(_args(setup, tmp_path / "b"))["metrics"] == first
    assert ev.run(_args(setup, tmp_path / "c", seed=1))["metrics"]["demo_fid"] != first["demo_fid"]


def test_features_do_not_depend_on_the_number_of_processes(setup, tmp_path):
    from parscale_ear_hf import ParScaleEARPipeline

    pipe = ParScaleEARPipeline.from_pretrained(setup / "pipe")
    pipe.set_progress_bar_config(disable=True)
    extractor = ev.load_extractor("digit", classifier=setup / "clf")
    kwargs = dict(images_per_class=2, batch_size=3, sampling={"num_inference_steps": 4}, progress=False)
    ev.generate_features(pipe, extractor, output_dir=tmp_path / "one", **kwargs)
    for rank in (1, 0):
        ev.generate_features(pipe, extractor, output_dir=tmp_path / "two", rank=rank, world_size=2, **kwargs)
    one, two = ev.collect_features(tmp_path / "one", 20), ev.collect_features(tmp_path / "two", 20)
    for a, b in zip(one, two):
        np.testing.assert_array_equal(a, b)
    assert list(one[2]) == [i % 10 for i in range(20)]
    # A part that goes missing is noticed, never silently scored on fewer samples.
    next((tmp_path / "two" / "parts").glob("*.npz")).unlink()
    with pytest.raises(RuntimeError, match="expected each of 0..19 once"):
        ev.collect_features(tmp_path / "two", 20)


def _cli_argv(setup, output_dir=None, images_per_class=2, batch_size=3):
    argv = [
        "--model", str(setup / "pipe"), "--extractor", "digit", "--classifier", str(setup / "clf"),
        "--dataset", str(setup / "data"), "--split", "train", "--reference-cache-dir", str(setup / "refs"),
        "--batch-size", str(batch_size), "--steps", "4",
    ]  # fmt: skip
    if output_dir is not None:
        argv += ["--output-dir", str(output_dir), "--images-per-class", str(images_per_class)]
    return argv


def _env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}


def test_two_processes_give_the_score_of_one(setup, tmp_path):
    script = str(REPO / "examples" / "eval_fid.py")
    single = subprocess.run(
        [sys.executable, script, *_cli_argv(setup, tmp_path / "one")], env=_env(), capture_output=True, text=True
    )
    assert single.returncode == 0, single.stderr[-3000:]
    double = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", script,
         *_cli_argv(setup, tmp_path / "two")],
        env=_env(), capture_output=True, text=True,
    )  # fmt: skip
    assert double.returncode == 0, double.stderr[-3000:]
    one = json.loads((tmp_path / "one" / "results.json").read_text())
    two = json.loads((tmp_path / "two" / "results.json").read_text())
    assert two["processes"] == 2 and one["processes"] == 1
    for key, value in one["metrics"].items():
        assert two["metrics"][key] == pytest.approx(value, rel=1e-6), key


def test_killed_run_resumes_to_the_same_score(setup, tmp_path):
    script = str(REPO / "examples" / "eval_fid.py")
    argv = _cli_argv(setup, tmp_path / "run", images_per_class=10, batch_size=2)
    process = subprocess.Popen([sys.executable, script, *argv], env=_env(), stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)  # fmt: skip
    parts = tmp_path / "run" / "parts"
    deadline = time.monotonic() + 120
    while len(list(parts.glob("batch-*.npz"))) < 3 and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()
    done = len(list(parts.glob("batch-*.npz")))
    assert 3 <= done < 50, f"the run must be killed half-way, it had written {done} of 50 parts"
    assert not (tmp_path / "run" / "results.json").exists()
    resumed = subprocess.run([sys.executable, script, *argv], env=_env(), capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    fresh_argv = _cli_argv(setup, tmp_path / "fresh", images_per_class=10, batch_size=2)
    subprocess.run([sys.executable, script, *fresh_argv], env=_env(), capture_output=True, check=True)
    fresh = json.loads((tmp_path / "fresh" / "results.json").read_text())
    result = json.loads((tmp_path / "run" / "results.json").read_text())
    assert result["metrics"] == fresh["metrics"]


def test_memory_benchmark_measures_both_sizes_in_one_run(setup, tmp_path):
    script = str(REPO / "examples" / "bench_eval_memory.py")
    command = [sys.executable, script, "--images-per-class", "1", "--factor", "2", "--results-file",
               str(tmp_path / "memory.json"), "--", *_cli_argv(setup)]  # fmt: skip
    subprocess.run(command, env=_env(), check=True, capture_output=True)
    record = json.loads((tmp_path / "memory.json").read_text())
    small, large = record["runs"]
    assert (small["samples"], large["samples"]) == (10, 20)
    assert record["value"] == pytest.approx(large["peak_rss_mib"] / small["peak_rss_mib"])
    assert small["peak_rss_mib"] > 50  # a real measurement of a process that loaded torch, in MiB


def test_resume_with_other_settings_or_weights_is_refused(setup, tmp_path):
    ev.run(_args(setup, tmp_path / "a"))
    with pytest.raises(ValueError, match="partial features of another evaluation.*seed"):
        ev.run(_args(setup, tmp_path / "a", seed=5))
    # The same folder name with retrained weights must not reuse the old features.
    from parscale_ear_hf import ParScaleEARPipeline

    retrained = ParScaleEARPipeline.from_pretrained(setup / "pipe")
    with torch.no_grad():
        retrained.energy_head.out.weight.add_(0.1)
    retrained.save_pretrained(tmp_path / "pipe")
    with pytest.raises(ValueError, match="weights_sha256"):
        ev.run(_args(setup, tmp_path / "a", model=tmp_path / "pipe"))


# ------------------------------------------------------------------------------ references


def test_dataset_reference_is_cached_and_read_back(setup, tmp_path):
    extractor = ev.load_extractor("digit", classifier=setup / "clf")
    data = datasets.load_from_disk(str(setup / "data"))
    kwargs = dict(dataset_name="mydata", split="train", image_size=16, channels=3, extractor=extractor,
                  cache_dir=tmp_path, progress=False)  # fmt: skip
    first = ev.reference_from_dataset(lambda: data, **kwargs)

    def must_not_open():
        raise AssertionError("a cached reference must not open the dataset")

    second = ev.reference_from_dataset(must_not_open, **kwargs)
    np.testing.assert_array_equal(first.sigma, second.sigma)
    assert second.count == 40 and second.extractor == extractor.name and second.image_size == 16
    pixels = torch.from_numpy(np.stack([np.asarray(im) for im in data["image"]])).permute(0, 3, 1, 2)
    mu, _ = ev.feature_statistics(extractor(pixels)[0].numpy())
    np.testing.assert_allclose(second.mu, mu, rtol=1e-6)
    key = ev.reference_cache_path(tmp_path, "mydata", "train", 16, extractor)
    assert key.is_file() and "mydata" in key.name and "16px" in key.name


def test_adm_reference_images_give_precision_recall_features(setup, tmp_path):
    extractor = ev.load_extractor("digit", classifier=setup / "clf")
    images = np.random.default_rng(0).integers(0, 256, (12, 16, 16, 3), dtype=np.uint8)
    mu, sigma = np.zeros(6), np.eye(6)
    np.savez(tmp_path / "ref.npz", mu=mu, sigma=sigma, arr_0=images)
    reference = ev.load_reference(tmp_path / "ref.npz", extractor)
    np.testing.assert_array_equal(reference.features, extractor(torch.from_numpy(images).permute(0, 3, 1, 2))[0])
    assert reference.image_size == 16 and reference.extractor is None
    reference.check_fits(extractor, 16)
    with pytest.raises(ValueError, match="holds 16x16 images, but the model makes 32x32"):
        reference.check_fits(extractor, 32)


def test_adm_sample_npz_matches_the_pngs(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, (5, 8, 8, 3), dtype=np.uint8)
    for i, image in enumerate(images):
        PIL.Image.fromarray(image).save(tmp_path / f"{i:06d}.png")
    ev.write_adm_npz(tmp_path, tmp_path / "samples.npz", 5)
    np.testing.assert_array_equal(np.load(tmp_path / "samples.npz")["arr_0"], images)


def test_to_uint8_rounds_like_the_pipelines_pil_output():
    from diffusers.image_processor import VaeImageProcessor

    images = torch.rand(2, 3, 4, 4)
    pil = VaeImageProcessor.numpy_to_pil(images.permute(0, 2, 3, 1).numpy())
    expected = np.stack([np.asarray(p) for p in pil])
    np.testing.assert_array_equal(ev.to_uint8(images).permute(0, 2, 3, 1).numpy(), expected)


# ------------------------------------------------------------------------------ bad input, before sampling


def _reference_file(path, **arrays):
    np.savez(path, **arrays)
    return path


@pytest.mark.parametrize(
    "case, match",
    [
        ("missing_reference", "is not a file"),
        ("reference_wrong_dims", r"do not fit the extractor .* 6 dimensions"),
        ("reference_no_sigma", "needs 'mu' and 'sigma'"),
        ("reference_other_extractor", "was made with the extractor 'inception"),
        ("reference_other_size", "holds 32x32 images, but the model makes 16x16"),
        ("reference_other_weights", "was made with the weights sha1 '0000000000"),
        ("reference_other_resize", "was made with the resize 'tf1_bilinear', but .* has 'none'"),
        ("corrupt_reference", "not a readable .npz"),
        ("missing_classifier", "is not a folder"),
        ("num_samples_not_divisible", "--num-samples 25 is not a multiple of the 10 classes"),
        ("both_references", "exactly one of --reference"),
        ("no_images_per_class", "--images-per-class"),
    ],
)
def test_bad_input_fails_before_any_sampling(setup, tmp_path, case, match):
    six = dict(mu=np.zeros(6), sigma=np.eye(6))
    overrides = {
        "missing_reference": dict(dataset=None, reference=tmp_path / "nope.npz"),
        "reference_wrong_dims": dict(
            dataset=None, reference=_reference_file(tmp_path / "r5.npz", mu=np.zeros(5), sigma=np.eye(5))
        ),
        "reference_no_sigma": dict(dataset=None, reference=_reference_file(tmp_path / "mu.npz", mu=np.zeros(6))),
        "missing_classifier": dict(classifier=tmp_path / "nope"),
        "num_samples_not_divisible": dict(images_per_class=None, num_samples=25),
        "both_references": dict(reference=_reference_file(tmp_path / "r6.npz", **six)),
        "no_images_per_class": dict(images_per_class=0),
    }.get(case, {})
    if case == "reference_other_extractor":
        Path(tmp_path / "o").mkdir()
        ev.Reference(np.zeros(6), np.eye(6), None, "x", "inception-v3-compat (torch-fidelity)", 16, 10).save(
            tmp_path / "o" / "r.npz"
        )
        overrides = dict(dataset=None, reference=tmp_path / "o" / "r.npz")
    if case == "reference_other_size":
        ev.Reference(np.zeros(6), np.eye(6), None, "x", None, 32, 10).save(tmp_path / "r.npz")
        overrides = dict(dataset=None, reference=tmp_path / "r.npz")
    if case in ("reference_other_weights", "reference_other_resize"):
        made = dict(weights_sha1="0" * 40) if case == "reference_other_weights" else dict(resize="tf1_bilinear")
        name = ev.load_extractor("digit", classifier=setup / "clf").name
        ev.Reference(np.zeros(6), np.eye(6), None, "x", name, 16, 10, **made).save(tmp_path / "r.npz")
        overrides = dict(dataset=None, reference=tmp_path / "r.npz")
    if case == "corrupt_reference":
        (tmp_path / "c.npz").write_bytes(b"not a zip")
        overrides = dict(dataset=None, reference=tmp_path / "c.npz")
    args = _args(setup, tmp_path / "out", **overrides)
    with pytest.raises((ValueError, FileNotFoundError), match=match):
        ev.run(args)
    assert not (tmp_path / "out" / "parts").exists()


def test_inception_extractor_errors_name_the_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match="weights-inception-2015-12-05"):
        ev.load_extractor("inception", inception_weights=tmp_path / "missing.pth")
    with pytest.raises(ValueError, match="accepted: 'inception', 'digit'"):
        ev.load_extractor("clip")
    with pytest.raises(ValueError, match="needs --classifier"):
        ev.load_extractor("digit")


def test_reconstruction_fid_and_its_real_data_floor(setup, tmp_path):
    """rFID compares a split with its own reconstructions; with --max-images both read the same
    seeded subset, so the 'floor' of the split against itself is 0 while the untrained VAE's
    reconstructions are far off."""
    parser = ev.add_reconstruction_arguments(argparse.ArgumentParser())
    args = parser.parse_args(
        ["--vae", str(setup / "pipe"), "--vae-subfolder", "vae", "--dataset", str(setup / "data"), "--split", "train",
         "--baseline-split", "train", "--max-images", "24", "--extractor", "digit", "--classifier", str(setup / "clf"),
         "--reference-cache-dir", str(tmp_path / "refs"), "--results-file", str(tmp_path / "rfid.json"),
         "--device", "cpu"]
    )  # fmt: skip
    record = ev.run_reconstruction(args)
    metrics = record["metrics"]
    assert metrics["demo_fid_real_train"] == pytest.approx(0, abs=1e-6)
    assert (metrics["demo_precision_real_train"], metrics["demo_recall_real_train"]) == (1.0, 1.0)
    assert metrics["demo_rfid"] > 1e-3 and record["value"] == metrics["demo_rfid"]
    assert set(metrics) == {"demo_rfid", "demo_rprecision", "demo_rrecall", *(f"demo_{m}_real_train" for m in
                            ("fid", "precision", "recall"))}  # fmt: skip
    assert "no spatial features" in record["not_computed"]["sfid"]
    assert record["samples"]["total"] == 24 and record["model"] == str(setup / "pipe")
    assert record["reference"]["count"] == 24


def test_limited_reference_is_a_shuffled_subset_not_a_prefix(setup, tmp_path):
    extractor = ev.load_extractor("digit", classifier=setup / "clf")
    data = datasets.load_from_disk(str(setup / "data"))
    reference = ev.reference_from_dataset(
        data, dataset_name="d", split="train", image_size=16, channels=3, extractor=extractor, cache_dir=tmp_path,
        max_images=10, progress=False,
    )  # fmt: skip
    first, _ = ev.dataset_features(data, image_size=16, channels=3, extractor=extractor, max_images=10, progress=False)
    shuffled, spatial = ev.dataset_features(
        data.shuffle(seed=0), image_size=16, channels=3, extractor=extractor, max_images=10, progress=False
    )
    assert spatial is None
    np.testing.assert_allclose(reference.features, shuffled, rtol=1e-6)
    assert not np.allclose(reference.features, first)


@pytest.mark.parametrize(
    "flags, match",
    [
        (dict(steps=0), "`--steps` must be an integer >= 1, got 0"),
        (dict(guidance=0.5), "`--guidance` must be a finite number >= 1.0, got 0.5"),
        (dict(guidance="nan"), "`--guidance` must be a finite number >= 1.0, got nan"),
        (dict(temperature=-1), "`--temperature` must be a finite number >= 0.0, got -1.0"),
        (dict(temperature="inf"), "`--temperature` must be a finite number >= 0.0, got inf"),
        (dict(batch_size=0), "`--batch-size` must be an integer >= 1, got 0"),
        (dict(reference_max_images=1), "`--reference-max-images` must be an integer >= 2, got 1"),
    ],
)
def test_bad_flags_fail_before_anything_loads(setup, tmp_path, monkeypatch, flags, match):
    from parscale_ear_hf import ParScaleEARPipeline

    def must_not_load(*args, **kwargs):
        raise AssertionError("the model was loaded before the flags were checked")

    monkeypatch.setattr(ParScaleEARPipeline, "from_pretrained", must_not_load)
    with pytest.raises(ValueError, match=match):
        ev.run(_args(setup, tmp_path / "out", **flags))
    assert not (tmp_path / "out").exists()


def test_a_model_dependent_refusal_comes_before_eval_config_and_the_fix_reruns(setup, tmp_path):
    with pytest.raises(ValueError, match="--num-samples 25 is not a multiple of the 10 classes"):
        ev.run(_args(setup, tmp_path / "out", images_per_class=None, num_samples=25))
    assert not (tmp_path / "out" / "eval_config.json").exists()
    assert ev.run(_args(setup, tmp_path / "out", steps=4))["sampling"]["num_inference_steps"] == 4


def test_eval_config_without_features_takes_new_settings(tmp_path):
    ev.check_run_config(tmp_path, {"seed": 0, "steps": 64})
    ev.check_run_config(tmp_path, {"seed": 0, "steps": 8})  # nothing computed yet: not a resume
    assert json.loads((tmp_path / "eval_config.json").read_text()) == {"seed": 0, "steps": 8}
    ev.part_path(tmp_path, 0).parent.mkdir()
    ev.part_path(tmp_path, 0).write_bytes(b"")
    with pytest.raises(ValueError, match=r"partial features of another evaluation \(steps: 8 there, 4 now\)"):
        ev.check_run_config(tmp_path, {"seed": 0, "steps": 4})


@pytest.mark.parametrize(
    "flags, match",
    [
        (["--batch-size", "0"], "`--batch-size` must be an integer >= 1, got 0"),
        (["--max-images", "3"], "`--max-images` must be an integer >= 4, got 3"),
    ],
)
def test_reconstruction_flags_fail_before_the_vae_loads(setup, tmp_path, monkeypatch, flags, match):
    from parscale_ear_hf.evaluation import driver

    def must_not_load(*args, **kwargs):
        raise AssertionError("the VAE was loaded before the flags were checked")

    monkeypatch.setattr(driver, "load_vae", must_not_load)
    parser = ev.add_reconstruction_arguments(argparse.ArgumentParser())
    args = parser.parse_args(
        ["--vae", str(setup / "pipe"), "--vae-subfolder", "vae", "--dataset", str(setup / "data"),
         "--results-file", str(tmp_path / "rfid.json"), *flags]
    )  # fmt: skip
    with pytest.raises(ValueError, match=match):
        ev.run_reconstruction(args)


def test_a_class_subset_samples_only_those_classes_and_is_recorded(setup, tmp_path):
    assert ev.sample_labels(10, 2, [3, 7]).tolist() == [3, 7, 3, 7]
    assert ev.sample_labels(3, 2).tolist() == [0, 1, 2, 0, 1, 2]
    record = ev.run(_args(setup, tmp_path / "a", images_per_class=None, num_samples=10, classes="3 7"))
    assert record["samples"] == {"images_per_class": 5, "num_classes": 10, "classes": [3, 7], "total": 10}
    assert json.loads((tmp_path / "a" / "eval_config.json").read_text())["classes"] == [3, 7]


@pytest.mark.parametrize(
    "classes, match",
    [("3 10", r"--classes \[3, 10\] must be distinct class ids in \[0, 9\].*out of range: \[10\]"),
     ("3 3", r"--classes \[3, 3\] must be distinct"),
     ("3 7 8", "--num-samples 10 is not a multiple of the 3 classes sampled")],
)  # fmt: skip
def test_bad_class_subsets_are_refused_before_sampling(setup, tmp_path, classes, match):
    with pytest.raises(ValueError, match=match):
        ev.run(_args(setup, tmp_path / "a", images_per_class=None, num_samples=10, classes=classes))
    assert not (tmp_path / "a" / "eval_config.json").exists()
