"""Model cards from results files, the README's evaluation table, and `parscale-ear card`."""

import json
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
from huggingface_hub import ModelCard

from parscale_ear_hf.cli import main
from parscale_ear_hf.model_card import TAGS, build_model_card, default_template_path, write_model_card
from parscale_ear_hf.results import format_number, write_results
from research.readme.tables import eval_results_table

from conftest import tiny_pipeline

ROOT = Path(__file__).resolve().parents[1]
MODEL_ID = "parscale-tests/tiny-ear"
INCEPTION = "inception-v3-compat (torch-fidelity)"
DIGITS = "demo digit classifier (digit_classifier, penultimate layer)"


def eval_payload(model: str, prefix: str, extractor: str, source: str, fid: float) -> dict:
    """What examples/eval_fid.py writes (evaluation.run), before `write_results` adds the provenance."""
    metrics = {
        f"{prefix}fid": fid,
        f"{prefix}is": 7.25,
        f"{prefix}is_std": 0.125,
        f"{prefix}precision": 0.6875,
        f"{prefix}recall": 0.5,
    }
    return {
        "metric": f"{prefix}fid",
        "value": fid,
        "metrics": metrics,
        "model": model,
        "samples": {"images_per_class": 10, "num_classes": 10, "total": 100},
        "reference": {"source": source, "count": 1000, "extractor": extractor, "image_size": 16},
        "extractor": {"name": extractor, "feature_dim": 128, "image_size": 16},
        "sampling": {
            "num_inference_steps": 8,
            "guidance_scale": 3.0,
            "guidance_schedule": "linear",
            "temperature": 0.7,
            "seed": 0,
            "generator": "torch.Generator().manual_seed(derived_seed(seed, i))",
        },
        "processes": 1,
        "mixed_precision": "no",
        "seconds": 1.5,
        "peak_rss_mib": 512.0,
    }


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A saved tiny pipeline, an Inception-like and a demo results file for it, and a written card."""
    root = tmp_path_factory.mktemp("card")
    folder = root / "tiny-ear"
    tiny_pipeline().save_pretrained(folder)
    files = [root / "results" / "eval" / "a_inception.json", root / "results" / "eval" / "b_demo.json"]
    records = [
        write_results(files[0], eval_payload(str(folder), "", INCEPTION, "ILSVRC/imagenet-1k [validation]", 23.456)),
        write_results(files[1], eval_payload("runs/x/tiny-ear", "demo_", DIGITS, "data/fid_refs/ref.npz", 1.2345)),
    ]
    card = write_model_card(folder, files, model_id=MODEL_ID, datasets=["ylecun/mnist"])
    return SimpleNamespace(root=root, folder=folder, files=files, records=records, card=card)


def test_card_round_trips_with_metadata(setup):
    loaded = ModelCard.load(setup.folder / "README.md")
    assert loaded.content == setup.card.content
    assert loaded.data.library_name == "diffusers"
    assert set(TAGS) <= set(loaded.data.tags)
    assert {"parscale-ear", "class-conditional", "image-generation", "energy-autoregressive"} <= set(TAGS)
    assert loaded.data.datasets == ["ylecun/mnist"]
    assert loaded.data.license == "apache-2.0"
    assert loaded.data.model_name == MODEL_ID


def test_eval_results_are_the_json_values(setup):
    results = ModelCard.load(setup.folder / "README.md").data.eval_results
    stored = {key: value for record in setup.records for key, value in record["metrics"].items()}
    assert {r.metric_type: r.metric_value for r in results} == stored
    by_type = {r.metric_type: r for r in results}
    assert by_type["fid"].metric_name == "FID"
    assert by_type["fid"].dataset_type == "ILSVRC/imagenet-1k" and by_type["fid"].dataset_split == "validation"
    for key in setup.records[1]["metrics"]:
        assert "demo" in by_type[key].metric_name and "stand-in" in by_type[key].metric_name
    for key in setup.records[0]["metrics"]:
        assert "demo" not in by_type[key].metric_name


def test_card_text_names_figures_commands_and_revisions(setup):
    text = setup.card.text
    for record in setup.records:
        assert f"```bash\n{record['provenance']['command']}\n```" in text
        assert record["provenance"]["git_revision"] in text
        assert record["extractor"]["name"] in text
        for value in record["metrics"].values():
            assert f"| {format_number(value)} |" in text
    assert "**Not comparable with Inception FID.**" in text
    assert f'ParScaleEARPipeline.from_pretrained("{MODEL_ID}")' in text
    assert f'DiffusionPipeline.from_pretrained("{MODEL_ID}", trust_remote_code=True)' in text
    assert "| `transformer` | 26,656 |" in text  # parameter counts of the tiny pipeline
    assert "16x16" in text


def test_stand_in_note_only_with_demo_metrics(setup):
    text = build_model_card(setup.folder, setup.records[:1]).text
    assert "Not comparable with Inception FID" not in text
    assert "No evaluation results yet" in build_model_card(setup.folder, []).text


@pytest.mark.parametrize("model", ["runs/other-pipeline", "other"], ids=["other name", "existing folder"])
def test_result_of_another_model_is_rejected(setup, tmp_path, model):
    if model == "other":  # an existing folder with the same name as the pipeline's is still another model
        model = str(tmp_path / "tiny-ear")
        tiny_pipeline().save_pretrained(model)
    record = {**setup.records[0], "model": model}
    with pytest.raises(ValueError, match=r"results\[0\]: evaluates the model .*not this pipeline"):
        build_model_card(setup.folder, [record])
    path = tmp_path / "other.json"
    path.write_text(json.dumps(record))
    with pytest.raises(ValueError, match=re.escape(f"{path}: evaluates the model")):
        write_model_card(setup.folder, [path])


@pytest.mark.parametrize(
    "change, message",
    [
        ({"value": "23.4"}, "'value' is '23.4'; expected a finite number"),
        ({"value": float("nan")}, "'value' is nan"),
        ({"metrics": {"fid": None}}, "'metrics' is"),
        ({"provenance": None}, "'provenance' must be an object with 'command'"),
        ({"provenance": {"command": "python x.py"}}, "'provenance' must be an object with 'command'"),
        ("provenance", "has no 'provenance'"),
    ],
)
def test_result_without_numeric_value_or_provenance_is_rejected(setup, change, message):
    if isinstance(change, dict):
        record = {**setup.records[0], **change}
    else:
        record = {k: v for k, v in setup.records[0].items() if k != change}
    with pytest.raises(ValueError, match=message):
        build_model_card(setup.folder, [record])


def test_missing_or_invalid_results_file_gives_a_clear_error(setup, tmp_path):
    missing = tmp_path / "missing.json"
    with pytest.raises(FileNotFoundError, match=re.escape(f"{missing}") + ".*is not a file.*eval_fid.py"):
        write_model_card(setup.folder, [missing])
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    with pytest.raises(ValueError, match=re.escape(f"{broken}") + ".*is not valid JSON"):
        write_model_card(setup.folder, [broken])
    with pytest.raises(FileNotFoundError, match="no model_index.json"):
        build_model_card(tmp_path, [])


def test_template_is_the_shipped_file():
    assert (
        default_template_path().read_bytes() == (ROOT / "model_cards" / "parscale_ear_card_template.md").read_bytes()
    )


def test_eval_results_table_renders_every_file(setup, tmp_path):
    table = eval_results_table(setup.root / "results")
    lines = table.splitlines()
    assert len(lines) == 2 + len(setup.files)
    for line, path, record in zip(lines[2:], setup.files, setup.records):  # sorted by file name
        assert f"`eval/{path.name}`" in line and record["provenance"]["git_revision"][:12] in line
        assert f"`{record['model']}`" in line and record["extractor"]["name"] in line
        for key, value in record["metrics"].items():
            assert f"`{key}` {format_number(value)}" in line
    empty = eval_results_table(tmp_path)
    assert "No evaluation results yet" in empty and "\n" not in empty


def test_card_command_writes_readme(setup, tmp_path, capsys):
    folder = tmp_path / "tiny-ear"
    tiny_pipeline().save_pretrained(folder)
    main(["card", "--model", str(folder), "--results", str(setup.files[1]), "--dataset", "ylecun/mnist"])
    card = ModelCard.load(folder / "README.md")
    assert [r.metric_type for r in card.data.eval_results] == list(setup.records[1]["metrics"])
    assert card.data.datasets == ["ylecun/mnist"] and card.data.model_name == "tiny-ear"
    assert "wrote" in capsys.readouterr().out


def test_card_without_results_never_drops_the_shipped_cards_figures(tmp_path, capsys):
    import shutil

    folder = tmp_path / "mnist_demo"
    shutil.copytree(ROOT / "models" / "mnist_demo", folder)  # never the shipped folder itself
    shipped = (folder / "README.md").read_bytes()
    with pytest.raises(SystemExit) as exit_info:
        main(["card", "--model", str(folder)])
    assert exit_info.value.code == 1
    line = capsys.readouterr().err.splitlines()[-1]
    assert line.startswith(f"parscale-ear card: error: write_model_card: '{folder / 'README.md'}' exists and the new "
                           "card would drop its eval results ['demo_fid', ")  # fmt: skip
    assert line.endswith("(--results FILE...), or --force to replace it.")
    assert (folder / "README.md").read_bytes() == shipped
    main(["card", "--model", str(folder), "--force"])
    assert ModelCard.load(folder / "README.md").data.eval_results is None
    assert sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp")) == []


def test_card_is_rewritten_with_its_results_but_a_foreign_readme_is_kept(tmp_path):
    folder = tmp_path / "tiny-ear"
    tiny_pipeline().save_pretrained(folder)
    files = [tmp_path / "inception.json", tmp_path / "demo.json"]
    write_results(files[0], eval_payload(str(folder), "", INCEPTION, "ILSVRC/imagenet-1k [validation]", 23.5))
    write_results(files[1], eval_payload(str(folder), "demo_", DIGITS, "data/fid_refs/ref.npz", 1.25))
    write_model_card(folder, files)
    write_results(files[1], eval_payload(str(folder), "demo_", DIGITS, "data/fid_refs/ref.npz", 1.5))
    write_model_card(folder, files)  # new figures for the same metrics: nothing lost, nothing asked
    with pytest.raises(FileExistsError, match=r"would drop its eval results \['fid', 'is', 'is_std', 'precision'"):
        write_model_card(folder, files[1:])
    (folder / "README.md").write_text("# My notes\n\nHand-written.\n")
    with pytest.raises(FileExistsError, match="it was not written by this command"):
        write_model_card(folder, files)
    assert (folder / "README.md").read_text() == "# My notes\n\nHand-written.\n"
    write_model_card(folder, files, force=True)
    results = ModelCard.load(folder / "README.md").data.eval_results
    assert len(results) == 10 and {r.metric_type: r.metric_value for r in results}["demo_fid"] == 1.5
