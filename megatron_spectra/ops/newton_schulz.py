"""Coupled Newton-Schulz iterations for the inverse square root of an SPD matrix.

Both iterations work on Â = A / a, where a >= λ_max(A), so the spectrum of Â lies in (0, 1].
With M = Z Y, the coupled iteration

    T = p(M),   Y <- Y T,   Z <- T Z          (Y_0 = Â, Z_0 = I)

keeps Y = Â Z, so on an eigenvalue x of Â, with y = x z², it is the scalar map y <- y p(y)².
Newton's p(y) = (3 - y)/2 gives y <- φ(y) = y (3 - y)² / 4, which fixes y = 1, where z = x^(-1/2).
"""

from __future__ import annotations

import math

import torch


def _phi(t: float) -> float:
    """Newton's map on y = x z²; increasing on [0, 1], decreasing on [1, 3], zero at 3."""
    return t * (3.0 - t) ** 2 / 4.0


def inverse_sqrt_newton_schulz(a_hat: torch.Tensor, steps: int) -> torch.Tensor:
    """The official iteration: plain Newton, a fixed number of steps, in the input's dtype.

    On an eigenvalue x of Â the small y = x grows only x2.25 per step, so 10 steps resolve
    the inverse square root only down to x ~ 1e-3 (s_max/c <~ 10: see `spectra bench clip`).
    """
    eye = torch.eye(a_hat.size(-1), dtype=a_hat.dtype, device=a_hat.device)
    if not _identity_products_exact(a_hat):
        y, z = a_hat.clone(), eye.expand_as(a_hat).clone()
        for _ in range(steps):
            t = 0.5 * (3.0 * eye - z @ y)
            y = y @ t
            z = t @ z
        return z
    # The same iteration with 3 of its products left out, bit for bit: the first step's two
    # products with Z_0 = I (exact in this dtype: one nonzero term per sum) and the last
    # step's Y, which nothing reads.
    y, z = a_hat, None
    for step in range(steps):
        t = 0.5 * (3.0 * eye - (y if z is None else z @ y))
        if step < steps - 1:
            y = y @ t
        z = t if z is None else t @ z
    return z


def _identity_products_exact(x: torch.Tensor) -> bool:
    """Does a matmul with I return the other factor unchanged here? In bf16/fp16 and in full
    fp32, yes; fp32 matmuls allowed to round their inputs (TF32, oneDNN's bf16 under
    float32_matmul_precision != "highest") change it, and the official result with them."""
    if x.dtype in (torch.bfloat16, torch.float16, torch.float64):
        return True
    if x.dtype != torch.float32:
        return False
    if x.device.type == "cuda" and torch.backends.cuda.matmul.allow_tf32:
        return False
    return torch.get_float32_matmul_precision() == "highest"


# Scaled Newton: with T = γ^(-1/2) (3I - M/γ)/2 the scalar map becomes y <- φ(y/γ), so a γ
# that stretches the current interval [lo, hi] of y towards 3 multiplies a small y by up to
# (9/4)·(hi/γ) instead of 9/4. We never stretch the top of the interval past _T_MAX: φ falls
# to 0 at 3, and a rounding error that pushes an eigenvalue there would stall it for good.
# With _T_MAX = 2.5 the small end grows x5.6 per step; step counts to |y - 1| <= 1e-4
# (3 matmuls each): s_max/c = 10: 5 (Newton 9), 100: 8 (Newton 15), 1e4: 13 (Newton 26).
_T_MAX = 2.5


def _balanced_gamma(lo: float, hi: float) -> float:
    """γ maximising the new lower end min(φ(lo/γ), φ(hi/γ)), with hi/γ in [1, _T_MAX]."""
    rho = lo / hi

    def gap(t: float) -> float:  # increasing in t on [1, 3)
        return _phi(t * rho) - _phi(t)

    if gap(_T_MAX) <= 0.0:
        return hi / _T_MAX
    if gap(1.0) >= 0.0:
        return hi
    left, right = 1.0, _T_MAX
    for _ in range(50):
        mid = 0.5 * (left + right)
        left, right = (mid, right) if gap(mid) < 0.0 else (left, mid)
    return hi / (0.5 * (left + right))


def scaled_newton_schedule(lo: float, tol: float) -> list[float]:
    """The γ of every step that takes the spectrum [lo, 1] of Â to within tol of 1.

    The interval of y is tracked exactly through the scalar map, as Polar Express does for
    the polar factor, so the schedule is optimal for the bound we were given and needs no
    check of the iterates (no device-to-host sync inside the loop).
    """
    if not 0.0 < lo <= 1.0:
        raise ValueError(f"the lower spectral bound must lie in (0, 1], got {lo}")
    hi, gammas = 1.0, []
    while lo < 1.0 - tol or hi > 1.0 + tol:
        gamma = _balanced_gamma(lo, hi)
        t_lo, t_hi = lo / gamma, hi / gamma
        lo, hi = min(_phi(t_lo), _phi(t_hi)), (1.0 if t_lo <= 1.0 <= t_hi else max(_phi(t_lo), _phi(t_hi)))
        gammas.append(gamma)
    return gammas


def inverse_sqrt_scaled_newton(a_hat: torch.Tensor, lo: float, tol: float, a_hat_squared: torch.Tensor | None = None) -> torch.Tensor:
    """Â^(-1/2) for Â with spectrum in [lo, 1], accurate to about tol/2 relative.

    `a_hat_squared` (Â², if the caller has it) saves the first step's Y·T: with Y_0 = Â and
    T_0 a polynomial in Â, Y_1 = Â·T_0 is a combination of Â and Â²."""
    eye = torch.eye(a_hat.size(-1), dtype=a_hat.dtype, device=a_hat.device)
    y, z = a_hat, None  # z = I until the first step, which saves its two products with I
    gammas = scaled_newton_schedule(lo, tol)
    for i, gamma in enumerate(gammas):
        m = y if z is None else z @ y
        scale = 0.5 / math.sqrt(gamma)
        t = scale * (3.0 * eye - m / gamma)
        if i == len(gammas) - 1:
            y = None  # the last Y: unused
        elif z is None and a_hat_squared is not None:
            y = scale * (3.0 * a_hat - a_hat_squared / gamma)
        else:
            y = y @ t
        z = t if z is None else t @ z
    return eye.expand_as(a_hat).clone() if z is None else z
