"""Megatron parameters as engine placements: TP attributes, ZeRO ranges, fused parts.

Megatron marks a TP-split weight with `tensor_model_parallel=True` and `partition_dim`
(0: column-parallel, QKV, fc1, vocab-parallel embedding and output layer; 1: row-parallel),
and every TP rank holds an equal block. The DistributedOptimizer then keeps only a range
`param_range_map["param"]` of each block's flattening on this DP rank. The translation is
these two facts, plus which tensors are clipped how (`optim.step.clip_kind`) and their alpha
(section 5.2 of arXiv 2603.14315), which a 1-D shard cannot tell: each Entry is the spec the
step asks for (`MainParamSpectra.spec_of`).

Mixture-of-experts (megatron-core's SequentialMLP, TEGroupedMLP, GroupedMLP): an expert's
weights live on one expert-parallel (EP) rank, split by expert tensor parallelism (ETP) and
ZeRO-sharded over the expert data-parallel group. Every expert matrix is its own matrix, with
its alpha from its own global shape, so each process lists the entries of every expert of
its pipeline stage (those of other EP ranks without a piece) and the engine works over all
the ranks of the stage. GroupedMLP keeps all local experts in one tensor, experts-major (its
forward's `weight1.view(E, h, -1)`): expert k is the k-th contiguous block, a matrix stored
(in, out); `grouped_experts` splits it the way fused QKV is split into parts.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass

import torch

from ..engine import Placement, tensor_parallel
from ..optim.schedules import matrix_scale
from ..optim.clipper import ParamSpec, clip_kind


@dataclass(frozen=True, eq=False)
class Entry(ParamSpec):
    """One model parameter as the engine sees it on this rank: its ParamSpec (name, clip
    kind, alpha from the global shape, matrix or not), where its piece sits, and the piece."""

    main: torch.Tensor | None  # this rank's fp32 main param (whole or a shard); None if none here
    placement: Placement
    span: tuple[int, int] | None = None  # the part of `main` that is this entry's piece (grouped experts)
    replica: bool = False  # another process of the group holds the same piece (and counts it in sums)

    def piece_of_main(self, tensor: torch.Tensor) -> torch.Tensor:
        """This entry's piece of a tensor laid out like `main` (flat)."""
        flat = tensor.reshape(-1)
        return flat if self.span is None else flat[self.span[0] : self.span[1]]


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


def make_entry(name, model_param, main, flat, tp_size, tp_rank, apply_to, parts, strategy, replica=None) -> Entry:
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
    if replica is None:  # a TP-replicated tensor: TP rank 0's copy counts
        replica = placement.tp_dim is None and tp_rank != 0
    return Entry(name, kind, scale, len(shape) >= 2, main, placement, replica=replica)


def param_names(model_chunks) -> dict:
    """Names that are the same on every TP and DP rank, for placements and messages."""
    names = {}
    for index, chunk in enumerate(model_chunks):
        prefix = f"chunk{index}." if len(model_chunks) > 1 else ""
        for name, p in chunk.named_parameters():
            names.setdefault(p, prefix + name.removeprefix("module."))
    return names


# ----------------------------------------------------------------------------- experts


@dataclass(frozen=True)
class Experts:
    """One megatron-core experts module (SequentialMLP, TEGroupedMLP, GroupedMLP) as this
    process sees it: `local` experts per EP rank, this rank's EP and expert-TP coordinates."""

    grouped: bool  # GroupedMLP: all local experts in one tensor
    local: int
    ep_size: int
    ep_rank: int
    tp_size: int
    tp_rank: int
    ffn: int  # moe_ffn_hidden_size (each TP block of a gated fc1 is [gate_t; up_t])


def expert_params(model_chunks) -> dict:
    """{param: (Experts, local index)} of every expert parameter of the model's MoE layers;
    the index is None for a GroupedMLP tensor, which holds every local expert."""
    from .compat import moe_expert_classes

    SequentialMLP, TEGroupedMLP, GroupedMLP = moe_expert_classes()  # no GroupedMLP from megatron-core 0.19 on

    found = {}
    for chunk in model_chunks:
        for module in chunk.modules():
            if not isinstance(module, (SequentialMLP, TEGroupedMLP, GroupedMLP)):
                continue
            layout = Experts(
                isinstance(module, GroupedMLP), module.num_local_experts, module.ep_group.size(), module.ep_group.rank(),
                module.tp_group.size(), module.tp_group.rank(), module.config.moe_ffn_hidden_size,
            )
            if isinstance(module, SequentialMLP):
                for j, expert in enumerate(module.local_experts):
                    found.update({p: (layout, j) for p in expert.parameters()})
            elif isinstance(module, TEGroupedMLP):  # one weight{j} (bias{j}) per local expert
                for name, p in module.named_parameters():
                    found[p] = (layout, int(re.search(r"(\d+)$", name).group(1)))
            else:
                found.update({p: (layout, None) for p in module.parameters()})
    return found


def expert_name(name: str, layout: Experts, index: int | None, expert: int) -> str:
    """The name of global expert `expert`'s tensor, from the local name of its module's param."""
    if layout.grouped:  # ...experts.weight1 -> ...experts.<e>.weight1 (megatron's checkpoint keys)
        head, tail = name.rsplit(".", 1)
        return f"{head}.{expert}.{tail}"
    if f"local_experts.{index}." in name:  # SequentialMLP
        return name.replace(f"local_experts.{index}.", f"local_experts.{expert}.")
    return re.sub(r"\d+$", str(expert), name)  # TEGroupedMLP's weight<j>


def expert_entries(name, model_param, main, flat, layout: Experts, index, *, apply_to, strategy, split_fc1: bool,
                   dp_replica: bool, replica_rank: int) -> list[Entry]:
    """Every global expert's entry for one local expert param: the same slot on every EP rank
    (expert e·local + index of EP rank e), in the same order on every process; this process
    has a piece of its own EP rank's only. `flat`: its ZeRO range (None: the whole TP block).
    Which copy of a replicated piece counts in sums: not one of `dp_replica` (expert DP without
    ZeRO), and that of `replica_rank` 0 (the TP rank among those that hold a TP-replicated one)."""
    entries = []
    for ep in range(layout.ep_size):
        mine = ep == layout.ep_rank
        if layout.grouped:
            entries += grouped_experts(name, model_param, main if mine else None, flat, layout, ep,
                                       apply_to=apply_to, strategy=strategy, split_fc1=split_fc1,
                                       replica=mine and (dp_replica or (layout.tp_size == 1 and replica_rank != 0)))
            continue
        gated = split_fc1 and ".linear_fc1." in name and model_param.dim() == 2
        parts = (layout.ffn // layout.tp_size,) * 2 if gated else None
        entry = make_entry(
            expert_name(name, layout, index, ep * layout.local + index), model_param, main if mine else None,
            flat if mine else (0, 0), layout.tp_size, layout.tp_rank, apply_to, parts, strategy, replica=False,
        )
        replica = mine and (dp_replica or (entry.placement.tp_dim is None and replica_rank != 0))
        entries.append(dataclasses.replace(entry, replica=replica) if replica else entry)
    return entries


def grouped_experts(name, model_param, main, flat, layout: Experts, ep: int, *, apply_to, strategy, split_fc1: bool,
                    replica: bool = False) -> list[Entry]:
    """The experts of EP rank `ep` in one GroupedMLP tensor, each its own matrix.

    The TP-local tensor holds the local experts one after another (weight1 (h, E·F1/t) is
    used as view(E, h, F1/t), weight2 (E·F/t, h) as view(E, F/t, h)): expert k's TP block is
    block k of the flattening, stored (in, out). Its placement is the full (in, out) matrix with
    the same TP dim; alpha is that of the (out, in) Linear weight it is; `flat` (a ZeRO range of
    the whole tensor) is cut at the expert boundaries, and `span` says where each expert's part
    sits in this process's piece."""
    dim, n = tp_dim(model_param), layout.local
    if model_param.dim() != 2 or dim is None or model_param.shape[dim] % n:
        raise ValueError(f"{name}: a GroupedMLP weight of shape {tuple(model_param.shape)} does not hold {n} experts along a TP dim")
    if split_fc1 and name.endswith("weight1"):
        raise NotImplementedError(
            f"{name}: spectra_split_fc1 (--spectra-split-fc1) cannot split GroupedMLP's fused fc1 (its gate and up "
            "halves are columns); use SequentialMLP or TEGroupedMLP, or leave the split off"
        )
    kind = clip_kind(model_param, apply_to)
    block = list(model_param.shape)
    block[dim] //= n
    shape = list(block)
    shape[dim] *= layout.tp_size
    scale = matrix_scale((shape[1], shape[0])) if kind == "matrix" else 1.0
    size = block[0] * block[1]
    start, end = flat if flat is not None else (0, model_param.numel())
    entries = []
    for k in range(n):
        lo, hi = max(start, k * size), min(end, (k + 1) * size)
        here = main is not None and lo < hi
        placement = tensor_parallel(shape, dim, layout.tp_size, layout.tp_rank,
                                    flat=(lo - k * size, hi - k * size) if here else (0, 0), strategy=strategy)
        entries.append(Entry(
            expert_name(name, layout, None, ep * n + k), kind, scale, True, main if here else None, placement,
            span=(lo - start, hi - start) if here else None, replica=here and replica,
        ))
    return entries
