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
from megatron.core.optimizer import OptimizerConfig, ParamKey, get_standard_config_overrides
from megatron.core.optimizer.optimizer import ChainedOptimizer

from .config import OPTIMIZERS, SpectraOptimizerConfig
from .optimizer import SPECTRA_CLASSES

_megatron_get_optimizer = mcore_optimizer.get_megatron_optimizer


def get_megatron_optimizer(config: OptimizerConfig, model_chunks, config_overrides=None, *args, **kwargs):
    """Drop-in for megatron.core.optimizer.get_megatron_optimizer, Spectra names included.
    For those, the param groups put weight decay where `spectra_decay_embeddings` says
    (`weight_decay_overrides`)."""
    if config.optimizer not in OPTIMIZERS:
        return _megatron_get_optimizer(config, model_chunks, config_overrides, *args, **kwargs)
    if not isinstance(config, SpectraOptimizerConfig):
        raise TypeError(f"optimizer={config.optimizer!r} needs a SpectraOptimizerConfig, got {type(config).__name__}")
    refuse_fsdp(config.optimizer, model_chunks)
    as_adam = OptimizerConfig(**{f.name: getattr(config, f.name) for f in dataclasses.fields(OptimizerConfig) if f.init})
    as_adam.optimizer = "adam"
    overrides = weight_decay_overrides(config, config_overrides)
    optimizer = _megatron_get_optimizer(as_adam, model_chunks, overrides, *args, **kwargs)
    for child in optimizer.chained_optimizers if isinstance(optimizer, ChainedOptimizer) else [optimizer]:
        to_spectra(child, config, model_chunks)
    return optimizer


def weight_decay_overrides(config: SpectraOptimizerConfig, overrides: dict | None = None) -> dict:
    """megatron-core's per-parameter config overrides with the paper's weight-decay placement.

    `overrides`: the caller's (Megatron-LM passes its own); None means megatron-core's
    standard ones (wd 0 on biases and 1-D params: norms). Unless `spectra_decay_embeddings`,
    the word and position embeddings and the output layer get wd 0 too: the paper (the
    official code's param groups) decays the weights of Linear layers only, where Megatron
    decays every matrix. megatron-core marks the embedding and output weights with
    `is_embedding_or_output_parameter` (on every pipeline stage that holds one)."""
    overrides = dict(get_standard_config_overrides(config) if overrides is None else overrides)
    if config.spectra_decay_embeddings:
        return overrides
    for key in (ParamKey(attr="is_embedding_or_output_parameter"), ParamKey(name="*position_embeddings.weight")):
        overrides[key] = {**overrides.get(key, {}), "wd_mult": 0.0}  # merged with a decoupled lr on the same key
    return overrides


def to_spectra(optimizer, config: SpectraOptimizerConfig, model_chunks) -> None:
    """Turn one built Megatron optimizer into the Spectra subclass of its own class."""
    for megatron_cls, spectra_cls in SPECTRA_CLASSES:
        if isinstance(optimizer, megatron_cls):
            optimizer.__class__ = spectra_cls
            optimizer.setup_spectra(config, model_chunks)
            return
    raise TypeError(f"Spectra cannot wrap a {type(optimizer).__name__}")


# Megatron-LM's flags for megatron-core's two FSDP wrappers, and what to use instead.
FSDP_REFUSALS = {
    "--use-torch-fsdp2": (
        "megatron-core's TorchFullyShardedDataParallel turns every parameter into a DTensor shard of its "
        "tensor-parallel piece, outside the DDP buffers Spectra's Megatron optimizers read their layout from; "
        "use --use-distributed-optimizer (ZeRO-1: optimizer state sharded over data parallel), or, for a "
        "PyTorch-native FSDP2 model (torchtitan), megatron_spectra.fsdp.FSDPSpectra"
    ),
    "--use-megatron-fsdp": (
        "Megatron-FSDP keeps the main params as DTensor shards in its own buffers, not in the ZeRO-1 ranges "
        "Spectra's distributed optimizer clips; use --use-distributed-optimizer (ZeRO-1: optimizer state "
        "sharded over data parallel) instead"
    ),
}


def fsdp_refusal(optimizer: str, flag: str) -> str:
    return f"--optimizer {optimizer} does not support {flag}: {FSDP_REFUSALS[flag]}"


def refuse_fsdp(optimizer: str, model_chunks) -> None:
    """Raise (on every rank alike: it reads the wrapped model only) for model chunks wrapped by
    Megatron-FSDP (`ddp_config.use_megatron_fsdp`) or holding DTensor parameters (PyTorch FSDP2:
    megatron-core's TorchFullyShardedDataParallel, or any fully_shard)."""
    from torch.distributed.tensor import DTensor

    for chunk in model_chunks if isinstance(model_chunks, (list, tuple)) else [model_chunks]:
        if getattr(getattr(chunk, "ddp_config", None), "use_megatron_fsdp", False):
            raise ValueError(fsdp_refusal(optimizer, "--use-megatron-fsdp"))
        name = next((n for n, p in chunk.named_parameters() if isinstance(p, DTensor)), None)
        if name is not None:
            raise ValueError(f"{fsdp_refusal(optimizer, '--use-torch-fsdp2')} (parameter {name!r} is a DTensor)")
