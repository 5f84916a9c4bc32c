"""Fidelity to the official SPECTRA code (mlolab/llm-spectral-clipping, issue 11 items 3-5
and the official options), each against the official formula written out here.

The official functions themselves were also run side by side (see the closing note of
issue 11): the threshold schedules agree exactly on 17k (step, decay, final scale, T) points,
normalize bit for bit with the official eager function, the vector rule bit for bit in bf16,
fp32 and fp64.
"""

import math

import pytest
import torch

from megatron_spectra import Spectra
from megatron_spectra.engine import Placement, ShardedClipper
from megatron_spectra.launch.spawn import run_distributed
from megatron_spectra.ops.soft_clip import ClipNumerics, clip_vector, normalize_singular_values
from megatron_spectra.optim.schedules import RampSchedule, ThresholdSchedule, pre_clip_schedule
from megatron_spectra.settings import SettingError, resolve


# ------------------------------------------------------------------ the official formulas


def official_clip_c(step, lr, c, base_lr, warmup, disable, decay, fract, final, total):
    """src/optim/spectra.py `_get_current_clip_c`, as written there."""
    if disable:
        return c
    if warmup > 0 and step < warmup:
        return c * base_lr / max(lr, 1e-10)
    if decay == "constant":
        return c
    n_anneal = int(fract * total)
    n_hold = total - n_anneal
    if step < n_hold:
        return c
    p = min((step - n_hold) / max(n_anneal, 1), 1.0)
    factor = {
        "linear": lambda: final + (1 - final) * (1 - p),
        "sqrt": lambda: final + (1 - final) * (1 - math.sqrt(p)),
        "cosine": lambda: final + (1 - final) * (1 + math.cos(math.pi * p)) * 0.5,
        "exp": lambda: (final**p) if final > 0 else (1 - p),
        "square": lambda: final + (1 - final) * (1 - p**2),
    }[decay]()
    return c * factor


def official_pre_clip_c(it, lr_group0, c, c_end, schedule, iters, lr, warmup, disable):
    """src/optim/base.py, the pre-clip threshold of iteration `it`."""
    if c_end is not None and schedule != "constant":
        t = min(it / max(iters, 1), 1.0)
        return {
            "linear": lambda: c + (c_end - c) * t,
            "cos": lambda: c + (c_end - c) * (1 - math.cos(math.pi * t)) * 0.5,
            "sqrt": lambda: c + (c_end - c) * math.sqrt(t),
            "exp": lambda: c * (c_end / max(c, 1e-10)) ** t,
            "square": lambda: c + (c_end - c) * t**2,
        }[schedule]()
    if not disable and warmup > 0 and it < warmup:
        return c * lr / max(lr_group0, 1e-10)
    return c


def official_normalize(G, steps, fp32=False):
    """src/optim/post_process.py `normalize_sigvals`, eager."""
    if G.ndim == 1:
        return G / (G.norm() + 1e-7)
    a, b, c = (3.4445, -4.7750, 2.0315)
    X = G.float() if fp32 else G.bfloat16()
    if G.size(-2) > G.size(-1):
        X = X.mT
    X = X / (X.norm(dim=(-2, -1), keepdim=True) + 1e-7)
    for _ in range(steps):
        A = X @ X.mT
        B = b * A + c * A @ A
        X = a * X + B @ X
    if G.size(-2) > G.size(-1):
        X = X.mT
    return X


def official_vector_clip(G, c):
    norm = G.norm()
    if norm <= c:
        return G
    return G / torch.sqrt(1 + (norm / c) ** 2)


def ssc_svd(x: torch.Tensor, c: float) -> torch.Tensor:
    """h_c(s) = s/sqrt(1 + s²/c²) on every singular value, in float64."""
    u, s, vh = torch.linalg.svd(x.double(), full_matrices=False)
    return (u * (s / torch.sqrt(1 + (s / c) ** 2))) @ vh


# ------------------------------------------------------------------ threshold schedules


@pytest.mark.parametrize("decay", ["linear", "sqrt", "cosine", "exp", "square"])
@pytest.mark.parametrize("final", [0.0, 0.1, 0.5])
def test_the_decay_types_are_the_official_ones_exactly(decay, final):
    for total, warmup, fract in ((100, 10, 0.2), (37, 0, 0.3)):
        ours = ThresholdSchedule(7.0, f"wsd-{decay}", warmup, total, fract, final)
        for k in range(total + 3):
            lr = 1e-3 * min(1.0, (k + 1) / max(warmup, 1)) * 0.7
            assert ours(k, lr, 1e-3) == official_clip_c(k, lr, 7.0, 1e-3, warmup, False, decay, fract, final, total), (k, total)


def test_constant_and_standard_are_disable_dynamic_clip_and_no_decay():
    for kind, disable in (("constant", True), ("standard", False)):
        ours = ThresholdSchedule(7.0, kind, 10, 100)
        for k in range(103):
            lr = 1e-3 * min(1.0, (k + 1) / 10)
            assert ours(k, lr, 1e-3) == official_clip_c(k, lr, 7.0, 1e-3, 10, disable, "constant", 0.2, 0.0, 100)


@pytest.mark.parametrize("kind", ["linear", "cos", "sqrt", "exp", "square"])
def test_the_pre_clip_ramps_are_the_official_ones_exactly(kind):
    ours = pre_clip_schedule(resolve(dict(pre_clip=True, pre_clip_schedule=kind, pre_clip_threshold=0.1,
                                          pre_clip_threshold_end=0.03, total_steps=77, warmup_steps=10)))
    assert isinstance(ours, RampSchedule)
    for k in range(80):  # the ramp replaces the warm-up rule, as in the official code
        assert ours(k, 1e-5, 1e-3) == official_pre_clip_c(k, 1e-5, 0.1, 0.03, kind, 77, 1e-3, 10, False)


@pytest.mark.parametrize("clip_schedule, disable", [("constant", True), ("standard", False), ("wsd-cosine", False)])
def test_the_pre_clip_warm_up_rule_follows_the_clip_schedule(clip_schedule, disable):
    """Issue 11 #3: the warm-up rule applies unless dynamic clipping is off; it never decays."""
    ours = pre_clip_schedule(resolve(dict(pre_clip=True, clip_schedule=clip_schedule, warmup_steps=10, total_steps=50)))
    for k in range(50):
        lr = 1e-3 * min(1.0, (k + 1) / 10)
        assert ours(k, lr, 1e-3) == official_pre_clip_c(k, lr, 0.1, None, "constant", 50, 1e-3, 10, disable)


def test_pre_clipping_with_a_constant_schedule_uses_the_constant_threshold():
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.zeros(12, 8))
    opt = Spectra([w], lr=1e-3, mode="accurate", clip_schedule="constant", warmup_steps=10, pre_clip=True)
    for group in opt.param_groups:
        group["lr"] = 1e-4  # deep in the warm-up: the standard rule would use c = 0.1·10
    grad = torch.randn(12, 8)
    w.grad = grad.clone()
    opt.pre_clip_gradients()
    assert torch.allclose(w.grad.double(), ssc_svd(grad, 0.1), rtol=2e-3, atol=1e-6)


# ------------------------------------------------------------------ the vector rule's dtype (#4)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float64])
def test_the_paper_vector_rule_is_the_official_expression_in_every_dtype(dtype):
    gen = torch.Generator().manual_seed(1)
    for i in range(60):
        u = (torch.randn(257, generator=gen, dtype=torch.float64) * 10 ** (i % 5 - 2)).to(dtype)
        c = float(u.double().norm()) * (0.5, 0.999, 1.001, 2.0)[i % 4]
        assert torch.equal(clip_vector(u, c, ClipNumerics("paper")), official_vector_clip(u, c)), (i, c)


def test_the_engine_vector_rule_computes_in_the_callers_dtype():
    gen = torch.Generator().manual_seed(2)
    u = torch.randn(300, generator=gen).bfloat16()
    c = float(u.double().norm()) * 1.001
    (out,) = ShardedClipper().clip([u], [Placement((300,))], c, ["bias"])
    assert out.dtype == torch.bfloat16 and torch.equal(out, official_vector_clip(u, c))


# ------------------------------------------------------------------ per-group learning rates (#5)


def _one_step_with_two_groups(rule):
    """Accurate mode, a group at lr and one at lr/4, in the warm-up (lr scaled by 0.2):
    the H_c(U) of each group, and c_k, lr_k, U of each."""
    torch.manual_seed(3)
    a, b = torch.nn.Parameter(torch.randn(10, 6)), torch.nn.Parameter(torch.randn(6, 10))
    lr = 1e-2
    opt = Spectra([{"params": [a], "lr": lr}, {"params": [b], "lr": lr / 4}], lr=lr, clip_threshold=0.5,
                  warmup_steps=5, mode="accurate", threshold_base_lr=rule, betas=(0.0, 0.0), eps=0.0)
    for group in opt.param_groups:
        group["lr"] *= 0.2
    seen = {}
    opt.register_update_observer(lambda clipped: seen.update({id(c.param): (c.u, c.h) for c in clipped}))
    a.grad, b.grad = torch.randn(10, 6), torch.randn(6, 10)
    opt.step()
    return [(seen[id(p)], g["lr"], g["peak_lr"]) for p, g in zip((a, b), opt.param_groups)], lr


@pytest.mark.parametrize("rule", ["global", "group"])
def test_each_group_gets_the_official_warm_up_threshold(rule):
    results, base_lr = _one_step_with_two_groups(rule)
    for (u, h), lr, peak in results:
        c = 0.5 * (base_lr if rule == "global" else peak) / lr  # official: c·--lr/lr_group
        assert torch.allclose(h.double(), ssc_svd(u, c), rtol=2e-3, atol=1e-7), (rule, c)


def test_the_official_rule_is_the_default():
    assert Spectra([torch.nn.Parameter(torch.zeros(2, 2))]).threshold_base_lr == "global"


# ------------------------------------------------------------------ normalize


@pytest.mark.parametrize("shape", [(8, 8), (16, 4), (4, 16), (64, 32), (3, 200), (50,)])
@pytest.mark.parametrize("fp32", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_normalize_is_the_official_function_bit_for_bit(shape, fp32, dtype):
    g = (torch.randn(*shape, generator=torch.Generator().manual_seed(4)) * 0.1).to(dtype)
    for steps in (5, 10):
        want = official_normalize(g, steps, fp32)
        got = normalize_singular_values(g, ns_steps=steps, fp32=fp32)
        assert torch.equal(got, want.to(got.dtype))  # the official returns its compute dtype


def test_a_normalize_step_is_lr_alpha_times_the_official_function():
    torch.manual_seed(5)
    w = torch.nn.Parameter(torch.randn(24, 8))
    x0 = w.detach().clone()
    opt = Spectra([w], lr=1e-2, weight_decay=0.1, post_process="normalize", clip_schedule="wsd-sqrt", total_steps=1,
                  decay_fraction=1.0, betas=(0.0, 0.0), eps=0.0)
    w.grad = torch.randn(24, 8)
    u = w.grad / w.grad.abs()  # AdamW with betas 0, eps 0 at step 1: sign(g)
    opt.step()  # c would be 0 at the end of the wsd schedule: normalize has no threshold
    want = (1 - 1e-2 * 0.1) * x0 - 1e-2 * math.sqrt(24 / 8) * official_normalize(u, 10).float()
    assert torch.allclose(w.detach(), want, atol=1e-6)


def test_normalize_refuses_accurate_mode_and_pre_clip_ramps_need_their_end():
    with pytest.raises(SettingError, match="post_process"):
        Spectra([torch.nn.Parameter(torch.zeros(2, 2))], post_process="normalize", mode="accurate")
    with pytest.raises(SettingError, match="pre_clip_threshold_end"):
        Spectra([torch.nn.Parameter(torch.zeros(2, 2))], pre_clip=True, pre_clip_schedule="linear", total_steps=10)


def _normalize_through_the_engine(rank, world):
    gen = torch.Generator().manual_seed(6)
    fulls = {"tall_gram": torch.randn(60, 12, generator=gen), "wide": torch.randn(12, 40, generator=gen),
             "bias": torch.randn(16, generator=gen)}
    cuts = {"tall_gram": ((0, 300), (300, 720)), "wide": ((0, 100), (100, 480)), "bias": ((0, 5), (5, 16))}
    strategy = {"tall_gram": "gram", "wide": "owner", "bias": "auto"}
    places = [Placement(fulls[n].shape, flat=cuts[n][rank], strategy=strategy[n]) for n in fulls]
    pieces = [p.piece_of(fulls[n]) for n, p in zip(fulls, places)]
    outs = ShardedClipper(None, ClipNumerics(post="normalize")).clip(pieces, places, 1.0, list(fulls))
    return {n: (out, p.piece_of(official_normalize(fulls[n], 10).float())) for n, out, p in zip(fulls, outs, places)}


def test_normalize_through_the_engine_matches_the_official_function():
    for result in run_distributed(_normalize_through_the_engine, world_size=2):
        got, want = result["wide"]
        assert torch.equal(got, want)  # an owner clips the whole matrix: the official ops
        # Sums over the holders: bf16 rounding in another order, which the unconverged bf16
        # quintic carries to ~2e-2 (the official compiled function differs from its own
        # eager one by up to 5e-2).
        for name, atol in (("tall_gram", 5e-2), ("bias", 1e-6)):
            got, want = result[name]
            assert torch.allclose(got, want, atol=atol), (name, float((got - want).abs().max()))
