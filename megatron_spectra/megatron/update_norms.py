"""The spectral norm of every full matrix update, before and after clipping, for the logs.

Under TP and ZeRO-1 no process holds a whole update, so each matrix is rebuilt, one at a
time: every process writes its piece into a zero matrix of the full shape and one all-reduce
(SUM) over the optimizer's group adds the pieces up. Each piece is held by exactly one
process of the group, except a replicated one (a TP-replicated tensor, which every TP rank
holds the same range of; an expert replicated over expert DP without ZeRO): only the copy
whose entry is not marked `replica` contributes it. Process `i % world` takes the norm of matrix i, and
a last all-reduce tells every process all of them. This costs two all-reduces of every
matrix per step and one SVD per matrix per group, which is why it is off by default
(`spectra_log_update_norms`); the peak memory is one full matrix.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from .layouts import Entry


def update_norms(entries: list[Entry], before: dict, after: dict, group) -> dict:
    """{'spectra/update-norm-before/<name>': ||U||_2, '.../after/<name>': ||H_c(U)||_2, and the
    maxima over all matrices}, the same on every process of `group`. `before` and `after`
    map this process's main params to its pieces of U and H_c(U)."""
    matrices = [e for e in entries if e.kind == "matrix"]
    distributed = dist.is_initialized() and dist.get_world_size(group) > 1
    world, rank = (dist.get_world_size(group), dist.get_rank(group)) if distributed else (1, 0)
    device = next((t.device for t in before.values()), torch.device("cpu"))  # NCCL needs GPU tensors
    norms = torch.zeros(2, len(matrices), dtype=torch.float64, device=device)
    for i, entry in enumerate(matrices):
        for side, pieces in enumerate((before, after)):
            piece = pieces.get(entry.main) if entry.main is not None else None
            full = full_matrix(entry, piece, device)
            if distributed:
                dist.all_reduce(full, group=group)
            if i % world == rank:
                norms[side, i] = torch.linalg.matrix_norm(full.double(), ord=2)
    if distributed:
        dist.all_reduce(norms, group=group)
    scalars = {}
    for i, entry in enumerate(matrices):
        scalars[f"spectra/update-norm-before/{entry.name}"] = norms[0, i].item()
        scalars[f"spectra/update-norm-after/{entry.name}"] = norms[1, i].item()
    if matrices:
        scalars["spectra/update-norm-before-max"] = norms[0].max().item()
        scalars["spectra/update-norm-after-max"] = norms[1].max().item()
    return scalars


def full_matrix(entry: Entry, piece: torch.Tensor | None, device) -> torch.Tensor:
    """This process's contribution to the full matrix: its piece (of the main param: its
    entry's part of it) in place, zeros elsewhere (only zeros from a replica)."""
    p = entry.placement
    if piece is not None:
        piece = entry.piece_of_main(piece)
    if piece is None or piece.numel() == 0 or entry.replica:
        return torch.zeros(p.matrix_shape, dtype=torch.float32, device=device)
    return p.embed(piece.float().to(device)).reshape(p.matrix_shape)
