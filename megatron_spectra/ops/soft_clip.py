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
  h_c(s_i) is below 1e-3 for any s_max/c. See `_accurate` for how and why.

`soft_spectral_clip` is the checked entry point (real floating dtype, finite entries, paper
mode's range, see its doc). `clip_wide` and `clip_vector` are the optimizer's and engine's:
unchecked (paper mode's matrix clip stays free of device syncs, as the official one), and
non-finite input gives a non-finite result in both modes, for the caller's finiteness check
to name.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Literal, Sequence

import torch

from .newton_schulz import inverse_sqrt_newton_schulz, inverse_sqrt_scaled_newton

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


class Reducer:
    """Sums (or maxes) per-process partial results in place; a no-op in one process.

    `share_` hands every process the tensors that one process each computed (the others
    pass zeros): the k x k factors of `clip_wide(..., roots=...)`. `meanwhile` is local work
    to run before the first share (once; `catch_up` runs it if no share came): the caller's
    other clips, so that no process idles at the exchange while the roots are computed."""

    def __init__(self, meanwhile: Callable[[], None] | None = None):
        self._meanwhile = meanwhile

    def sum_(self, tensors: Sequence[torch.Tensor]) -> None:
        pass

    def max_(self, tensors: Sequence[torch.Tensor]) -> None:
        pass

    def share_(self, tensors: Sequence[torch.Tensor]) -> None:
        self.catch_up()
        self.sum_(tensors)  # x + 0 + ... + 0 = x exactly

    def catch_up(self) -> None:
        work, self._meanwhile = self._meanwhile, None
        if work is not None:
            work()


LOCAL = Reducer()


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
    return _accurate(xs, cs, reduce, roots)


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
    c2 = c[0] ** 2 if len(set(c)) == 1 else _as_batch([v**2 for v in c], gram)
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
    alone = type(reduce) is Reducer  # nothing to sum: the official ops exactly
    if alone:
        norms = [x.norm(dim=(-2, -1), keepdim=True) for x in xs_c]
    else:
        norms = [x.float().square().sum(dim=(-2, -1), keepdim=True) for x in xs_c]
        reduce.sum_(norms)
        norms = [n.sqrt().to(dtype) for n in norms]
    xs_c = [x / (n + 1e-7) for x, n in zip(xs_c, norms)]
    for _ in range(numerics.ns_steps):
        grams = [x @ x.mT for x in xs_c]
        if not alone:
            grams = [g.float() for g in grams]
            reduce.sum_(grams)
            grams = [g.to(dtype) for g in grams]
        xs_c = [a * x + (b * g + c * g @ g) @ x for x, g in zip(xs_c, grams)]
    return [x.to(x_in.dtype) for x, x_in in zip(xs_c, xs)]


# -------------------------------------------------------------------------- accurate mode
#
# Two things limit the official iteration, and each gets its own fix:
#
# 1. Too few steps. On an eigenvalue x of Â = (I + G/c²)/a the plain Newton step grows the
#    small x only x2.25, so the unclipped bulk (x ~ 1/a) is still shrunk after 10 steps once
#    s_max/c >~ 10. We use the scaled Newton schedule of `newton_schulz.py` and run it to
#    |y - 1| <= 1e-6 (fp32 round-off level, so that differently batched runs agree to ~1e-7):
#    9 steps at s_max/c = 100: their 27 k x k products less the first step's 3 (Z_0 = I, and
#    Y_1 from G²) and the last, unread Y, plus G² itself: 24, with the Gram and the final
#    product 26 matmuls against the official 32; 11 steps if the bound on s_max² is 30-fold
#    too high; 14 steps at s_max/c = 1e4. The bound is min(Gershgorin, |G|_F, |G²|_F^(1/2)).
#
# 2. The Gram squares the dynamic range. fp32 rounding puts an absolute error of about
#    eps·s_max² on G, which moves the small eigenvalues s_i² and hence h_c(s_i) by a relative
#    eps·(s_max/c)²: harmless at 100 (6e-4 at worst, ~1e-5 measured) and fatal at 1e4.
#    h_c composes, 1/h_{c1}(h_{c2}(s))² = 1/s² + 1/c1² + 1/c2², so for s_max/c > _ONE_STAGE
#    we clip in stages: first at c1 = s_max/_STAGE_RATIO, which compresses the top of the
#    spectrum and barely touches the rest, then again on the result with the remaining
#    threshold. Each stage sees a ratio <= _ONE_STAGE, and the error stays ~eps·s_max/c.
#
# The input is first divided by its largest |entry| (so the Gram cannot overflow), and every
# stage rescales its factor to keep the running matrix O(1): finite input, finite output.

_ONE_STAGE = 32.0
_STAGE_RATIO = 16.0
_NS_TOL = 1e-6


def _accurate(xs, cs, reduce: Reducer, roots: list[bool]) -> list[torch.Tensor]:
    xs32 = [x.float() for x in xs]
    amax = [_abs_max(x) for x in xs32]
    reduce.max_(amax)
    amax_host = [a.double().tolist() for a in amax]
    # Non-finite in, NaN out (as paper mode's arithmetic gives): the caller's finiteness check
    # names it. Decided on the reduced maxima, so every holder of a matrix decides alike.
    bad = {i for i, a in enumerate(amax_host) if not all(math.isfinite(v) for v in a)}
    scales = [[v if 0 < v < math.inf else 1.0 for v in a] for a in amax_host]  # per matrix of each item
    xs32 = [x / _as_batch(s, x) if i not in bad else torch.full_like(x, math.nan) for i, (x, s) in enumerate(zip(xs32, scales))]
    remaining = [[c / v for c, v in zip(cc, s)] for cc, s in zip(cs, scales)]  # threshold in running units
    out_scale = [list(s) for s in scales]
    active = [i for i in range(len(xs32)) if i not in bad]
    while active:
        grams = [xs32[i] @ xs32[i].mT for i in active]
        reduce.sum_(grams)
        factors = []
        for i, gram in zip(active, grams):  # every holder plans alike: the summed Gram is the same
            bounds = _lambda_max_bound(gram).double().tolist()
            stage_c, rescale, remaining[i] = _plan_stage(bounds, remaining[i])
            out_scale[i] = [o * r for o, r in zip(out_scale[i], rescale)]
            # Dividing by `rescale` (the stage threshold of a matrix that has more stages to
            # go) brings its output, of spectral norm <= stage_c, back to O(1).
            factors.append(_inverse_sqrt_factor(gram, stage_c, bounds) / _as_batch(rescale, gram) if roots[i] else torch.zeros_like(gram))
        reduce.share_(factors)
        for i, factor in zip(active, factors):
            xs32[i] = factor @ xs32[i]
        active = [i for i in active if any(math.isfinite(r) for r in remaining[i])]
    return [(x * _as_batch(s, x)).to(x_in.dtype) for x, s, x_in in zip(xs32, out_scale, xs)]


def _abs_max(x: torch.Tensor) -> torch.Tensor:
    """Largest |entry| per matrix; 0 for a process holding no columns of it."""
    if x.numel() == 0:
        return x.new_zeros(x.shape[0] if x.ndim == 3 else 1)
    return x.abs().amax(dim=(-2, -1)).reshape(-1)


def _plan_stage(bounds: list[float], remaining: list[float]):
    """Per matrix: this stage's threshold, the rescale after it, and the threshold left.

    A matrix with nothing left to clip (remaining = inf) gets the identity stage, c = inf.
    """
    stage_c, rescale, left = [], [], []
    for s, c in zip(bounds, remaining):
        top = math.sqrt(max(s, 0.0))
        if math.isinf(c) or top <= _ONE_STAGE * c:
            stage_c.append(c), rescale.append(1.0), left.append(math.inf)
        else:
            stage = top / _STAGE_RATIO
            # 1/c'² = 1/c² - 1/stage²: what is left after this stage, in the rescaled units.
            stage_c.append(stage), rescale.append(stage)
            left.append(1.0 / math.sqrt(1.0 / c**2 - 1.0 / stage**2) / stage)
    return stage_c, rescale, left


def _lambda_max_bound(gram: torch.Tensor) -> torch.Tensor:
    """min(Gershgorin, Frobenius) >= λ_max(G), per matrix, flattened over the batch."""
    gershgorin = gram.abs().sum(dim=-1).amax(dim=-1)
    frobenius = torch.linalg.matrix_norm(gram)
    return torch.minimum(gershgorin, frobenius).reshape(-1)


def _inverse_sqrt_factor(gram: torch.Tensor, cs: list[float], bounds: list[float]) -> torch.Tensor:
    """(I + G/c²)^(-1/2) for each matrix of `gram` (k, k) or (b, k, k), with its own c.

    G² costs one k x k product and pays for itself twice: |G²|_F^(1/2) = (Σλ⁴)^(1/4) bounds
    λ_max(G) more tightly than Gershgorin and Frobenius (1.3-2.3x above it on Adam-like
    updates, against 2.7-4x), which saves about one Newton step (3 products) where the
    bound was loose, and Â² from G² saves the first step's Y·T."""
    gram_sq = gram @ gram
    tight = torch.linalg.matrix_norm(gram_sq).sqrt().reshape(-1).double().tolist()
    bounds = [min(b, t) for b, t in zip(bounds, tight)]
    inv_c2 = [0.0 if math.isinf(c) else 1.0 / c**2 for c in cs]
    a = [1.0 + max(s, 0.0) * w for s, w in zip(bounds, inv_c2)]  # a >= λ_max(I + G/c²)
    eye = torch.eye(gram.size(-1), dtype=gram.dtype, device=gram.device)
    w, scale = _as_batch(inv_c2, gram), _as_batch(a, gram)
    a_hat = (eye + gram * w) / scale
    a_hat_squared = (eye + gram * (2.0 * w) + gram_sq * (w * w)) / (scale * scale)  # (I + G/c²)²/a²
    z = inverse_sqrt_scaled_newton(a_hat, lo=1.0 / max(a), tol=_NS_TOL, a_hat_squared=a_hat_squared)
    return z / _as_batch([math.sqrt(v) for v in a], z)


def _as_batch(values: list[float], like: torch.Tensor) -> torch.Tensor:
    """Per-matrix scalars shaped to broadcast against `like` ((k, n) or (b, k, n))."""
    t = torch.tensor(values, dtype=like.dtype, device=like.device)
    return t.reshape(-1, 1, 1) if like.ndim == 3 else t.reshape(())
