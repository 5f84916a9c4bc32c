"""The official code's clipping cost inside Megatron: every rank rebuilds every full matrix
from its TP x ZeRO pieces (one all-reduce each) and clips it itself, as the official
optimizer does under DDP. `spectra bench megatron`'s redundant-* rows; a baseline, not a
mode to train with."""

from __future__ import annotations


def make_redundant(optimizer) -> None:
    """Every rank rebuilds every full matrix and clips it itself (the official code's cost)."""
    for part in getattr(optimizer, "chained_optimizers", [optimizer]):
        if getattr(part, "spectra_entries", None):
            part.optimizer.clipper = RedundantClipper(part)


class RedundantClipper:
    """A Spectra Megatron optimizer's clipper the official way: one all-reduce per matrix
    rebuilds it from the TP x ZeRO pieces on every rank, and every rank clips it."""

    def __init__(self, part):
        from ..megatron.main_params import EntryClipper

        clipper, numerics = part.spectra_clipper, part.optimizer.numerics
        self.matrices = [e for e in clipper.entries if e.kind == "matrix"]
        # the 1-D params through the engine: negligible either way
        self.vectors = EntryClipper([e for e in clipper.entries if e.kind == "vector"], clipper.group, numerics)
        self.group, self.numerics = clipper.group, numerics

    verified_finite = False

    def clip(self, items, c, stage="update", also_check=()):
        import torch.distributed as dist

        from ..megatron.update_norms import full_matrix
        from ..ops import soft_spectral_clip

        vectors = [item for item in items if item.kind == "vector"]
        outs = dict(zip((item.param for item in vectors), self.vectors.clip(vectors, c, stage)))
        given = {item.param: item for item in items}
        device = next((e.main.device for e in self.matrices if e.main is not None), None)
        for e in self.matrices:
            item = given.get(e.main) if e.main is not None else None
            full = full_matrix(e, item.tensor if item is not None else None, device)
            dist.all_reduce(full, group=self.group)
            clipped = soft_spectral_clip(full, c, mode=self.numerics.mode, fp32=self.numerics.fp32)
            if item is not None:
                outs[e.main] = e.placement.piece_of(clipped).view_as(item.tensor)
        return [outs[item.param] for item in items]

    def find_nonfinite(self, tensors):
        return self.vectors.find_nonfinite(tensors)
