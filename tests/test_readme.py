"""The README's snippet runs, its component table comes from the results file, the demo script works."""

import json
import re
import subprocess
import sys
from pathlib import Path

from parscale_ear_hf.info import default_parameter_counts, parameter_table
from parscale_ear_hf.results import replace_section

ROOT = Path(__file__).resolve().parents[1]


def test_usage_snippet_runs(tmp_path, monkeypatch):
    readme = (ROOT / "README.md").read_text()
    snippet = re.search(r"## Usage\s+```python\n(.*?)```", readme, re.S).group(1)
    monkeypatch.chdir(tmp_path)
    namespace = {}
    exec(compile(snippet, "README.md", "exec"), namespace)  # noqa: S102 - our own README
    assert len(namespace["images"]) == 2
    assert (tmp_path / "my-pipeline" / "model_index.json").is_file()


def test_parameter_table_is_generated_from_the_results_file():
    record = json.loads((ROOT / "results" / "param_counts.json").read_text())
    assert record["components"] == default_parameter_counts()["components"]  # results file is current
    assert record["provenance"]["git_revision"] and record["provenance"]["command"].endswith(
        "param_counts.py --output results/param_counts.json --readme README.md"
    )
    readme = (ROOT / "README.md").read_text()
    assert parameter_table(record["components"]) in readme


def test_replace_section_requires_one_marker_pair():
    text = "a\n<!-- t:start -->\nold\n<!-- t:end -->\nb"
    assert replace_section(text, "t", "new") == "a\n<!-- t:start -->\nnew\n<!-- t:end -->\nb"
    try:
        replace_section("no markers", "t", "x")
    except ValueError as err:
        assert "t:start" in str(err)
    else:
        raise AssertionError("missing markers must raise")


def test_demo_script_builds_saves_reloads_and_writes_a_grid(tmp_path):
    out = tmp_path / "grid.png"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "generate.py"), "--output", str(out), "--steps", "8"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert "RANDOM weights" in proc.stdout and out.is_file()
    assert (tmp_path / "random_tiny_pipeline" / "transformer" / "diffusion_pytorch_model.safetensors").is_file()
