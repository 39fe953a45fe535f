"""The web demo's logic (parscale_ear_hf/app.py) without a browser: classes by id or name, the snippet that
reproduces the page's images, errors that name the control, the sampling caches, and the queue."""

import time
from pathlib import Path

import numpy as np
import pytest
import torch

from parscale_ear_hf import ParScaleEARPipeline, cli
from parscale_ear_hf.app import DemoApp, Request, build_app, parse_classes

from conftest import ID2LABEL, tiny_pipeline
from test_loading import offline, populate_hub_cache  # noqa: F401  (offline: a fixture)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = tmp_path_factory.mktemp("app") / "tiny"
    tiny_pipeline().save_pretrained(path)
    return str(path)


def request(model, classes="3, 7", **changes):
    fields = dict(images_per_class=2, steps=4, guidance=3.0, temperature=0.7, seed=5)
    return Request(model, classes, **{**fields, **changes})


def arrays(images):
    return [np.asarray(image) for image in images]


def test_classes_are_ids_or_names_separated_by_commas():
    assert parse_classes("3, 7") == [3, 7]
    assert parse_classes(" digit 3, number 3 ,7,") == ["digit 3", "number 3", 7]
    with pytest.raises(ValueError, match="at least one class"):
        parse_classes(" , ")


def test_the_snippet_makes_the_pages_images_exactly(model):
    out = DemoApp(model).generate(request(model, f"{ID2LABEL[3].split(',')[0]}, 7"))
    assert [name for _, name in out["images"]] == ["digit 3", "digit 3", "digit 7", "digit 7"]
    assert out["settings"]["class_ids"] == [3, 7] and out["settings"]["cache"] is None and out["seconds"] > 0
    namespace = {}
    exec(out["snippet"], namespace)
    assert all(np.array_equal(a, b) for a, b in zip(arrays(namespace["images"]), arrays(i for i, _ in out["images"])))
    # ... which are the pipeline's own: the page adds nothing of its own to sampling.
    pipe = ParScaleEARPipeline.from_pretrained(model)
    direct = pipe([3, 7], num_images_per_class=2, num_inference_steps=4, guidance_scale=3.0, temperature=0.7,
                  generator=[torch.Generator().manual_seed(5 + i) for i in range(4)]).images  # fmt: skip
    assert all(np.array_equal(a, b) for a, b in zip(arrays(direct), arrays(i for i, _ in out["images"])))


def test_the_caches_reach_the_pipeline_the_settings_and_the_snippet(model):
    app = DemoApp(model)
    exact = app.generate(request(model))
    cached = app.generate(request(model, token_cache=True, condition_cache=True, token_share=0.5, refresh_every=2))
    assert cached["settings"]["cache"] == {"token_cache": True, "token_share": 0.5, "condition_cache": True,
                                           "refresh_every": 2, "full_layers": 1}  # fmt: skip
    assert "cache=SamplingCache(token_cache=True, token_share=0.5" in cached["snippet"]
    assert not all(np.array_equal(a, b) for a, b in zip(arrays(i for i, _ in exact["images"]),
                                                          arrays(i for i, _ in cached["images"])))  # fmt: skip
    namespace = {}
    exec(cached["snippet"], namespace)
    assert all(
        np.array_equal(a, b) for a, b in zip(arrays(namespace["images"]), arrays(i for i, _ in cached["images"]))
    )


@pytest.mark.parametrize(
    "changes, match",
    [
        ({"classes": "3, dog"}, r"unknown class name\(s\) \['dog'\]; accepted names"),
        ({"classes": "12"}, r"class label 12 is out of range; accepted: ints in \[0, 9\]"),
        ({"steps": 0}, "Steps must be a whole number of at least 1, got 0"),
        ({"steps": 2.5}, "Steps must be a whole number"),
        ({"guidance": 0.5}, "Guidance must be at least 1"),
        ({"temperature": 0}, "Temperature must be above 0"),
        ({"images_per_class": 40}, "At most 64 images per request"),
        ({"model": "/no/such/folder"}, "Model: cannot load '/no/such/folder'"),
        ({"token_cache": True, "refresh_every": 0}, "Refresh every must be a whole number"),
    ],
)
def test_bad_input_is_a_message_naming_the_control(model, changes, match):
    values = {"classes": "3, 7", **changes}
    app = DemoApp(model)
    with pytest.raises(ValueError, match=match):
        app.generate(request(values.pop("model", model), **values))
    assert app.generate(request(model))["images"]  # and the app goes on


def test_progress_is_reported_at_every_step(model):
    seen = []
    DemoApp(model).generate(request(model, steps=3), progress=lambda fraction, desc: seen.append((fraction, desc)))
    assert seen == [(1 / 3, "step 1 of 3"), (2 / 3, "step 2 of 3"), (1.0, "step 3 of 3")]


def test_app_is_a_cli_command():
    args = cli.build_parser().parse_args(["app", "--model", "m", "--port", "7000"])
    assert args.func.__module__ == "parscale_ear_hf.app" and args.model == "m" and args.port == 7000


def test_a_second_request_waits_for_the_first_and_both_are_answered(model, monkeypatch):
    from gradio_client import Client

    from parscale_ear_hf.app_browser import free_port

    spans, original = [], DemoApp.generate

    def slow(self, req, progress=None):
        start = time.monotonic()
        out = original(self, req, progress)
        time.sleep(1.0)
        spans.append((start, time.monotonic()))
        return out

    monkeypatch.setattr(DemoApp, "generate", slow)
    demo = build_app(model)
    port = free_port()
    demo.launch(server_port=port, prevent_thread_lock=True, quiet=True)
    try:
        client = Client(f"http://127.0.0.1:{port}/", verbose=False)
        values = [model, "3, 7", 1, 2, 3.0, 0.7, 0, False, False, 0.1, 8]
        jobs = [client.submit(*values, api_name="/run") for _ in range(2)]
        results = [job.result(timeout=120) for job in jobs]
    finally:
        demo.close()
    assert sorted(r[0].split(":")[0] for r in results) == ["Request 1", "Request 2"]
    assert all("2 images in" in r[0] for r in results)
    assert len(spans) == 2 and sorted(spans)[0][1] <= sorted(spans)[1][0]  # one after the other, none dropped


def test_a_hub_repo_id_in_the_local_cache_loads_offline(model, offline):  # noqa: F811
    populate_hub_cache(offline, Path(model), repo_id="parscale-tests/app-demo")
    out = DemoApp("parscale-tests/app-demo").generate(request("parscale-tests/app-demo"))
    assert out["settings"]["model"] == "parscale-tests/app-demo" and len(out["images"]) == 4
    assert "from_pretrained('parscale-tests/app-demo')" in out["snippet"]
    with pytest.raises(ValueError, match="Model: cannot load 'parscale-tests/absent'.*not in the Hugging Face cache"):
        DemoApp(model).generate(request("parscale-tests/absent"))


def test_the_spaces_app_py_builds_the_page_for_its_model(model, monkeypatch):
    import runpy

    import gradio as gr

    monkeypatch.setenv("MODEL", model)
    page = runpy.run_path(str(Path(__file__).resolve().parents[1] / "app.py"))["demo"]  # not launched: no __main__
    assert isinstance(page, gr.Blocks)
    textboxes = {b.elem_id: b.value for b in page.blocks.values() if getattr(b, "elem_id", None)}
    assert textboxes["model"] == model and textboxes["classes"] == "3, 7"
