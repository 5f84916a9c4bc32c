"""megatron-spectra: SPECTRA spectral clipping (arXiv 2603.14315) for Megatron-core and FSDP.

Layers, from the bottom: `ops` (the clipping operators, pure math), `optim` (base-optimizer
directions, threshold schedules, the single-process `Spectra`), `engine` (clipping matrices
that live in shards across processes), `megatron` and `fsdp` (adapters), `cli` (the
`spectra` command).
"""

from .ops import ClipNumerics, soft_spectral_clip, soft_spectral_clip_svd, spectral_clip
from .optim import NonFiniteError, Spectra, ThresholdSchedule, matrix_scale

__version__ = "0.1.0"

__all__ = [
    "ClipNumerics",
    "NonFiniteError",
    "Spectra",
    "ThresholdSchedule",
    "matrix_scale",
    "soft_spectral_clip",
    "soft_spectral_clip_svd",
    "spectral_clip",
]
