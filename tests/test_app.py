"""The web demo's logic (parscale_ear_hf/app.py) without a browser: classes by id or name, the snippet that
reproduces the page's images, errors that name the control, the sampling caches, the queue, and what makes it
safe to serve publicly: only the served models, a bounded number of them loaded, capped requests, and the
command line that refuses --allow-any-model on a server others can reach."""

import gc
import math
import re
import runpy
import time
import weakref
from pathlib import Path

import numpy as np
import pytest
import torch

from parscale_ear_hf import ParScaleEARPipeline, SamplingCache, cli
from parscale_ear_hf import app as app_module
from parscale_ear_hf.app import DemoApp, Limits, Request, build_app, parse_classes

from conftest import ID2LABEL, tiny_pipeline
from test_loading import offline, populate_hub_cache  # noqa: F401  (offline: a fixture)

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Three saved tiny pipelines (other weights each)."""
    folder = tmp_path_factory.mktemp("app")
    paths = []
    for seed in range(3):
        tiny_pipeline(seed=seed).save_pretrained(folder / f"tiny{seed}")
        paths.append(str(folder / f"tiny{seed}"))
    return paths


@pytest.fixture(scope="module")
def model(models):
    return models[0]


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
    out = DemoApp([model]).generate(request(model, f"{ID2LABEL[3].split(',')[0]}, 7"))
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
    app = DemoApp([model])
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


def test_an_empty_refresh_is_the_step_count_rule(model):
    app = DemoApp([model])
    out = app.generate(request(model, token_cache=True, condition_cache=True))
    assert out["settings"]["cache"]["refresh_every"] is None
    pipe = ParScaleEARPipeline.from_pretrained(model)
    direct = pipe([3, 7], num_images_per_class=2, num_inference_steps=4, guidance_scale=3.0, temperature=0.7,
                  generator=[torch.Generator().manual_seed(5 + i) for i in range(4)],
                  cache=SamplingCache(refresh_every=2)).images  # fmt: skip
    # 4 steps: a full pass every 2nd step, as refresh_every=2 asks.
    assert all(np.array_equal(a, b) for a, b in zip(arrays(direct), arrays(i for i, _ in out["images"])))


@pytest.mark.parametrize(
    "changes, match",
    [
        ({"classes": "3, dog"}, r"unknown class name\(s\) \['dog'\]; accepted names"),
        ({"classes": "12"}, r"class label 12 is out of range; accepted: ints in \[0, 9\]"),
        ({"steps": 0}, r"Steps must be a whole number from 1 to 64 \(this server's limit\), got 0\."),
        ({"steps": 2.5}, "Steps must be a whole number"),
        ({"steps": math.inf}, "Steps must be a whole number from 1 to 64 .*, got inf"),
        ({"steps": 65}, r"Steps must be a whole number from 1 to 64 \(this server's limit\), got 65\."),
        ({"steps": 200_000}, "Steps must be a whole number from 1 to 64 .*, got 200000"),
        ({"images_per_class": 40}, r"Images: 2 classes x 40 per class = 80 images; this server's limit is 64"),
        ({"images_per_class": 10, "steps": 64}, r"Images x steps: 20 x 64 = 1280; this server's limit is 1024"),
        ({"seed": -1}, r"Seed must be a whole number from 0 to 4294967295 \(this server's limit\), got -1"),
        ({"seed": 2**64}, r"Seed must be a whole number from 0 to 4294967295 \(this server's limit\), got 1844"),
        ({"guidance": 0.5}, r"`guidance_scale` must be a finite number >= 1.0, got 0.5"),
        ({"temperature": -0.1}, r"`temperature` must be a finite number >= 0.0, got -0.1"),
        ({"temperature": math.nan}, r"`temperature` must be a finite number >= 0.0, got nan"),
        ({"model": "/etc"}, r"Model: '/etc' is not served here; accepted: '.*tiny0' \(the models it was started"),
        ({"token_cache": True, "refresh_every": 0}, "Refresh every must be a whole number"),
    ],
)
def test_bad_input_is_a_message_naming_the_control(model, changes, match):
    values = {"classes": "3, 7", **changes}
    app = DemoApp([model])
    with pytest.raises(ValueError, match=match):
        app.generate(request(values.pop("model", model), **values))
    assert app.generate(request(model))["images"]  # and the app goes on


def test_the_limits_are_the_ones_given_and_a_request_at_a_limit_is_served(model):
    app = DemoApp([model], limits=Limits(max_steps=5, max_images=4, max_work=16))
    assert len(app.generate(request(model, "3, 7", images_per_class=2, steps=4))["images"]) == 4  # 4 x 4 = 16
    assert app.generate(request(model, "3", images_per_class=1, steps=5))["settings"]["num_inference_steps"] == 5
    for changes, match in [
        ({"steps": 6}, "from 1 to 5"),
        ({"classes": "1, 3, 7", "images_per_class": 2}, "= 6 images; this server's limit is 4"),
        ({"steps": 5}, "4 x 5 = 20; this server's limit is 16"),
    ]:
        with pytest.raises(ValueError, match=match):
            app.generate(request(model, **changes))


@pytest.mark.parametrize("temperature", [0, 0.0, 2.5, -1e-6, math.inf, math.nan])
def test_temperature_is_accepted_exactly_when_the_pipeline_accepts_it(model, temperature):
    app = DemoApp([model])
    _, pipe = app.pipeline(model)
    try:
        pipe([3], num_inference_steps=1, temperature=temperature)
        accepted = True
    except ValueError:
        accepted = False
    try:
        out = app.generate(request(model, "3", images_per_class=1, temperature=temperature))
    except ValueError as error:
        assert not accepted and "temperature" in str(error)
    else:
        assert accepted and out["settings"]["temperature"] == temperature and len(out["images"]) == 1
    assert accepted == (temperature == 0 or temperature == 2.5)  # the pipeline's range today: [0, inf)


def test_only_the_served_models_load_unless_any_model_is_allowed(models, monkeypatch):
    loads, original = [], ParScaleEARPipeline.from_pretrained.__func__

    def recording(cls, path, **kwargs):
        loads.append(path)
        return original(cls, path, **kwargs)

    monkeypatch.setattr(ParScaleEARPipeline, "from_pretrained", classmethod(recording))
    served = DemoApp(models[:2])
    for name in ("/etc", models[2]):
        with pytest.raises(ValueError, match="is not served here; accepted: '.*tiny0', '.*tiny1'"):
            served.pipeline(name)
    assert loads == []  # refused before any load
    assert served.pipeline("")[0] == models[0] and served.pipeline(f" {models[1]} ")[0] == models[1]
    assert loads == models[:2]
    anything = DemoApp(models[:1], allow_any_model=True)
    assert anything.pipeline(models[2])[0] == models[2]
    with pytest.raises(ValueError, match="Model: cannot load '/no/such/folder' as a ParScaleEARPipeline"):
        anything.pipeline("/no/such/folder")


def test_the_least_recently_used_pipeline_is_dropped_and_freed(models):
    a, b, c = models
    one = DemoApp([a, b], max_loaded_models=1)
    first = weakref.ref(one.pipeline(a)[1])
    assert one.loaded == [a]
    one.pipeline(b)
    gc.collect()
    assert one.loaded == [b] and first() is None  # dropped, and nothing else holds it
    assert len(one.generate(request(a))["images"]) == 4 and one.loaded == [a]  # loaded again when asked for
    two = DemoApp([a, b, c])  # the default: two loaded
    for name in (a, b, a, c):
        two.pipeline(name)
    assert two.loaded == [a, c]  # b, not a, was the least recently used
    with pytest.raises(ValueError, match=r"`max_loaded_models` must be an integer >= 1, got 0"):
        DemoApp([a], max_loaded_models=0)


def test_app_is_a_cli_command():
    args = cli.build_parser().parse_args(["app", "--model", "m", "--model", "n", "--port", "7000"])
    assert args.func.__module__ == "parscale_ear_hf.app" and args.model == ["m", "n"] and args.port == 7000
    args = cli.build_parser().parse_args(["app"])
    assert args.model is None and not args.allow_any_model and args.max_loaded_models == 2
    assert Limits(args.max_steps, args.max_images, args.max_work) == Limits() == Limits(64, 64, 1024)


@pytest.fixture
def launched(monkeypatch):
    """Runs `parscale-ear app ...` with build_app and launch recorded, not done; returns (calls, run)."""
    calls = []

    class Page:
        def launch(self, **kwargs):
            calls.append(("launch", kwargs))

    def fake_build_app(models, device, **kwargs):
        calls.append(("build_app", {"models": models, **kwargs}))
        return Page()

    monkeypatch.setattr(app_module, "build_app", fake_build_app)
    return calls, lambda *argv: cli.main(["app", *argv])


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--allow-any-model", "--host", "0.0.0.0"], "--allow-any-model is refused with --host 0.0.0.0"),
        (["--host", "192.168.1.5", "--allow-any-model"], "--allow-any-model is refused with --host 192.168.1.5"),
        (["--allow-any-model", "--share"], "--allow-any-model is refused with --share"),
        (["--port", "70000"], r"`--port` must be an integer in \[1, 65535\], got 70000"),
        (["--port", "0"], r"`--port` must be an integer in \[1, 65535\], got 0"),
        (["--max-steps", "0"], "`--max-steps` must be an integer >= 1, got 0"),
        (["--max-images", "-3"], "`--max-images` must be an integer >= 1, got -3"),
        (["--max-work", "0"], "`--max-work` must be an integer >= 1, got 0"),
        (["--max-loaded-models", "0"], "`--max-loaded-models` must be an integer >= 1, got 0"),
        (["--max-queue", "0"], "`--max-queue` must be an integer >= 1, got 0"),
        (["--device", "cuda:999"], "`--device` 'cuda:999' is not a device this machine can use"),
    ],
)
def test_bad_flags_are_one_line_errors_before_any_model_loads(launched, capsys, argv, message):
    calls, run = launched
    with pytest.raises(SystemExit) as exit_:
        run(*argv)
    err = capsys.readouterr().err
    assert exit_.value.code == 1 and calls == []  # nothing built, nothing served
    assert err.startswith("parscale-ear app: error: app: ") and err.count("\n") == 1
    assert re.search(message, err)


def test_the_flags_reach_the_page_and_the_server(launched):
    calls, run = launched
    run("--model", "a", "--model", "b", "--host", "0.0.0.0", "--max-steps", "8", "--max-loaded-models", "3",
        "--max-queue", "4")  # fmt: skip
    run("--allow-any-model", "--host", "localhost", "--port", "8000")
    run("--allow-any-model", "--host", "::1")
    (_, built), (_, launch), (_, any_built), (_, any_launch), (_, ipv6_built), _ = calls
    assert built == {"models": ["a", "b"], "allow_any_model": False, "max_loaded_models": 3,
                     "limits": Limits(8, 64, 1024), "max_queue": 4}  # fmt: skip
    assert launch == {"server_name": "0.0.0.0", "server_port": 7860, "share": False}
    assert (
        any_built["models"] == ["models/mnist_demo"] and any_built["allow_any_model"] and ipv6_built["allow_any_model"]
    )
    assert any_launch == {"server_name": "localhost", "server_port": 8000, "share": False}


def test_a_second_request_waits_for_the_first_and_both_are_answered(model, monkeypatch):
    from gradio_client import Client

    from research.app_screenshot.app_browser import free_port

    spans, original = [], DemoApp.generate

    def slow(self, req, progress=None):
        start = time.monotonic()
        out = original(self, req, progress)
        time.sleep(1.0)
        spans.append((start, time.monotonic()))
        return out

    monkeypatch.setattr(DemoApp, "generate", slow)
    demo = build_app([model])
    port = free_port()
    demo.launch(server_port=port, prevent_thread_lock=True, quiet=True)
    try:
        client = Client(f"http://127.0.0.1:{port}/", verbose=False)
        values = [model, "3, 7", 1, 2, 3.0, 0.7, 0, False, False, 0.1, 8]
        with pytest.raises(Exception, match=r"/etc is not in the list of choices: \['.*tiny0'\]"):
            client.predict("/etc", *values[1:], api_name="/run")  # a forged model: refused by the server
        too_long = client.predict(*values[:3], 65, *values[4:], api_name="/run")
        assert "**Error:** Steps must be a whole number from 1 to 64" in too_long[0]
        jobs = [client.submit(*values, api_name="/run") for _ in range(2)]
        results = [job.result(timeout=120) for job in jobs]
    finally:
        demo.close()
    assert sorted(r[0].split(":")[0] for r in results) == ["Request 2", "Request 3"]
    assert all("2 images in" in r[0] for r in results)
    assert len(spans) == 2 and sorted(spans)[0][1] <= sorted(spans)[1][0]  # one after the other, none dropped


def test_requests_beyond_the_queue_bound_are_turned_away(model, monkeypatch):
    from gradio_client import Client

    from research.app_screenshot.app_browser import free_port

    original = DemoApp.generate

    def slow(self, req, progress=None):
        time.sleep(2.0)
        return original(self, req, progress)

    monkeypatch.setattr(DemoApp, "generate", slow)
    demo = build_app([model], max_queue=1)
    port = free_port()
    demo.launch(server_port=port, prevent_thread_lock=True, quiet=True)
    try:
        client = Client(f"http://127.0.0.1:{port}/", verbose=False)
        values = [model, "3", 1, 2, 3.0, 0.7, 0, False, False, 0.1, 8]
        jobs = []
        for _ in range(3):  # one samples, one waits, the third finds the queue full
            jobs.append(client.submit(*values, api_name="/run"))
            time.sleep(0.5)
        outcomes = []
        for job in jobs:
            try:
                outcomes.append(job.result(timeout=120)[0].split(":")[0])
            except Exception as error:
                outcomes.append(str(error))
    finally:
        demo.close()
    assert sum(o.startswith("Request") for o in outcomes) == 2
    assert any("queue is full" in o.lower() for o in outcomes), outcomes


def test_a_hub_repo_id_in_the_local_cache_loads_offline(model, offline):  # noqa: F811
    populate_hub_cache(offline, Path(model), repo_id="parscale-tests/app-demo")
    out = DemoApp(["parscale-tests/app-demo"]).generate(request("parscale-tests/app-demo"))
    assert out["settings"]["model"] == "parscale-tests/app-demo" and len(out["images"]) == 4
    assert "from_pretrained('parscale-tests/app-demo')" in out["snippet"]
    with pytest.raises(ValueError, match="Model: cannot load 'parscale-tests/absent'.*not in the Hugging Face cache"):
        DemoApp([model, "parscale-tests/absent"]).generate(request("parscale-tests/absent"))


def components(page) -> dict:
    return {b.elem_id: b for b in page.blocks.values() if getattr(b, "elem_id", None)}


def test_the_spaces_app_py_serves_its_models_with_the_safe_defaults(models, monkeypatch):
    import gradio as gr

    monkeypatch.setenv("MODEL", f"{models[0]}, {models[1]}")
    page = runpy.run_path(str(ROOT / "app.py"))["demo"]  # not launched: no __main__
    assert isinstance(page, gr.Blocks)
    boxes = components(page)
    assert isinstance(boxes["model"], gr.Dropdown) and not boxes["model"].allow_custom_value
    assert [value for _, value in boxes["model"].choices] == models[:2] and boxes["model"].value == models[0]
    assert boxes["classes"].value == "3, 7" and boxes["steps"].label == "Steps (1-64)"
    assert (
        boxes["limits"].value
        == "Limits per request: at most 64 steps, 64 images, and 1024 image-steps (images x steps)."
    )


def test_the_page_states_its_limits_and_allows_any_model_only_when_asked(model):
    boxes = components(build_app([model], allow_any_model=True, limits=Limits(8, 16, 100)))
    assert boxes["model"].allow_custom_value and boxes["steps"].label == "Steps (1-8)"
    assert (
        boxes["limits"].value
        == "Limits per request: at most 8 steps, 16 images, and 100 image-steps (images x steps)."
    )
