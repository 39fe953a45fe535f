"""The README and docs/ pages: the snippet and shell blocks run, every table comes from the results files, links
resolve, the module map matches the package, and the demo script works."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import PIL.Image
import pytest

from parscale_ear_hf.info import default_parameter_counts, parameter_table
from research.readme.tables import demo_results_table, markdown_documents, replace_section

ROOT = Path(__file__).resolve().parents[1]


def test_usage_snippet_runs(tmp_path, monkeypatch):
    readme = (ROOT / "README.md").read_text()
    snippet = re.search(r"## Usage\s+```python\n(.*?)```", readme, re.S).group(1)
    monkeypatch.chdir(tmp_path)
    namespace = {}
    exec(compile(snippet, "README.md", "exec"), namespace)  # noqa: S102 - our own README
    assert len(namespace["images"]) == 2
    assert (tmp_path / "my-pipeline" / "model_index.json").is_file()


def pages() -> dict[str, str]:
    """README.md and docs/*.md by their path from the repository root."""
    return {path.relative_to(ROOT).as_posix(): path.read_text() for path in markdown_documents(ROOT)}


def test_readme_tables_are_generated_from_the_results_files(tmp_path):
    record = json.loads((ROOT / "results" / "param_counts.json").read_text())
    assert record["components"] == default_parameter_counts()["components"]  # the results file is current
    assert record["provenance"]["command"].endswith("examples/param_counts.py --output results/param_counts.json")
    texts = pages()
    assert parameter_table(record["components"]) in texts["docs/architecture.md"]
    # Regenerating the README and docs/ from results/ changes nothing: no figure in them was typed by hand.
    (tmp_path / "docs").mkdir()
    for name, text in texts.items():
        (tmp_path / name).write_text(text)
    # A copy of results/: the command also rewrites the benchmark tables and plots beside the JSON.
    shutil.copytree(ROOT / "results", tmp_path / "results")
    subprocess.run(
        [
            sys.executable,
            str(ROOT / "examples" / "update_readme.py"),
            "--root",
            str(tmp_path),
            "--results-dir",
            str(tmp_path / "results"),
        ],
        check=True,
        capture_output=True,
        timeout=120,
    )
    for name, text in texts.items():
        assert (tmp_path / name).read_text() == text, f"{name} is not what examples/update_readme.py writes"
    for table in (tmp_path / "results").glob("benchmark_*.md"):  # derived from the JSON alone
        assert table.read_text() == (ROOT / "results" / table.name).read_text()
    assert demo_results_table(ROOT / "results") in texts["README.md"]


def test_readme_is_a_landing_page_that_says_what_is_not_done():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 250
    top = readme[: readme.index("## The two commands")]
    assert "No ImageNet model has been trained" in top and "never run on a GPU" in top


def test_no_page_shows_a_dirty_revision():
    """A figure measured with uncommitted code cannot be reproduced from its revision: none is shown."""
    for name, text in pages().items():
        assert "-dirty" not in text, f"{name} shows a -dirty revision"


def test_benchmark_tables_say_first_which_rows_measured_a_model_that_no_longer_ships(tmp_path):
    """A benchmark section measured on models/mnist_demo before the shipped model replaced it is named in its
    table's first line; once every such section is rerun, no first line claims a former model."""
    import update_readme

    from parscale_ear_hf.results import load_results

    text = pages()["docs/benchmarks.md"]
    for section, sampling in (("performance", False), ("sampling-speed", True)):
        first = text.split(f"<!-- {section}:start -->\n", 1)[1].splitlines()[0]
        note = update_readme.with_notes(str(ROOT / "results"), "", sampling).strip()
        if note:
            assert first == note and "former 1.5M-parameter demo model, which no longer ships" in first, first
        else:
            assert "former" not in first, first
    # Shipped after every measurement: each demo-model section is then the former model's, and says so.
    results = tmp_path / "results"
    shutil.copytree(ROOT / "results", results)
    ship = load_results(results / "experiments_ship.json")
    ship["provenance"]["time_utc"] = "2999-01-01T00:00:00+00:00"
    (results / "experiments_ship.json").write_text(json.dumps(ship))
    note = update_readme.with_notes(str(results), "", True).strip()
    assert "former 1.5M-parameter demo model, which no longer ships" in note and "issue 28" in note
    assert "`cache`" in note and "`reference`" in note, note


# A link target: a path (no scheme), with an optional #anchor.
LINK = re.compile(r"!?\[[^\]]*\]\((?![a-z][a-z0-9+.-]*:)([^)\s#]*)(#[^)\s]*)?\)")


def test_every_relative_link_of_the_readme_and_docs_resolves():
    for name, text in pages().items():
        prose = re.sub(r"```.*?```", "", text, flags=re.S)  # links in code blocks are code
        for target, _ in LINK.findall(prose):
            if target:
                assert (ROOT / name).parent.joinpath(target).exists(), f"{name}: broken link '{target}'"


def test_module_map_lists_every_module_of_the_package():
    """The README's module map names each file of parscale_ear_hf/ once: adding, moving or removing a module
    fails here until the map says what it does."""
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Module map", 1)[1].split("\n## ", 1)[0]
    listed = re.findall(r"^\| `([^`]+\.py)` \|", section, re.M)
    package = ROOT / "parscale_ear_hf"
    modules = [path.relative_to(package).as_posix() for path in package.rglob("*.py")]
    assert len(listed) == len(set(listed)), "a module is listed twice"
    assert sorted(listed) == sorted(modules)


def test_replace_section_requires_one_marker_pair():
    text = "a\n<!-- t:start -->\nold\n<!-- t:end -->\nb"
    assert replace_section(text, "t", "new") == "a\n<!-- t:start -->\nnew\n<!-- t:end -->\nb"
    with pytest.raises(ValueError, match="t:start"):
        replace_section("no markers", "t", "x")


def test_demo_command_generates_a_labelled_grid_from_the_shipped_model(tmp_path):
    """What `make demo` runs."""
    makefile = (ROOT / "Makefile").read_text()
    command = re.search(r"\$\(PY\) (examples/generate.py [^\n]*)", makefile).group(1).split()
    out = tmp_path / "grid.png"
    command[command.index("--output") + 1] = str(out)
    proc = subprocess.run(
        [sys.executable, *[str(ROOT / command[0])] + command[1:]],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr
    assert "models/mnist_demo" in command and "10 images of classes [0, 1, 2, 3, 4, 5, 6, 7, 8, 9]" in proc.stdout
    assert PIL.Image.open(out).size == (10 * 32, 32 + 12)


# ------------------------------------------------------------------ the shell blocks run as written

NOT_RUN = "# not run by tests/test_readme.py:"
# The pages show real budgets; the test runs the same commands with these (flag -> tiny value).
TINY_BUDGETS = {
    "--max-steps": "2",
    "--lr-warmup-steps": "1",
    "--warmup-steps": "1",
    "--eval-every": "2",
    "--checkpoint-every": "1",
    "--images-per-class": "2",
}


def shell_blocks(text: str) -> list[str]:
    return re.findall(r"```(?:bash|sh)\n(.*?)```", text, re.S)


def readme_shell_blocks() -> list[tuple[str, str]]:
    """(page, block) for every shell block of README.md, then of docs/*.md in name order: the docs pages
    continue where the README leaves off, in the same folder."""
    return [(name, block) for name, text in pages().items() for block in shell_blocks(text)]


def with_tiny_budgets(block: str) -> str:
    for flag, value in TINY_BUDGETS.items():
        block = re.sub(rf"{flag} \d+", f"{flag} {value}", block)
    return block


def test_readme_shell_blocks_say_why_they_are_not_run_and_hide_no_flags():
    blocks = readme_shell_blocks()
    runnable = [(name, b) for name, b in blocks if not b.startswith(NOT_RUN)]
    assert len([name for name, _ in runnable if name == "README.md"]) >= 3  # try, train, evaluate
    assert {name for name, _ in runnable} >= {"README.md", "docs/training.md", "docs/sampling.md"}
    for name, block in blocks:
        assert "..." not in block, f"a command of {name} hides its flags behind '...':\n{block}"
        if block.startswith(NOT_RUN):
            assert len(block.splitlines()[0]) > len(NOT_RUN) + 5, f"{name}: a block not run gives no reason"
    assert "source .venv/bin/activate" in runnable[0][1]


def test_readme_shell_blocks_run_in_order_in_a_fresh_folder(tmp_path):
    """Every runnable shell block of the README, then of docs/*.md, in order, from a folder holding only what a
    clone holds (examples/, models/) and the virtual environment, with tiny step counts: the pages cannot drift."""
    for name in ("examples", "models"):
        shutil.copytree(ROOT / name, tmp_path / name)
    (tmp_path / ".venv").symlink_to(Path(sys.prefix))
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("VIRTUAL_ENV", "PYTHONPATH"))},
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
    }
    # One shell for all blocks, as a reader would type them: `source .venv/bin/activate` carries over.
    named = [(name, with_tiny_budgets(b)) for name, b in readme_shell_blocks() if not b.startswith(NOT_RUN)]
    blocks = [block for _, block in named]
    script = "\n".join(f"echo '>>> README block {i}' >&2\n{block}" for i, block in enumerate(blocks))
    proc = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", script],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    index, _, output = proc.stderr.rsplit(">>> README block ", 1)[-1].partition("\n")
    assert proc.returncode == 0, (
        f"block {index} of {named[int(index)][0]} failed:\n{blocks[int(index)]}\n{output[-3000:]}"
    )
    ran = proc.stderr.count(">>> README block ")
    assert ran == len(blocks) >= 4
    # What the commands promise exists: the demo data, a trained VAE and pipeline, images, scores.
    assert (tmp_path / "data" / "mnist_demo").is_dir()
    assert (tmp_path / "runs" / "vae" / "vae" / "config.json").is_file()
    assert (tmp_path / "runs" / "gen" / "pipeline" / "model_index.json").is_file()
    assert PIL.Image.open(tmp_path / "outputs" / "my_model.png").size[0] == 10 * 32
    assert any((tmp_path / "runs" / "eval_demo").rglob("*.json"))


def test_demo_vae_config_file_is_the_shipped_vae():
    """The README trains the demo VAE from examples/configs/mnist_demo_vae.json: the shipped VAE's architecture."""
    config = json.loads((ROOT / "examples" / "configs" / "mnist_demo_vae.json").read_text())
    shipped = json.loads((ROOT / "models" / "mnist_demo" / "vae" / "config.json").read_text())
    assert {k: shipped[k] for k in config} == config
    assert set(shipped) - set(config) == {"_class_name", "_diffusers_version", "scaling_factor", "shift_factor"}
