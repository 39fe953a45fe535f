"""A Gradio web demo for saved pipelines: ``parscale-ear app --model DIR_OR_REPO [--model ...]`` (and `app.py`,
a Space's entry point).

The page takes a model, classes (ids or names, comma-separated), images per class, steps, guidance, temperature,
seed and the fast-sampling options (:class:`~parscale_ear_hf.SamplingCache`), shows the images with the time they
took, the exact settings, and a Python snippet that makes the same images through ``pipe(...)``. Requests are
queued (one sampling at a time); progress shows per step. Any bad input (an unknown class, zero steps, guidance
below 1, a request above the server's limits, a model it does not serve) is reported in the page (the ``#status``
box) and the server goes on.

Safe to serve publicly by default: visitors choose among the models named with --model (checked on the server,
so a forged request is refused too), at most --max-loaded-models pipelines stay loaded (the least recently used
is dropped), and each request is capped by --max-steps, --max-images and --max-work (images x steps); the page
states the limits. --allow-any-model lets the Model box load any folder or Hub repo id; it is refused with a
--host other than loopback and with --share.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import math
import time
from collections.abc import Sequence

import torch

from .models._checks import check_device, check_int

DEFAULT_MODEL = "models/mnist_demo"
LOOPBACK_HOSTS = ("127.0.0.1", "::1", "localhost")
MAX_LOADED_MODELS = 2  # pipelines kept in memory: the shipped one and one more, for a small Space
MAX_QUEUE = 16  # requests waiting their turn; more are turned away (Gradio's "queue is full")
MAX_SEED = 2**32 - 1  # image i uses seed + i, which must stay a valid torch seed


@dataclasses.dataclass(frozen=True)
class Limits:
    """The most that one request may ask for (the flags --max-steps, --max-images and --max-work).

    The defaults suit a CPU Space serving the shipped model. It has 64 tokens, and steps beyond the number of
    tokens predict nothing; 64 is also the pipeline's default steps and the CLI's (``min(64, tokens)``). A
    request's time grows with images x steps: the cap of 1,024 (16 images at 64 steps, or 64 images at 16) keeps
    one request to about half a minute on one CPU thread, so that the single-slot queue moves.
    """

    max_steps: int = 64
    max_images: int = 64
    max_work: int = 1024

    def describe(self) -> str:
        """The limits as the page states them."""
        return (
            f"Limits per request: at most {self.max_steps} steps, {self.max_images} images, and "
            f"{self.max_work} image-steps (images x steps)."
        )


@dataclasses.dataclass(frozen=True)
class Request:
    """What one click asks for, as the page's controls give it (before any check)."""

    model: str
    classes: str
    images_per_class: float
    steps: float
    guidance: float
    temperature: float | None  # None: the pipeline's (`pipe.sampling_defaults`)
    seed: float
    token_cache: bool = False
    condition_cache: bool = False
    token_share: float = 0.1
    refresh_every: float | None = None  # None: by the step count


def parse_classes(text: str) -> list[int | str]:
    """``"3, 7"`` -> ``[3, 7]``; names stay strings (the pipeline maps them); empty entries are dropped."""
    parts = [p.strip() for p in (text or "").split(",")]
    labels = [int(p) if p.lstrip("-").isdigit() else p for p in parts if p]
    if not labels:
        raise ValueError("Classes: give at least one class id or name, separated by commas (e.g. `3, 7`).")
    return labels


def _whole(name: str, value, minimum: int, maximum: int | None = None) -> int:
    """``value`` as an int; raises unless it is a whole number in ``[minimum, maximum]``."""
    number = value if isinstance(value, (int, float)) and not isinstance(value, bool) else math.nan
    ok = math.isfinite(number) and number == int(number) and minimum <= number
    if not ok or (maximum is not None and number > maximum):
        accepted = (
            f"of at least {minimum}" if maximum is None else f"from {minimum} to {maximum} (this server's limit)"
        )
        raise ValueError(f"{name} must be a whole number {accepted}, got {value!r}.")
    return int(number)


def sampling_cache(request: Request):
    """The request's :class:`SamplingCache`, or None for exact sampling (both caches off)."""
    from .pipeline_parscale_ear import SamplingCache

    if not (request.token_cache or request.condition_cache):
        return None
    return SamplingCache(
        token_cache=bool(request.token_cache),
        token_share=float(request.token_share),
        condition_cache=bool(request.condition_cache),
        refresh_every=None if request.refresh_every is None else _whole("Refresh every", request.refresh_every, 1),
    )


def python_snippet(model: str, labels: list, settings: dict, cache) -> str:
    """The code that makes the same images with ``pipe(...)`` (per-image generators seeded seed, seed + 1, ...)."""
    cache_line = ""
    imports = "ParScaleEARPipeline"
    if cache is not None:
        fields = ", ".join(f"{k}={v!r}" for k, v in dataclasses.asdict(cache).items())
        cache_line = f"    cache=SamplingCache({fields}),\n"
        imports += ", SamplingCache"
    count = len(labels) * settings["num_images_per_class"]
    return (
        "import torch\n"
        f"from parscale_ear_hf import {imports}\n\n"
        f"pipe = ParScaleEARPipeline.from_pretrained({model!r})\n"
        "images = pipe(\n"
        f"    {labels!r},\n"
        f"    num_images_per_class={settings['num_images_per_class']},\n"
        f"    num_inference_steps={settings['num_inference_steps']},\n"
        f"    guidance_scale={settings['guidance_scale']!r},\n"
        f"    temperature={settings['temperature']!r},\n"
        f"    generator=[torch.Generator().manual_seed({settings['seed']} + i) for i in range({count})],\n"
        f"{cache_line}"
        ").images\n"
    )


class DemoApp:
    """The app's state (the served models, the pipelines loaded now) and its one action, :meth:`generate`.

    Args:
        models: the pipeline folders or Hub repo ids served; the first is the one an empty Model box means.
        device: where pipelines run (default: cuda when available, else cpu).
        allow_any_model: also load any other folder or Hub repo id a request names (only for a loopback host).
        max_loaded_models: pipelines kept loaded; loading another drops the least recently used.
        limits: the most one request may ask for (default: :class:`Limits`' defaults).
    """

    def __init__(
        self,
        models: Sequence[str] = (DEFAULT_MODEL,),
        device: str | None = None,
        *,
        allow_any_model: bool = False,
        max_loaded_models: int = MAX_LOADED_MODELS,
        limits: Limits | None = None,
    ):
        if isinstance(models, str) or not models:
            raise ValueError(f"DemoApp: `models` must be a non-empty list of folders or Hub repo ids, got {models!r}.")
        check_int("DemoApp", "max_loaded_models", max_loaded_models, 1)
        self.models = list(dict.fromkeys(models))
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.allow_any_model = allow_any_model
        self.max_loaded_models = max_loaded_models
        self.limits = limits or Limits()
        self._pipes = collections.OrderedDict()  # model -> pipeline, least recently used first

    @property
    def loaded(self) -> list[str]:
        """The models whose pipelines are loaded now, least recently used first."""
        return list(self._pipes)

    def pipeline(self, model: str | None):
        """``(model, pipeline)``: the pipeline of `model` (empty: the first served model), loaded if need be.

        Raises:
            ValueError: `model` is not served (without `allow_any_model`), or does not load.
        """
        from .pipeline_parscale_ear import ParScaleEARPipeline

        model = (model or "").strip() or self.models[0]
        if not (self.allow_any_model or model in self.models):
            served = ", ".join(map(repr, self.models))
            raise ValueError(
                f"Model: {model!r} is not served here; accepted: {served} (the models it was started with)."
            )
        if model in self._pipes:
            self._pipes.move_to_end(model)
            return model, self._pipes[model]
        while len(self._pipes) >= self.max_loaded_models:  # dropped before the load: never more held at once
            self._pipes.popitem(last=False)
        try:
            pipe = ParScaleEARPipeline.from_pretrained(model).to(self.device)
        except Exception as error:  # any failure to load is reported in the page
            message = " ".join(str(error).split())
            raise ValueError(f"Model: cannot load {model!r} as a ParScaleEARPipeline: {message}") from error
        pipe.set_progress_bar_config(disable=True)
        self._pipes[model] = pipe
        return model, pipe

    def check_size(self, num_classes: int, per_class, steps) -> tuple[int, int]:
        """``(per_class, steps)`` as ints, once they are within :attr:`limits`.

        Raises:
            ValueError: naming the control (or the total), its value and the limit.
        """
        limits = self.limits
        per_class = _whole("Images per class", per_class, 1)
        steps = _whole("Steps", steps, 1, limits.max_steps)
        images = num_classes * per_class
        if images > limits.max_images:
            raise ValueError(
                f"Images: {num_classes} classes x {per_class} per class = {images} images; this server's limit is "
                f"{limits.max_images} per request."
            )
        if images * steps > limits.max_work:
            raise ValueError(
                f"Images x steps: {images} x {steps} = {images * steps}; this server's limit is {limits.max_work} "
                "per request (ask for fewer images or steps)."
            )
        return per_class, steps

    def generate(self, request: Request, progress=None) -> dict:
        """Sample the request; returns images (with captions), seconds, settings and the snippet.

        Guidance and temperature are checked by ``pipe(...)`` itself, before it samples: the page accepts exactly
        what the pipeline accepts.

        Raises:
            ValueError: bad input, with a message that names the control (or the pipeline's argument) and what
                it accepts.
        """
        labels = parse_classes(request.classes)
        per_class, steps = self.check_size(len(labels), request.images_per_class, request.steps)
        seed = _whole("Seed", request.seed, 0, MAX_SEED)
        cache = sampling_cache(request)
        model, pipe = self.pipeline(request.model)
        ids = pipe.class_ids(labels)  # unknown names and ids fail here, before any sampling
        count = len(ids) * per_class
        temperature = pipe.sampling_defaults["temperature"] if request.temperature is None else request.temperature
        settings = {
            "num_images_per_class": per_class,
            "num_inference_steps": steps,
            "guidance_scale": request.guidance,
            "temperature": temperature,
            "seed": seed,
        }

        def on_step(pipe_, step, timestep, tensors):
            if progress is not None:
                progress((step + 1) / steps, desc=f"step {step + 1} of {steps}")
            return {}

        start = time.perf_counter()
        images = pipe(
            labels,
            num_images_per_class=per_class,
            num_inference_steps=steps,
            guidance_scale=request.guidance,
            temperature=temperature,
            generator=[torch.Generator().manual_seed(seed + i) for i in range(count)],
            cache=cache,
            callback_on_step_end=on_step,
        ).images
        seconds = time.perf_counter() - start
        names = [pipe.id2label[i].split(",")[0] if pipe.id2label else str(i) for i in ids for _ in range(per_class)]
        return {
            "images": list(zip(images, names)),
            "seconds": seconds,
            "settings": {
                "model": model,
                "class_labels": labels,
                "class_ids": ids,
                **settings,
                "cache": dataclasses.asdict(cache) if cache else None,
                "device": self.device,
            },
            "snippet": python_snippet(model, labels, settings, cache),
        }


def build_app(
    models: Sequence[str] = (DEFAULT_MODEL,),
    device: str | None = None,
    *,
    allow_any_model: bool = False,
    max_loaded_models: int = MAX_LOADED_MODELS,
    limits: Limits | None = None,
    max_queue: int = MAX_QUEUE,
):
    """The Gradio Blocks page of a :class:`DemoApp` with these arguments (queued: one sampling at a time, at most
    `max_queue` others wait their turn). The first model is loaded now, for the class names beside the classes box."""
    import gradio as gr

    app = DemoApp(models, device, allow_any_model=allow_any_model, max_loaded_models=max_loaded_models, limits=limits)
    try:  # a model that does not load says so here and when used
        _, pipe = app.pipeline(app.models[0])
        names = [pipe.id2label[i] for i in sorted(pipe.id2label)] if pipe.id2label else []
        num_classes = pipe.transformer.config.num_classes
        hint = f"ids 0-{num_classes - 1}" + (f" or names: {', '.join(names[:12])}" if names else "")
    except ValueError as error:
        hint = str(error)

    # Gallery files older than an hour are deleted every hour, so that a long-running server's disk stays bounded.
    with gr.Blocks(title="ParScale-EAR", delete_cache=(3600, 3600)) as demo:
        gr.Markdown(
            "# ParScale-EAR\nClass-conditional images from a masked autoregressive model over continuous tokens, "
            "one energy-head step per token."
        )
        with gr.Row():
            with gr.Column():
                model = gr.Dropdown(
                    choices=app.models,
                    value=app.models[0],
                    allow_custom_value=allow_any_model,  # Gradio refuses other values too, before `run`
                    label="Model (one served here, or any folder or Hub repo id)" if allow_any_model else "Model",
                    elem_id="model",
                )
                classes = gr.Textbox(value="3, 7", label=f"Classes ({hint})", elem_id="classes")
                per_class = gr.Number(value=2, precision=0, label="Images per class", elem_id="per_class")
                steps = gr.Number(value=16, precision=0, label=f"Steps (1-{app.limits.max_steps})", elem_id="steps")
                guidance = gr.Number(value=3.0, label="Guidance (>= 1)", elem_id="guidance")
                temperature = gr.Number(
                    value=None, label="Temperature (>= 0; empty: the model's, EAR 0.7, MAR 1.0)", elem_id="temperature"
                )
                seed = gr.Number(value=0, precision=0, label="Seed", elem_id="seed")
                with gr.Accordion("Fast sampling (LazyMAR's caches; not exact)", open=False):
                    token_cache = gr.Checkbox(value=False, label="Token cache", elem_id="token_cache")
                    token_share = gr.Slider(0.0, 1.0, value=0.1, step=0.05, label="Token share")
                    condition_cache = gr.Checkbox(value=False, label="Condition cache", elem_id="condition_cache")
                    refresh_every = gr.Number(
                        value=None, precision=0, label="Refresh every (steps; empty: by the step count)"
                    )
                button = gr.Button("Generate", variant="primary", elem_id="generate")
                gr.Markdown(app.limits.describe(), elem_id="limits")
            with gr.Column():
                status = gr.Markdown("Ready.", elem_id="status")
                gallery = gr.Gallery(label="Images", columns=4, height=320, elem_id="gallery", format="png")
                snippet = gr.Code(label="Copy as Python", language="python", elem_id="snippet")
                settings = gr.JSON(label="Settings", elem_id="settings")

        requests = iter(range(1, 1 << 62))  # numbers each answer, so that two alike still differ in the page

        def run(*values, progress=gr.Progress()):  # noqa: B008  (how Gradio asks for a progress tracker)
            number = next(requests)
            try:
                out = app.generate(Request(*values), progress=progress)
            except ValueError as error:
                return f"Request {number}: **Error:** {error}", gr.update(), gr.update(), gr.update()
            count = len(out["images"])
            plural = "s" if count != 1 else ""
            text = f"Request {number}: {count} image{plural} in {out['seconds']:.2f} s on {app.device}."
            return text, out["images"], out["settings"], out["snippet"]

        inputs = [model, classes, per_class, steps, guidance, temperature, seed,
                  token_cache, condition_cache, token_share, refresh_every]  # fmt: skip
        button.click(run, inputs, [status, gallery, settings, snippet], concurrency_limit=1)
    return demo.queue(default_concurrency_limit=1, max_size=max_queue)


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    limits = Limits()
    parser.add_argument(
        "--model",
        action="append",
        default=None,
        help=f"a pipeline folder or Hub repo id to serve; repeat for several, the first is preselected "
        f"(default: {DEFAULT_MODEL})",
    )
    parser.add_argument(
        "--allow-any-model",
        action="store_true",
        help="let the Model box load any folder or Hub repo id a visitor types; only with a loopback --host "
        "and without --share",
    )
    parser.add_argument("--host", default="127.0.0.1", help="0.0.0.0 to serve other machines")
    parser.add_argument("--port", type=int, default=7860, help="1-65535 (default: %(default)s)")
    parser.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    parser.add_argument("--share", action="store_true", help="a public gradio.live link")
    parser.add_argument(
        "--max-loaded-models",
        type=int,
        default=MAX_LOADED_MODELS,
        help="pipelines kept loaded; the least recently used is dropped (default: %(default)s)",
    )
    parser.add_argument(
        "--max-queue",
        type=int,
        default=MAX_QUEUE,
        help="requests waiting their turn at most; more are turned away (default: %(default)s)",
    )
    parser.add_argument(
        "--max-steps", type=int, default=limits.max_steps, help="steps per request at most (default: %(default)s)"
    )
    parser.add_argument(
        "--max-images", type=int, default=limits.max_images, help="images per request at most (default: %(default)s)"
    )
    parser.add_argument(
        "--max-work",
        type=int,
        default=limits.max_work,
        help="images x steps per request at most (default: %(default)s)",
    )
    return parser


def check_args(args: argparse.Namespace) -> None:
    """Refuse, before any model is loaded or port opened, flags out of range and --allow-any-model on a server
    that others can reach (a --host other than loopback, or --share)."""
    check_int("app", "--port", args.port, 1, 65535)
    if args.device is not None:
        check_device("app", "--device", args.device)
    for flag in ("--max-loaded-models", "--max-queue", "--max-steps", "--max-images", "--max-work"):
        check_int("app", flag, getattr(args, flag[2:].replace("-", "_")), 1)
    if args.allow_any_model and (args.share or args.host not in LOOPBACK_HOSTS):
        public = "--share" if args.share else f"--host {args.host}"
        raise ValueError(
            f"app: --allow-any-model is refused with {public}: it would let anyone load any path or Hub repo id; "
            f"use a loopback --host ({', '.join(LOOPBACK_HOSTS)}) without --share, or serve chosen models with "
            "--model instead."
        )


def run(args: argparse.Namespace) -> None:
    """Serve the demo page until interrupted."""
    check_args(args)
    demo = build_app(
        args.model or [DEFAULT_MODEL],
        args.device,
        allow_any_model=args.allow_any_model,
        max_loaded_models=args.max_loaded_models,
        limits=Limits(args.max_steps, args.max_images, args.max_work),
        max_queue=args.max_queue,
    )
    demo.launch(server_name=args.host, server_port=args.port, share=args.share)


__all__ = ["DemoApp", "Limits", "Request", "build_app", "parse_classes", "python_snippet"]
