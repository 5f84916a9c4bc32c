"""The SSC operators against the SVD reference and against the official algorithm."""

import math

import pytest
import torch

from megatron_spectra import normalize_singular_values, soft_spectral_clip, soft_spectral_clip_svd, spectral_clip
from megatron_spectra.bench.clip_cost import products
from megatron_spectra.ops.newton_schulz import polynomial_schedule, schedule_products


def make_matrix(m, n, s_max, spectrum="log", rank=None, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    k = min(m, n)
    u, _ = torch.linalg.qr(torch.randn(m, k, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(n, k, generator=g, dtype=torch.float64))
    if spectrum == "log":  # five decades below s_max: the bulk that must not be shrunk
        s = torch.logspace(-5, 0, k, dtype=torch.float64)
    elif spectrum == "spike":  # a rank-1 spike far above a flat bulk
        s = torch.rand(k, generator=g, dtype=torch.float64) * 1e-3
        s[0] = 1.0
    else:
        s = 0.5 + 0.5 * torch.rand(k, generator=g, dtype=torch.float64)
    s = torch.sort(s, descending=True).values * s_max
    if rank is not None:
        s[rank:] = 0
    return ((u * s) @ v.T).to(dtype), s


def singular_value_error(out, s, c):
    """max |s_i(out) - h_c(s_i)| / h_c(s_i) over s_i >= 1e-4 s_max."""
    got = torch.linalg.svdvals(out.double())[: len(s)]
    want = s / torch.sqrt(1 + (s / c) ** 2)
    mask = s >= 1e-4 * s[0]
    return ((got[mask] - want[mask]).abs() / want[mask]).max().item()


RATIOS = [1e-3, 1e-2, 0.1, 1, 10, 100, 1e3, 1e4]
SHAPES = [(96, 160), (160, 96), (128, 128)]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("spectrum", ["log", "spike", "flat"])
@pytest.mark.parametrize("ratio", RATIOS)
def test_accurate_mode_meets_the_error_target(shape, spectrum, ratio):
    c = 3.0
    x, s = make_matrix(*shape, ratio * c, spectrum)
    out = soft_spectral_clip(x.float(), c, mode="accurate")
    assert out.dtype == torch.float32 and out.shape == x.shape
    assert singular_value_error(out, s, c) <= 1e-3


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_accurate_mode_any_input_dtype(dtype):
    # The target is against the singular values of the input as given in that dtype.
    c = 1.0
    x, _ = make_matrix(64, 200, 100.0, "log")
    x = x.to(dtype)
    s = torch.linalg.svdvals(x.double())
    out = soft_spectral_clip(x, c, mode="accurate")
    assert out.dtype == dtype
    # The output is rounded to the input dtype, whose own precision bounds what can be seen.
    tol = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2, torch.float64: 1e-3}[dtype]
    assert singular_value_error(out, s, c) <= tol


def test_accurate_mode_rank_deficient_keeps_the_null_space():
    x, s = make_matrix(120, 80, 500.0, "flat", rank=7)
    out = soft_spectral_clip(x.float(), 2.0, mode="accurate")
    assert singular_value_error(out, s[:7], 2.0) <= 1e-3
    # Nothing appears outside the row space of x.
    _, _, vh = torch.linalg.svd(x)
    assert (out.double() @ vh[7:].T).abs().max() <= 1e-4 * out.abs().max()


def test_accurate_mode_extreme_values_stay_finite():
    x, _ = make_matrix(40, 70, 1.0, "log")
    for scale, c in [(1e30, 1.0), (1e-30, 1.0), (1.0, 1e-30), (1.0, 1e30), (3e38, 1e-3)]:
        out = soft_spectral_clip((x * scale).float(), c, mode="accurate")
        assert torch.isfinite(out).all(), (scale, c)
    assert torch.equal(soft_spectral_clip(torch.zeros(5, 7), 1.0, mode="accurate"), torch.zeros(5, 7))


def test_accurate_mode_costs_fewer_matmuls_than_the_official_clip():
    # Official: Gram + 10 steps x 3 + final product = 32 matmuls, at any ratio. Accurate mode
    # grows with the ratio (clipped in stages of <= 32): counted from the code.
    counted = {ratio: sum(products("accurate", ratio)) for ratio in (1.0, 10.0, 30.0, 100.0)}
    assert counted[1.0] <= 8 and counted[10.0] <= 16 and counted[30.0] <= 20 and counted[100.0] <= 32, counted


@pytest.mark.parametrize("lo", [1.0, 0.9, 0.3, 1e-2, 1e-3 / 7, 1e-6])
@pytest.mark.parametrize("tol", [1e-3, 1e-5])
def test_polynomial_schedule_takes_every_eigenvalue_to_within_tol(lo, tol):
    # The schedule tracks its interval through each step's polynomial; check it on a dense grid
    # of the spectrum it was planned for: σ = sqrt(x), x in [lo, 1].
    sigma = torch.linspace(math.sqrt(lo), 1.0, 20001, dtype=torch.float64)
    steps = polynomial_schedule(lo, tol)
    for alpha, beta, gamma in steps:
        sigma = sigma * (alpha + sigma**2 * (beta + sigma**2 * gamma))
    assert (sigma - 1).abs().max().item() <= tol * (1 + 1e-9)
    assert len(steps) <= 10 and (lo < 1 or not steps)


def test_polynomial_schedule_closes_with_cubics_where_that_is_cheaper():
    # At s_max/c = 10 two minimax quintics and two cubics take 10 k x k products besides G²;
    # quintics throughout (a cubic only where it finishes) would take 11.
    steps = polynomial_schedule(1 / (1 + 10.0**2), 1e-5)
    assert [c[2] != 0 for c in steps] == [True, True, False, False] and schedule_products(steps) == 10


def test_a_matrix_clips_the_same_whatever_it_is_batched_with():
    # Each matrix follows its own schedule (shorter ones padded with T = I, exact), so its
    # result depends on its batch-mates only through the batched matmul's rounding.
    xs = torch.stack([make_matrix(48, 90, r, "log", seed=i)[0] for i, r in enumerate([0.5, 20, 300, 3])]).float()
    batched = soft_spectral_clip(xs, 2.0, mode="accurate")
    for b in range(len(xs)):
        torch.testing.assert_close(batched[b], soft_spectral_clip(xs[b], 2.0, mode="accurate"), rtol=1e-5, atol=1e-6)


def test_batched_matches_one_at_a_time():
    xs = torch.stack([make_matrix(48, 90, r, "log", seed=i)[0] for i, r in enumerate([0.5, 20, 300])]).float()
    for mode in ("accurate", "paper"):
        batched = soft_spectral_clip(xs, 2.0, mode=mode, fp32=True)
        if mode == "accurate":  # per-matrix normalisation: identical to clipping each alone
            for b in range(3):
                torch.testing.assert_close(batched[b], soft_spectral_clip(xs[b], 2.0, mode=mode), rtol=1e-4, atol=1e-5)
        else:  # paper mode shares one bound across the batch, as the official code does
            assert batched.shape == xs.shape


# --------------------------------------------------------------------------- paper mode


def official_clip_sigvals(G, clip_c, ns_iter=10, use_float32=False):
    """An independent line-by-line transcription of the official algorithm (mlolab/llm-spectral-clipping, src/optim/post_process.py, commit ed9df11)."""
    if G.ndim == 1:
        norm = G.norm()
        return G if norm <= clip_c else G / torch.sqrt(1 + (norm / clip_c) ** 2)
    X = G.float() if use_float32 else G.bfloat16()
    transposed = X.size(-2) > X.size(-1)
    if transposed:
        X = X.mT
    XXT = X @ X.mT
    if X.ndim == 2:
        s = torch.minimum(XXT.abs().sum(dim=-1).max(), XXT.norm())
    else:
        s = torch.minimum(XXT.abs().sum(dim=-1).max(dim=-1).values.max(), XXT.norm(dim=(-2, -1)).max())
    I = torch.eye(X.size(-2), dtype=X.dtype)
    A = I + XXT / clip_c**2
    alpha = 1.0 + s / clip_c**2
    Y, Z = (A / alpha).clone(), I.expand_as(A).clone()
    for _ in range(ns_iter):
        T = 0.5 * (3.0 * I - Z @ Y)
        Y = Y @ T
        Z = T @ Z
    out = (Z / torch.sqrt(alpha)) @ X
    return (out.mT if transposed else out).to(G.dtype)


@pytest.mark.parametrize("shape", [(30, 50), (50, 30), (4, 20, 12), (64,)])
@pytest.mark.parametrize("fp32", [False, True])
@pytest.mark.parametrize("ns_steps", [5, 10])
def test_paper_mode_is_the_official_algorithm(shape, fp32, ns_steps):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(*shape, generator=g) * 3
    for c in (0.5, 10.0, 100.0):
        ours = soft_spectral_clip(x, c, mode="paper", ns_steps=ns_steps, fp32=fp32)
        assert torch.equal(ours, official_clip_sigvals(x, c, ns_steps, fp32))


def test_paper_mode_error_grows_with_the_ratio_as_documented():
    # The official 10 fp32 steps are accurate to ~1.5e-3 while s_max/c <~ 10, ~0.2 at 100 (fp32, 10 steps).
    c = 1.0
    x, s = make_matrix(128, 256, 5.0, "log")
    assert singular_value_error(soft_spectral_clip(x.float(), c, fp32=True), s[s >= 0.05 * c], c) < 5e-3
    x, s = make_matrix(128, 256, 100.0, "log")
    assert singular_value_error(soft_spectral_clip(x.float(), c, fp32=True), s, c) > 0.1


# --------------------------------------------------------------------------- vectors, hard clip


def test_vector_rule():
    u = torch.tensor([3.0, 4.0])  # |u| = 5
    assert torch.equal(soft_spectral_clip(u, 6.0), u)  # official: untouched when |u| <= c
    torch.testing.assert_close(soft_spectral_clip(u, 2.0), u / math.sqrt(1 + 25 / 4))
    # accurate: h_c everywhere, continuous at |u| = c
    torch.testing.assert_close(soft_spectral_clip(u, 6.0, mode="accurate"), u / math.sqrt(1 + 25 / 36))
    assert torch.isfinite(soft_spectral_clip(torch.full((3,), 1e38), 1.0, mode="accurate")).all()


def test_hard_clip_is_the_projection_onto_the_spectral_ball():
    x, s = make_matrix(30, 20, 10.0, "log")
    out = spectral_clip(x, 2.0)
    torch.testing.assert_close(torch.linalg.svdvals(out), s.clamp(max=2.0), atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(soft_spectral_clip_svd(x, 2.0), soft_spectral_clip(x, 2.0, mode="accurate"), atol=1e-5, rtol=1e-4)


def test_bad_input_is_named():
    x = torch.randn(4, 4)
    with pytest.raises(ValueError, match="threshold"):
        soft_spectral_clip(x, 0.0)
    with pytest.raises(ValueError, match="threshold"):
        soft_spectral_clip(x, float("nan"))
    with pytest.raises(TypeError):
        soft_spectral_clip(x, "10")
    with pytest.raises(ValueError, match="mode"):
        soft_spectral_clip(x, 1.0, mode="fast")
    with pytest.raises(ValueError, match="non-finite"):
        soft_spectral_clip(torch.tensor([[1.0, float("inf")], [0.0, 1.0]]), 1.0, mode="accurate")
    with pytest.raises(ValueError, match="shape"):
        soft_spectral_clip(torch.randn(2, 2, 2, 2), 1.0)


# --------------------------------------------------------------------------- input range and bad input


@pytest.mark.parametrize("shape", [(30, 50), (50, 30), (4, 20, 12), (64,)])
@pytest.mark.parametrize("k", [-100, -30, 40, 60])
def test_paper_mode_out_of_range_is_the_official_algorithm_on_the_scaled_input(shape, k):
    # Where the official arithmetic computes (2^40, 2^-30: finite, nonzero), its result bit for
    # bit; where it overflows or underflows (2^60: the bf16 Gram or |u|² overflows; 2^-100: the
    # Gram underflows to 0/0), the official algorithm on x and c scaled so that max|x| lies in
    # [0.5, 1), scaled back: bit for bit as well.
    g = torch.Generator().manual_seed(2)
    x = torch.ldexp(torch.randn(*shape, generator=g) * 3, torch.tensor(k))
    e = math.frexp(x.abs().max().item())[1]
    for c in (0.5, 10.0):
        c = math.ldexp(c, k)
        official = official_clip_sigvals(x, c)
        handled = torch.isfinite(official).all() and (x.ndim > 1 or 0 < (x.norm() / c) ** 2 < math.inf)
        assert handled == (k in (40, -30))
        want = official if handled else torch.ldexp(official_clip_sigvals(torch.ldexp(x, torch.tensor(-e)), math.ldexp(c, -e)), torch.tensor(e))
        assert torch.equal(soft_spectral_clip(x, c), want)


def test_paper_mode_takes_huge_and_tiny_inputs_where_the_official_gives_nan():
    x, s = make_matrix(40, 70, 3.0, "flat", dtype=torch.float32)
    for scale in (1e20, 1e-30):
        official = official_clip_sigvals(x * scale, scale)  # the bf16 Gram overflows / underflows to 0/0
        assert torch.isnan(official).all()
        out = soft_spectral_clip(x * scale, scale)
        assert singular_value_error(out.double() / scale, s, 1.0) < 2e-2  # bf16's accuracy at s_max/c = 3
    u = torch.tensor([3e20, 4e20])  # the vector rule: |u|² overflows fp32
    assert torch.equal(official_clip_sigvals(u, 1e20), torch.zeros(2))
    torch.testing.assert_close(soft_spectral_clip(u, 1e20), u / math.sqrt(1 + 25))


@pytest.mark.parametrize("x, c", [
    (torch.randn(8, 12), 1e-30),  # s_max/c ~ 1e30: I + XXᵀ/c² is beyond bf16/fp32
    (torch.randn(8, 12) * 1e20, 1.0),
    (torch.full((4,), 1000.0, dtype=torch.float16), 1.0),  # fp16 vector rule: |u|²/c² > 65504
], ids=["tiny-c", "huge-x", "fp16-vector"])
def test_paper_mode_beyond_its_range_is_a_clear_error(x, c):
    assert not torch.isfinite(official_clip_sigvals(x, c)).all() or not official_clip_sigvals(x, c).any()
    with pytest.raises(ValueError, match=r"paper mode overflowed at max\|x\|/c = .*mode='accurate'"):
        soft_spectral_clip(x, c)
    out = soft_spectral_clip(x, c, mode="accurate")
    assert torch.isfinite(out).all() and out.any()


@pytest.mark.parametrize("shape", [(0, 5), (5, 0), (0, 0), (2, 0, 3), (0, 3, 4), (0,)])
def test_empty_input_gives_an_empty_result(shape):
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.zeros(shape, dtype=dtype)
        for mode in ("paper", "accurate"):
            out = soft_spectral_clip(x, 1.0, mode=mode)
            assert out.shape == x.shape and out.dtype == dtype
        assert normalize_singular_values(x).shape == x.shape


@pytest.mark.parametrize("dtype", [torch.int64, torch.int8, torch.bool, torch.complex64])
def test_integer_bool_and_complex_input_is_rejected_naming_the_dtype(dtype):
    x = torch.ones(3, 4, dtype=dtype)
    for fn in (soft_spectral_clip, lambda x, c: normalize_singular_values(x)):
        with pytest.raises(TypeError, match=f"real floating-point tensor, got dtype {dtype}"):
            fn(x, 1.0)
        with pytest.raises(TypeError, match="dtype"):
            fn(x[0], 1.0)


@pytest.mark.parametrize("mode", ["paper", "accurate"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_input_is_rejected_in_both_modes(mode, bad):
    for shape in [(3, 4), (2, 3, 4), (5,)]:
        x = torch.ones(shape)
        x.view(-1)[1] = bad
        with pytest.raises(ValueError, match="non-finite"):
            soft_spectral_clip(x, 1.0, mode=mode)
    with pytest.raises(TypeError, match="dense"):
        soft_spectral_clip(torch.eye(3).to_sparse(), 1.0, mode=mode)


def test_a_sole_holder_stages_on_the_tighter_bound():
    # 16 singular values at s_max = 20c, 48 at 10c: min(Gershgorin, Frobenius) bounds s_max/c
    # by 35 (> 32: two stages), |G²|_F^(1/4) by 28. Only the root has G², so holders
    # that must agree plan on the looser bound; a sole holder (local reduce) plans on G²'s.
    from megatron_spectra.bench.clip_cost import matmul_shapes
    from megatron_spectra.ops.reducer import Reducer
    from megatron_spectra.ops.soft_clip import ClipNumerics, clip_wide

    class Spread(Reducer):  # as a multi-process reducer looks to the clip (one process: sums are no-ops)
        local = False

    g = torch.Generator().manual_seed(0)
    u, _ = torch.linalg.qr(torch.randn(64, 64, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(128, 64, generator=g, dtype=torch.float64))
    s = torch.cat([torch.full((16,), 20.0), torch.full((48,), 10.0)]).double()
    x = ((u * s) @ v.T).float()
    numerics = ClipNumerics("accurate")
    outs, lines = {}, {}
    for name, reduce in (("sole", Reducer()), ("spread", Spread())):
        shapes = matmul_shapes(lambda: outs.setdefault(name, clip_wide([x], [1.0], numerics, reduce)[0]))
        lines[name] = sum(1 for shape in shapes if 128 in shape)  # the Gram and the product, per stage
        assert singular_value_error(outs[name], s, 1.0) <= 1e-4
    assert lines == {"sole": 2, "spread": 4}
