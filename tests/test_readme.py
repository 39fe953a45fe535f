"""The README's snippet runs, its component table comes from the results file, the demo script works."""

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import PIL.Image
import pytest

from parscale_ear_hf.info import default_parameter_counts, parameter_table
from parscale_ear_hf.results import demo_results_table, replace_section

ROOT = Path(__file__).resolve().parents[1]


def test_usage_snippet_runs(tmp_path, monkeypatch):
    readme = (ROOT / "README.md").read_text()
    snippet = re.search(r"## Usage\s+```python\n(.*?)```", readme, re.S).group(1)
    monkeypatch.chdir(tmp_path)
    namespace = {}
    exec(compile(snippet, "README.md", "exec"), namespace)  # noqa: S102 - our own README
    assert len(namespace["images"]) == 2
    assert (tmp_path / "my-pipeline" / "model_index.json").is_file()


def test_readme_tables_are_generated_from_the_results_files(tmp_path):
    record = json.loads((ROOT / "results" / "param_counts.json").read_text())
    assert record["components"] == default_parameter_counts()["components"]  # the results file is current
    assert record["provenance"]["command"].endswith("examples/param_counts.py --output results/param_counts.json")
    readme = (ROOT / "README.md").read_text()
    assert parameter_table(record["components"]) in readme
    # Regenerating the README from results/ changes nothing: no figure in it was typed by hand.
    copy = tmp_path / "README.md"
    copy.write_text(readme)
    # A copy of results/: the command also rewrites the benchmark tables and plots beside the JSON.
    shutil.copytree(ROOT / "results", tmp_path / "results")
    subprocess.run(
        [
            sys.executable,
            str(ROOT / "examples" / "update_readme.py"),
            "--readme",
            str(copy),
            "--results-dir",
            str(tmp_path / "results"),
        ],
        check=True,
        capture_output=True,
        timeout=120,
    )
    assert copy.read_text() == readme
    for table in (tmp_path / "results").glob("benchmark_*.md"):  # derived from the JSON alone
        assert table.read_text() == (ROOT / "results" / table.name).read_text()
    assert demo_results_table(ROOT / "results") in readme


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
