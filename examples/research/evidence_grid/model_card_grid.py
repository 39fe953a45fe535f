"""A model card's evidence-grid section: how the grid's runs of a pipeline's configuration scored over seeds
(`examples/make_model_card.py --grid-cell`), passed to the library's card as ``grid_section``."""

from __future__ import annotations

import json
import os
from pathlib import Path

from research.evidence_grid import experiments


def cell_config_differences(pipe, cell: str, base_config: str | os.PathLike) -> list[str]:
    """Where ``pipe``'s component configs differ from the grid cell's model config (its changes on the runs'
    base config): ``"section.key: ours here, theirs in the grid's runs"``, one per differing field."""
    path = Path(base_config)
    if not path.is_file():
        raise FileNotFoundError(
            f"--grid-cell {cell}: the grid's base config {os.fspath(path)!r} (named in its results files) is not "
            "there; build the card from the repository's root."
        )
    config = experiments.model_config(experiments.CELLS_BY_NAME[cell], json.loads(path.read_text(encoding="utf-8")))
    differences = []
    for section, fields in config.items():
        component = getattr(pipe, section, None)
        for key, theirs in fields.items():
            ours = component.config.get(key) if component is not None else None
            if ours != theirs:
                differences.append(f"{section}.{key}: {ours!r} here, {theirs!r} in the grid's runs")
    return differences


def cell_card_section(results_dir: str | os.PathLike, cell: str, pipe) -> str:
    """A card's evidence-grid section: the cell's scores (mean ± std over its complete seeds) and the grid's
    claims, from `<results_dir>/experiments/` (:mod:`research.evidence_grid.experiments`), and where ``pipe``'s
    configuration differs from the cell's (:func:`cell_config_differences`)."""

    if cell not in experiments.CELLS_BY_NAME:
        raise ValueError(f"--grid-cell: unknown cell {cell!r}; accepted: {sorted(experiments.CELLS_BY_NAME)}.")
    grid = experiments.load_grid(Path(results_dir, "experiments"))
    runs = grid.get(cell, [])
    if not runs:
        raise FileNotFoundError(
            f"--grid-cell {cell}: {os.fspath(Path(results_dir, 'experiments', cell))} holds no complete run; run "
            f"`python examples/experiments.py --cells {cell}` first."
        )
    steps = runs[0]["settings"]["training_steps"]
    differences = cell_config_differences(pipe, cell, runs[0]["settings"]["base_config"])
    table = experiments.main_table(grid)
    row = next(line for line in table if f"(`{cell}`)" in line)
    what = "The same configuration" if not differences else f"The grid's cell `{cell}`"
    lines = [
        f"{what} trained with the grid's recipe for {steps} steps, once per seed, and scored "
        f"against the held-out split (mean ± standard deviation over {len(runs)} seeds; training and sampling "
        "seed both change). These runs are not this model: they show how much its figures move between seeds.",
        "",
        *table[:2],
        row,
        "",
        *(
            [
                "Its model config differs from this model's in:",
                "",
                *[f"- {line}" for line in differences],
                "",
            ]
            if differences
            else []
        ),
        "The grid's claims (a difference exceeds the spread when the means are further apart than the sum of the "
        "two standard deviations):",
        "",
        *experiments.claims_table(grid),
        "",
        *experiments.provenance_lines({cell: runs}),
    ]
    return "\n".join(lines)
