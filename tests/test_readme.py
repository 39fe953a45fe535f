"""The README's snippet runs, its component table comes from the results file, the demo script works."""

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
from research.readme.tables import demo_results_table, replace_section

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


# ------------------------------------------------------------------ the README's shell blocks run as written

NOT_RUN = "# not run by tests/test_readme.py:"
# The README shows real budgets; the test runs the same commands with these (flag -> tiny value).
TINY_BUDGETS = {
    "--max-steps": "2",
    "--lr-warmup-steps": "1",
    "--warmup-steps": "1",
    "--eval-every": "2",
    "--checkpoint-every": "1",
    "--images-per-class": "2",
}


def readme_shell_blocks() -> list[str]:
    return re.findall(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), re.S)


def with_tiny_budgets(block: str) -> str:
    for flag, value in TINY_BUDGETS.items():
        block = re.sub(rf"{flag} \d+", f"{flag} {value}", block)
    return block


def test_readme_shell_blocks_say_why_they_are_not_run_and_hide_no_flags():
    blocks = readme_shell_blocks()
    runnable = [b for b in blocks if not b.startswith(NOT_RUN)]
    assert len(runnable) >= 4
    for block in blocks:
        assert "..." not in block, f"a README command hides its flags behind '...':\n{block}"
    assert "source .venv/bin/activate" in runnable[0]


def test_readme_shell_blocks_run_in_order_in_a_fresh_folder(tmp_path):
    """Every runnable ```bash block of the README, in order, from a folder holding only what a clone holds
    (examples/, models/) and the virtual environment, with tiny step counts: the README cannot drift."""
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
    blocks = [with_tiny_budgets(b) for b in readme_shell_blocks() if not b.startswith(NOT_RUN)]
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
    assert proc.returncode == 0, f"README block {index} failed:\n{blocks[int(index)]}\n{output[-3000:]}"
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
