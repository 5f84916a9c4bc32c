"""Checking, before any data moves, that all processes describe the same tensors.

A layout that disagrees across processes would otherwise surface as mismatched collective
sizes, which gloo answers by killing peers ("connection reset") and NCCL by hanging. Every
call starts with one fixed-size all-gather of a fingerprint; only when the fingerprints
change are the full descriptions exchanged (padded to one size) and compared field by field,
so every process raises the same error, naming the tensor and the processes that disagree.
"""

from __future__ import annotations

import dataclasses
import hashlib
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


def fingerprint(encoded: torch.Tensor, thresholds: Sequence[float], finite: bool) -> torch.Tensor:
    """(layout hash, tensor count, threshold hash, all inputs finite): 4 int64 per process."""
    layout = _hash(encoded.numpy().tobytes())
    cs = _hash(struct.pack(f"<{len(thresholds)}d", *thresholds))
    return torch.tensor([layout, encoded.shape[0], cs, int(finite)], dtype=torch.int64)


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
