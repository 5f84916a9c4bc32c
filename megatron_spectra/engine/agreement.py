"""Checking, before any data moves, that all processes describe the same tensors.

A layout that disagrees across processes would otherwise surface as mismatched collective
sizes, which gloo answers by killing peers ("connection reset") and NCCL by hanging. Every
call starts with one fixed-size all-gather of a fingerprint; only when the fingerprints
change are the full descriptions exchanged (padded to one size) and compared field by field,
so every process raises the same error, naming the tensor and the processes that disagree.

The first all-gather also carries each process's local verdict on its own arguments (a piece
whose size is not its placement's, lists of different lengths, a threshold that is not a
number): a process that raised on its own before that collective would leave the others
blocked in it, so the verdict is shared and every process raises the same error.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import struct
from typing import Sequence

import torch
import torch.distributed as dist

from .placement import STRATEGIES, Placement
from .exchange import all_gather_flat

_FIELDS = 11  # int64 per placement in the encoding below


class LayoutMismatch(ValueError):
    pass


def _hash(data: bytes) -> int:
    return struct.unpack("<q", hashlib.blake2b(data, digest_size=8).digest())[0]


def _name_hash(name: str) -> int:
    return _hash(name.encode())


def encode(placements: Sequence[Placement], names: Sequence[str]) -> torch.Tensor:
    rows = []
    for p, name in zip(placements, names):
        parts = 0 if p.row_parts is None else _name_hash(",".join(map(str, p.row_parts)))
        rows.append([
            len(p.shape), p.shape[0], p.shape[-1], -1 if p.tp_dim is None else p.tp_dim, p.tp_size,
            p.tp_block, *p.range, parts, STRATEGIES.index(p.strategy), _name_hash(name),
        ])
    return torch.tensor(rows, dtype=torch.int64).reshape(-1, _FIELDS)


# A process's verdict on its own arguments: (problem, tensor index, a, b); problem 0 is none.
FINE = (0, -1, 0, 0)
LENGTHS, SIZE, THRESHOLD = 1, 2, 3


def local_problem(tensors, placements, names, thresholds) -> tuple[int, int, int, int]:
    """What is wrong with this process's arguments, encoded for the fingerprint (FINE: nothing)."""
    others = [n for n in (len(placements), len(names), len(thresholds)) if n != len(tensors)]
    if others:
        return (LENGTHS, -1, len(tensors), others[0])
    for i, (t, p, c) in enumerate(zip(tensors, placements, thresholds)):
        if t.numel() != p.local_numel:
            return (SIZE, i, t.numel(), p.local_numel)
        if not _finite_number(c):
            return (THRESHOLD, i, 0, 0)
    return FINE


def _finite_number(c) -> bool:
    try:
        return math.isfinite(float(c))
    except (TypeError, ValueError):
        return False


def describe_problem(rank: int, problem: Sequence[int], names: Sequence[str]) -> str:
    kind, index, a, b = problem
    if kind == LENGTHS:
        return f"rank {rank} passes {a} tensors but {b} placements, names or thresholds (one of each per tensor)"
    name = f"tensor {index} ({names[index]!r})" if 0 <= index < len(names) else f"tensor {index}"
    if kind == SIZE:
        return f"{name} on rank {rank}: its local piece has {a} elements, its placement says {b}"
    return f"{name} on rank {rank}: its clipping threshold is not a finite number"


def fingerprint(encoded: torch.Tensor, thresholds: Sequence[float], finite: bool,
                problem: Sequence[int] = FINE) -> torch.Tensor:
    """(layout hash, tensor count, threshold hash, all inputs finite, *local problem): 8 int64
    per process."""
    layout = _hash(encoded.numpy().tobytes())
    cs = _hash(struct.pack(f"<{len(thresholds)}d", *thresholds))
    return torch.tensor([layout, encoded.shape[0], cs, int(finite), *problem], dtype=torch.int64)


def check_problems(fingerprints, names: Sequence[str]) -> None:
    """Raises the same LayoutMismatch on every process when any process's arguments are bad."""
    bad = [describe_problem(r, fp[4:8], names) for r, fp in enumerate(fingerprints) if fp[4] != FINE[0]]
    if bad:
        raise LayoutMismatch("bad input to the clip engine, nothing was changed: " + "; ".join(bad))


def gather_fingerprints(fp: torch.Tensor, group, world: int, device) -> list[tuple[int, int, int]]:
    out = torch.empty(world * fp.numel(), dtype=torch.int64, device=device)
    all_gather_flat(out, fp.to(device), group=group)
    return [tuple(row) for row in out.view(world, -1).cpu().tolist()]


def gather_layouts(
    encoded: torch.Tensor, fingerprints, names: Sequence[str], group, world: int, device
) -> list[torch.Tensor]:
    """All processes' encodings; raises the same LayoutMismatch on every process."""
    counts = [fp[1] for fp in fingerprints]
    if len(set(counts)) > 1:
        detail = ", ".join(f"rank {r}: {n}" for r, n in enumerate(counts))
        raise LayoutMismatch(f"processes pass different numbers of tensors to the clip engine ({detail})")
    count = counts[0]
    out = torch.empty(world * count * _FIELDS, dtype=torch.int64, device=device)
    all_gather_flat(out, encoded.reshape(-1).to(device), group=group)
    layouts = list(out.cpu().view(world, count, _FIELDS))
    _compare(layouts, names)
    return layouts


def _compare(layouts: list[torch.Tensor], names: Sequence[str]) -> None:
    shared = [0, 1, 2, 3, 4, 8, 9, 10]  # everything but the block and range a process holds
    what = {0: "rank", 1: "shape", 2: "shape", 3: "tp_dim", 4: "tp_size", 8: "row_parts", 9: "strategy", 10: "name"}
    reference = layouts[0]
    for t in range(reference.shape[0]):
        for column in shared:
            values = [int(layout[t, column]) for layout in layouts]
            if len(set(values)) > 1:
                odd = [r for r, v in enumerate(values) if v != values[0]]
                raise LayoutMismatch(
                    f"tensor {t} ({names[t]!r} here) has a different {what[column]} on rank(s) {odd} than on rank 0"
                )


def remote_placements(local: Sequence[Placement], layout: torch.Tensor) -> list[Placement]:
    """Another process's placements: our global fields (checked equal) with its block and range."""
    return [
        dataclasses.replace(p, tp_block=int(row[5]), flat=(int(row[6]), int(row[7])))
        for p, row in zip(local, layout)
    ]
