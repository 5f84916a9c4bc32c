"""The reference Spectra optimizer: eq. (2), its bases, schedules, state and errors."""

import copy
import math

import pytest
import torch

from megatron_spectra import NonFiniteError, Spectra, ThresholdSchedule, matrix_scale
from megatron_spectra.optim.directions import ademamix


def tiny_model(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Embedding(40, 16),
        torch.nn.Linear(16, 48, bias=False),
        torch.nn.LayerNorm(48),
        torch.nn.Linear(48, 40, bias=False),
    )


def loss_of(model, seed):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, 40, (8, 6), generator=g)
    return torch.nn.functional.cross_entropy(model(tokens).reshape(-1, 40), tokens.roll(1, 1).reshape(-1))


def train(model, opt, steps, first=0):
    losses = []
    for k in range(first, first + steps):
        opt.zero_grad()
        loss = loss_of(model, k)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("how", ["group clip none", "apply_to none"])
def test_without_clipping_it_is_adamw(how):
    a, b = tiny_model(), tiny_model()
    ref = torch.optim.AdamW(a.parameters(), lr=1e-2, betas=(0.8, 0.99), weight_decay=0.1)
    # A clip threshold that would move every update: only "none" keeps them AdamW's (no alpha).
    ours = Spectra(b.parameters(), "adamw", lr=1e-2, betas=(0.8, 0.99), weight_decay=0.1, clip_threshold=1e-3,
                   clip_schedule="constant", apply_to="none" if how == "apply_to none" else "all")
    if how == "group clip none":
        for group in ours.param_groups:
            group["clip"] = "none"
    train(a, ref, 5), train(b, ours, 5)
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


def official_ademamix_update(p, grad, state, lr, wd, betas, alpha, eps):
    """Apple's AdEMAMix step (the official code's copy) without warmups, for comparison."""
    b1, b2, b3 = betas
    state["step"] += 1
    state["fast"].mul_(b1).add_(grad, alpha=1 - b1)
    state["slow"].mul_(b3).add_(grad, alpha=1 - b3)
    state["sq"].mul_(b2).addcmul_(grad, grad, value=1 - b2)
    denom = (state["sq"].sqrt() / math.sqrt(1 - b2 ** state["step"])).add_(eps)
    update = (state["fast"].div(1 - b1 ** state["step"]) + alpha * state["slow"]) / denom
    return p - lr * (update + wd * p)


def test_ademamix_direction_matches_the_official_step():
    g = torch.Generator().manual_seed(0)
    p = torch.randn(5, 7, generator=g)
    ours = {"exp_avg": torch.zeros(5, 7), "exp_avg_slow": torch.zeros(5, 7), "exp_avg_sq": torch.zeros(5, 7)}
    theirs = {"step": 0, "fast": torch.zeros(5, 7), "slow": torch.zeros(5, 7), "sq": torch.zeros(5, 7)}
    for k in range(1, 4):
        grad = torch.randn(5, 7, generator=g)
        u = ademamix(grad, ours, k, betas=(0.9, 0.999, 0.999), mix_alpha=8.0, eps=1e-8)
        want = official_ademamix_update(p, grad, theirs, 0.01, 0.1, (0.9, 0.999, 0.999), 8.0, 1e-8)
        p = (1 - 0.01 * 0.1) * p - 0.01 * u
        torch.testing.assert_close(p, want, rtol=1e-6, atol=1e-7)


def test_signum_is_the_sign_of_nesterov_momentum():
    p = torch.nn.Parameter(torch.zeros(3))
    opt = Spectra([p], "signum", lr=1.0, apply_to="2d")
    buf = torch.zeros(3)
    for grad in ([1.0, -2.0, 0.5], [-3.0, 1.0, 0.5]):
        p.grad = torch.tensor(grad)
        before = p.detach().clone()
        opt.step()
        buf = 0.95 * buf + p.grad
        torch.testing.assert_close(before - p.detach(), (p.grad + 0.95 * buf).sign())


@pytest.mark.parametrize("base", ["adamw", "signum", "ademamix"])
@pytest.mark.parametrize("mode, ns_fp32, tol", [("accurate", False, 1e-4), ("paper", True, 1e-4), ("paper", False, 0.2)])
def test_applied_update_has_spectral_norm_at_most_lr_alpha_c(base, mode, ns_fp32, tol):
    # The official bf16 numerics overshoot c (bf16 rounding of Z/sqrt(a) and of the final
    # product): measured over random matrices up to 0.6% at s_max/c = 10, 10.5% at 100 and
    # beyond (README, Usage). fp32 and accurate mode hold it to fp32 rounding (<= 3e-6).
    model = tiny_model()
    lr, wd, c = 0.05, 0.1, 0.5
    opt = Spectra(model.named_parameters(), base, lr=lr, weight_decay=wd, clip_threshold=c,
                  clip_schedule="constant", mode=mode, ns_fp32=ns_fp32)
    tol = 1.0 + tol
    for k in range(4):
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        train(model, opt, 1, first=k)
        for n, p in model.named_parameters():
            step = (1 - lr * wd) * before[n] - p.detach()
            if p.ndim == 2:
                bound = lr * matrix_scale(p.shape) * c
                assert torch.linalg.matrix_norm(step.double(), ord=2) <= bound * tol, n
            else:
                assert torch.linalg.vector_norm(step) <= lr * c * tol, n


def test_alpha_uses_the_stored_shape():
    assert matrix_scale((50304, 768)) == pytest.approx(math.sqrt(50304 / 768))
    assert matrix_scale((768, 2048)) == 1.0
    assert matrix_scale((2304, 768)) == pytest.approx(math.sqrt(3))
    assert matrix_scale((768,)) == 1.0


def test_resume_gives_the_same_trajectory():
    for base in ("adamw", "signum", "ademamix"):
        kwargs = dict(base=base, lr=3e-3, weight_decay=0.1, warmup_steps=3, clip_schedule="wsd-sqrt", total_steps=10)
        model = tiny_model()
        opt = Spectra(model.parameters(), **kwargs)
        train(model, opt, 4)
        saved_model, saved_opt = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
        straight = train(model, opt, 4, first=4)

        resumed = tiny_model(seed=123)
        resumed.load_state_dict(saved_model)
        opt2 = Spectra(resumed.parameters(), **kwargs)
        opt2.load_state_dict(saved_opt)
        assert train(resumed, opt2, 4, first=4) == straight
        for p, q in zip(model.parameters(), resumed.parameters()):
            assert torch.equal(p, q)


def test_threshold_and_update_norms_are_logged():
    model = tiny_model()
    opt = Spectra(model.named_parameters(), lr=1e-3, warmup_steps=10, track_update_norms=True)
    train(model, opt, 1)
    # step 0 of warmup with a constant lr: c·eta_max/eta_k = c
    assert opt.last_threshold == pytest.approx(10.0)
    opt.param_groups[0]["lr"] = 1e-4
    train(model, opt, 1, first=1)
    assert opt.last_threshold == pytest.approx(100.0)
    before, after = opt.last_update_norms["1.weight"]
    assert after <= before and after <= 100.0


def test_group_choices_and_apply_to():
    model = tiny_model()
    emb, lin1, norm, lin2 = model[0].weight, model[1].weight, model[2].weight, model[3].weight
    opt = Spectra([{"params": [emb, lin2], "clip": "none"}, {"params": [lin1, norm]}],
                  lr=0.1, clip_threshold=1e-3, clip_schedule="constant")
    before = {k: t.detach().clone() for k, t in {"emb": emb, "lin1": lin1, "norm": norm}.items()}
    train(model, opt, 1)
    # excluded: a plain AdamW first step moves every touched entry by ~lr
    assert (before["emb"] - emb).abs().max() > 0.05
    # clipped at c = 1e-3: tiny moves
    assert torch.linalg.matrix_norm(before["lin1"] - lin1, ord=2) <= 0.1 * matrix_scale(lin1.shape) * 1e-3 * 1.01
    assert torch.linalg.vector_norm(before["norm"] - norm) <= 0.1 * 1e-3 * 1.01


def test_pre_clip_bounds_every_matrix_gradient_before_global_clipping():
    model = tiny_model()
    opt = Spectra(model.parameters(), lr=1e-3, pre_clip=True, mode="accurate")
    loss_of(model, 0).backward()
    opt.pre_clip_gradients()
    for p in model.parameters():
        if p.ndim == 2:
            assert torch.linalg.matrix_norm(p.grad, ord=2) <= 0.1 * (1 + 1e-4)
    opt.step()
    with pytest.raises(RuntimeError, match="pre-clipping is off"):
        Spectra(model.parameters()).pre_clip_gradients()


def test_nonfinite_gradient_raises_with_the_name_or_skips():
    model = tiny_model()
    opt = Spectra(model.named_parameters(), lr=1e-3)
    loss_of(model, 0).backward()
    model[1].weight.grad[0, 0] = float("nan")
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(NonFiniteError, match=r"1\.weight"):
        opt.step()
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))

    skipping = Spectra(model.named_parameters(), lr=1e-3, nonfinite="skip")
    skipping.step()
    assert skipping.skipped_steps == 1 and skipping.spectra_step == 0
    assert all(int(s["step"]) == 0 and not s["exp_avg"].any() for s in skipping.state.values())  # moments untouched
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(clip_threshold=0.0), "threshold"),
        (dict(clip_threshold=-1.0), "threshold"),
        (dict(base="lamb"), "base optimizer"),
        (dict(clip_schedule="cosine"), "schedule"),
        (dict(clip_schedule="wsd-sqrt"), "total_steps"),
        (dict(lr=-1e-3), "learning rate"),
        (dict(mode="fast"), "mode"),
        (dict(base="signum", betas=(0.9, 0.99)), "do not apply"),
        (dict(apply_to="3d"), "apply_to"),
        (dict(nonfinite="ignore"), "nonfinite"),
    ],
)
def test_bad_configuration_is_a_clear_error(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Spectra(tiny_model().parameters(), **kwargs)


def test_schedules_follow_their_formulas():
    eta_max = 1e-3
    standard = ThresholdSchedule(10.0, "standard", warmup_steps=100)
    assert standard(0, eta_max / 100, eta_max) == pytest.approx(1000.0)
    assert standard(50, eta_max / 2, eta_max) == pytest.approx(20.0)
    assert standard(100, eta_max, eta_max) == 10.0
    assert ThresholdSchedule(10.0, "constant", warmup_steps=100)(0, eta_max / 100, eta_max) == 10.0
    wsd = ThresholdSchedule(10.0, "wsd-sqrt", warmup_steps=100, total_steps=1000)
    assert wsd(10, eta_max / 10, eta_max) == pytest.approx(100.0)
    assert wsd(799, eta_max, eta_max) == 10.0
    for k in (800, 850, 950, 1000):
        assert wsd(k, eta_max, eta_max) == pytest.approx(10.0 * (1 - math.sqrt((k - 800) / 200)))
    # Under the WSD sqrt lr schedule it tracks c·eta_k/eta_max.
    for k in (820, 900, 990):
        eta_k = eta_max * (1 - math.sqrt((k - 800) / 200))
        assert wsd(k, eta_k, eta_max) == pytest.approx(10.0 * eta_k / eta_max)


# ----------------------------------------------------------------------------- lr = 0, observers, apply_to


def adamw_direction(grads, betas, eps):
    """AdamW's U after the gradients `grads`, from its formula (bias-corrected moments)."""
    b1, b2 = betas
    m = v = 0
    for g in grads:
        m, v = b1 * m + (1 - b1) * g, b2 * v + (1 - b2) * g * g
    k = len(grads)
    return (m / (1 - b1**k)) / (v.sqrt() / math.sqrt(1 - b2**k) + eps)


def test_at_lr_zero_the_moments_and_step_advance_but_not_the_weights():
    """As the official code (Algorithm 3): a group at lr = 0 (warm-up start, frozen) takes its
    base step, moments and count, and only the clip and the update are skipped."""
    g = torch.Generator().manual_seed(0)
    w = torch.nn.Parameter(torch.randn(6, 4, generator=g))
    grads = [torch.randn(6, 4, generator=g) for _ in range(2)]
    lr, wd, betas, eps = 0.1, 0.1, (0.9, 0.99), 1e-8
    opt = Spectra([w], lr=0.0, weight_decay=wd, betas=betas, eps=eps, apply_to="none")
    seen = []
    opt.register_update_observer(seen.append)
    w0 = w.detach().clone()
    w.grad = grads[0].clone()
    opt.step()
    assert torch.equal(w.detach(), w0) and not seen  # no update, no clip
    assert opt.spectra_step == 1 and int(opt.state[w]["step"]) == 1
    torch.testing.assert_close(opt.state[w]["exp_avg"], (1 - betas[0]) * grads[0])
    torch.testing.assert_close(opt.state[w]["exp_avg_sq"], (1 - betas[1]) * grads[0] ** 2)
    opt.param_groups[0]["lr"] = lr
    w.grad = grads[1].clone()
    opt.step()  # the second step's bias corrections: k = 2
    torch.testing.assert_close(w.detach(), (1 - lr * wd) * w0 - lr * adamw_direction(grads, betas, eps))
    assert opt.spectra_step == 2 and len(seen) == 1


def test_megatron_main_params_at_lr_zero_and_after():
    """The Megatron path: a 1-D main-param shard, its clip kind and alpha from its entry."""
    pytest.importorskip("megatron.core")
    from megatron_spectra.engine import Placement
    from megatron_spectra.megatron.layouts import Entry
    from megatron_spectra.megatron.main_params import EntryClipper, MainParamSpectra
    from megatron_spectra.ops import ClipNumerics
    from megatron_spectra.optim import get_base

    g = torch.Generator().manual_seed(1)
    w0 = torch.randn(6, 4, generator=g)
    grads = [torch.randn(6, 4, generator=g) for _ in range(2)]
    lr, wd, betas, eps, alpha = 0.1, 0.1, (0.9, 0.99), 1e-8, math.sqrt(6 / 4)
    main = w0.reshape(-1).clone()  # what a ZeRO shard looks like: 1-D
    entry = Entry("w", "matrix", alpha, True, main, Placement((6, 4), flat=(0, 24)))
    numerics = ClipNumerics("accurate")

    def build(group_lr):
        return MainParamSpectra(
            [{"params": [main], "lr": group_lr, "weight_decay": wd, "max_lr": lr}], get_base("adamw"),
            dict(betas=betas, eps=eps), schedule=ThresholdSchedule(1e8, "constant"), pre_clip_schedule=None,
            numerics=numerics, nonfinite="raise", specs={main: entry}, clipper=EntryClipper([entry], None, numerics),
        )

    opt = build(0.0)
    main.grad = grads[0].reshape(-1).clone()
    opt.step()
    assert torch.equal(main, w0.reshape(-1))
    group = opt.param_groups[0]
    assert group["spectra_step"] == group["step"] == 1 and int(opt.state[main]["step"]) == 1
    torch.testing.assert_close(opt.state[main]["exp_avg"], (1 - betas[0]) * grads[0].reshape(-1))
    saved = copy.deepcopy(opt.state_dict())

    opt = build(lr)  # as Megatron resumes: its own load, then restore_step
    opt.load_state_dict(saved)
    opt.param_groups[0]["lr"] = lr
    opt.restore_step()
    main.grad = grads[1].reshape(-1).clone()
    opt.step()  # c = 1e8: H_c(U) = U to ~(s/c)^2
    want = (1 - lr * wd) * w0 - lr * alpha * adamw_direction(grads, betas, eps)
    torch.testing.assert_close(main.view(6, 4), want)
    assert opt.param_groups[0]["step"] == 2


def named_model(seed=0):
    torch.manual_seed(seed)

    class LM(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = torch.nn.Embedding(40, 16)
            self.hidden = torch.nn.Linear(16, 48, bias=False)
            self.norm = torch.nn.LayerNorm(48)
            self.lm_head = torch.nn.Linear(48, 40, bias=False)

        def forward(self, x):
            return self.lm_head(self.norm(self.hidden(self.embed(x))))

    return LM()


def test_update_observers_see_u_and_the_applied_h_c_of_u():
    model = named_model()
    lr, c = 0.1, 0.05
    opt = Spectra(model.named_parameters(), lr=lr, clip_threshold=c, clip_schedule="constant", mode="accurate")
    seen = []
    handle = opt.register_update_observer(seen.append)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    train(model, opt, 1)
    (updates,) = seen
    assert {u.spec.name for u in updates} == set(before)  # apply_to="all": every param is clipped
    for u in updates:
        grad = u.param.grad
        torch.testing.assert_close(u.u, grad / (grad.abs() + 1e-8))  # AdamW's first U
        applied = (before[u.spec.name] - u.param.detach()) / (lr * u.spec.scale)
        torch.testing.assert_close(u.h, applied, rtol=1e-4, atol=1e-5)  # what reached the weights
        if u.spec.kind == "matrix":
            assert torch.linalg.matrix_norm(u.h.double(), ord=2) <= c * (1 + 1e-4)
    handle.remove()
    train(model, opt, 1, first=1)
    assert len(seen) == 1


def test_apply_to_hidden_leaves_embedding_and_output_layer_unclipped():
    model = named_model()
    opt = Spectra(model.named_parameters(), lr=0.1, clip_threshold=1e-3, clip_schedule="constant", apply_to="hidden")
    seen = []
    opt.register_update_observer(seen.append)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    train(model, opt, 1)
    assert [u.spec.name for u in seen[0]] == ["hidden.weight"]
    moved = {n: (before[n] - p.detach()) for n, p in model.named_parameters()}
    for name in ("embed.weight", "lm_head.weight", "norm.weight"):  # plain AdamW: touched entries move by ~lr
        assert moved[name].abs().max() > 0.05, name
    bound = 0.1 * matrix_scale(model.hidden.weight.shape) * 1e-3
    assert torch.linalg.matrix_norm(moved["hidden.weight"], ord=2) <= bound * 1.01


@pytest.mark.parametrize(
    "name, outer",
    [("tok_embeddings.weight", True), ("model.embed_tokens.weight", True), ("transformer.wte.weight", True),
     ("lm_head.weight", True), ("output.weight", True), ("output_layer.weight", True),
     ("layers.0.attention.wq.weight", False), ("0.weight", False)],
)
def test_hidden_tells_embedding_and_output_by_mark_then_name(name, outer):
    from megatron_spectra.optim import clip_kind

    w = torch.nn.Parameter(torch.zeros(4, 3))
    assert clip_kind(w, "hidden", name=name) == ("none" if outer else "matrix")
    w.is_embedding_or_output_parameter = not outer  # Megatron's mark wins over the name
    assert clip_kind(w, "hidden", name=name) == ("matrix" if outer else "none")
    assert clip_kind(w, "hidden", override="matrix", name=name) == "matrix"  # and a group's "clip" over both
