"""The paper's synthetic check of robustness to sparse spectral spikes (section 6.1, F.1.2).

Matrix logistic regression, min_X mean_i log(1 + exp(-y_i <A_i, X>)), with a stochastic
gradient oracle that adds a zero-mean rank-1 spike ±sigma·u vᵀ (u, v uniform on the sphere)
to the true gradient. With the same step size and an lr/sqrt(k) decay, SGD with spectral
clipping (our `soft_spectral_clip`, c = 2x the gradient's spectral norm at the start, fixed
across noise levels as in the paper) keeps converging as sigma grows, while plain SGD and
SGD with global (Frobenius) clipping diverge or stall and still trail it with smaller steps.
Every assertion compares measured runs with each other.
"""

from __future__ import annotations

import math

import pytest
import torch

from megatron_spectra import soft_spectral_clip

D, SAMPLES, STEPS, LR = 16, 200, 150, 20.0


@pytest.fixture(scope="module")
def problem():
    gen = torch.Generator().manual_seed(0)
    x_star = torch.randn(D, D, generator=gen, dtype=torch.float64)
    a = torch.randn(SAMPLES, D, D, generator=gen, dtype=torch.float64)
    y = torch.sign(torch.einsum("nij,ij->n", a, x_star))
    return a, y


def _loss(problem, x):
    a, y = problem
    return torch.nn.functional.softplus(-y * torch.einsum("nij,ij->n", a, x)).mean()


def _grad(problem, x):
    a, y = problem
    weights = -y * torch.sigmoid(-y * torch.einsum("nij,ij->n", a, x))  # d softplus(-y z) / dz
    return torch.einsum("n,nij->ij", weights, a) / len(y)


def _unit(gen):
    v = torch.randn(D, 1, generator=gen, dtype=torch.float64)
    return v / v.norm()


def _train(problem, method: str, sigma: float, lr: float, seed: int = 1) -> float:
    """Final training loss (inf when the iterate overflows)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.zeros(D, D, dtype=torch.float64)
    g0 = _grad(problem, x)
    c, tau = 2 * torch.linalg.matrix_norm(g0, 2).item(), 2 * g0.norm().item()
    for k in range(STEPS):
        sign = 1.0 if torch.rand(1, generator=gen).item() < 0.5 else -1.0
        g = _grad(problem, x) + sign * sigma * _unit(gen) @ _unit(gen).T
        if method == "global":
            g = g * min(1.0, tau / g.norm().item())
        elif method == "spectral":
            g = soft_spectral_clip(g.float(), c, mode="accurate").double()
        x = x - lr / math.sqrt(k + 1) * g
        if not torch.isfinite(x).all():
            return math.inf
    return _loss(problem, x).item()


def test_spectral_clipping_is_robust_to_spikes_where_sgd_and_global_clipping_are_not(problem):
    start = math.log(2.0)
    quiet = {m: _train(problem, m, 0.0, LR) for m in ("sgd", "global", "spectral")}
    # Without spikes the three rules are the same method: all converge from log 2.
    assert all(loss < 0.05 * start for loss in quiet.values()), quiet

    for sigma in (10.0, 100.0):
        loud = {m: _train(problem, m, sigma, LR) for m in ("sgd", "global", "spectral")}
        # Spectral clipping barely notices spikes 40-400x the gradient's spectral norm ...
        assert loud["spectral"] < 0.05 * start and loud["spectral"] < quiet["spectral"] + 0.02, (sigma, loud)
        # ... while, at the same step size, the others end far above it, or above the start.
        assert loud["sgd"] > 10 * loud["spectral"] and loud["global"] > 10 * loud["spectral"], (sigma, loud)


def test_smaller_steps_do_not_let_sgd_or_global_clipping_catch_up(problem):
    spectral = _train(problem, "spectral", 100.0, LR)
    for lr in (LR / 10, LR / 100):
        for method in ("sgd", "global"):
            assert _train(problem, method, 100.0, lr) > 10 * spectral, (method, lr)
