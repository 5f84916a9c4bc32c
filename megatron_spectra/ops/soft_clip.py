"""Soft spectral clipping (SSC), the operator SPECTRA trains with.

    h_c(s) = s / sqrt(1 + s²/c²)        H_c(X) = (I + X Xᵀ/c²)^(-1/2) X = X (I + XᵀX/c²)^(-1/2)

Everything here works on the smaller Gram side: a matrix is turned wide (k x n, k <= n) and
H_c(X) = F X with F = (I + G/c²)^(-1/2), G = X Xᵀ. Because G is a sum over columns, the
same code clips a matrix whose columns are spread over several processes: each holds a
column block, the k x k Grams are summed by `reduce`, and every holder applies F to its own
block. The distributed engine passes a reducer; in one process it is the identity.

Two numerics:
- "paper": the official code line by line (mlolab/llm-spectral-clipping, `clip_sigvals`):
  bf16 (fp32 on request), bound s = min(Gershgorin, Frobenius) of G, a = 1 + s/c²,
  10 plain coupled Newton-Schulz steps on (I + G/c²)/a, no early exit.
- "accurate": fp32, the relative error of every singular value s_i >= 1e-4 s_max against
  h_c(s_i) is below 1e-3 for any s_max/c. See `accurate.py` for how and why.

`soft_spectral_clip` is the checked entry point (real floating dtype, finite entries, paper
mode's range, see its doc). `clip_wide` and `clip_vector` are the optimizer's and engine's:
unchecked (paper mode's matrix clip stays free of device syncs, as the official one), and
non-finite input gives a non-finite result in both modes, for the caller's finiteness check
to name.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Sequence

import torch

from .accurate import clip_accurate
from .newton_schulz import as_batch, inverse_sqrt_newton_schulz
from .reducer import LOCAL, Reducer

Mode = Literal["paper", "accurate"]
MODES = ("paper", "accurate")
POST_PROCESSES = ("clip", "normalize")
MUON_QUINTIC = (3.4445, -4.7750, 2.0315)  # the official normalize_sigvals' coefficients (Muon's)


@dataclass(frozen=True)
class ClipNumerics:
    """How SSC is computed. `ns_steps` and `fp32` are the official knobs (paper mode only).

    post="normalize" swaps SSC for the official `normalize_sigvals` (paper mode only): every
    singular value set to ~1 by Muon's quintic Newton-Schulz, a vector to u/(|u| + 1e-7);
    thresholds are then ignored. Every function here that takes a numerics follows it."""

    mode: Mode = "paper"
    ns_steps: int = 10
    fp32: bool = False
    post: str = "clip"

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"unknown SSC mode {self.mode!r}; expected one of {MODES}")
        if not isinstance(self.ns_steps, int) or self.ns_steps < 1:
            raise ValueError(f"ns_steps must be a positive int, got {self.ns_steps!r}")
        if self.post not in POST_PROCESSES:
            raise ValueError(f"unknown post_process {self.post!r}; expected one of {POST_PROCESSES}")
        if self.post == "normalize" and self.mode != "paper":
            raise ValueError("post_process='normalize' is the official function: paper mode only")


def check_threshold(c: float) -> float:
    if isinstance(c, bool) or not isinstance(c, (int, float)):
        raise TypeError(f"the clipping threshold c must be a number, got {type(c).__name__}")
    if not (math.isfinite(c) and c > 0):
        raise ValueError(f"the clipping threshold c must be finite and > 0, got {c}")
    return float(c)


def soft_spectral_clip(
    x: torch.Tensor, c: float, *, mode: Mode = "paper", ns_steps: int = 10, fp32: bool = False
) -> torch.Tensor:
    """H_c(x) for a vector (n,), a matrix (m, n) or a batch of same-shape matrices (b, m, n).

    Vectors follow the official rule in paper mode, u / sqrt(1 + |u|²/c²) only when |u| > c
    (discontinuous at |u| = c); accurate mode applies h_c to |u| always, which is the SSC of
    the vector seen as a 1 x n matrix.

    x must be a real floating-point tensor with finite entries (else TypeError / ValueError);
    an empty x gives an empty result. Paper mode is the official algorithm, bit for bit. Where
    its arithmetic overflows or underflows (entries ~1e20 or ~1e-30: inf/NaN out, or 0 from a
    vector whose |u|²/c² overflows), it is rerun on x and c scaled by the power of two that
    brings max|x| into [0.5, 1): exact, so H_c is unchanged. If that overflows too, s_max/c
    is beyond its single Newton-Schulz stage (~1e19): a ValueError; accurate mode clips in
    stages and takes any ratio.
    """
    c = check_threshold(c)
    numerics = ClipNumerics(mode, ns_steps, fp32)
    check_input(x, "soft_spectral_clip")
    if x.ndim not in (1, 2, 3):
        raise ValueError(f"soft_spectral_clip takes a vector, a matrix or a batch (b, m, n); got shape {tuple(x.shape)}")
    if x.numel() == 0:
        return x.clone()
    amax = float(x.abs().amax())  # device syncs are fine here: this is the checked public entry point
    if not math.isfinite(amax):
        raise ValueError("soft_spectral_clip: the input has non-finite values (inf or NaN)")
    out = _clip_one(x, c, numerics)
    if mode == "accurate" or not _paper_overflowed(x, c, out):
        return out
    exponent = min(max(-math.frexp(amax)[1], -1000), 1000)  # 2^exponent·max|x| in [0.5, 1), representable
    scaled_c = math.ldexp(c, exponent)
    if math.isinf(scaled_c):  # c is > 1e300 times every entry: H_c(x) = x in any precision
        return x.clone()
    scaled = (x.double() * math.ldexp(1.0, exponent)).to(x.dtype)  # exact, also where 2^exponent is not an x.dtype
    out = _clip_one(scaled, scaled_c, numerics)
    if _paper_overflowed(scaled, scaled_c, out):
        raise ValueError(
            f"soft_spectral_clip: paper mode overflowed at max|x|/c = {amax / c:.1e}: its one Newton-Schulz stage "
            f"needs I + XXᵀ/c² (and, for a vector, |x|²/c²) representable in {_paper_dtype(x, numerics)}, "
            f"i.e. s_max/c below ~1e19; use mode='accurate', which clips in stages"
        )
    return (out.double() * math.ldexp(1.0, -exponent)).to(x.dtype)


def _paper_dtype(x: torch.Tensor, numerics: ClipNumerics) -> torch.dtype:
    if x.ndim == 1:
        return x.dtype  # the vector rule computes in x's dtype
    return torch.float32 if numerics.fp32 else torch.bfloat16


def _paper_overflowed(x: torch.Tensor, c: float, out: torch.Tensor) -> bool:
    """Did the official arithmetic overflow or underflow? A matrix then comes out inf/NaN (a
    Gram of 0s divided by c² ~ 0 too); the vector rule's |u| is checked as it computes it:
    inf (|u|²/c² overflows: 0 out) or 0 for a nonzero u (u unclipped)."""
    if x.ndim == 1:
        norm = x.norm()
        return bool(torch.isinf((norm / c) ** 2)) or (float(norm) == 0.0 and bool(x.any()))
    return not bool(torch.isfinite(out).all())


def _clip_one(x: torch.Tensor, c: float, numerics: ClipNumerics) -> torch.Tensor:
    if x.ndim == 1:
        return clip_vector(x, c, numerics)
    tall = x.size(-2) > x.size(-1)
    (out,) = clip_wide([x.mT if tall else x], [c], numerics, shared_bound=True)
    return out.mT if tall else out


def check_input(x, what: str) -> None:
    """A dense real floating-point tensor, or a TypeError naming what it is."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{what} expects a torch.Tensor, got {type(x).__name__}")
    if x.layout != torch.strided:
        raise TypeError(f"{what} takes a dense tensor, got layout {x.layout}")
    if not x.dtype.is_floating_point:  # ints and bools would come back as zeros, complex without its imaginary part
        raise TypeError(f"{what} takes a real floating-point tensor, got dtype {x.dtype}")


def normalize_singular_values(x: torch.Tensor, *, ns_steps: int = 10, fp32: bool = False) -> torch.Tensor:
    """The official `normalize_sigvals` (Muon's quintic Newton-Schulz: every singular value to
    ~1) of a vector, a matrix or a batch (b, m, n), bit for bit; returned in x's dtype."""
    numerics = ClipNumerics("paper", ns_steps, fp32, "normalize")
    check_input(x, "normalize_singular_values")
    if x.ndim not in (1, 2, 3):
        raise ValueError(f"normalize_singular_values takes a vector, a matrix or a batch (b, m, n); got shape {tuple(x.shape)}")
    if x.numel() == 0:
        return x.clone()
    if x.ndim == 1:
        return clip_vector(x, 1.0, numerics)
    tall = x.size(-2) > x.size(-1)
    (out,) = clip_wide([x.mT if tall else x], [1.0], numerics)
    return out.mT if tall else out


def clip_vector(u: torch.Tensor, c: float, numerics: ClipNumerics, norm: torch.Tensor | None = None) -> torch.Tensor:
    """The vector rule; `norm` is |u| when u is spread over processes (pass the global norm).

    Paper mode is the official expression in u's dtype (`G.norm()`, and the threshold compared
    and divided in that dtype too): bit for bit in bf16, fp32 and fp64. Accurate mode: fp32."""
    if numerics.mode == "paper":
        norm = u.norm() if norm is None else norm.to(u.dtype)
        if numerics.post == "normalize":
            return u / (norm + 1e-7)
        # The official `u if norm <= c else u / sqrt(...)`, chosen on the device: the same
        # values, without a host read per vector.
        return torch.where(norm <= c, u, u / torch.sqrt(1 + (norm / c) ** 2))
    norm = torch.linalg.vector_norm(u.float()) if norm is None else norm.float()
    # h_c(s)/s = 1/sqrt(1 + s²/c²) written as c/hypot(c, s) so that a huge s cannot overflow.
    scale = c / torch.hypot(torch.as_tensor(c, dtype=norm.dtype, device=norm.device), norm)
    return (u.float() * scale).to(u.dtype)


def clip_wide(
    xs: Sequence[torch.Tensor],
    cs: Sequence[float | Sequence[float]],
    numerics: ClipNumerics,
    reduce: Reducer = LOCAL,
    shared_bound: bool = False,
    roots: Sequence[bool] | None = None,
) -> list[torch.Tensor]:
    """H_c of wide matrices X_i (k_i <= n_i), each (k, n) or a batch (b, k, n).

    cs[i] is X_i's threshold, or one per matrix of a batch. xs[i] may be only this process's
    column block of X_i; `reduce` then sums the Grams over the processes holding X_i, and
    roots[i] says whether this process computes X_i's k x k factor F (exactly one holder
    does; `reduce.share_` hands it to the others). `shared_bound` takes one normalisation
    for a whole batch, as the official code does for a batched input (paper mode);
    otherwise every matrix gets its own, as when the official optimizer clips parameters
    one by one. Results come back in each input's dtype.
    """
    roots = [True] * len(xs) if roots is None else list(roots)
    if numerics.post == "normalize":
        return _normalize(xs, numerics, reduce)
    cs = [_per_matrix([check_threshold(v) for v in _listify(c)], x) for c, x in zip(cs, xs)]
    if numerics.mode == "paper":
        return _paper(xs, cs, numerics, reduce, shared_bound, roots)
    return clip_accurate(xs, cs, reduce, roots)


def _listify(c) -> list[float]:
    return list(c) if isinstance(c, (list, tuple)) else [c]


def _per_matrix(cs: list[float], x: torch.Tensor) -> list[float]:
    batch = x.shape[0] if x.ndim == 3 else 1
    if len(cs) == 1:
        return cs * batch
    if len(cs) != batch:
        raise ValueError(f"{len(cs)} thresholds for a batch of {batch} matrices")
    return cs


# ----------------------------------------------------------------------------- paper mode


def _paper(xs, cs, numerics: ClipNumerics, reduce: Reducer, shared_bound: bool, roots: list[bool]) -> list[torch.Tensor]:
    dtype = torch.float32 if numerics.fp32 else torch.bfloat16
    xs_c = [x.to(dtype) for x in xs]
    grams = [(x @ x.mT).float() for x in xs_c]  # summed in fp32, rounded back as one matmul would be
    reduce.sum_(grams)
    factors = [_paper_factor(g.to(dtype), c, numerics, shared_bound) if mine else torch.zeros_like(g, dtype=dtype)
               for g, c, mine in zip(grams, cs, roots)]
    reduce.share_(factors)  # on every holder alike (a no-op in one process)
    return [(f @ x).to(x_in.dtype) for f, x, x_in in zip(factors, xs_c, xs)]


def _paper_factor(gram: torch.Tensor, c: list[float], numerics: ClipNumerics, shared_bound: bool) -> torch.Tensor:
    """F = (I + G/c²)^(-1/2) as the official code computes it, from the summed Gram."""
    dtype = gram.dtype
    # Upper bound on λ_max(G): min(Gershgorin, Frobenius), per matrix or over the batch.
    gershgorin = gram.abs().sum(dim=-1).amax(dim=-1, keepdim=True).unsqueeze(-1)
    frobenius = gram.norm(dim=(-2, -1), keepdim=True)
    if shared_bound:
        gershgorin, frobenius = gershgorin.max(), frobenius.max()
    s = torch.minimum(gershgorin, frobenius)
    c2 = c[0] ** 2 if len(set(c)) == 1 else as_batch([v**2 for v in c], gram)
    eye = torch.eye(gram.size(-1), dtype=dtype, device=gram.device)
    a_mat = eye + gram / c2
    a = 1.0 + s / c2
    z = inverse_sqrt_newton_schulz(a_mat / a, numerics.ns_steps)
    return z / torch.sqrt(a)


def _normalize(xs, numerics: ClipNumerics, reduce: Reducer) -> list[torch.Tensor]:
    """The official `normalize_sigvals` of wide matrices, op for op: X/(|X|_F + 1e-7), then
    `ns_steps` quintic steps X <- aX + (bA + cA²)X, A = XXᵀ, in bf16 (fp32 on request). A
    column block of X needs the sums over its holders of |X|_F² and of every step's A."""
    dtype = torch.float32 if numerics.fp32 else torch.bfloat16
    a, b, c = MUON_QUINTIC
    xs_c = [x.to(dtype) for x in xs]
    if reduce.local:  # nothing to sum: the official ops exactly
        norms = [x.norm(dim=(-2, -1), keepdim=True) for x in xs_c]
    else:
        norms = [x.float().square().sum(dim=(-2, -1), keepdim=True) for x in xs_c]
        reduce.sum_(norms)
        norms = [n.sqrt().to(dtype) for n in norms]
    xs_c = [x / (n + 1e-7) for x, n in zip(xs_c, norms)]
    for _ in range(numerics.ns_steps):
        grams = [x @ x.mT for x in xs_c]
        if not reduce.local:
            grams = [g.float() for g in grams]
            reduce.sum_(grams)
            grams = [g.to(dtype) for g in grams]
        xs_c = [a * x + (b * g + c * g @ g) @ x for x, g in zip(xs_c, grams)]
    return [x.to(x_in.dtype) for x, x_in in zip(xs_c, xs)]
