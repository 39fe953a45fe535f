"""The diffusers DiT baseline: training on a latent cache (DiT's objective, exact resume), the saved
DiTPipeline with our LiteVAE (null class, latent scale, per-image generators, EMA weights), and
`parscale-ear eval` on it; the eval driver's sampling-cache and compile flags for our pipeline."""

import argparse
import dataclasses
import json

import numpy as np
import pytest
import torch
from diffusers import DiTPipeline, DiTTransformer2DModel
from diffusers.models.embeddings import LabelEmbedding
from safetensors.torch import load_file

from parscale_ear_hf import LiteVAE, ParScaleEARPipeline, cli
from parscale_ear_hf import evaluation as ev
from parscale_ear_hf.info import count_parameters
from parscale_ear_hf.training import checkpointing, dit, latent_cache, objectives
from parscale_ear_hf.training.checkpointing import JsonlLog

from conftest import make_latent_workspace, tiny_pipeline

NAMES = [f"digit {i}" for i in range(10)]
SCALE, SHIFT = 1.5, 0.1


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A tiny VAE and a latent cache of 40 random 16x16 images (4x4x4 latents, 10 named classes); a tiny
    ParScaleEARPipeline to compare parameters with; a digit-classifier extractor and reference images."""
    root = tmp_path_factory.mktemp("dit")
    make_latent_workspace(root, 40, names=NAMES, scale=SCALE, shift=SHIFT)
    tiny_pipeline().save_pretrained(root / "ours")
    return root


def train_args(workspace, output_dir, *extra):
    argv = [
        "--latents", str(workspace / "latents"), "--output-dir", str(output_dir), "--num-layers", "1",
        "--num-attention-heads", "2", "--attention-head-dim", "8", "--patch-size", "1", "--batch-size", "8",
        "--max-steps", "6", "--lr", "1e-3", "--ema-decay", "0.5", "--checkpoint-every", "2", "--log-every", "1",
        "--sample-steps", "2", "--cpu", *extra,
    ]  # fmt: skip
    return dit.add_arguments(argparse.ArgumentParser()).parse_args(argv)


def losses(output_dir):
    return {r["step"]: r["loss"] for r in JsonlLog(output_dir / "train_log.jsonl").read()}


@pytest.fixture(scope="module")
def trained(workspace, tmp_path_factory):
    """An uninterrupted 6-step run, recording how the latents were scaled."""
    output_dir = tmp_path_factory.mktemp("dit_run") / "run"
    calls, original = [], latent_cache.sample_latents
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(latent_cache, "sample_latents", lambda *a: calls.append(a[1:3]) or original(*a))
        dit.run(train_args(workspace, output_dir, "--compare-parameters", str(workspace / "ours")))
    return output_dir, calls


def weights(folder):
    return load_file(folder / "transformer" / "diffusion_pytorch_model.safetensors")


# ------------------------------------------------------------------------------ the model and its loss


def test_dit_pipelines_null_class_1000_is_the_models_own():
    torch.manual_seed(0)
    config = dict(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4, num_layers=1,
                  sample_size=4, patch_size=1, num_embeds_ada_norm=10)  # fmt: skip
    model = dit.NullClassDiTTransformer2DModel(**config).eval()
    x, t = torch.randn(2, 4, 4, 4), torch.tensor([10, 500])
    with torch.no_grad():
        for block in model.transformer_blocks:  # a trained, not a zero-initialised, label table
            block.norm1.emb.class_embedder.embedding_table.weight.normal_()
        null = model(x, t, torch.tensor([10, 10])).sample
        torch.testing.assert_close(model(x, t, torch.tensor([1000, 1000])).sample, null, rtol=0, atol=0)
        assert not torch.allclose(model(x, t, torch.tensor([3, 3])).sample, null)
        plain = DiTTransformer2DModel(**config).eval()
        with pytest.raises(IndexError):  # why the subclass exists: DiTPipeline's 1000 is out of a 10-class table
            plain(x, t, torch.tensor([1000, 1000]))


def test_labels_are_dropped_once_per_example_from_the_callers_generator():
    torch.manual_seed(0)
    transformer = dit.NullClassDiTTransformer2DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4, num_layers=2, sample_size=4,
        patch_size=1, num_embeds_ada_norm=10,
    )  # fmt: skip
    model = objectives.DiTTrainingModel(transformer, class_dropout_prob=0.5).train()
    tables = [m for m in model.modules() if isinstance(m, LabelEmbedding)]
    assert len(tables) == 2 and not any(m.training for m in tables) and transformer.transformer_blocks[0].training
    seen = []
    model.transformer.register_forward_pre_hook(
        lambda m, a, kw: seen.append(kw["class_labels"].clone()), with_kwargs=True
    )
    latents, labels = torch.randn(64, 4, 4, 4), torch.arange(64) % 10
    rng = torch.get_rng_state()
    first = model(latents, labels, torch.Generator().manual_seed(1))
    assert torch.equal(torch.get_rng_state(), rng)  # no draw from the global generator (per-block dropout)
    dropped = seen[0] == 10
    assert 10 < dropped.sum() < 54 and torch.equal(seen[0][~dropped], labels[~dropped])
    assert model(latents, labels, torch.Generator().manual_seed(1)) == first
    assert model(latents, labels, torch.Generator().manual_seed(2)) != first


# ------------------------------------------------------------------------------ training and the saved pipeline


def test_training_saves_a_dit_pipeline_with_ema_weights_and_our_vae(workspace, trained):
    output_dir, calls = trained
    assert calls and all(c == (SCALE, 0.0) for c in calls)  # z * scaling_factor: what DiTPipeline decodes
    run_config = json.loads((output_dir / "run_config.json").read_text())
    ours = ParScaleEARPipeline.from_pretrained(workspace / "ours")
    ours_total = sum(count_parameters(getattr(ours, n)) for n in ("lite_hybrid", "transformer", "energy_head"))
    pipe = DiTPipeline.from_pretrained(output_dir / "pipeline")
    pipe.set_progress_bar_config(disable=True)
    params = run_config["parameters"]
    assert params["dit_transformer"] == count_parameters(pipe.transformer)
    assert params["compared"]["generator_total"] == ours_total
    assert params["ratio_to_compared"] == pytest.approx(count_parameters(pipe.transformer) / ours_total)
    index = json.loads((output_dir / "pipeline" / "model_index.json").read_text())
    assert index["_class_name"] == "DiTPipeline" and index["vae"][1] == "LiteVAE"
    assert index["id2label"] == {str(i): name for i, name in enumerate(NAMES)} and pipe.labels["digit 3"] == 3
    assert isinstance(pipe.transformer, dit.NullClassDiTTransformer2DModel) and isinstance(pipe.vae, LiteVAE)
    assert pipe.transformer.config.out_channels == pipe.transformer.config.in_channels == 4  # no learned sigma
    scheduler = pipe.scheduler.config
    assert type(pipe.scheduler).__name__ == "DPMSolverMultistepScheduler" and scheduler.prediction_type == "epsilon"
    assert (scheduler.beta_schedule, scheduler.beta_start, scheduler.beta_end) == ("linear", 1e-4, 0.02)
    assert len(losses(output_dir)) == 6 and all(np.isfinite(list(losses(output_dir).values())))
    assert (output_dir / "samples" / "final.png").is_file()
    # The saved transformer holds the EMA weights of the last checkpoint, not the live ones.
    last = checkpointing.latest_checkpoint(output_dir / "checkpoints")
    shadow, live = load_file(last / "ema.safetensors"), load_file(last / "model.safetensors")
    saved = weights(output_dir / "pipeline")
    names = [name for name, _ in pipe.transformer.named_parameters()]
    assert all(torch.equal(saved[name], shadow[str(i)]) for i, name in enumerate(names))
    assert not all(torch.equal(saved[name], live[f"transformer.{name}"]) for name in names)
    # Guided sampling (the null class) at the VAE's size; image i is the same alone or in a batch.
    gens = lambda *seeds: [torch.Generator().manual_seed(s) for s in seeds]  # noqa: E731
    batch = pipe([2, 3], guidance_scale=3.0, num_inference_steps=3, generator=gens(0, 1), output_type="pt").images
    alone = pipe([3], guidance_scale=3.0, num_inference_steps=3, generator=gens(1), output_type="pt").images
    assert batch.shape == (2, 3, 16, 16) and 0 <= batch.min() and batch.max() <= 1
    torch.testing.assert_close(batch[1:], alone, rtol=0, atol=1e-5)
    assert not torch.allclose(batch[0], batch[1])
    assert pipe(pipe.get_label_ids(["digit 7"]), num_inference_steps=2, generator=gens(0)).images[0].size == (16, 16)


@pytest.mark.usefixtures("fresh_accelerate_state")
@pytest.mark.parametrize("precision", ["no", "bf16"])
def test_resume_after_interruption_gives_the_uninterrupted_weights(
    workspace, trained, tmp_path, monkeypatch, precision
):
    reference, flags = trained[0], ["--mixed-precision", precision]
    if precision == "bf16":  # CPU autocast: other losses than float32's, as reproducible
        reference = tmp_path / "reference"
        dit.run(train_args(workspace, reference, *flags))
        assert losses(reference) != losses(trained[0])
    write = JsonlLog.write

    def interrupt_at_step_5(self, record):  # after step 5's update, before the step-6 checkpoint
        if record["step"] == 5:
            raise KeyboardInterrupt
        write(self, record)

    monkeypatch.setattr(JsonlLog, "write", interrupt_at_step_5)
    with pytest.raises(KeyboardInterrupt):
        dit.run(train_args(workspace, tmp_path / "run", *flags))
    monkeypatch.setattr(JsonlLog, "write", write)
    assert checkpointing.latest_checkpoint(tmp_path / "run" / "checkpoints").name == "checkpoint-00000004"
    with pytest.raises(FileExistsError, match="--resume latest"):
        dit.run(train_args(workspace, tmp_path / "run", *flags))
    dit.run(train_args(workspace, tmp_path / "run", *flags, "--resume", "latest"))
    assert losses(tmp_path / "run") == losses(reference)  # every step's loss, bit for bit
    a, b = weights(reference / "pipeline"), weights(tmp_path / "run" / "pipeline")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((tmp_path / "run" / "run_config.json").read_text())["resumes"][0]["step"] == 4


@pytest.mark.parametrize(
    "flags, match",
    [
        (["--class-dropout-prob", "1"], r"`--class-dropout-prob` must be a finite number in \[0.0, 1.0\), got 1.0"),
        (["--num-layers", "0"], "`--num-layers` must be an integer >= 1, got 0"),
        (["--checkpoint-minutes", "-1"], r"`--checkpoint-minutes` must be a finite number >= 0.0, got -1.0"),
        (["--lr", "0"], "`--lr` must be a finite number in"),
        (["--sample-guidance", "0.5"], "`--sample-guidance` must be a finite number >= 1.0, got 0.5"),
        (["--resume", "latest"], "--resume latest: no complete checkpoint"),
    ],
)
def test_bad_flags_fail_before_the_cache_loads(workspace, tmp_path, monkeypatch, flags, match):
    def must_not_load(*args, **kwargs):
        raise AssertionError("the latent cache was loaded before the flags were checked")

    monkeypatch.setattr(latent_cache, "load_latent_cache", must_not_load)
    with pytest.raises((ValueError, FileNotFoundError), match=match):
        dit.run(train_args(workspace, tmp_path / "out", *flags))
    assert not (tmp_path / "out").exists()


def test_a_patch_that_does_not_tile_the_latent_grid_fails_before_training(workspace, tmp_path):
    with pytest.raises(ValueError, match="`--patch-size` must divide the latent grid 4, got 3"):
        dit.run(train_args(workspace, tmp_path / "out", "--patch-size", "3"))
    assert not (tmp_path / "out").exists()


def test_train_dit_is_a_cli_subcommand():
    args = cli.build_parser().parse_args(["train-dit", "--latents", "l", "--output-dir", "o", "--max-steps", "1"])
    assert args.func is dit.run and args.patch_size == 2 and args.lr == 1e-4


# ------------------------------------------------------------------------------ eval


def eval_args(workspace, model, output_dir, *extra):
    argv = [
        "--model", str(model), "--output-dir", str(output_dir), "--extractor", "digit",
        "--classifier", str(workspace / "clf"), "--dataset", str(workspace / "data"), "--split", "train",
        "--reference-cache-dir", str(workspace / "refs"), "--images-per-class", "1", "--batch-size", "4",
        "--steps", "2", *extra,
    ]  # fmt: skip
    return ev.add_arguments(argparse.ArgumentParser()).parse_args(argv)


def test_eval_scores_the_dit_pipeline_and_times_its_calls(workspace, trained, tmp_path, monkeypatch):
    compiled = []
    monkeypatch.setattr(dit.NullClassDiTTransformer2DModel, "compile", lambda self, *a, **k: compiled.append(self))
    record = ev.run(eval_args(workspace, trained[0] / "pipeline", tmp_path / "e", "--guidance", "2", "--compile"))
    assert record["pipeline_class"] == "DiTPipeline" and len(compiled) == 1
    assert record["metric"] == "demo_fid" and np.isfinite(record["value"]) and record["samples"]["total"] == 10
    config = json.loads((tmp_path / "e" / "eval_config.json").read_text())
    assert config["pipeline_class"] == "DiTPipeline" and config["compile"] is True
    assert config["sampling"] == {"num_inference_steps": 2, "guidance_scale": 2.0}
    assert config["scheduler"]["class"] == "DPMSolverMultistepScheduler"
    assert record["sampling"]["temperature"] is None and record["sampling"]["guidance_schedule"] == "constant"
    parts = sorted((tmp_path / "e" / "parts").glob("*.npz"))
    seconds = [float(np.load(p)["sampling_seconds"]) for p in parts]
    timing = record["timing"]
    assert len(parts) == timing["batches"] == 3 and all(s > 0 for s in seconds)
    assert timing["sampling_seconds_per_image"] == pytest.approx(sum(seconds) / 10)
    assert timing["sampling_seconds_per_image"] < record["seconds"] / 10  # loading and extraction excluded
    # The same seed gives the same samples: a rerun scores the same.
    again = ev.run(eval_args(workspace, trained[0] / "pipeline", tmp_path / "f", "--guidance", "2"))
    assert again["metrics"] == record["metrics"]


@pytest.mark.parametrize(
    "flags", [["--temperature", "0"], ["--guidance-schedule", "linear"], ["--token-cache"], ["--condition-cache"]]
)
def test_our_pipelines_options_are_refused_for_a_dit(workspace, trained, tmp_path, monkeypatch, flags):
    def must_not_load(*args, **kwargs):
        raise AssertionError("the pipeline was loaded before the flags were checked")

    monkeypatch.setattr(DiTPipeline, "from_pretrained", must_not_load)
    with pytest.raises(ValueError, match=f"{flags[0]} do not apply to a DiTPipeline"):
        ev.run(eval_args(workspace, trained[0] / "pipeline", tmp_path / "out", *flags))
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "flags, match",
    [
        (["--token-share", "0.5"], "--token-share is the token cache's; add --token-cache"),
        (["--token-cache", "--token-share", "1.5"], r"`--token-share` must be a finite number in \[0.0, 1.0\]"),
        (["--cache-refresh-every", "2"], "--cache-refresh-every paces the sampling caches; add --token-cache"),
        (["--condition-cache", "--cache-refresh-every", "0"], "`--cache-refresh-every` must be an integer >= 1"),
    ],
)
def test_bad_cache_flags_fail_before_anything_loads(workspace, tmp_path, monkeypatch, flags, match):
    def must_not_load(*args, **kwargs):
        raise AssertionError("the pipeline was loaded before the flags were checked")

    monkeypatch.setattr(ParScaleEARPipeline, "from_pretrained", must_not_load)
    with pytest.raises(ValueError, match=match):
        ev.run(eval_args(workspace, workspace / "ours", tmp_path / "out", *flags))
    assert not (tmp_path / "out").exists()


def test_cache_and_compile_flags_reach_our_pipeline_and_eval_config(workspace, tmp_path, monkeypatch):
    from parscale_ear_hf.pipeline_parscale_ear import SamplingCache

    calls, compiled, call = [], [], ParScaleEARPipeline.__call__
    monkeypatch.setattr(ParScaleEARPipeline, "__call__", lambda self, *a, **k: calls.append(k) or call(self, *a, **k))
    monkeypatch.setattr(ParScaleEARPipeline, "enable_compiled_step", lambda self, **k: compiled.append(self))
    flags = ["--token-cache", "--token-share", "0.5", "--cache-refresh-every", "2", "--compile"]
    record = ev.run(eval_args(workspace, workspace / "ours", tmp_path / "e", *flags))
    expected = SamplingCache(token_cache=True, token_share=0.5, condition_cache=False, refresh_every=2)
    assert all(k["cache"] == expected for k in calls) and len(calls) == 3 and len(compiled) == 1
    config = json.loads((tmp_path / "e" / "eval_config.json").read_text())
    assert config["sampling"]["cache"] == dataclasses.asdict(expected) and config["compile"] is True
    assert config["pipeline_class"] == record["pipeline_class"] == "ParScaleEARPipeline"
    assert record["sampling"]["temperature"] == 0.7 and record["sampling"]["guidance_schedule"] == "linear"
    # Partial features of one cache setting are never resumed with another.
    next((tmp_path / "e" / "parts").glob("*.npz")).unlink()
    with pytest.raises(ValueError, match="partial features of another evaluation.*sampling"):
        ev.run(eval_args(workspace, workspace / "ours", tmp_path / "e", *flags, "--condition-cache"))
    # Without cache flags sampling is exact: no cache object reaches the pipeline.
    calls.clear()
    exact = ev.run(eval_args(workspace, workspace / "ours", tmp_path / "x"))
    assert exact["sampling"]["cache"] is None and all(k["cache"] is None for k in calls) and calls
