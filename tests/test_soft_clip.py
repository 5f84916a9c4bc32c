"""The SSC operators against the SVD reference and against the official algorithm."""

import math

import pytest
import torch

from megatron_spectra import soft_spectral_clip, soft_spectral_clip_svd, spectral_clip
from megatron_spectra.ops.newton_schulz import scaled_newton_schedule


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


def test_accurate_mode_matmul_budget_at_ratio_100():
    # Official: Gram + 10 steps x 3 + final product = 32 matmuls; we may use at most 64.
    # A loose bound (Frobenius of a flat spectrum, sqrt(k) x s_max²) costs a few extra steps.
    for overestimate in (1.0, 30.0):
        a = 1 + (100.0**2) * overestimate
        steps = len(scaled_newton_schedule(1 / a, 1e-6))
        assert 2 + 3 * steps - 2 <= 64


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
