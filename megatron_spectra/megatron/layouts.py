"""Megatron parameters as engine placements: TP attributes, ZeRO ranges, fused parts.

Megatron marks a TP-split weight with `tensor_model_parallel=True` and `partition_dim`
(0: column-parallel, QKV, fc1, vocab-parallel embedding and output layer; 1: row-parallel),
and every TP rank holds an equal block. The DistributedOptimizer then keeps only a range
`param_range_map["param"]` of each block's flattening on this DP rank. The translation is
these two facts, plus which tensors are clipped how (`optim.step.clip_kind`) and their alpha
(section 5.2 of arXiv 2603.14315), which a 1-D shard cannot tell: each Entry is the spec the
step asks for (`MainParamSpectra.spec_of`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..engine import Placement
from ..optim.schedules import matrix_scale
from ..optim.step import ParamSpec, clip_kind


@dataclass(frozen=True, eq=False)
class Entry(ParamSpec):
    """One model parameter as the engine sees it on this rank: its ParamSpec (name, clip
    kind, alpha from the global shape, matrix or not), where its piece sits, and the piece."""

    main: torch.Tensor | None  # this rank's fp32 main param (whole or a shard); None if none here
    placement: Placement


def global_shape(param: torch.Tensor, tp_size: int) -> tuple[int, ...]:
    shape = list(param.shape)
    dim = tp_dim(param)
    if dim is not None:
        shape[dim] *= tp_size
    return tuple(shape)


def tp_dim(param: torch.Tensor) -> int | None:
    if getattr(param, "tensor_model_parallel", False) and getattr(param, "partition_dim", -1) >= 0:
        return param.partition_dim
    return None


def row_parts(name: str, model_config, tp_size: int, split_qkv: bool, split_fc1: bool):
    """Fused sub-matrices to clip separately, as periodic row parts (see engine.placement)."""
    if split_qkv and name.endswith("linear_qkv.weight"):
        heads_per_group = model_config.num_attention_heads // (model_config.num_query_groups or model_config.num_attention_heads)
        kv = model_config.kv_channels
        return (heads_per_group * kv, kv, kv)
    if split_fc1 and name.endswith("linear_fc1.weight") and getattr(model_config, "gated_linear_unit", False):
        half = model_config.ffn_hidden_size // tp_size  # each TP block is [gate_t; up_t]
        return (half, half)
    return None


def make_entry(name, model_param, main, flat, tp_size, tp_rank, apply_to, parts, strategy) -> Entry:
    shape = global_shape(model_param, tp_size)
    dim = tp_dim(model_param)
    kind = clip_kind(model_param, apply_to)
    if model_param.dim() > 2:
        raise ValueError(f"{name}: Spectra clips 1-D and 2-D parameters; got shape {tuple(shape)}")
    placement = Placement(
        shape,
        tp_dim=dim if tp_size > 1 else None,
        tp_size=tp_size if dim is not None else 1,
        tp_block=tp_rank if dim is not None and tp_size > 1 else 0,
        flat=flat,
        row_parts=parts if kind == "matrix" else None,
        strategy=strategy,
    )
    scale = matrix_scale(shape) if kind == "matrix" else 1.0
    return Entry(name, kind, scale, len(shape) >= 2, main, placement)


def param_names(model_chunks) -> dict:
    """Names that are the same on every TP and DP rank, for placements and messages."""
    names = {}
    for index, chunk in enumerate(model_chunks):
        prefix = f"chunk{index}." if len(model_chunks) > 1 else ""
        for name, p in chunk.named_parameters():
            names.setdefault(p, prefix + name.removeprefix("module."))
    return names
