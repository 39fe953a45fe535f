"""Atomic, exclusive saves and the sha256 manifest (parscale_ear_hf/saving.py).

The kill test SIGKILLs real saves at random moments: a helper process imports everything once and
forks one child per save, so that each trial costs a save, not a Python start.
"""

import errno
import fcntl
import hashlib
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import safetensors.torch
import torch

import parscale_ear_hf.saving as saving
from parscale_ear_hf import EARTransformer, EnergyHead, ParScaleEARPipeline
from parscale_ear_hf.saving import MANIFEST_NAME

from conftest import flip_middle_bytes, tiny_components, tiny_pipeline, tree_hashes

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
COMPONENTS = ("vae", "lite_hybrid", "transformer", "energy_head")
WEIGHTS = "diffusion_pytorch_model.safetensors"
CARD = "---\nlibrary_name: diffusers\n---\n\n# the old folder's card\n"
LOG = '{"step": 1, "loss": 0.5}\n'
KILL_TRIALS = 24

# Imports once, then forks a child per `save <pipeline> <exchange|rename> <folder>` and prints its
# pid; `reap <pid>` waits for that child and prints its wait status. A child stays unreaped (a
# zombie, its pid not reused) until the test asks, so the test can always SIGKILL its pid safely.
HELPER = f"""
import os, sys
sys.path.insert(0, {str(TESTS)!r})
import torch
from conftest import tiny_pipeline
import parscale_ear_hf.saving as saving
torch.set_num_threads(1)  # no thread pool to break by fork()
pipes = {{"same": tiny_pipeline(seed=1), "bigger": tiny_pipeline(parscale_n=2, seed=2)}}
print("ready", flush=True)
for line in sys.stdin:
    command, *args = line.split()
    if command == "save":
        which, swap, folder = args
        pid = os.fork()
        if pid == 0:
            if swap == "rename":
                saving._exchange = lambda a, b: False  # as without renameat2
            pipes[which].save_pretrained(folder)
            os._exit(0)
        print(pid, flush=True)
    else:
        print(os.waitpid(int(args[0]), 0)[1], flush=True)
"""


def same_weights(a: ParScaleEARPipeline, b: ParScaleEARPipeline) -> bool:
    for name in COMPONENTS:
        sa, sb = getattr(a, name).state_dict(), getattr(b, name).state_dict()
        if list(sa) != list(sb) or not all(torch.equal(sa[k], sb[k]) for k in sa):
            return False
    return True


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.parent.iterdir() if p.name != folder.name)


@pytest.fixture(scope="module")
def refs(tmp_path_factory):
    """The old pipeline, saved with a card and training logs beside it; and the two that save over it."""
    old = tiny_pipeline(seed=0)
    folder = tmp_path_factory.mktemp("old") / "pipeline"
    old.save_pretrained(folder)
    (folder / "README.md").write_text(CARD)
    (folder / "training").mkdir()
    (folder / "training" / "train_log.jsonl").write_text(LOG)
    return SimpleNamespace(
        old=old, folder=folder, same=tiny_pipeline(seed=1), bigger=tiny_pipeline(parscale_n=2, seed=2)
    )


def copy_of_old(refs, tmp_path, name="pipeline") -> Path:
    target = tmp_path / name / "pipeline"
    shutil.copytree(refs.folder, target)
    return target


class Helper:
    def __init__(self):
        self.proc = subprocess.Popen(
            [sys.executable, "-c", HELPER], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=REPO
        )
        assert self.proc.stdout.readline().strip() == "ready"

    def ask(self, line: str) -> int:
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()
        return int(self.proc.stdout.readline())

    def save(self, which: str, swap: str, folder: Path) -> int:
        return self.ask(f"save {which} {swap} {folder}")

    def reap(self, pid: int) -> int:
        return self.ask(f"reap {pid}")


@pytest.fixture(scope="module")
def helper():
    h = Helper()
    yield h
    h.proc.stdin.close()
    h.proc.wait(timeout=30)


# ---------------------------------------------------------------- kill, full disk, concurrency


def test_kill_at_a_random_moment_leaves_the_old_or_the_new_pipeline(helper, refs, tmp_path):
    """SIGKILL real saves over a good folder: each time, the folder loads as exactly the old or the new one."""
    new = {"same": refs.same, "bigger": refs.bigger}
    # One uninterrupted save of each kind: how long a save takes, and that it gives the new weights.
    durations = []
    for which, swap in (("same", "exchange"), ("bigger", "rename")):
        target = copy_of_old(refs, tmp_path, f"whole-{which}")
        start = time.perf_counter()
        assert helper.reap(helper.save(which, swap, target)) == 0
        durations.append(time.perf_counter() - start)
        assert same_weights(ParScaleEARPipeline.from_pretrained(target), new[which])
        assert leftovers(target) == []
    rng = random.Random(0)
    outcomes = []
    bound = min(durations)  # delays are drawn below it: most kills land inside a save
    # At least KILL_TRIALS trials, and on until a third of that many saves were cut short: on a loaded machine a
    # save can finish before its delay, so the bound shrinks after each one that did (at most 4x the trials).
    trial = 0
    while trial < KILL_TRIALS or (sum(k for k, _ in outcomes) < KILL_TRIALS // 3 and trial < 4 * KILL_TRIALS):
        which, swap = ("same", "bigger")[trial % 2], ("exchange", "rename")[trial // 2 % 2]
        target = copy_of_old(refs, tmp_path, f"trial-{trial}")
        pid = helper.save(which, swap, target)
        time.sleep(rng.uniform(0, bound))
        os.kill(pid, signal.SIGKILL)  # not reaped yet, so still our child even if it has finished
        killed = os.WIFSIGNALED(helper.reap(pid))
        loaded = ParScaleEARPipeline.from_pretrained(target)  # restores a folder renamed aside
        is_old, is_new = same_weights(loaded, refs.old), same_weights(loaded, new[which])
        assert is_old != is_new, f"trial {trial} ({which}, {swap}, killed={killed}): neither old nor new weights"
        assert (target / "README.md").read_text() == CARD
        assert (target / "training" / "train_log.jsonl").read_text() == LOG
        outcomes.append((killed, is_new))
        bound = bound if killed else 0.75 * bound
        trial += 1
    # Many saves were cut short, and each left the old or the new folder (checked above).
    assert sum(killed for killed, _ in outcomes) >= KILL_TRIALS // 3, (durations, outcomes)


@pytest.mark.parametrize("failing", ["second weights file", "fsync"])
def test_full_disk_leaves_the_old_folder_and_no_temporary_folder(refs, tmp_path, monkeypatch, failing):
    target = copy_of_old(refs, tmp_path)
    before = tree_hashes(target)
    calls = []

    def no_space(path):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)

    if failing == "fsync":
        real_fsync = os.fsync

        def fsync(fd):
            calls.append(fd)
            if len(calls) == 3:
                no_space(None)
            real_fsync(fd)

        monkeypatch.setattr(os, "fsync", fsync)
    else:
        real_save_file = safetensors.torch.save_file

        def save_file(tensors, filename, metadata=None):
            calls.append(filename)
            if len(calls) == 2:  # half a file on disk, then the disk is full
                real_save_file(tensors, filename, metadata=metadata)
                Path(filename).write_bytes(Path(filename).read_bytes()[:100])
                no_space(filename)
            real_save_file(tensors, filename, metadata=metadata)

        monkeypatch.setattr(safetensors.torch, "save_file", save_file)
    with pytest.raises(OSError) as info:
        refs.bigger.save_pretrained(target)
    assert info.value.errno == errno.ENOSPC and str(target) in str(info.value)
    assert "unchanged" in str(info.value)
    assert tree_hashes(target) == before
    assert leftovers(target) == []
    monkeypatch.undo()
    assert same_weights(ParScaleEARPipeline.from_pretrained(target), refs.old)


def test_concurrent_saves_in_threads_end_with_one_complete_pipeline(refs, tmp_path):
    target = copy_of_old(refs, tmp_path)
    start, errors = threading.Barrier(2), []

    def save(pipe):
        start.wait()
        try:
            pipe.save_pretrained(target)
        except BaseException as err:  # noqa: BLE001 (reported below)
            errors.append(err)

    threads = [threading.Thread(target=save, args=(p,)) for p in (refs.same, refs.bigger)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    loaded = ParScaleEARPipeline.from_pretrained(target)
    assert same_weights(loaded, refs.same) or same_weights(loaded, refs.bigger)
    assert leftovers(target) == [] and (target / "README.md").read_text() == CARD


def test_concurrent_saves_in_processes_end_with_one_complete_pipeline(helper, refs, tmp_path):
    target = copy_of_old(refs, tmp_path)
    pids = [helper.save("same", "exchange", target), helper.save("bigger", "rename", target)]
    assert [helper.reap(pid) for pid in pids] == [0, 0]
    loaded = ParScaleEARPipeline.from_pretrained(target)
    assert same_weights(loaded, refs.same) or same_weights(loaded, refs.bigger)
    assert leftovers(target) == []


def test_a_save_waits_for_the_lock_on_the_parent_folder(helper, refs, tmp_path):
    target = copy_of_old(refs, tmp_path)
    before = tree_hashes(target)
    fd = os.open(target.parent, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        pid = helper.save("same", "exchange", target)
        time.sleep(1.0)  # several times a whole save: it would have finished without the lock
        assert tree_hashes(target) == before and leftovers(target) == []
    finally:
        os.close(fd)
    assert helper.reap(pid) == 0
    assert same_weights(ParScaleEARPipeline.from_pretrained(target), refs.same)


# ---------------------------------------------------------------- what a killed save leaves behind


def test_a_folder_renamed_aside_by_a_killed_save_is_restored_then_leftovers_removed(refs, tmp_path):
    """Killed between the two renames of the fallback: the target is missing, `.old-*` holds it."""
    target = copy_of_old(refs, tmp_path)
    aside = target.parent / ".pipeline.old-123-abcd"
    target.rename(aside)
    partial = target.parent / ".pipeline.tmp-123-ef01"
    shutil.copytree(aside, partial)
    (partial / "transformer" / WEIGHTS).unlink()
    assert same_weights(ParScaleEARPipeline.from_pretrained(target), refs.old)
    assert not aside.exists() and partial.exists()  # a load restores, only a save deletes
    refs.same.save_pretrained(target)
    assert leftovers(target) == []
    assert same_weights(ParScaleEARPipeline.from_pretrained(target), refs.same)


def test_save_without_rename_exchange_swaps_by_renames(refs, tmp_path, monkeypatch):
    monkeypatch.setattr(saving, "_exchange", lambda a, b: False)
    target = copy_of_old(refs, tmp_path)
    refs.bigger.save_pretrained(target)
    assert leftovers(target) == []
    assert same_weights(ParScaleEARPipeline.from_pretrained(target), refs.bigger)


def test_save_into_a_file_path_raises(tmp_path):
    (tmp_path / "p").write_text("not a folder")
    with pytest.raises(NotADirectoryError, match=r"'.*p' is a file; pass a folder"):
        tiny_pipeline().save_pretrained(tmp_path / "p")
    assert (tmp_path / "p").read_text() == "not a folder"


# ---------------------------------------------------------------- carried over


def test_resave_keeps_card_and_logs_but_not_old_weights(refs, tmp_path):
    target = copy_of_old(refs, tmp_path)
    (target / "stale.safetensors").write_bytes(b"old top-level weights")
    (target / "transformer" / "diffusion_pytorch_model-00001-of-00002.safetensors").write_bytes(b"old shard")
    refs.bigger.save_pretrained(target)
    assert (target / "README.md").read_text() == CARD
    assert (target / "training" / "train_log.jsonl").read_text() == LOG
    assert not (target / "stale.safetensors").exists()
    assert sorted(p.name for p in (target / "transformer").iterdir()) == ["config.json", WEIGHTS]
    assert same_weights(ParScaleEARPipeline.from_pretrained(target), refs.bigger)


def test_component_resave_keeps_its_card(tmp_path):
    head = tiny_components()["energy_head"]
    head.save_pretrained(tmp_path / "head")
    (tmp_path / "head" / "README.md").write_text(CARD)
    tiny_components(seed=1)["energy_head"].save_pretrained(tmp_path / "head")
    assert (tmp_path / "head" / "README.md").read_text() == CARD
    assert sorted(p.name for p in tmp_path.iterdir()) == ["head"]


# ---------------------------------------------------------------- manifest


def test_manifest_lists_every_weights_file_in_sha256sum_format(refs, tmp_path):
    target = copy_of_old(refs, tmp_path)
    lines = (target / MANIFEST_NAME).read_text().splitlines()
    expected = [
        f"{hashlib.sha256((target / c / WEIGHTS).read_bytes()).hexdigest()}  {c}/{WEIGHTS}" for c in sorted(COMPONENTS)
    ]
    assert lines == expected
    if shutil.which("sha256sum"):
        subprocess.run(["sha256sum", "--check", "--quiet", MANIFEST_NAME], cwd=target, check=True)


def test_flipped_bytes_in_weights_are_refused_naming_the_file(refs, tmp_path):
    target = copy_of_old(refs, tmp_path)
    damaged = target / "transformer" / WEIGHTS
    expected = hashlib.sha256(damaged.read_bytes()).hexdigest()
    flip_middle_bytes(damaged)
    actual = hashlib.sha256(damaged.read_bytes()).hexdigest()
    for load in (
        lambda **k: ParScaleEARPipeline.from_pretrained(target, **k),
        lambda **k: EARTransformer.from_pretrained(target, subfolder="transformer", **k),
    ):
        with pytest.raises(OSError) as info:
            load()
        assert str(damaged) in str(info.value) and expected in str(info.value) and actual in str(info.value)
    # Unchecked, the damage loads silently and changes the images: what the manifest is for.
    loaded = ParScaleEARPipeline.from_pretrained(target, verify_checksums=False)
    run = dict(num_inference_steps=4, output_type="np")
    images = loaded([1, 2], generator=torch.Generator().manual_seed(0), **run).images
    assert not np.array_equal(images, refs.old([1, 2], generator=torch.Generator().manual_seed(0), **run).images)
    EARTransformer.from_pretrained(target, subfolder="transformer", verify_checksums=False)


def test_component_manifest_is_checked(tmp_path):
    head = tiny_components()["energy_head"]
    head.save_pretrained(tmp_path / "head")
    assert (tmp_path / "head" / MANIFEST_NAME).read_text().endswith(f"  {WEIGHTS}\n")
    flip_middle_bytes(tmp_path / "head" / WEIGHTS)
    with pytest.raises(OSError, match=rf"refusing to load {tmp_path / 'head' / WEIGHTS}"):
        EnergyHead.from_pretrained(tmp_path / "head")
    EnergyHead.from_pretrained(tmp_path / "head", verify_checksums=False)


def test_folders_without_manifest_load(refs, tmp_path):
    target = copy_of_old(refs, tmp_path)
    flip_middle_bytes(target / "README.md", count=4)  # not a weights file: never checked
    (target / MANIFEST_NAME).unlink()
    assert same_weights(ParScaleEARPipeline.from_pretrained(target), refs.old)
    shipped = REPO / "models" / "mnist_demo_plain"  # saved before the manifest existed
    assert not (shipped / MANIFEST_NAME).exists()
    ParScaleEARPipeline.from_pretrained(shipped)


def test_component_push_to_hub_uploads_the_finished_folder(tmp_path, monkeypatch):
    uploads = []
    monkeypatch.setattr(saving, "create_repo", lambda repo_id, **k: SimpleNamespace(repo_id=repo_id))

    def upload_folder(*, repo_id, folder_path, **kwargs):
        files = sorted(p.relative_to(folder_path).as_posix() for p in Path(folder_path).rglob("*"))
        uploads.append((repo_id, Path(folder_path), files))

    monkeypatch.setattr(saving, "upload_folder", upload_folder)
    tiny_components()["transformer"].save_pretrained(tmp_path / "t", push_to_hub=True, repo_id="org/t")
    assert uploads == [("org/t", tmp_path / "t", [MANIFEST_NAME, "config.json", WEIGHTS])]


def test_a_variant_save_reaches_every_component_and_loads_back(tmp_path):
    """diffusers passes `variant` only to component saves that name it: the atomic save must."""
    pipe = tiny_pipeline()
    pipe.save_pretrained(tmp_path / "p", variant="fp16")
    for name in COMPONENTS:
        assert [p.name for p in (tmp_path / "p" / name).glob("*.safetensors")] == [
            "diffusion_pytorch_model.fp16.safetensors"
        ]
    loaded = ParScaleEARPipeline.from_pretrained(tmp_path / "p", variant="fp16")
    assert same_weights(pipe, loaded)


def test_components_refuse_pickle_serialisation(tmp_path):
    with pytest.raises(ValueError, match="only safetensors are supported; `safe_serialization` must be True"):
        tiny_pipeline().transformer.save_pretrained(tmp_path / "t", safe_serialization=False)
    assert not (tmp_path / "t").exists()
