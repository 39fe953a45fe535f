"""Saving and loading of the pipeline: atomic safetensors folders with a manifest, the Hub entry file, and
loading from a folder or a Hub repo id (see :mod:`parscale_ear_hf.saving`)."""

from __future__ import annotations

import json
import os
import shutil
from contextlib import nullcontext
from importlib import resources

from .saving import (
    HUB_KWARGS,
    MANIFEST_NAME,
    atomic_save,
    hub_snapshot,
    looks_like_local_path,
    push_folder,
    restore_interrupted_save,
    rewrite_json,
    verified,
    verify_manifest,
)

# The Hub entry file that lets `DiffusionPipeline.from_pretrained(..., trust_remote_code=True)`
# find the pipeline class; written beside model_index.json by `save_pretrained`.
HUB_ENTRY_MODULE = "pipeline_parscale_ear"


class PipelineHubMixin:
    """``save_pretrained`` / ``from_pretrained`` for a ``DiffusionPipeline``; inherit it before ``DiffusionPipeline``.

    The class names its saved components, in order, in `_component_names`.
    """

    _component_names: tuple[str, ...] = ()

    def save_pretrained(self, save_directory: str | os.PathLike, push_to_hub: bool = False, **kwargs):
        """``DiffusionPipeline.save_pretrained`` (safetensors only), atomic, plus the Hub entry file and a manifest.

        The folder is written beside `save_directory` and swapped in only when complete (see
        :mod:`parscale_ear_hf.saving`): a kill, a full disk or a concurrent save leaves the old
        folder or the new one, never a mix. `checksums.sha256` lists the weights, checked by
        :meth:`from_pretrained`. Top-level files of the old folder that this save does not write
        (its `README.md` card, `training/` logs) are kept.

        `model_index.json` names the class as ``["pipeline_parscale_ear", "ParScaleEARPipeline"]``
        so that ``DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)`` finds it;
        ``ParScaleEARPipeline.from_pretrained`` ignores the entry file and needs no remote code.
        Local paths (`_name_or_path`) are not written, so a re-saved pipeline is identical.

        With `push_to_hub`, the finished folder itself is uploaded (`repo_id`, default the folder's
        name; `token`, `private`, `commit_message`, `create_pr` as in diffusers), with whatever
        else it holds: its `README.md` (the card of :func:`parscale_ear_hf.model_card.write_model_card`)
        goes up as the repo's model card. diffusers' own `push_to_hub` would save again into a
        temporary folder and write a generic card there.
        """
        if not kwargs.pop("safe_serialization", True):
            raise ValueError(
                f"{type(self).__name__}: only safetensors are supported; `safe_serialization` must be True."
            )
        hub_kwargs = {k: kwargs.pop(k) for k in HUB_KWARGS if k in kwargs}
        atomic_save(save_directory, lambda folder: self._write_folder(folder, **kwargs), type(self).__name__)
        if push_to_hub:
            push_folder(save_directory, type(self).__name__, **hub_kwargs)

    def _write_folder(self, folder: str, **kwargs) -> None:
        super().save_pretrained(folder, safe_serialization=True, **kwargs)
        entry = resources.files("parscale_ear_hf.hub_entry").joinpath(f"{HUB_ENTRY_MODULE}.py")
        with resources.as_file(entry) as entry_path:
            shutil.copyfile(entry_path, os.path.join(folder, f"{HUB_ENTRY_MODULE}.py"))

        def without_local_path(config: dict) -> dict:
            config.pop("_name_or_path", None)
            return config

        rewrite_json(
            os.path.join(folder, self.config_name),
            lambda index: {**without_local_path(index), "_class_name": [HUB_ENTRY_MODULE, type(self).__name__]},
        )
        for name in self._component_names:
            rewrite_json(os.path.join(folder, name, "config.json"), without_local_path)

    @classmethod
    def load_config(cls, *args, **kwargs):
        # Our own class needs no remote code: read the entry-file class name back as plain.
        out = super().load_config(*args, **kwargs)
        config = out[0] if isinstance(out, tuple) else out
        name = config.get("_class_name")
        if isinstance(name, list) and len(name) == 2 and name[1] == cls.__name__:
            config["_class_name"] = cls.__name__
        return out

    @classmethod
    def from_pretrained(
        cls, pretrained_model_name_or_path: str | os.PathLike, verify_checksums: bool = True, **kwargs
    ):
        """Load from a folder or a Hub repo id (online, or offline from the HF cache).

        A repo id is fetched with ``huggingface_hub.snapshot_download`` (configs, safetensors, the
        manifest and the entry file only; never pickles), which also resolves it offline from the
        cache (``HF_HUB_OFFLINE=1``), and then loaded as a folder. Online, diffusers' own repo-id
        path rejects components whose `model_index.json` entry is a module path of an installed
        package (it looks for ``<component>/<module path>.py`` in the repo), hence this detour.

        The weights are checked against the folder's `checksums.sha256` when it has one, and each component
        against the hashes in its `config.json` (see :mod:`parscale_ear_hf.saving`); an OSError names the
        file that differs. `verify_checksums=False` skips both checks.
        """
        owner = f"{cls.__name__}.from_pretrained"
        path = os.fspath(pretrained_model_name_or_path)
        restore_interrupted_save(path)
        if not os.path.isdir(path):
            if os.path.exists(path) or looks_like_local_path(path):
                raise FileNotFoundError(
                    f"{owner}: {path!r} is not an existing folder; pass a folder written "
                    "by `save_pretrained` or a Hub repo id ('name' or 'org/name')."
                )
            path = hub_snapshot(
                path, kwargs, owner, ["*.json", "*.safetensors", "*.py", "*.md", "*.txt", MANIFEST_NAME]
            )
        if verify_checksums:
            verify_manifest(path, owner)
        cls._check_component_folders(path, kwargs)
        kwargs.setdefault("use_safetensors", True)
        # Checked against the manifest (or waived): the components need not hash their weights again.
        done = not verify_checksums or os.path.isfile(os.path.join(path, MANIFEST_NAME))
        with verified(path) if done else nullcontext():
            return super().from_pretrained(path, **kwargs)

    @classmethod
    def _check_component_folders(cls, folder: str, kwargs: dict) -> None:
        """Raise naming the component and its folder when a saved component is missing (diffusers names a file)."""
        index_path = os.path.join(folder, cls.config_name)
        if not os.path.isfile(index_path):
            return  # diffusers' own error names model_index.json
        with open(index_path, encoding="utf-8") as f:
            index = json.load(f)
        for name in cls._component_names:
            expected = os.path.join(folder, name)
            entry = index.get(name)
            # A component passed as a keyword argument is not read from the folder.
            if name in kwargs or not isinstance(entry, list):
                continue
            if not os.path.isfile(os.path.join(expected, "config.json")):
                raise FileNotFoundError(
                    f"{cls.__name__}.from_pretrained: component `{name}` ({entry[-1]}) is missing: expected the "
                    f"folder {expected} with its config.json and weights, as save_pretrained writes it; restore it, "
                    f"or pass `{name}=` a loaded {entry[-1]}."
                )
