"""The Megatron adapter: Spectra optimizers for megatron-core, their config and `--spectra-*`
flags, checkpoints, megatron-core on CPU. Megatron-LM itself is hooked one layer up, in
`megatron_spectra.megatron_lm`. Importing this package needs megatron-core; it patches nothing.
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
