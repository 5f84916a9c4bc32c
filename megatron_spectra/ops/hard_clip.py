"""The exact hard spectral clip, by SVD: the reference the Newton-Schulz operators are checked against."""

from __future__ import annotations

import torch


def spectral_clip(x: torch.Tensor, c: float) -> torch.Tensor:
    """clip_c(X) = P diag(min(s_i, c)) Qᵀ, the projection onto the spectral ball of radius c.

    Matrices (m, n) and batches (b, m, n); computed in float64 and returned in x's dtype.
    """
    return _apply_to_singular_values(x, lambda s: s.clamp(max=c))


def soft_spectral_clip_svd(x: torch.Tensor, c: float) -> torch.Tensor:
    """H_c(X) = P diag(h_c(s_i)) Qᵀ, h_c(s) = s / sqrt(1 + s²/c²): the exact soft clip."""
    return _apply_to_singular_values(x, lambda s: s / torch.sqrt(1 + (s / c) ** 2))


def _apply_to_singular_values(x: torch.Tensor, f) -> torch.Tensor:
    if x.ndim not in (2, 3):
        raise ValueError(f"expected a matrix or a batch of matrices, got shape {tuple(x.shape)}")
    u, s, vh = torch.linalg.svd(x.double(), full_matrices=False)
    return ((u * f(s).unsqueeze(-2)) @ vh).to(x.dtype)
