"""Coupled Newton-Schulz iterations for the inverse square root of an SPD matrix.

Both iterations, the official plain Newton and accurate mode's minimax polynomials, work on
Â = A / a, where a >= λ_max(A), so the spectrum of Â lies in (0, 1]. With M = Z Y, the coupled
iteration

    T = p(M),   Y <- Y T,   Z <- T Z          (Y_0 = Â, Z_0 = I)

keeps Y = Â Z, so on an eigenvalue x of Â, with y = x z², it is the scalar map y <- y p(y)².
Newton's p(y) = (3 - y)/2 gives y <- φ(y) = y (3 - y)² / 4, which fixes y = 1, where z = x^(-1/2).
"""

from __future__ import annotations

import functools
import math

import torch


def inverse_sqrt_newton_schulz(a_hat: torch.Tensor, steps: int) -> torch.Tensor:
    """The official iteration: plain Newton, a fixed number of steps, in the input's dtype.

    On an eigenvalue x of Â the small y = x grows only x2.25 per step, so 10 steps resolve
    the inverse square root only down to x ~ 1e-3 (s_max/c <~ 10: see `spectra bench clip`).
    """
    eye = torch.eye(a_hat.size(-1), dtype=a_hat.dtype, device=a_hat.device)
    if not _identity_products_exact(a_hat):
        y, z = a_hat.clone(), eye.expand_as(a_hat).clone()
        for _ in range(steps):
            t = _newton_t(z @ y)
            y = y @ t
            z = t @ z
        return z
    # The same iteration with 3 of its products left out, bit for bit: the first step's two
    # products with Z_0 = I (exact in this dtype: one nonzero term per sum) and the last
    # step's Y, which nothing reads.
    y, z = a_hat, None
    for step in range(steps):
        t = _newton_t(y if z is None else z @ y)
        if step < steps - 1:
            y = y @ t
        z = t if z is None else t @ z
    return z


def _newton_t(m: torch.Tensor) -> torch.Tensor:
    """The official 0.5·(3I - M), bit for bit, in one pass over M: off the diagonal both are
    -M/2 rounded once; on it 1.5 - m/2 rounds as (3 - m)/2 does (halving is exact)."""
    t = m * -0.5
    t.diagonal(dim1=-2, dim2=-1).add_(1.5)
    return t


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


# Accurate mode's iteration: with T = α I + β M + γ M² the scalar map on σ = y^(1/2) is the odd
# polynomial g(σ) = σ (α + β σ² + γ σ⁴), the quintic Muon orthogonalizes with (γ = 0: a cubic,
# Newton's among them). Each step takes the g closest to 1 in max norm on the current interval
# [lo, hi] of σ (a Remez exchange), the greedy choice that "The Polar Express" (Amsel et al.,
# arXiv 2505.16932) proves optimal among compositions of odd polynomials; the interval is
# tracked exactly through g, so the schedule needs no look at the iterates (no device-to-host
# sync inside the loop). A quintic step costs 4 k x k products (M, M², Y·T, T·Z), a cubic 3;
# per product the quintic gains more while the interval is wide, and a cubic or two can close
# more cheaply. At s_max/c = 30: 5 steps, 15 products in all with G²; Newton scaled as well as
# it can be (γ = 0 throughout) needs 7-8 steps, 18-21 products.
Coefs = tuple[float, float, float]
_TAYLOR = {3: (1.5, -0.5, 0.0), 5: (15.0 / 8.0, -10.0 / 8.0, 3.0 / 8.0)}  # g(1+e) - 1 = O(e²), O(e³)
_NARROW = 1e-3  # below this width the Remez system is ill-conditioned, and Taylor is as good


def _poly(coefs: Coefs, s: float) -> float:
    alpha, beta, gamma = coefs
    return s * (alpha + s * s * (beta + s * s * gamma))


def _turning_points(coefs: Coefs) -> list[float]:
    """σ > 0 where g'(σ) = α + 3β σ² + 5γ σ⁴ = 0: at most a quadratic in σ²."""
    alpha, beta, gamma = coefs
    qa, qb = 5.0 * gamma, 3.0 * beta
    if qa == 0.0:
        return [math.sqrt(-alpha / qb)] if qb != 0.0 and -alpha / qb > 0.0 else []
    disc = qb * qb - 4.0 * qa * alpha
    if disc < 0.0:
        return []
    roots = ((-qb - math.sqrt(disc)) / (2.0 * qa), (-qb + math.sqrt(disc)) / (2.0 * qa))
    return sorted(math.sqrt(t) for t in roots if t > 0.0)


def _solve(rows: list[list[float]], rhs: list[float]) -> list[float]:
    """A small dense linear system, Gaussian elimination with partial pivoting."""
    a = [row + [b] for row, b in zip(rows, rhs)]
    n = len(a)
    for col in range(n):
        pivot = max(range(col, n), key=lambda r: abs(a[r][col]))
        a[col], a[pivot] = a[pivot], a[col]
        for r in range(col + 1, n):
            f = a[r][col] / a[col][col]
            a[r] = [v - f * w for v, w in zip(a[r], a[col])]
    x = [0.0] * n
    for r in reversed(range(n)):
        x[r] = (a[r][n] - sum(a[r][j] * x[j] for j in range(r + 1, n))) / a[r][r]
    return x


def _minimax(lo: float, hi: float, degree: int) -> Coefs:
    """The odd cubic or quintic closest to 1 in max norm on [lo, hi]. It equioscillates,
    1 ∓ E at lo, at its turning points inside and at hi; Remez moves the inner points to the
    turning points of the last solution until the level E settles (2-4 passes; the points
    themselves, extrema of a flat error, are only defined to about sqrt(eps))."""
    if hi - lo < _NARROW:
        return _TAYLOR[degree]
    powers, inner = (1, 3, 5)[: (degree + 1) // 2], (degree - 1) // 2
    points = [lo + (hi - lo) * f for f in (0.0, *[(j + 0.5) / inner for j in range(inner)], 1.0)]
    level = math.inf
    for _ in range(100):
        *solution, new_level = _solve([[x**p for p in powers] + [(-1.0) ** i] for i, x in enumerate(points)], [1.0] * len(points))
        coefs = (*solution, 0.0, 0.0)[:3]
        turning = [x for x in _turning_points(coefs) if lo < x < hi]
        if len(turning) != inner or abs(new_level - level) <= 1e-6 * abs(new_level):
            break
        points, level = [lo, *turning, hi], new_level
    return coefs


def _image(coefs: Coefs, lo: float, hi: float) -> tuple[float, float]:
    """g([lo, hi]) exactly: g at the ends and at its turning points inside."""
    values = [_poly(coefs, s) for s in (lo, hi, *[t for t in _turning_points(coefs) if lo < t < hi])]
    return min(values), max(values)


@functools.lru_cache(maxsize=4096)
def polynomial_schedule(lo: float, tol: float) -> tuple[Coefs, ...]:
    """(α, β, γ) of every step that takes the spectrum [lo, 1] of Â to |σ - 1| <= tol on the
    eigenvalues σ² of M (Z then equals Â^(-1/2) to about tol relative): of the schedules
    "minimax quintics, then minimax cubics", the one with the fewest k x k products."""
    if not 0.0 < lo <= 1.0:
        raise ValueError(f"the lower spectral bound must lie in (0, 1], got {lo}")

    def done(s_lo: float, s_hi: float) -> bool:
        return s_lo >= 1.0 - tol and s_hi <= 1.0 + tol

    def run(degree: int, s_lo: float, s_hi: float, limit: int) -> tuple[list[Coefs], float, float]:
        steps = []
        while not done(s_lo, s_hi) and len(steps) < limit:
            steps.append(_minimax(s_lo, s_hi, degree))
            s_lo, s_hi = _image(steps[-1], s_lo, s_hi)
        return steps, s_lo, s_hi

    best, quintics, s_lo, s_hi = None, [], math.sqrt(lo), 1.0
    while best is None or schedule_products(quintics) < schedule_products(best):
        cubics, *end = run(3, s_lo, s_hi, limit=6)
        if done(*end) and (best is None or schedule_products(quintics + cubics) < schedule_products(best)):
            best = quintics + cubics
        if done(s_lo, s_hi):
            break
        if len(quintics) == 64:
            raise RuntimeError(f"the schedule from lo={lo} did not reach tol={tol} in 64 steps")
        step, s_lo, s_hi = run(5, s_lo, s_hi, limit=1)
        quintics += step
    return tuple(best)


def schedule_products(steps) -> int:
    """k x k products of a schedule, given Â²: the first step's Y·T; after it M, M² in a
    quintic, Y·T and T·Z; no Y·T in the last step."""
    count = sum(1 if i == 0 else 3 + (c[2] != 0.0) for i, c in enumerate(steps))
    return count - 1 if steps else 0


def _quantized(lo: float) -> float:
    """lo rounded down to a power of 2^(1/16): a still valid bound, and few distinct schedules."""
    return min(1.0, 2.0 ** (math.floor(16.0 * math.log2(lo)) / 16.0))


def inverse_sqrt_polynomial(a_hat: torch.Tensor, a_hat_squared: torch.Tensor, los: list[float], tol: float, scale: list[float]) -> torch.Tensor:
    """scale[i] · Â_i^(-1/2) for each matrix of Â ((k, k) or (b, k, k)), its spectrum in [los[i], 1].

    Every matrix follows its own schedule; a shorter one is padded with T = I, which leaves
    Z exactly as it is, so a matrix's result does not depend on what it is batched with.
    Â² (the caller has it from G²) is the first step's M²; `scale` is folded into the last
    step's T. T = αI + M(βI + γM) takes one pass over M besides its product."""
    schedules = [polynomial_schedule(_quantized(lo), tol) for lo in los]
    steps = max(len(s) for s in schedules)
    eye = torch.eye(a_hat.size(-1), dtype=a_hat.dtype, device=a_hat.device)
    if steps == 0:
        return eye * as_batch(scale, a_hat)
    table = [[s[i] if i < len(s) else (1.0, 0.0, 0.0) for s in schedules] for i in range(steps)]
    table[-1] = [tuple(v * f for v in c) for c, f in zip(table[-1], scale)]
    # Every step's coefficients reach the device at once: (steps, 3, b[, 1, 1]).
    coefs = torch.tensor(table, dtype=a_hat.dtype, device=a_hat.device).transpose(1, 2)
    coefs = coefs.reshape(*coefs.shape, 1, 1) if a_hat.ndim == 3 else coefs.squeeze(-1)
    y, z = a_hat, None  # z = I until the first step, which saves its products with I
    for i, (alpha, beta, gamma) in enumerate(coefs):
        last = i == steps - 1
        quintic = any(c[2] != 0.0 for c in table[i])
        m = y if z is None else z @ y  # M = Â in the first step
        if not quintic:
            t = m * beta
        elif z is None:
            t = (a_hat * beta).addcmul_(a_hat_squared, gamma)
        else:
            t = m @ add_to_diagonal(m * gamma, beta)
        add_to_diagonal(t, alpha)
        y = None if last else y @ t  # the last Y: unused
        z = t if z is None else t @ z
    return z


def add_to_diagonal(x: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """x += values·I in place, values one per matrix (shaped by `as_batch`)."""
    x.diagonal(dim1=-2, dim2=-1).add_(values.squeeze(-1) if values.ndim else values)
    return x


def as_batch(values: list[float], like: torch.Tensor) -> torch.Tensor:
    """Per-matrix scalars shaped to broadcast against `like` ((k, n) or (b, k, n))."""
    t = torch.tensor(values, dtype=like.dtype, device=like.device)
    return t.reshape(-1, 1, 1) if like.ndim == 3 else t.reshape(())
