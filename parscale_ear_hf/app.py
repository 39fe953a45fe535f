"""A Gradio web demo for any saved pipeline: ``parscale-ear app --model DIR_OR_REPO`` (and `app.py`, a Space's
entry point).

The page takes classes (ids or names, comma-separated), images per class, steps, guidance, temperature, seed and
the fast-sampling options (:class:`~parscale_ear_hf.SamplingCache`), shows the images with the time they took,
the exact settings, and a Python snippet that makes the same images through ``pipe(...)``. Requests are queued
(one sampling at a time); progress shows per step. Any bad input (an unknown class, zero steps, guidance below 1,
a model that does not load) is reported in the page (the ``#status`` box) and the server goes on.
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import torch

DEFAULT_MODEL = "models/mnist_demo"
MAX_IMAGES = 64  # per request: a CPU Space stays responsive


@dataclasses.dataclass(frozen=True)
class Request:
    """What one click asks for, as the page's controls give it (before any check)."""

    model: str
    classes: str
    images_per_class: float
    steps: float
    guidance: float
    temperature: float
    seed: float
    token_cache: bool = False
    condition_cache: bool = False
    token_share: float = 0.1
    refresh_every: float = 8


def parse_classes(text: str) -> list[int | str]:
    """``"3, 7"`` -> ``[3, 7]``; names stay strings (the pipeline maps them); empty entries are dropped."""
    parts = [p.strip() for p in (text or "").split(",")]
    labels = [int(p) if p.lstrip("-").isdigit() else p for p in parts if p]
    if not labels:
        raise ValueError("Classes: give at least one class id or name, separated by commas (e.g. `3, 7`).")
    return labels


def _whole(name: str, value, minimum: int) -> int:
    if value is None or float(value) != int(float(value)) or int(float(value)) < minimum:
        raise ValueError(f"{name} must be a whole number of at least {minimum}, got {value!r}.")
    return int(float(value))


def sampling_cache(request: Request):
    """The request's :class:`SamplingCache`, or None for exact sampling (both caches off)."""
    from .pipeline_parscale_ear import SamplingCache

    if not (request.token_cache or request.condition_cache):
        return None
    return SamplingCache(
        token_cache=bool(request.token_cache),
        token_share=float(request.token_share),
        condition_cache=bool(request.condition_cache),
        refresh_every=_whole("Refresh every", request.refresh_every, 1),
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
    """The app's state (loaded pipelines by path) and its one action, :meth:`generate`."""

    def __init__(self, default_model: str = DEFAULT_MODEL, device: str | None = None):
        self.default_model = default_model
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self._pipes = {}

    def pipeline(self, model: str):
        from .pipeline_parscale_ear import ParScaleEARPipeline

        model = (model or "").strip() or self.default_model
        if model not in self._pipes:
            try:
                pipe = ParScaleEARPipeline.from_pretrained(model).to(self.device)
            except Exception as error:  # any failure to load is the user's path, reported in the page
                message = " ".join(str(error).split())
                raise ValueError(f"Model: cannot load {model!r} as a ParScaleEARPipeline: {message}") from error
            pipe.set_progress_bar_config(disable=True)
            self._pipes[model] = pipe
        return model, self._pipes[model]

    def generate(self, request: Request, progress=None) -> dict:
        """Sample the request; returns images (with captions), seconds, settings and the snippet.

        Raises:
            ValueError: bad input, with a message that names the control and what it accepts.
        """
        labels = parse_classes(request.classes)
        per_class = _whole("Images per class", request.images_per_class, 1)
        steps = _whole("Steps", request.steps, 1)
        seed = _whole("Seed", request.seed, 0)
        guidance, temperature = float(request.guidance), float(request.temperature)
        if not guidance >= 1.0:
            raise ValueError(f"Guidance must be at least 1 (1 turns it off), got {guidance}.")
        if not temperature > 0:
            raise ValueError(f"Temperature must be above 0, got {temperature}.")
        if len(labels) * per_class > MAX_IMAGES:
            raise ValueError(f"At most {MAX_IMAGES} images per request, got {len(labels)} classes x {per_class}.")
        cache = sampling_cache(request)
        model, pipe = self.pipeline(request.model)
        ids = pipe.class_ids(labels)  # unknown names and ids fail here, before any sampling
        count = len(ids) * per_class
        settings = {
            "num_images_per_class": per_class,
            "num_inference_steps": steps,
            "guidance_scale": guidance,
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
            guidance_scale=guidance,
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


def build_app(default_model: str = DEFAULT_MODEL, device: str | None = None):
    """The Gradio Blocks page (queued: one sampling at a time, the others wait their turn)."""
    import gradio as gr

    app = DemoApp(default_model, device)
    try:  # the class names shown beside the classes box; a model that does not load says so when used
        _, pipe = app.pipeline(default_model)
        names = [pipe.id2label[i] for i in sorted(pipe.id2label)] if pipe.id2label else []
        num_classes = pipe.transformer.config.num_classes
        hint = f"ids 0-{num_classes - 1}" + (f" or names: {', '.join(names[:12])}" if names else "")
    except ValueError as error:
        hint = str(error)

    with gr.Blocks(title="ParScale-EAR") as demo:
        gr.Markdown(
            "# ParScale-EAR\nClass-conditional images from a masked autoregressive model over continuous tokens, "
            "one energy-head step per token."
        )
        with gr.Row():
            with gr.Column():
                model = gr.Textbox(value=default_model, label="Model (folder or Hub repo id)", elem_id="model")
                classes = gr.Textbox(value="3, 7", label=f"Classes ({hint})", elem_id="classes")
                per_class = gr.Number(value=2, precision=0, label="Images per class", elem_id="per_class")
                steps = gr.Number(value=16, precision=0, label="Steps", elem_id="steps")
                guidance = gr.Number(value=3.0, label="Guidance (>= 1)", elem_id="guidance")
                temperature = gr.Number(value=0.7, label="Temperature", elem_id="temperature")
                seed = gr.Number(value=0, precision=0, label="Seed", elem_id="seed")
                with gr.Accordion("Fast sampling (LazyMAR's caches; not exact)", open=False):
                    token_cache = gr.Checkbox(value=False, label="Token cache", elem_id="token_cache")
                    token_share = gr.Slider(0.0, 1.0, value=0.1, step=0.05, label="Token share")
                    condition_cache = gr.Checkbox(value=False, label="Condition cache", elem_id="condition_cache")
                    refresh_every = gr.Number(value=8, precision=0, label="Refresh every (steps)")
                button = gr.Button("Generate", variant="primary", elem_id="generate")
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
    return demo.queue(default_concurrency_limit=1)


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--model", default=DEFAULT_MODEL, help="pipeline folder or Hub repo id loaded at start")
    parser.add_argument("--host", default="127.0.0.1", help="0.0.0.0 to serve other machines")
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    parser.add_argument("--share", action="store_true", help="a public gradio.live link")
    return parser


def run(args: argparse.Namespace) -> None:
    """Serve the demo page until interrupted."""
    build_app(args.model, args.device).launch(server_name=args.host, server_port=args.port, share=args.share)


__all__ = ["DemoApp", "Request", "build_app", "parse_classes", "python_snippet"]
