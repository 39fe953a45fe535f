"""Atomic, exclusive saves and sha256 manifests, for the pipeline and each component.

``save_pretrained`` writes everything into a hidden folder beside the target
(``.<name>.tmp-<pid>-<random>``), fsyncs it and only then swaps it in: with Linux'
``renameat2(RENAME_EXCHANGE)`` in one step, elsewhere by renaming the old folder aside
(``.<name>.old-*``) and the new one in. A kill, a full disk or a concurrent save therefore leaves
the complete old folder or the complete new one, never a mix. Saves beside each other are
serialised by an exclusive ``flock`` on the parent folder, held for the whole save (a second save
waits). Under that lock a save first undoes what a killed one left: it restores a folder that was
renamed aside and deletes temporary folders; a load that finds its folder missing restores it too.

Top-level entries of the old folder that the new save does not write (a `README.md` model card,
`training/` logs) are carried over; old weights and old component folders are not.

The weights are listed in ``checksums.sha256`` (``sha256sum`` format, so ``sha256sum -c
checksums.sha256`` works in the folder), and each component's ``config.json`` records the sha256 of its
own weights (``_weights_sha256``). Every loader reads a component's config before its weights, so every
loading path checks them: ``ParScaleEARPipeline.from_pretrained``, a component's ``from_pretrained``
(folder or Hub repo id, with or without ``subfolder``), and ``DiffusionPipeline.from_pretrained(...,
trust_remote_code=True)``, which loads each component from its folder with no subfolder and never reads
the pipeline's manifest. ``verify_checksums=False`` skips the check. Folders with neither record load as
before.
"""

from __future__ import annotations

import contextvars
import ctypes
import errno
import fcntl
import hashlib
import json
import os
import secrets
import shutil
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

import torch
from huggingface_hub import constants as hf_constants
from huggingface_hub import create_repo, snapshot_download, upload_folder
from huggingface_hub.errors import LocalEntryNotFoundError
from huggingface_hub.utils.sha import sha_fileobj

MANIFEST_NAME = "checksums.sha256"
# The key of a component's config.json that maps each of its weights files to its sha256. Private (a
# leading underscore): diffusers passes no such key to `__init__`.
WEIGHT_HASHES = "_weights_sha256"
# Keyword arguments of `save_pretrained(..., push_to_hub=True)` that go to the Hub, as in diffusers.
HUB_KWARGS = ("repo_id", "commit_message", "private", "token", "create_pr")
# Weights of an old save are never carried into a new one (the new save wrote its own).
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".index.json")
_RENAME_EXCHANGE = 2  # from <linux/fs.h>
_AT_FDCWD = -100
_LIBC = ctypes.CDLL(None, use_errno=True)
# The temporary folder of the save running in this thread: a save into it (the pipeline's
# components) writes in place, as the outer save swaps in the whole folder.
_saving_into: contextvars.ContextVar[str | None] = contextvars.ContextVar("_saving_into", default=None)
# The folder whose weights the loader running in this thread has checked already (or was told not to).
_verified_root: contextvars.ContextVar[str | None] = contextvars.ContextVar("_verified_root", default=None)


def _exchange(a: str, b: str) -> bool:
    """Swap two existing paths atomically; False where the C library or the filesystem cannot."""
    renameat2 = getattr(_LIBC, "renameat2", None)  # glibc >= 2.28
    if renameat2 is None:
        return False
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), a, None, b)


@contextmanager
def _parent_locked(parent: str):
    """Hold an exclusive ``flock`` on folder ``parent``; blocks while another save holds it."""
    fd = os.open(parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield fd
    finally:
        os.close(fd)  # releases the lock, also when a kill closes it


def _leftovers(parent: str, name: str, kind: str) -> list[str]:
    prefix = f".{name}.{kind}-"
    return [os.path.join(parent, e) for e in os.listdir(parent) if e.startswith(prefix)]


def _restore_and_clean(parent: str, name: str, clean: bool) -> None:
    """Under the lock: put back a folder that a killed save had renamed aside; with ``clean``, drop leftovers."""
    target = os.path.join(parent, name)
    olds = _leftovers(parent, name, "old")
    if olds and not os.path.lexists(target):
        newest = max(olds, key=lambda p: os.stat(p).st_mtime_ns)
        os.rename(newest, target)
        olds.remove(newest)
    if clean:
        # No other save of this folder runs while we hold the lock: these are from dead ones.
        for path in olds + _leftovers(parent, name, "tmp"):
            shutil.rmtree(path, ignore_errors=True)


def restore_interrupted_save(path: str | os.PathLike) -> None:
    """If ``path`` is missing because a save was killed between its two renames, put the old folder back."""
    parent, name = os.path.split(os.path.abspath(path))
    if not os.path.isdir(parent) or not _leftovers(parent, name, "old"):
        return
    with _parent_locked(parent):
        _restore_and_clean(parent, name, clean=False)


def _sha256(path: str) -> str:
    with open(path, "rb") as f:
        return sha_fileobj(f).hex()


def _write_manifest(folder: str) -> None:
    """``checksums.sha256`` of every ``*.safetensors`` under ``folder``, as ``sha256sum`` writes it."""
    weights = sorted(
        os.path.relpath(os.path.join(root, f), folder).replace(os.sep, "/")
        for root, _, files in os.walk(folder)
        for f in files
        if f.endswith(".safetensors")
    )
    with open(os.path.join(folder, MANIFEST_NAME), "w", encoding="utf-8") as f:
        f.writelines(f"{_sha256(os.path.join(folder, rel))}  {rel}\n" for rel in weights)


def _refuse_changed(path: str, expected: str, source: str, owner: str) -> None:
    """Raise naming ``path`` when it is missing or its sha256 is not ``expected`` (as ``source`` records it)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"{owner}: cannot load {path}: it is listed in {source} but missing; restore it from the saved copy, or "
            "save the model again."
        )
    actual = _sha256(path)
    if actual != expected:
        raise OSError(
            f"{owner}: refusing to load {path}: its sha256 is {actual} but {source} expects {expected}; the file "
            "changed after it was saved (corrupted or edited). Restore it or save again, or pass "
            "verify_checksums=False to load it anyway."
        )


def _check_manifest(manifest: str, prefix: str, owner: str) -> None:
    """Check the entries of ``manifest`` whose path starts with ``prefix`` against the files beside it."""
    folder = os.path.dirname(manifest)
    with open(manifest, encoding="utf-8") as f:
        lines = f.read().splitlines()
    for number, line in enumerate(lines, 1):
        # `<64 hex digits><space><space or *><path>`, as sha256sum writes it (text or binary mode).
        expected, mode, rel = line[:64], line[64:66], line[66:]
        if len(expected) != 64 or mode not in ("  ", " *") or not rel:
            raise ValueError(
                f"{owner}: line {number} of {manifest} is not '<sha256>  <file>' (sha256sum format): {line!r}; "
                "fix or delete the manifest, or pass verify_checksums=False."
            )
        if rel.startswith(prefix):
            _refuse_changed(os.path.join(folder, *rel.split("/")), expected, manifest, owner)


def verify_manifest(folder: str | os.PathLike, owner: str) -> None:
    """Check the weights listed in ``folder``'s ``checksums.sha256``; raise an OSError naming the first that differs.

    No manifest: nothing to check.
    """
    manifest = os.path.join(os.fspath(folder), MANIFEST_NAME)
    if os.path.isfile(manifest):
        _check_manifest(manifest, "", owner)


def weights_fingerprint(*modules: torch.nn.Module) -> str:
    """sha256 of the modules' parameters and buffers (names and bytes, in name order): a function of the weights
    alone, not of the files they came from. Partial evaluation features and a latent cache's VAE are matched by it."""
    digest = hashlib.sha256()
    for module in modules:
        for name, tensor in sorted(module.state_dict().items()):
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def rewrite_json(path: str, edit: Callable[[dict], dict]) -> None:
    """Apply ``edit`` to a JSON file in place (in an atomic save's temporary folder), written as diffusers does."""
    with open(path, encoding="utf-8") as f:
        data = edit(json.load(f))
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2, sort_keys=True)
        f.write("\n")


def _record_weight_hashes(folder: str) -> None:
    """Write the sha256 of each ``*.safetensors`` of a component into its ``config.json`` (:data:`WEIGHT_HASHES`)."""
    hashes = {
        name: _sha256(os.path.join(folder, name))
        for name in sorted(os.listdir(folder))
        if name.endswith(".safetensors")
    }
    rewrite_json(os.path.join(folder, "config.json"), lambda config: {**config, WEIGHT_HASHES: hashes})


def verify_component(folder: str | os.PathLike, owner: str) -> None:
    """Check the weights of the component saved in ``folder`` (a local folder, e.g. a Hub cache snapshot's).

    The hashes come from its ``config.json`` (:data:`WEIGHT_HASHES`, written by every save since they were
    added, and downloaded by every loader with the config); a folder saved before that is checked against a
    ``checksums.sha256`` beside its weights, or against the entries under ``<name>/`` of the one in the folder
    above (a component inside a saved pipeline). Nothing recorded: nothing to check.
    """
    folder = os.path.abspath(folder)
    config_path = os.path.join(folder, "config.json")
    if not os.path.isfile(config_path):
        return  # diffusers' own error names the missing config
    with open(config_path, encoding="utf-8") as f:
        hashes = json.load(f).get(WEIGHT_HASHES)
    if hashes is not None:
        for name, expected in sorted(hashes.items()):
            _refuse_changed(os.path.join(folder, name), expected, f"the {WEIGHT_HASHES} of {config_path}", owner)
        return
    parent, name = os.path.split(folder)
    for manifest, prefix in (
        (os.path.join(folder, MANIFEST_NAME), ""),
        (os.path.join(parent, MANIFEST_NAME), name + "/"),
    ):
        if os.path.isfile(manifest):
            _check_manifest(manifest, prefix, owner)
            return


@contextmanager
def verified(folder: str | os.PathLike):
    """Within this block, components loaded from inside ``folder`` skip their own check (it was done, or waived)."""
    token = _verified_root.set(os.path.realpath(folder))
    try:
        yield
    finally:
        _verified_root.reset(token)


def _is_verified(folder: str) -> bool:
    root = _verified_root.get()
    return root is not None and os.path.commonpath([root, os.path.realpath(folder)]) == root


def looks_like_local_path(source: str) -> bool:
    """Whether ``source``, which does not exist, was meant as a local path rather than a Hub id.

    Hub ids are ``name`` or ``owner/name``; absolute or ``./`` / ``~`` paths, more than two parts,
    a data-file suffix, or ``folder/name`` where ``folder`` exists here are local paths.
    """
    parts = Path(source).parts
    return (
        source.startswith(("/", ".", "~"))
        or len(parts) > 2
        or Path(source).suffix in {".parquet", ".tar", ".arrow"}
        or (len(parts) == 2 and Path(parts[0]).is_dir())
    )


def hub_snapshot(repo_id: str, kwargs: dict, owner: str, allow_patterns: list[str]) -> str:
    """The local snapshot folder of Hub repo ``repo_id`` (downloaded, or from the cache offline).

    Pops the Hub options (`revision`, `token`, `local_files_only`) from ``kwargs``; `cache_dir` stays.
    Only ``allow_patterns`` are fetched (configs, safetensors, manifests: never a pickle).
    """
    cache_dir = kwargs.get("cache_dir")
    try:
        return snapshot_download(
            repo_id,
            revision=kwargs.pop("revision", None),
            cache_dir=cache_dir,
            token=kwargs.pop("token", None),
            local_files_only=kwargs.pop("local_files_only", False),
            allow_patterns=allow_patterns,
        )
    except LocalEntryNotFoundError as err:
        cache = os.fspath(cache_dir) if cache_dir is not None else hf_constants.HF_HUB_CACHE
        raise LocalEntryNotFoundError(
            f"{owner}: the Hub repo {repo_id!r} is not in the Hugging Face cache {cache!r} and could not be "
            "downloaded (offline: HF_HUB_OFFLINE=1, local_files_only=True or no connection). Download it once "
            "online, pass the `cache_dir` that holds it, or pass a local folder."
        ) from err


def _component_folders(folder: str) -> set[str]:
    """Names of the component folders listed in a pipeline folder's `model_index.json` (none for a model)."""
    index = os.path.join(folder, "model_index.json")
    if not os.path.isfile(index):
        return set()
    with open(index, encoding="utf-8") as f:
        return {k for k, v in json.load(f).items() if isinstance(v, list) and len(v) == 2}


def _carry_over(old: str, new: str) -> None:
    """Copy into ``new`` the top-level entries of ``old`` that the new save did not write (cards, logs)."""
    skip = _component_folders(old)
    for entry in os.listdir(old):
        src, dst = os.path.join(old, entry), os.path.join(new, entry)
        if entry in skip or entry.endswith(_WEIGHT_SUFFIXES) or os.path.lexists(dst):
            continue
        if os.path.isdir(src) and not os.path.islink(src):
            shutil.copytree(src, dst, symlinks=True)
        else:
            shutil.copy2(src, dst, follow_symlinks=False)
    shutil.copymode(old, new)


def _fsync_tree(folder: str) -> None:
    """Flush every file and folder under ``folder`` to disk, so that the swap publishes complete data."""
    for root, _, files in os.walk(folder, topdown=False):
        for name in files:
            path = os.path.join(root, name)
            if not os.path.islink(path):
                fsync_path(path)
        fsync_path(root)


def fsync_path(path: str | os.PathLike) -> None:
    """``fsync`` a file or a folder (a folder: so that its new entries survive a power cut)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _swap_in(tmp: str, target: str) -> str | None:
    """Publish folder ``tmp`` at ``target``; returns where the previous ``target`` now is (None if none)."""
    if not os.path.lexists(target):
        os.rename(tmp, target)
        return None
    if _exchange(tmp, target):
        return tmp
    parent, name = os.path.split(target)
    aside = os.path.join(parent, f".{name}.old-{os.getpid()}-{secrets.token_hex(4)}")
    # `target` is missing between these two renames: a kill here leaves `aside`, which the next
    # save or load of `target` renames back.
    os.rename(target, aside)
    try:
        os.rename(tmp, target)
    except BaseException:
        os.rename(aside, target)
        raise
    return aside


def atomic_save(save_directory: str | os.PathLike, write: Callable[[str], None], owner: str) -> str:
    """Run ``write(folder)`` into a temporary folder and swap it in for ``save_directory``; see the module doc.

    Returns the real path of the saved folder. A failed ``write`` (an exception, a full disk)
    leaves ``save_directory`` as it was, removes the temporary folder and re-raises; an OSError
    comes back as an OSError with the same errno that names ``save_directory``.
    """
    target = os.path.realpath(save_directory)
    outer = _saving_into.get()
    if outer is not None and os.path.commonpath([outer, target]) == outer:
        write(target)
        return target
    if os.path.lexists(target) and not os.path.isdir(target):
        raise NotADirectoryError(
            f"{owner}.save_pretrained: {os.fspath(save_directory)!r} is a file; pass a folder (new or written by "
            "save_pretrained)."
        )
    parent, name = os.path.split(target)
    os.makedirs(parent, exist_ok=True)
    with _parent_locked(parent) as parent_fd:
        _restore_and_clean(parent, name, clean=True)
        tmp = os.path.join(parent, f".{name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
        try:
            os.mkdir(tmp)
            token = _saving_into.set(tmp)
            try:
                write(tmp)
            finally:
                _saving_into.reset(token)
            _write_manifest(tmp)
            if os.path.isdir(target):
                _carry_over(target, tmp)
            _fsync_tree(tmp)
            previous = _swap_in(tmp, target)
        except BaseException as err:
            shutil.rmtree(tmp, ignore_errors=True)
            if isinstance(err, OSError):
                raise OSError(
                    err.errno,
                    f"{owner}.save_pretrained: could not save to {os.fspath(save_directory)!r} ({err}); the folder "
                    "there is unchanged and the partial copy was removed",
                ) from err
            raise
        os.fsync(parent_fd)
        if previous is not None:
            # Delete under a `tmp` name: a kill mid-way must not leave a partial `.old-*` to restore.
            if previous != tmp:
                os.rename(previous, tmp)
            shutil.rmtree(tmp)
    return target


def push_folder(folder: str | os.PathLike, owner: str, **hub_kwargs) -> None:
    """Upload a finished folder as it is (its own `README.md` is the card) to `repo_id` (default: its name)."""
    folder = os.fspath(folder)
    token = hub_kwargs.get("token")
    repo_id = create_repo(
        hub_kwargs.get("repo_id") or os.path.basename(os.path.normpath(folder)),
        private=hub_kwargs.get("private"),
        token=token,
        exist_ok=True,
    ).repo_id
    upload_folder(
        repo_id=repo_id,
        folder_path=folder,
        token=token,
        commit_message=hub_kwargs.get("commit_message") or f"Upload {owner}",
        create_pr=hub_kwargs.get("create_pr", False),
    )


class AtomicSaveMixin:
    """``save_pretrained`` through :func:`atomic_save` (with weight hashes) and ``from_pretrained`` that checks them.

    Put it first in the bases of a ``ModelMixin``. ``from_pretrained`` takes a folder or a Hub repo id (with
    or without ``subfolder``); ``verify_checksums=False`` skips the check.
    """

    def save_pretrained(
        self,
        save_directory: str | os.PathLike,
        safe_serialization: bool = True,
        variant: str | None = None,
        max_shard_size: int | str = "10GB",
        push_to_hub: bool = False,
        **kwargs,
    ) -> None:
        """``ModelMixin.save_pretrained``, atomic, with the weights' sha256 in `config.json`; with `push_to_hub`
        the finished folder is uploaded.

        The options diffusers' pipeline save passes on are named here: it passes `variant` and
        `max_shard_size` only to a save method whose signature names them.
        """
        if not safe_serialization:
            raise ValueError(
                f"{type(self).__name__}: only safetensors are supported; `safe_serialization` must be True."
            )
        hub_kwargs = {k: kwargs.pop(k) for k in HUB_KWARGS if k in kwargs}
        options = {"safe_serialization": safe_serialization, "variant": variant, "max_shard_size": max_shard_size}

        def write(folder: str) -> None:
            super(AtomicSaveMixin, self).save_pretrained(folder, **options, **kwargs)
            _record_weight_hashes(folder)

        atomic_save(save_directory, write, type(self).__name__)
        if push_to_hub:
            push_folder(save_directory, type(self).__name__, **hub_kwargs)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, verify_checksums: bool = True, **kwargs):
        owner = f"{cls.__name__}.from_pretrained"
        path = os.fspath(pretrained_model_name_or_path)
        restore_interrupted_save(path)
        subfolder = kwargs.get("subfolder")
        if not os.path.isdir(path) and not looks_like_local_path(path):
            inside = f"{subfolder.strip('/')}/" if subfolder else ""
            patterns = [f"{inside}*.json", f"{inside}*.safetensors", MANIFEST_NAME, f"{inside}{MANIFEST_NAME}"]
            path = hub_snapshot(path, kwargs, owner, patterns)
        folder = os.path.join(path, subfolder) if subfolder else path
        if verify_checksums and os.path.isdir(folder) and not _is_verified(folder):
            verify_component(folder, owner)
        model = super().from_pretrained(path, **kwargs)
        # The hashes belong to the files just read, not to the weights in memory (a save records its own).
        model._internal_dict = type(model.config)({k: v for k, v in model.config.items() if k != WEIGHT_HASHES})
        return model
