"""The ParScale-EAR components (and MAR's backbone), one file each."""

from .diffusion_head import DiffusionHead
from .ear_transformer import EARTransformer
from .energy_head import EnergyHead, energy_score_loss
from .lite_hybrid import LiteHybrid
from .lite_vae import LiteVAE
from .mar_transformer import MARTransformer

__all__ = [
    "DiffusionHead",
    "EARTransformer",
    "EnergyHead",
    "LiteHybrid",
    "LiteVAE",
    "MARTransformer",
    "energy_score_loss",
]
