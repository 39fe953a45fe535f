"""Hub entry file of ParScale-EAR.

Placed beside `model_index.json` (which names it as ``["pipeline_parscale_ear",
"ParScaleEARPipeline"]``) so that ``DiffusionPipeline.from_pretrained(repo, trust_remote_code=True)``
finds the pipeline class. It holds no model code: the package is the single source of it.
Without remote code, ``parscale_ear_hf.ParScaleEARPipeline.from_pretrained(repo)`` loads the same repo.
"""

try:
    from parscale_ear_hf import ParScaleEARPipeline
except ImportError as err:  # pragma: no cover - exercised only without the package
    raise ImportError("This pipeline needs the `parscale-ear-hf` package: `pip install parscale-ear-hf`.") from err

__all__ = ["ParScaleEARPipeline"]
