"""From DTensor parameters (FSDP2, HSDP, tensor parallelism) to the clip engine's placements.

A DTensor says where its local piece sits through its device mesh and one placement per mesh
dim. torch 2.13 produces these for weights (checked against `full_tensor()` in the tests):

| layout                                   | placements (mesh dims)                |
|------------------------------------------|---------------------------------------|
| FSDP2 `fully_shard`, 1-D mesh            | (Shard(0),)                           |
| HSDP, mesh (replicate, shard)            | (Replicate(), Shard(0))               |
| FSDP2 over ColwiseParallel, mesh (dp,tp) | (_StridedShard(0, sf=tp), Shard(0))   |
| FSDP2 over RowwiseParallel, mesh (dp,tp) | (Shard(0), Shard(1))                  |
| row-parallel bias / norm under FSDP x TP | (Shard(0), Replicate())               |
| module left out of TP, FSDP on dp mesh   | (Shard(0),) on the 1-D dp submesh     |

Every rank computes the global indices it holds along each tensor dim with torch's own chunk
rules (uneven and empty chunks included; FSDP2's padding is not part of `to_local()`), checks
that they are contiguous and match the local tensor, and describes them to the engine: rows
as a flat range (FSDP rows are data parallel: the engine gives each matrix one owner, or
under Gram one root rank), an even split of dim 1 as
`tp_dim=1` blocks. A plain tensor is a whole copy (replicated over the clip group).

The clip group is the set of ranks whose pieces make up the same full tensors: the union of
every parameter's sharded mesh dims (FSDP x TP: the flattened dp x tp ranks). Mesh dims on
which every parameter is replicated (HSDP's replicate dim) are left out: each replica group
clips its own copy, with no traffic between replicas.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Iterable, Sequence

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.distributed.tensor.placement_types import _StridedShard, _StridedShardOffsetMode

from ..engine import STRATEGIES, Placement

SUPPORTED = "Replicate(), Shard(0), _StridedShard(0) (FSDP2 over TP), Shard(1) in equal blocks (one mesh dim)"


class UnsupportedPlacement(ValueError):
    """A parameter's DTensor layout that the clip engine cannot describe."""


def _describe(name: str, t: DTensor) -> str:
    return f"parameter {name!r} (shape {tuple(t.shape)}, placements {tuple(t.placements)} on {t.device_mesh})"


def _is_shard(p) -> bool:
    return isinstance(p, (Shard, _StridedShard))


def held_ranges(t: DTensor, name: str = "tensor") -> list[range]:
    """The global index range this rank holds along each dim of DTensor `t`.

    Mirrors torch's `compute_local_shape_and_global_offset` (left-to-right over mesh dims,
    `_StridedShard` taking its strided rows), but keeps every index so that a piece that is
    not one contiguous box is refused instead of misdescribed.
    """
    mesh, shape = t.device_mesh, tuple(t.shape)
    coordinate = mesh.get_coordinate()
    if coordinate is None:
        raise UnsupportedPlacement(f"{_describe(name, t)}: this rank is not in its mesh")
    held: dict[int, torch.Tensor] = {}
    for mesh_dim, placement in enumerate(t.placements):
        if isinstance(placement, Replicate):
            continue
        if not _is_shard(placement) or not 0 <= placement.dim < len(shape):
            raise UnsupportedPlacement(f"{_describe(name, t)}: {placement} is not supported; supported: {SUPPORTED}")
        dim = placement.dim
        current = held.get(dim, torch.arange(shape[dim]))
        chunks, me = mesh.size(mesh_dim), coordinate[mesh_dim]
        if isinstance(placement, _StridedShard):
            size, offsets = placement.local_shard_size_and_offset(len(current), chunks, me, _StridedShardOffsetMode.ALL)
            picked = torch.tensor(offsets if size else [], dtype=torch.long)
        else:
            size, offset = Shard.local_shard_size_and_offset(len(current), chunks, me)
            picked = torch.arange(offset, offset + size)
        held[dim] = current[picked]
    ranges = []
    for dim, size in enumerate(shape):
        idx = held.get(dim)
        if idx is None:
            ranges.append(range(size))
        elif len(idx) == 0:
            ranges.append(range(0, 0))
        else:
            start = int(idx[0])
            if not torch.equal(idx, torch.arange(start, start + len(idx))):
                raise UnsupportedPlacement(f"{_describe(name, t)}: this rank's piece is not contiguous along dim {dim}")
            ranges.append(range(start, start + len(idx)))
    local = tuple(t.to_local().shape)
    if tuple(len(r) for r in ranges) != local:
        raise UnsupportedPlacement(
            f"{_describe(name, t)}: the local tensor has shape {local}, the placements say {tuple(len(r) for r in ranges)}"
        )
    return ranges


def engine_placement(t: torch.Tensor, name: str, kind: str, strategy: str = "auto") -> Placement:
    """The engine Placement of this rank's piece of parameter `t`, clipped as `kind`.

    kind "matrix": the tensor as a (d0, prod(rest)) matrix (a 1-D tensor as (n, 1)), as the
    reference `Spectra` clips it; kind "vector": the flattened tensor (the vector rule).
    """
    shape = tuple(t.shape)
    rows, cols = (shape[0] if shape else 1), math.prod(shape[1:])
    whole = (math.prod(shape),) if kind == "vector" else (rows, cols)
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}; expected one of {STRATEGIES}")
    placement = _placement(t, name, kind, whole, cols)
    return replace(placement, strategy=_strategy(placement, strategy))


def _strategy(p: Placement, strategy: str) -> str:
    """The engine strategy for one placement.

    "gram" is asked for where bytes matter more than FLOPs; it pays only where the lines the
    shards hold run along the long side (FSDP rows of a tall matrix, TP column bands of a wide
    one): the all-reduce is then the small k x k Gram. Elsewhere (square or short-side splits)
    the Gram is as large as the matrix, so the owner is used.
    """
    if strategy != "gram" or p.is_vector:
        return strategy
    rows, cols = p.matrix_shape
    long_side_split = cols > rows if p.tp_dim == 1 else rows > cols
    return "gram" if long_side_split else "owner"


def _placement(t: torch.Tensor, name: str, kind: str, whole: tuple, cols: int) -> Placement:
    shape = tuple(t.shape)
    if not isinstance(t, DTensor):  # a whole copy on every rank of the clip group
        return Placement(whole)
    ranges = held_ranges(t, name)
    split = {p.dim for p in t.placements if _is_shard(p)}
    if split - {0, 1} or (1 in split and len(shape) < 2):
        raise UnsupportedPlacement(f"{_describe(name, t)}: only dims 0 and 1 may be sharded; supported: {SUPPORTED}")
    r0, r1 = (ranges[0].start, ranges[0].stop) if ranges[0] else (0, 0)
    if 1 not in split:
        return Placement(whole, flat=(r0 * cols, r1 * cols))
    if kind == "vector":
        raise UnsupportedPlacement(f"{_describe(name, t)}: the vector rule on a column-sharded tensor is not supported")
    return _column_blocks(t, name, ranges, (r0, r1), cols)


def _column_blocks(t: DTensor, name: str, ranges, rows_held, cols: int) -> Placement:
    """Dim 1 cut into equal blocks by one mesh dim (RowwiseParallel, FSDP2 Shard(1))."""
    mesh_dims = [i for i, p in enumerate(t.placements) if _is_shard(p) and p.dim == 1]
    if len(mesh_dims) != 1 or isinstance(t.placements[mesh_dims[0]], _StridedShard):
        raise UnsupportedPlacement(f"{_describe(name, t)}: dim 1 may be split by one mesh dim only; supported: {SUPPORTED}")
    blocks, width = t.device_mesh.size(mesh_dims[0]), t.shape[1]
    if width % blocks:
        raise UnsupportedPlacement(f"{_describe(name, t)}: dim 1 ({width}) does not split into {blocks} equal blocks")
    block_width = width // blocks
    block = ranges[1].start // block_width
    if ranges[1] != range(block * block_width, (block + 1) * block_width):
        raise UnsupportedPlacement(f"{_describe(name, t)}: this rank's columns {ranges[1]} are not one whole block")
    block_cols = cols // blocks
    r0, r1 = rows_held
    return Placement((t.shape[0], cols), tp_dim=1, tp_size=blocks, tp_block=block, flat=(r0 * block_cols, r1 * block_cols))


# ----------------------------------------------------------------------------- the clip group


def sharded_rank_sets(t: torch.Tensor) -> set[tuple[int, ...]]:
    """Sets of global ranks that hold different pieces of the same copy of `t` (one per replica)."""
    if not isinstance(t, DTensor):
        return set()
    sharded = [i for i, p in enumerate(t.placements) if not isinstance(p, Replicate)]
    if not sharded:
        return set()
    ranks = t.device_mesh.mesh
    others = [i for i in range(ranks.ndim) if i not in sharded]
    rows = ranks.permute(*others, *sharded).reshape(-1, math.prod(ranks.shape[i] for i in sharded))
    return {tuple(sorted(row.tolist())) for row in rows}


def connected_components(rank_sets: Iterable[Sequence[int]], ranks: Sequence[int]) -> list[tuple[int, ...]]:
    """Union-find over `ranks`: two ranks are together when some rank set holds both."""
    parent = {r: r for r in ranks}

    def root(r):
        while parent[r] != r:
            parent[r] = parent[parent[r]]
            r = parent[r]
        return r

    for members in rank_sets:
        for r in members:
            if r not in parent:
                raise ValueError(f"rank {r} of a parameter's mesh is not in the optimizer's process group {sorted(ranks)}")
            parent[root(r)] = root(members[0])
    groups: dict[int, list[int]] = {}
    for r in ranks:
        groups.setdefault(root(r), []).append(r)
    return sorted(tuple(sorted(g)) for g in groups.values())


_GROUPS: dict[tuple[int, ...], object] = {}


def subgroup(ranks: tuple[int, ...]):
    """A process group of exactly `ranks`, created once per process and reused.

    Only the members call this (use_local_synchronization), so each HSDP replica group or
    pipeline stage creates its own without the others.
    """
    cached = _GROUPS.get(ranks)
    if cached is not None and cached in dist.distributed_c10d._world.pg_group_ranks:
        return cached
    group = dist.new_group(list(ranks), use_local_synchronization=True)
    _GROUPS[ranks] = group
    return group


def group_ranks(group) -> list[int]:
    return dist.get_process_group_ranks(group if group is not None else dist.group.WORLD)
