"""Model cards: a pipeline's Hub README, filled from its evaluation results files, never typed.

:func:`build_model_card` renders ``model_cards/parscale_ear_card_template.md`` (Jinja, through
``huggingface_hub.ModelCard.from_template``) with the pipeline's configuration and parameter counts
and the results JSONs that ``examples/eval_fid.py`` writes; the YAML metadata carries the same
figures as ``model-index`` eval results. :func:`write_model_card` writes it to
``<pipeline_dir>/README.md``, which ``ParScaleEARPipeline.save_pretrained(..., push_to_hub=True)``
uploads with the folder.

python examples/make_model_card.py --model models/mnist_demo --results results/eval/mnist_demo.json
"""

from __future__ import annotations

import argparse
import json
import os
import re
from importlib import resources
from pathlib import Path

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from .evaluation import DigitFeatureExtractor
from .info import pipeline_summary
from .models.mar_transformer import MARTransformer
from .pipeline_parscale_ear import ParScaleEARPipeline
from .results import (
    check_eval_results,
    format_number,
    machine_summary,
    provenance,
    read_eval_results,
    reference_summary,
    samples_summary,
    sampling_summary,
    short_revision,
)

TEMPLATE_NAME = "parscale_ear_card_template.md"
TAGS = ["parscale-ear", "class-conditional", "image-generation", "energy-autoregressive"]
# A pipeline converted from MAR's released weights (`parscale-ear convert --mar`): its own template, tags and license.
MAR_TEMPLATE_NAME = "mar_card_template.md"
MAR_TAGS = ["parscale-ear", "class-conditional", "image-generation", "mar", "masked-autoregressive"]
MAR_LICENSE = "mit"
# The authors' evaluation guidance of MAR-B / L / H (LTH14/mar's README), with temperature 1.0.
MAR_GUIDANCE = {"mar_base": 2.9, "mar_large": 3.0, "mar_huge": 3.2}
# What the converter records about the authors' files, beside model_index.json (kept by later saves).
CONVERSION_RECORD = "conversion.json"
# The Hub has no task id for class-conditional generation ("unconditional-image-generation" would
# say the model takes no condition), so the eval results name the task plainly.
TASK_TYPE = "class-conditional-image-generation"
TASK_NAME = "Class-conditional image generation"
METRIC_LABELS = {
    "fid": "FID",
    "is": "Inception Score",
    "is_std": "Inception Score std over 10 splits",
    "precision": "Precision",
    "recall": "Recall",
    "rfid": "reconstruction FID (VAE)",
    "sfid": "sFID (spatial features)",
    "rsfid": "reconstruction sFID (VAE)",
    "rprecision": "Precision of the reconstructions (VAE)",
    "rrecall": "Recall of the reconstructions (VAE)",
}
DEMO_PREFIX = DigitFeatureExtractor.metric_prefix


def default_template_path(name: str = TEMPLATE_NAME) -> Path:
    """Where the card template `name` is: in the source checkout this module runs from, else package data.

    ``setup.cfg`` installs the top-level ``model_cards/`` folder as the package
    ``parscale_ear_hf.model_cards`` (as it installs ``pipelines/`` as ``parscale_ear_hf.hub_entry``),
    so a wheel carries the template. Code run from a checkout (an editable install, or a checkout put on
    ``sys.path``, perhaps beside another editable install) takes the checkout's ``model_cards/``, so the
    templates are those of the same tree as the code.

    Returns:
        The path of `name` (default ``parscale_ear_card_template.md``).
    """
    path = Path(__file__).resolve().parents[1] / "model_cards" / name
    if not path.is_file():
        try:
            path = Path(str(resources.files("parscale_ear_hf.model_cards").joinpath(name)))
        except ModuleNotFoundError:
            pass
    if not path.is_file():
        raise FileNotFoundError(
            f"default_template_path: the card template {os.fspath(path)!r} is missing; reinstall parscale-ear-hf or "
            "pass `template_path` (`--template`)."
        )
    return path


def metric_name(key: str) -> str:
    """The display name of a stored metric key; a ``demo_`` key says it is a demo stand-in.

    Args:
        key: a key of a result's `metrics`, e.g. ``fid`` or ``demo_fid``.

    Returns:
        e.g. ``FID``, or ``demo-FID (stand-in extractor, not Inception-v3)``.
    """
    if key.startswith(DEMO_PREFIX):
        base = key[len(DEMO_PREFIX) :]
        return f"demo-{_label(base)} (stand-in extractor, not Inception-v3)"
    return _label(key)


def _label(key: str) -> str:
    for metric in ("fid", "sfid", "precision", "recall"):
        if key.startswith(f"{metric}_real_"):  # run_reconstruction's floor: real images of another split
            split = key[len(f"{metric}_real_") :]
            return f"{METRIC_LABELS[metric]} of real {split} images (the sampling-noise floor)"
    return METRIC_LABELS.get(key, key)


def _refers_to(model: str, pipeline_dir: Path, model_id: str | None) -> bool:
    if model_id is not None and model == model_id:
        return True
    path = Path(model)
    if path.is_dir():  # a folder that exists here must be this one
        return path.resolve() == pipeline_dir.resolve()
    # Evaluated from another working directory or machine, or as a Hub repo id: the folder's name.
    return path.name == pipeline_dir.resolve().name


def check_result(record: dict, source: str, pipeline_dir: str | os.PathLike, model_id: str | None = None) -> dict:
    """Raise a ValueError naming `source` when `record` is not an evaluation result of this pipeline.

    Args:
        record: a parsed results JSON (:func:`~parscale_ear_hf.results.check_eval_results` checks its fields).
        source: where it came from, for the message.
        pipeline_dir: the pipeline folder the card is for.
        model_id: the Hub repo id the card is for, if any.

    Returns:
        `record`, unchanged.
    """
    check_eval_results(record, source)
    pipeline_dir = Path(pipeline_dir)
    if not _refers_to(str(record["model"]), pipeline_dir, model_id):
        also = f" or the repo id {model_id!r}" if model_id else ""
        raise ValueError(
            f"{source}: evaluates the model {record['model']!r}, not this pipeline {os.fspath(pipeline_dir)!r}; "
            f"accepted: this folder, a path whose last part is {pipeline_dir.resolve().name!r}{also}."
        )
    return record


def eval_results(record: dict) -> list[EvalResult]:
    """One ``huggingface_hub.EvalResult`` per metric of a results record, dataset from its reference.

    Args:
        record: a checked evaluation result.

    Returns:
        The eval results, in the order of `record["metrics"]`.
    """
    source = record["reference"]["source"]
    named = re.fullmatch(r"(.+) \[(.+)\]", source)  # "dataset [split]", as reference_from_dataset names it
    dataset, split = (named.group(1), named.group(2)) if named else (source, None)
    return [
        EvalResult(
            task_type=TASK_TYPE,
            task_name=TASK_NAME,
            dataset_type=dataset,
            dataset_name=dataset,
            dataset_split=split,
            metric_type=key,
            metric_name=metric_name(key),
            metric_value=value,
        )
        for key, value in record["metrics"].items()
    ]


def _training_summary(pipeline_dir: Path) -> dict | None:
    """What ``<pipeline_dir>/training/run_config.json`` (copied there from examples/train_ear.py) says."""
    path = pipeline_dir / "training" / "run_config.json"
    if not path.is_file():
        return None
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
        args, cache = config["args"], config["latent_cache"]
        # The last phase's resolved settings (`--epochs` leaves args.max_steps None); run configs written
        # before the recipe flags have only args.
        latest = (config.get("resumes") or [config])[-1]
        max_steps = latest["resolved"]["max_steps"] if "resolved" in latest else args["max_steps"]
        return {
            "dataset": cache["dataset"],
            "split": cache["split"],
            "count": cache["count"],
            "hflip": cache["hflip"],
            "vae": cache["vae"],
            "max_steps": max_steps,
            "batch_size": args["batch_size"],
            "seed": args["seed"],
        }
    except (json.JSONDecodeError, KeyError, TypeError) as error:
        raise ValueError(
            f"{os.fspath(path)!r} is not a run_config.json written by examples/train_ear.py ({error!r}); fix or "
            "remove it."
        ) from error


def build_model_card(
    pipeline_dir: str | os.PathLike,
    results: list[dict],
    *,
    model_id: str | None = None,
    datasets: list[str] | None = None,
    license: str | None = None,
    template_path: str | os.PathLike | None = None,
    grid_section: str | None = None,
    pipe: ParScaleEARPipeline | None = None,
    location: str | os.PathLike | None = None,
) -> ModelCard:
    """The model card of a saved pipeline, with its evaluation results.

    A pipeline with MAR's backbone (converted by ``parscale-ear convert --mar``) gets MAR's card
    (``model_cards/mar_card_template.md``): its origin from the folder's `conversion.json`, the MIT
    license of LTH14/mar and the paper's citation.

    Args:
        pipeline_dir: a folder written by ``ParScaleEARPipeline.save_pretrained``.
        results: evaluation records as ``examples/eval_fid.py`` writes them; each must be of this
            pipeline (see :func:`check_result`) with numeric values and provenance.
        model_id: the Hub repo id; names the model and goes into the loading snippet (default:
            the folder's name and path).
        datasets: training data, as Hub dataset ids or names, for the metadata and the card.
        license: the license id in the metadata (default: "apache-2.0"; MAR's pipelines: "mit").
        template_path: a Jinja card template (default: :func:`default_template_path` of the pipeline's kind).
        grid_section: Markdown on this configuration's runs over seeds, shown under its own heading
            (``examples/make_model_card.py --grid-cell`` writes it from the evidence grid's results).
        pipe: the pipeline saved in `pipeline_dir`, when it is at hand (else it is loaded from there).
        location: where the folder will be, when `pipeline_dir` is a save in progress (names the model
            and goes into the snippet in place of `pipeline_dir`).

    Returns:
        The card (``card.data`` holds the metadata, ``str(card)`` the README).
    """
    pipeline_dir = Path(pipeline_dir)
    if not (pipeline_dir / "model_index.json").is_file():
        raise FileNotFoundError(
            f"build_model_card: {os.fspath(pipeline_dir)!r} has no model_index.json; pass a folder written by "
            "`ParScaleEARPipeline.save_pretrained`."
        )
    where = Path(location) if location is not None else pipeline_dir
    results = [check_result(r, f"results[{i}]", where, model_id) for i, r in enumerate(results)]
    pipe = pipe if pipe is not None else ParScaleEARPipeline.from_pretrained(pipeline_dir)
    summary = pipeline_summary(pipe)
    model_name = model_id or where.resolve().name
    mar = isinstance(pipe.transformer, MARTransformer)
    card_data = ModelCardData(
        library_name="diffusers",
        license=license or (MAR_LICENSE if mar else "apache-2.0"),
        tags=MAR_TAGS if mar else TAGS,
        datasets=datasets,
        model_name=model_name,
        eval_results=[e for record in results for e in eval_results(record)] or None,
    )
    card_provenance = provenance()
    fields = _mar_fields(pipe, pipeline_dir) if mar else {}
    return ModelCard.from_template(
        card_data,
        template_path=os.fspath(template_path or default_template_path(MAR_TEMPLATE_NAME if mar else TEMPLATE_NAME)),
        card_command=card_provenance["command"],
        card_revision=card_provenance["git_revision"],
        model_name=model_name,
        repo_id=model_id or os.fspath(where),
        **_model_fields(pipe, summary),
        **fields,
        snippet_sampling=_snippet_sampling(results, pipe.grid_size**2, fields.get("sampling")),
        demo_extractors=sorted(
            {r["extractor"]["name"] for r in results if any(k.startswith(DEMO_PREFIX) for k in r["metrics"])}
        ),
        results=[_result_fields(r) for r in results],
        datasets=datasets or [],
        training=_training_summary(pipeline_dir),
        grid_section=grid_section,
    )


def _model_fields(pipe: ParScaleEARPipeline, summary: dict) -> dict:
    """The template's fields that describe the model: sizes, components, parameters, class names."""
    hybrid = summary["configs"]["lite_hybrid"]
    branches = [name for name, on in (("coarse", hybrid["use_coarse"]), ("fine", hybrid["use_fine"])) if on]
    names = [pipe.id2label[i].split(",")[0] for i in sorted(pipe.id2label)] if pipe.id2label else []
    num_tokens = pipe.grid_size**2
    return dict(
        image_size=summary["image_size"],
        image_channels=summary["image_channels"],
        num_classes=summary["num_classes"],
        token_grid="x".join(map(str, summary["token_grid"])) + f" ({num_tokens} tokens)",
        vae_class=type(pipe.vae).__name__,
        parscale_n=summary["configs"]["transformer"].get("parscale_n", 1),
        hybrid_branches=" + ".join(branches) or "none (identity: plain EAR)",
        parameters=[(name, f"{count:,}") for name, count in summary["parameters"].items()],
        label_preview=", ".join(names[:5]) + (", ..." if len(names) > 5 else ""),
        has_label_names=bool(names),
        example_labels=list(range(min(4, summary["num_classes"]))),
    )


def _mar_fields(pipe: ParScaleEARPipeline, pipeline_dir: Path) -> dict:
    """The MAR card's fields: the origin that the converter recorded (unknown entries say so), the backbone and
    head sizes, and the authors' sampling settings for the snippet."""
    path = pipeline_dir / CONVERSION_RECORD
    try:
        origin = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    except json.JSONDecodeError as error:
        raise ValueError(
            f"{os.fspath(path)!r} is not the JSON `parscale-ear convert --mar` writes ({error})."
        ) from error
    unknown = "not recorded"
    origin = {
        key: origin.get(key, unknown)
        for key in ("name", "script", "checkpoint", "weights", "vae", "vae_scaling_factor", "command")
    } | {"model": origin.get("model"), "checkpoint_sha256": origin.get("checkpoint_sha256")}
    t, h = pipe.transformer.config, pipe.energy_head.config
    return dict(
        origin=origin,
        backbone=dict(
            encoder=f"{t.encoder_hidden_size}x{t.encoder_num_layers}",
            decoder=f"{t.decoder_hidden_size}x{t.decoder_num_layers}",
            buffer=t.buffer_size,
        ),
        head=dict(width=h.width, depth=h.depth),
        num_sampling_steps=h.num_sampling_steps,
        sampling={
            "num_inference_steps": min(64, pipe.grid_size**2),
            "guidance_scale": MAR_GUIDANCE.get(origin["model"], 3.0),
            "temperature": 1.0,
        },
    )


def _snippet_sampling(results: list[dict], num_tokens: int, default: dict | None = None) -> dict:
    """The sampling settings of the card's loading snippet: the first sampled result's, else `default`, else at most
    64 steps."""
    sampled = [r["sampling"] for r in results if r["sampling"] is not None]
    if sampled:
        return {k: sampled[0][k] for k in ("num_inference_steps", "guidance_scale", "temperature")}
    return default or {"num_inference_steps": min(64, num_tokens)}


def _result_fields(record: dict) -> dict:
    """One evaluation record as the template shows it: headline, metric rows, and how it was measured."""
    return {
        "headline": f"`{record['metric']}` = {format_number(record['value'])}",
        "rows": [
            {"key": key, "name": metric_name(key), "value": format_number(value)}
            for key, value in record["metrics"].items()
        ],
        "samples": samples_summary(record["samples"]),
        "reference": reference_summary(record["reference"]),
        "extractor": record["extractor"]["name"],
        "sampling": sampling_summary(record["sampling"]),
        "revision": short_revision(record),
        "git_revision": record["provenance"]["git_revision"],
        "time_utc": record["provenance"]["time_utc"],
        "machine": machine_summary(record["provenance"]["machine"]),
        "command": record["provenance"]["command"],
    }


def _would_lose(path: Path, card: ModelCard) -> str | None:
    """What replacing the card at ``path`` with ``card`` would lose, or None: a README this module
    did not write (its metadata lacks our tags), or the eval results (by metric and dataset) that
    only the old card holds."""
    import yaml

    try:
        old = ModelCard.load(path).data
    except (ValueError, yaml.YAMLError) as error:
        return f"its metadata cannot be read ({' '.join(str(error).split())})"
    if not set(card.data.tags) <= set(old.tags or []):
        return f"it was not written by this command (its metadata lacks the tags {card.data.tags})"
    kept = {(r.metric_type, r.dataset_name) for r in card.data.eval_results or []}
    lost = sorted({r.metric_type for r in old.eval_results or [] if (r.metric_type, r.dataset_name) not in kept})
    return f"the new card would drop its eval results {lost}" if lost else None


def write_model_card(
    pipeline_dir: str | os.PathLike,
    results_files: list[str | os.PathLike],
    *,
    model_id: str | None = None,
    datasets: list[str] | None = None,
    license: str | None = None,
    template_path: str | os.PathLike | None = None,
    force: bool = False,
    grid_section: str | None = None,
) -> ModelCard:
    """Load results JSONs, build the card (:func:`build_model_card`) and write ``<pipeline_dir>/README.md``.

    The file is replaced atomically, and an existing card is never lost silently: unless
    ``force``, a FileExistsError names it when it was not written by this module or when the new
    card would drop eval results it holds (pass the results files that made them).

    Args:
        pipeline_dir: a folder written by ``ParScaleEARPipeline.save_pretrained``.
        results_files: results JSONs written by ``examples/eval_fid.py`` for this pipeline; a
            missing, unreadable or foreign file is an error naming it.
        model_id, datasets, license, template_path, grid_section: as in
            :func:`build_model_card`.
        force: replace an existing README.md whatever it holds.

    Returns:
        The card that was written.
    """
    results = [check_result(read_eval_results(p), os.fspath(p), pipeline_dir, model_id) for p in results_files]
    card = build_model_card(
        pipeline_dir,
        results,
        model_id=model_id,
        datasets=datasets,
        license=license,
        template_path=template_path,
        grid_section=grid_section,
    )
    path = Path(pipeline_dir) / "README.md"
    loss = None if force or not path.is_file() else _would_lose(path, card)
    if loss is not None:
        raise FileExistsError(
            f"write_model_card: {os.fspath(path)!r} exists and {loss}; pass the results files its figures come "
            "from (--results FILE...), or --force to replace it."
        )
    tmp = path.with_name(f".{path.name}.tmp")
    card.save(tmp)
    os.replace(tmp, path)
    return card


# ------------------------------------------------------------------------------ the command


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--model", required=True, help="pipeline folder; the card is written to <model>/README.md")
    parser.add_argument(
        "--results", nargs="*", default=[], help="results JSONs written by examples/eval_fid.py for this pipeline"
    )
    parser.add_argument("--model-id", default=None, help="Hub repo id the card is for (names the model)")
    parser.add_argument("--dataset", nargs="*", default=None, help="training data: Hub dataset ids or names")
    parser.add_argument(
        "--license", default=None, help="license id for the metadata (default: apache-2.0; MAR's pipelines: mit)"
    )
    parser.add_argument("--template", default=None, help=f"Jinja card template (default: model_cards/{TEMPLATE_NAME})")
    parser.add_argument(
        "--force", action="store_true", help="replace an existing README.md even if the new card drops its results"
    )
    return parser


def run(args: argparse.Namespace, grid_section: str | None = None) -> ModelCard:
    """Write a pipeline's model card (README.md) from its evaluation results files (and `grid_section`, Markdown
    that examples/make_model_card.py builds from the evidence grid)."""
    card = write_model_card(
        args.model,
        args.results,
        model_id=args.model_id,
        datasets=args.dataset,
        license=args.license,
        template_path=args.template,
        force=args.force,
        grid_section=grid_section,
    )
    print(f"wrote {os.path.join(args.model, 'README.md')}: {len(card.data.eval_results or [])} eval results")
    return card
