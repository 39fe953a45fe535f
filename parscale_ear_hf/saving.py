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
checksums.sha256`` works in the folder); ``from_pretrained`` checks them unless given
``verify_checksums=False``. Folders without the manifest load as before.
"""

from __future__ import annotations

import contextvars
import ctypes
import errno
import fcntl
import json
import os
import secrets
import shutil
from collections.abc import Callable
from contextlib import contextmanager

from huggingface_hub import create_repo, upload_folder
from huggingface_hub.utils.sha import sha_fileobj

MANIFEST_NAME = "checksums.sha256"
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


def verify_manifest(folder: str | os.PathLike, owner: str, subfolder: str | None = None) -> None:
    """Check the files listed in ``folder``'s manifest; raise an OSError naming the first that differs.

    With ``subfolder``, its own manifest is checked if it has one, else the entries of ``folder``'s
    manifest under ``subfolder/`` (a component inside a saved pipeline). No manifest: nothing to check.
    """
    folder = os.fspath(folder)
    prefix = ""
    if subfolder:
        if os.path.isfile(os.path.join(folder, subfolder, MANIFEST_NAME)):
            folder = os.path.join(folder, subfolder)
        else:
            prefix = subfolder.strip("/") + "/"
    manifest = os.path.join(folder, MANIFEST_NAME)
    if not os.path.isfile(manifest):
        return
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
        if not rel.startswith(prefix):
            continue
        path = os.path.join(folder, *rel.split("/"))
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"{owner}: cannot load {path}: it is listed in {manifest} but missing; restore it from the saved "
                "copy, or save the model again."
            )
        actual = _sha256(path)
        if actual != expected:
            raise OSError(
                f"{owner}: refusing to load {path}: its sha256 is {actual} but {manifest} expects {expected}; the "
                "file changed after it was saved (corrupted or edited). Restore it or save again, or pass "
                "verify_checksums=False to load it anyway."
            )


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
    """``save_pretrained`` through :func:`atomic_save` (with a manifest) and ``from_pretrained`` that checks it.

    Put it first in the bases of a ``ModelMixin``. ``from_pretrained(..., verify_checksums=False)``
    skips the check; a Hub repo id is loaded by diffusers unchecked.
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
        """``ModelMixin.save_pretrained``, atomic; with `push_to_hub` the finished folder is uploaded.

        The options diffusers' pipeline save passes on are named here: it passes `variant` and
        `max_shard_size` only to a save method whose signature names them.
        """
        if not safe_serialization:
            raise ValueError(
                f"{type(self).__name__}: only safetensors are supported; `safe_serialization` must be True."
            )
        hub_kwargs = {k: kwargs.pop(k) for k in HUB_KWARGS if k in kwargs}
        save = super().save_pretrained
        options = {"safe_serialization": safe_serialization, "variant": variant, "max_shard_size": max_shard_size}
        atomic_save(save_directory, lambda folder: save(folder, **options, **kwargs), type(self).__name__)
        if push_to_hub:
            push_folder(save_directory, type(self).__name__, **hub_kwargs)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, verify_checksums: bool = True, **kwargs):
        path = os.fspath(pretrained_model_name_or_path)
        restore_interrupted_save(path)
        if verify_checksums and os.path.isdir(path):
            verify_manifest(path, f"{cls.__name__}.from_pretrained", kwargs.get("subfolder"))
        return super().from_pretrained(path, **kwargs)
