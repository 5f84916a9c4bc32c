"""`get_megatron_optimizer` for every optimizer name, with the Spectra ones added.

For a `spectra-*` name, megatron-core's own factory builds the optimizer exactly as it would
for Adam (param groups, buffers, ZeRO ranges, main params, loss scaler, chaining of dense and
expert parts), and each piece is then turned into its Spectra version in place. Nothing of
megatron-core's construction logic is repeated here, so what a newer release changes there
(new group overrides, process-group plumbing) carries over.
"""

from __future__ import annotations

import dataclasses

import megatron.core.optimizer as mcore_optimizer
from megatron.core.optimizer import OptimizerConfig
from megatron.core.optimizer.optimizer import ChainedOptimizer

from .config import OPTIMIZERS, SpectraOptimizerConfig
from .optimizer import SPECTRA_CLASSES

_megatron_get_optimizer = mcore_optimizer.get_megatron_optimizer


def get_megatron_optimizer(config: OptimizerConfig, model_chunks, *args, **kwargs):
    """Drop-in for megatron.core.optimizer.get_megatron_optimizer, Spectra names included."""
    if config.optimizer not in OPTIMIZERS:
        return _megatron_get_optimizer(config, model_chunks, *args, **kwargs)
    if not isinstance(config, SpectraOptimizerConfig):
        raise TypeError(f"optimizer={config.optimizer!r} needs a SpectraOptimizerConfig, got {type(config).__name__}")
    as_adam = OptimizerConfig(**{f.name: getattr(config, f.name) for f in dataclasses.fields(OptimizerConfig) if f.init})
    as_adam.optimizer = "adam"
    optimizer = _megatron_get_optimizer(as_adam, model_chunks, *args, **kwargs)
    for child in optimizer.chained_optimizers if isinstance(optimizer, ChainedOptimizer) else [optimizer]:
        to_spectra(child, config, model_chunks)
    return optimizer


def to_spectra(optimizer, config: SpectraOptimizerConfig, model_chunks) -> None:
    """Turn one built Megatron optimizer into the Spectra subclass of its own class."""
    for megatron_cls, spectra_cls in SPECTRA_CLASSES:
        if isinstance(optimizer, megatron_cls):
            optimizer.__class__ = spectra_cls
            optimizer.setup_spectra(config, model_chunks)
            return
    raise TypeError(f"Spectra cannot wrap a {type(optimizer).__name__}")
