"""Which tensors are finite, at the cost of one sum each.

A sum is finite only if every entry is (a NaN or an inf entry makes it NaN or inf), so one
read of each tensor clears the common case; `torch.isfinite(t).all()` writes a bool per
entry and reads it back, ~10x the time on a CPU. Only where a sum is not finite, which a
huge but finite tensor can also cause, is that tensor checked entry by entry.
"""

from __future__ import annotations

from typing import Sequence

import torch


def finite_flags(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """A bool per tensor: all its entries are finite (an empty tensor is)."""
    if not tensors:
        return torch.ones(0, dtype=torch.bool)
    sums = torch.stack([t.sum(dtype=_sum_dtype(t)).reshape(()).to(torch.float64, copy=False) for t in tensors])
    flags = torch.isfinite(sums)
    if bool(flags.all()):
        return flags
    return torch.stack([torch.isfinite(t).all() if not f else f for t, f in zip(tensors, flags)])


def _sum_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float32 if t.dtype in (torch.bfloat16, torch.float16) else t.dtype
