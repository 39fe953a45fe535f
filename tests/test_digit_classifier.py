import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from diffusers import ImagePipelineOutput

from parscale_ear_hf import EARTransformer, EnergyHead, LiteHybrid, LiteVAE, ParScaleEARPipeline
from parscale_ear_hf.data import prepare_mnist_demo
from parscale_ear_hf.digit_classifier import (
    DigitClassifier,
    class_accuracy_of_pipeline,
    evaluate_accuracy,
    images_and_labels,
    predict,
    random_shift_rotate,
    train_digit_classifier,
)

from conftest import tiny_pipeline

REPO = Path(__file__).resolve().parents[1]
SMALL = dict(width=8, feature_dim=32)  # a fast classifier for the shape / pipeline tests


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """The real MNIST demo splits: a class-balanced 500-image train subset and the 1,000 held-out."""
    data = prepare_mnist_demo(tmp_path_factory.mktemp("d"))
    return {"train": data["train"].shuffle(seed=0).select(range(500)), "heldout": data["heldout"]}


@pytest.fixture(scope="module")
def trained(demo):
    return train_digit_classifier(
        demo["train"], demo["heldout"], steps=150, batch_size=32, lr=3e-3, seed=0, config={"width": 16}
    )


@pytest.fixture
def images():
    return torch.rand(3, 1, 32, 32, generator=torch.Generator().manual_seed(0))


# ---------------------------------------------------------------- the model


def test_shapes(images):
    model = DigitClassifier(**SMALL).eval()
    assert model(images).shape == (3, 10)
    assert model.features(images).shape == (3, 32)
    assert (model.features(images) >= 0).all()
    assert DigitClassifier(in_channels=3, image_size=16, num_classes=4).eval()(torch.rand(2, 3, 16, 16)).shape == (
        2,
        4,
    )


@pytest.mark.parametrize(
    "bad, message",
    [
        (torch.rand(3, 3, 32, 32), r"\(B, 1, 32, 32\).*got \(3, 3, 32, 32\)"),
        (torch.rand(3, 1, 28, 28), r"\(B, 1, 32, 32\).*got \(3, 1, 28, 28\)"),
        (torch.rand(1, 32, 32), r"got \(1, 32, 32\)"),
        (torch.zeros(2, 1, 32, 32, dtype=torch.uint8), "floating-point"),
        (torch.rand(2, 1, 32, 32) * 2 - 1, r"pixel values in \[0, 1\]"),
        (torch.rand(2, 1, 32, 32) * 255, r"pixel values in \[0, 1\]"),
    ],
)
def test_bad_input_is_a_clear_error(bad, message):
    model = DigitClassifier(**SMALL)
    with pytest.raises(ValueError, match=message):
        model(bad)
    with pytest.raises(ValueError, match=message):
        model.features(bad)


@pytest.mark.parametrize(
    "kwargs, field",
    [({"image_size": 20}, "image_size"), ({"width": 0}, "width"), ({"num_classes": 1}, "num_classes"),
     ({"dropout": 1.0}, "dropout"), ({"in_channels": 1.5}, "in_channels")],
)  # fmt: skip
def test_bad_config_names_the_field(kwargs, field):
    with pytest.raises(ValueError, match=f"DigitClassifier: `{field}`"):
        DigitClassifier(**kwargs)


def test_save_load_round_trip(tmp_path, images):
    torch.manual_seed(0)
    model = DigitClassifier(**SMALL).eval()
    model.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "diffusion_pytorch_model.safetensors"]
    loaded = DigitClassifier.from_pretrained(tmp_path).eval()
    public = lambda config: {k: v for k, v in config.items() if not k.startswith("_")}
    assert public(loaded.config) == public(model.config) and loaded.config.width == 8
    assert torch.equal(loaded(images), model(images))
    assert torch.equal(loaded.features(images), model.features(images))


# ---------------------------------------------------------------- data and augmentation


def test_images_and_labels(demo):
    images, labels = images_and_labels(demo["heldout"])
    assert images.shape == (1000, 1, 32, 32) and images.dtype == torch.float32
    assert images.min() == 0 and images.max() == 1
    assert labels.dtype == torch.long and torch.equal(torch.bincount(labels), torch.full((10,), 100))


def test_augmentation_is_seeded_and_keeps_shape_and_range(images):
    a = random_shift_rotate(images, torch.Generator().manual_seed(1))
    assert torch.equal(a, random_shift_rotate(images, torch.Generator().manual_seed(1)))
    assert not torch.equal(a, random_shift_rotate(images, torch.Generator().manual_seed(2)))
    assert a.shape == images.shape and a.min() >= 0 and a.max() <= 1
    still = random_shift_rotate(images, torch.Generator(), max_shift=0, max_degrees=0, scale_range=0)
    torch.testing.assert_close(still, images, atol=1e-5, rtol=0)


def test_augmentation_shift_stays_within_max_shift():
    image = torch.zeros(64, 1, 16, 16)
    image[:, 0, 7:9, 7:9] = 1
    out = random_shift_rotate(image, torch.Generator().manual_seed(0), max_shift=2, max_degrees=0, scale_range=0)
    grid = torch.arange(16.0)
    mass = out.sum(dim=(1, 2, 3))
    center_y = (out.sum(dim=3).squeeze(1) * grid).sum(1) / mass
    center_x = (out.sum(dim=2).squeeze(1) * grid).sum(1) / mass
    torch.testing.assert_close(mass, torch.full((64,), 4.0))  # a pure translation keeps the ink
    shifts = torch.stack([center_y - 7.5, center_x - 7.5])
    assert shifts.abs().max() <= 2 + 1e-4 and shifts.abs().max() > 1  # the whole range is used


# ---------------------------------------------------------------- training


def test_training_beats_80_percent_on_heldout(trained, demo):
    model, metrics = trained
    assert metrics["heldout_accuracy"] > 0.8, metrics
    assert metrics["num_train"] == 500 and metrics["num_heldout"] == 1000
    assert not model.training
    images, labels = images_and_labels(demo["heldout"])
    assert evaluate_accuracy(model, images, labels) == metrics["heldout_accuracy"]


def test_training_is_deterministic_with_the_seed(demo):
    subset = demo["train"].select(range(64))
    runs = [
        train_digit_classifier(subset, subset, steps=3, batch_size=16, lr=1e-3, seed=s, config=SMALL)[0]
        for s in (0, 0, 1)
    ]
    same = [torch.equal(a, b) for a, b in zip(runs[0].state_dict().values(), runs[1].state_dict().values())]
    assert all(same)
    assert not torch.equal(runs[0].classifier.weight, runs[2].classifier.weight)


def test_training_rejects_bad_labels():
    images, labels = torch.rand(4, 1, 32, 32), torch.tensor([0, 1, 2, 10])
    with pytest.raises(ValueError, match=r"`train_ds` has labels outside \[0, 9\]"):
        train_digit_classifier((images, labels), (images, labels % 10), steps=1, batch_size=2, lr=1e-3, seed=0)


def test_evaluate_accuracy_counts_correct_predictions(images):
    model = DigitClassifier(**SMALL).eval()
    predictions = predict(model, images)
    labels = predictions.clone()
    labels[0] = (labels[0] + 1) % 10
    assert evaluate_accuracy(model, images, labels) == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="as many labels as images"):
        evaluate_accuracy(model, images, labels[:2])


# ---------------------------------------------------------------- judging a pipeline


class FakePipeline:
    """Returns, for requested class c, real held-out digits of class `shown.get(c, c)`; image choice by seed."""

    def __init__(self, images, labels, shown=None, num_classes=10, image_size=32, channels=1):
        self.by_class = {c: images[labels == c] for c in range(10)}
        self.shown = shown or {}
        self.transformer = SimpleNamespace(config=SimpleNamespace(num_classes=num_classes))
        self.vae = SimpleNamespace(config=SimpleNamespace(out_channels=channels))
        self.grid_size, self.vae_scale_factor = image_size // 4, 4
        self.calls = []

    def __call__(self, class_labels, generator, output_type, **kwargs):
        seeds = [g.initial_seed() for g in generator]
        self.calls.append({"labels": list(class_labels), "seeds": seeds, "output_type": output_type, **kwargs})
        digits = [self.by_class[self.shown.get(c, c)][s % 100] for c, s in zip(class_labels, seeds)]
        return ImagePipelineOutput(images=torch.stack(digits))


def test_class_accuracy_of_fake_pipeline(trained, demo):
    classifier = trained[0]
    images, labels = images_and_labels(demo["heldout"])
    pipe = FakePipeline(images, labels, shown={3: 5})  # asked for a 3, it draws a 5
    options = dict(num_inference_steps=7, guidance_scale=2.0, temperature=0.5)
    result = class_accuracy_of_pipeline(pipe, classifier, images_per_class=4, batch_size=6, seed=10, **options)

    seeds = [s for call in pipe.calls for s in call["seeds"]]
    requested = [c for call in pipe.calls for c in call["labels"]]
    assert seeds == list(range(10, 50)) and requested == [c for c in range(10) for _ in range(4)]
    assert [len(call["labels"]) for call in pipe.calls] == [6] * 6 + [4]
    assert all(call["output_type"] == "pt" for call in pipe.calls)
    assert all(call[k] == v for call in pipe.calls for k, v in options.items())

    shown_images = torch.stack([pipe.by_class[pipe.shown.get(c, c)][s % 100] for c, s in zip(requested, seeds)])
    predicted = predict(classifier, shown_images)
    expected = torch.zeros(10, 10, dtype=torch.long)
    for c, p in zip(requested, predicted.tolist()):
        expected[c, p] += 1
    assert result["confusion_matrix"] == expected.tolist()
    assert result["accuracy"] == pytest.approx((predicted == torch.tensor(requested)).float().mean().item())
    assert result["per_class_accuracy"] == pytest.approx((expected.diagonal() / 4).tolist())
    assert result["predicted_counts"] == expected.sum(0).tolist()
    assert (result["num_images"], result["images_per_class"], result["num_classes"]) == (40, 4, 10)
    # The trained judge sees most of the 5s drawn for "3" as 5s: class 3 fails, the rest mostly pass.
    assert result["per_class_accuracy"][3] <= 0.25 and result["confusion_matrix"][3][5] >= 3
    assert result["accuracy"] > 0.6


@pytest.mark.parametrize(
    "pipe_kwargs, message",
    [
        ({"num_classes": 5}, r"classifier.config.num_classes=10 but pipe.transformer.config.num_classes=5"),
        ({"image_size": 16}, r"classifier.config.image_size=32 but pipe.grid_size \* pipe.vae_scale_factor"),
        ({"channels": 3}, r"classifier.config.in_channels=1 but pipe.vae.config.out_channels"),
    ],
)
def test_mismatched_pipeline_fails_before_generating(pipe_kwargs, message):
    pipe = FakePipeline(torch.rand(10, 1, 32, 32), torch.arange(10), **pipe_kwargs)
    with pytest.raises(ValueError, match=message):
        class_accuracy_of_pipeline(pipe, DigitClassifier(**SMALL), images_per_class=1)
    assert pipe.calls == []


def test_real_rgb_pipeline_is_refused():
    with pytest.raises(ValueError, match="image_size=32 but .* must be equal"):
        class_accuracy_of_pipeline(tiny_pipeline(), DigitClassifier(**SMALL), images_per_class=1)


def tiny_gray_pipeline() -> ParScaleEARPipeline:
    """A random 32x32, 1-channel pipeline over an 8x8x4 token grid, like the MNIST demo's shapes."""
    torch.manual_seed(0)
    vae = LiteVAE(in_channels=1, out_channels=1, sample_size=32, levels=2, latent_channels=4,
                  encoder_channels=(8, 8), encoder_layers_per_level=1, aggregation_channels=16,
                  aggregation_layers=1, decoder_block_out_channels=(8, 16, 16), decoder_layers_per_block=1,
                  norm_num_groups=4)  # fmt: skip
    pipe = ParScaleEARPipeline(
        vae,
        LiteHybrid(in_channels=4, grid_size=8, coarse_grid_size=2, hidden_dim=16, num_heads=2),
        EARTransformer(in_channels=4, grid_size=8, num_classes=10, hidden_size=32, num_layers=1, num_heads=4,
                       buffer_size=4),
        EnergyHead(condition_dim=32, token_channels=4, width=32, depth=1, noise_dim=8),
    )  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_real_pipeline_result_does_not_depend_on_batch_size():
    pipe, classifier = tiny_gray_pipeline(), DigitClassifier(**SMALL).eval()
    options = dict(images_per_class=2, seed=3, num_inference_steps=3, guidance_scale=2.0, temperature=0.7)
    one_batch = class_accuracy_of_pipeline(pipe, classifier, batch_size=20, **options)
    assert class_accuracy_of_pipeline(pipe, classifier, batch_size=3, **options) == one_batch
    assert sum(one_batch["predicted_counts"]) == 20

    # Image 5 (class 2, second image) alone, with its own generator, is predicted the same way.
    image = pipe(2, num_inference_steps=3, guidance_scale=2.0, temperature=0.7,
                 generator=[torch.Generator().manual_seed(3 + 5)], output_type="pt").images  # fmt: skip
    predicted = predict(classifier, image).item()
    assert one_batch["confusion_matrix"][2][predicted] >= 1


def test_eval_script_writes_results(tmp_path):
    tiny_gray_pipeline().save_pretrained(tmp_path / "pipe")
    DigitClassifier(**SMALL).save_pretrained(tmp_path / "clf")
    out = tmp_path / "acc.json"
    cmd = [sys.executable, str(REPO / "examples/eval_class_accuracy.py"), "--model", str(tmp_path / "pipe"),
           "--classifier", str(tmp_path / "clf"), "--images-per-class", "1", "--steps", "2", "--guidance", "1.5",
           "--temperature", "0.7", "--seed", "0", "--results-file", str(out)]  # fmt: skip
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    record = json.loads(out.read_text())
    assert record["metric"] == "generated_class_accuracy" and record["num_images"] == 10
    assert record["value"] == record["accuracy"] and len(record["per_class_accuracy"]) == 10
    assert record["sampling"]["num_inference_steps"] == 2 and record["sampling"]["guidance_scale"] == 1.5
    assert "provenance" in record
