"""parscale-ear-hf: class-conditional image generation with EAR's energy head, ParScale streams,
a wavelet LiteVAE and a Lite-Hybrid token module, as a Hugging Face diffusers pipeline."""

from .models import DiffusionHead, EARTransformer, EnergyHead, LiteHybrid, LiteVAE, MARTransformer, energy_score_loss
from .pipeline_parscale_ear import ParScaleEARPipeline, SamplingCache
from .training.objectives import EARTrainingModel

__version__ = "0.1.0"

__all__ = [
    "EARTrainingModel",
    "DiffusionHead",
    "EARTransformer",
    "EnergyHead",
    "LiteHybrid",
    "LiteVAE",
    "MARTransformer",
    "ParScaleEARPipeline",
    "SamplingCache",
    "energy_score_loss",
]
