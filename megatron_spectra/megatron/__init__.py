"""The Megatron adapter: Spectra optimizers for megatron-core, and Megatron-LM's CLI hook.

Importing this package needs megatron-core; nothing is patched until `install()`.
"""

from .config import OPTIMIZERS, SpectraOptimizerConfig
from .factory import get_megatron_optimizer, to_spectra
from .optimizer import SpectraDistributedOptimizer, SpectraFloat16Optimizer, SpectraFP32Optimizer

__all__ = [
    "OPTIMIZERS",
    "SpectraDistributedOptimizer",
    "SpectraFloat16Optimizer",
    "SpectraFP32Optimizer",
    "SpectraOptimizerConfig",
    "get_megatron_optimizer",
    "to_spectra",
]
