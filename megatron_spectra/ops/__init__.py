"""Pure math: the spectral clipping operators. Nothing here knows about processes."""

from .hard_clip import soft_spectral_clip_svd, spectral_clip
from .reducer import Reducer
from .soft_clip import MODES, ClipNumerics, clip_vector, clip_wide, normalize_singular_values, soft_spectral_clip

__all__ = [
    "MODES",
    "ClipNumerics",
    "Reducer",
    "clip_vector",
    "clip_wide",
    "normalize_singular_values",
    "soft_spectral_clip",
    "soft_spectral_clip_svd",
    "spectral_clip",
]
