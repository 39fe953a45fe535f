"""The installed package is the library only: the research apparatus (examples/research/) stays out of the
wheel, and the package's modules import one another without cycles."""

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RESEARCH = ("benchmark", "bench_sampling", "experiments", "reference_ear", "app_browser", "model_card_grid", "tables")
LIBRARY = (
    "__init__",
    "cli",
    "commands",
    "loading",
    "pipeline_parscale_ear",
    "saving",
    "model_card",
    "results",
    "models/ear_transformer",
    "models/energy_head",
    "training/loop",
    "evaluation/driver",
)


def test_the_wheel_holds_the_library_and_none_of_the_research_modules(tmp_path):
    pytest.importorskip("setuptools", reason="builds offline with the environment's setuptools")
    # Build from a copy: setuptools writes build/ and *.egg-info beside setup.cfg.
    source = tmp_path / "src"
    files = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    for name in files:
        if name.startswith(("parscale_ear_hf/", "pipelines/", "model_cards/")) or name in (
            "setup.cfg",
            "pyproject.toml",
            "README.md",
        ):
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            (source / name).write_bytes((ROOT / name).read_bytes())
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            str(source),
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
        ],
        check=True,
        capture_output=True,
        timeout=120,
    )
    (wheel,) = tmp_path.glob("parscale_ear_hf-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    modules = {Path(n).with_suffix("").as_posix() for n in names if n.endswith(".py")}
    assert not [m for m in modules if Path(m).name in RESEARCH or "research" in m.split("/")], sorted(modules)
    assert {f"parscale_ear_hf/{m}" for m in LIBRARY} <= modules
    assert "parscale_ear_hf/hub_entry/pipeline_parscale_ear" in modules  # saved pipelines write it


def test_the_package_has_no_import_cycles():
    grimp = pytest.importorskip("grimp", reason="grimp comes with import-linter (the test extra)")
    graph = grimp.build_graph("parscale_ear_hf")
    cycles = []
    for module in sorted(graph.modules):
        for imported in graph.find_modules_directly_imported_by(module):
            if imported != module and graph.chain_exists(imported, module):
                cycles.append(f"{module} <-> {imported}")
    assert not cycles, cycles
