"""Base directions against their formulas: Signum's buffer start (signum_init), and bases
plugged in from outside (register_base / a Base object): SGD with momentum and Lion."""

import pytest
import torch

from megatron_spectra.optim import Spectra
from megatron_spectra.optim.directions import BASES, Base, register_base
from megatron_spectra.settings import SettingError

LRS = [0.0, 0.02, 0.05, 0.05, 0.03, 0.01]  # a warm-up that starts at 0, then a decay


def weights(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(6, 4, generator=g) * 0.02, torch.randn(4, generator=g)]


def grads(k, seed=1):
    g = torch.Generator().manual_seed(seed + k)
    return [torch.randn(6, 4, generator=g) * 1e-3, torch.randn(4, generator=g) * 1e-3]


def run(base, wds=(0.1, 0.0), **kwargs):
    """Spectra without clipping (apply_to none: the plain base), one group per weight."""
    params = [torch.nn.Parameter(w.clone()) for w in weights()]
    opt = Spectra([{"params": [p], "weight_decay": wd} for p, wd in zip(params, wds)], base, apply_to="none", **kwargs)
    out = []
    for k, lr in enumerate(LRS):
        for group in opt.param_groups:
            group["lr"] = lr
        for p, g in zip(params, grads(k)):
            p.grad = g.clone()
        opt.step()
        out.append([p.detach().clone() for p in params])
    return out, opt


def reference(start, direction, wds=(0.1, 0.0)):
    """X_{k+1} = (1 - lr·wd) X_k - lr·U_k, with the state made by `start` at the first step."""
    xs, out = weights(), []
    states = [None, None]
    for k, lr in enumerate(LRS):
        for i, g in enumerate(grads(k)):
            decay = 1 - lr * wds[i]
            if states[i] is None:
                states[i] = start(xs[i], decay)
            u = direction(states[i], g, k + 1)
            xs[i] = decay * xs[i] - lr * u
        out.append([x.clone() for x in xs])
    return out


def signum_reference(init, m=0.95):
    def start(x, decay):
        # the official Signum: the weight decays first, then the buffer is cloned from it
        return {"buf": x * decay if init == "weight" else torch.zeros_like(x)}

    def direction(s, g, k):
        s["buf"] = m * s["buf"] + g
        return (g + m * s["buf"]).sign()

    return start, direction


@pytest.mark.parametrize("init", ["weight", "zero"])
def test_signum_buffer_starts_as_named(init):
    got, _ = run("signum", signum_init=init)
    want = reference(*signum_reference(init))
    for k, (a, b) in enumerate(zip(got, want)):
        for x, y in zip(a, b):
            torch.testing.assert_close(x, y, rtol=0, atol=1e-7, msg=f"step {k + 1}")


def test_signum_default_is_the_official_weight_start():
    assert BASES["signum"].defaults["signum_init"] == "weight"
    got, _ = run("signum")
    zero, weight = reference(*signum_reference("zero")), reference(*signum_reference("weight"))
    torch.testing.assert_close(got[-1][0], weight[-1][0], rtol=0, atol=1e-7)
    assert (got[-1][0] - zero[-1][0]).abs().max() > 1e-3  # the choice matters at these scales


def test_signum_buffer_is_not_refilled_after_a_resume():
    full, _ = run("signum")
    params = [torch.nn.Parameter(w.clone()) for w in weights()]
    groups = lambda ps: [{"params": [p], "weight_decay": wd} for p, wd in zip(ps, (0.1, 0.0))]  # noqa: E731
    opt = Spectra(groups(params), "signum", apply_to="none")
    for k, lr in enumerate(LRS):
        if k == 3:  # a fresh optimizer over the same weights, from the checkpoint
            saved = opt.state_dict()
            opt = Spectra(groups(params), "signum", apply_to="none")
            opt.load_state_dict(saved)
        for group in opt.param_groups:
            group["lr"] = lr
        for p, g in zip(params, grads(k)):
            p.grad = g.clone()
        opt.step()
    torch.testing.assert_close([p.detach() for p in params], full[-1], rtol=0, atol=0)


def test_signum_buffer_takes_the_weight_at_the_first_step_not_at_construction():
    # the official state is created lazily: weights loaded after construction (a fine-tune) count
    p = torch.nn.Parameter(torch.zeros(3, 2))
    opt = Spectra([p], "signum", lr=0.1, weight_decay=0.5, apply_to="none", momentum=0.9)
    loaded = torch.arange(6.0).reshape(3, 2)
    with torch.no_grad():
        p.copy_(loaded)
    p.grad = torch.ones(3, 2)
    opt.step()
    torch.testing.assert_close(opt.state[p]["momentum_buffer"], 0.9 * (1 - 0.1 * 0.5) * loaded + 1)


def test_sgd_momentum_is_torch_sgd_with_decoupled_weight_decay():
    for momentum, nesterov, dampening in ((0.9, False, 0.0), (0.9, True, 0.0), (0.9, False, 0.5), (0.0, False, 0.5)):
        got, _ = run("sgd-momentum", momentum=momentum, nesterov=nesterov, dampening=dampening)
        params = [torch.nn.Parameter(w.clone()) for w in weights()]
        sgd = torch.optim.SGD(params, lr=0.1, momentum=momentum, nesterov=nesterov, dampening=dampening)
        for k, lr in enumerate(LRS):
            for group in sgd.param_groups:
                group["lr"] = lr
            with torch.no_grad():
                decayed = [p * (1 - lr * wd) for p, wd in zip(params, (0.1, 0.0))]
            for p, g in zip(params, grads(k)):
                p.grad = g.clone()
            before = [p.detach().clone() for p in params]
            sgd.step()
            with torch.no_grad():  # torch's step is X - lr·U; the decay is decoupled: (1 - lr·wd) X - lr·U
                for p, b, d in zip(params, before, decayed):
                    p.add_(d - b)
            for x, y in zip(got[k], params):
                torch.testing.assert_close(x, y.detach(), rtol=0, atol=1e-7, msg=f"nesterov={nesterov} step {k + 1}")


def test_lion_follows_its_formula():
    b1, b2 = 0.8, 0.95

    def start(x, decay):
        return {"m": torch.zeros_like(x)}

    def direction(s, g, k):
        u = (b1 * s["m"] + (1 - b1) * g).sign()
        s["m"] = b2 * s["m"] + (1 - b2) * g
        return u

    got, opt = run("lion", betas=(b1, b2))
    assert opt.defaults["betas"] == (b1, b2)
    for a, b in zip(got, reference(start, direction)):
        for x, y in zip(a, b):
            torch.testing.assert_close(x, y, rtol=0, atol=1e-7)


def test_a_base_object_plugs_in_with_clipping():
    # plain SGD as a Base object, not registered: SPECTRA clips its direction, the gradient
    plain = Base("plain-sgd", lambda grad, state, step, **_: grad.clone(), (), {})
    w = torch.nn.Parameter(torch.zeros(8, 8))
    opt = Spectra([w], plain, lr=1.0, clip_threshold=0.5, clip_schedule="constant", mode="accurate")
    w.grad = torch.diag(torch.tensor([4.0, 2.0, 1.0, 0.5, 0.25, 0.1, 0.0, 0.0]))
    opt.step()
    sigma = -torch.linalg.svdvals(w.detach())
    assert sigma.max() <= 0.5 + 1e-4  # soft clipping: every singular value below c
    assert "plain-sgd" not in BASES


def test_registered_bases_take_their_own_hyperparameters_only():
    with pytest.raises(SettingError, match=r"unknown setting\(s\) \['eps'\] for base 'lion'"):
        Spectra([torch.nn.Parameter(torch.zeros(2))], "lion", eps=1e-8)
    with pytest.raises(SettingError, match="clip_threshold"):
        Spectra([torch.nn.Parameter(torch.zeros(2))], "lion", clip_threshold=-1.0)
    with pytest.raises(ValueError, match="already registered"):
        register_base(Base("lion", lambda grad, state, step, **_: grad, (), {}))
    with pytest.raises(ValueError, match=r"\['lr'\] are SPECTRA's own"):
        Base("bad", lambda grad, state, step, **_: grad, (), {"lr": 1.0})
    with pytest.raises(ValueError, match="unknown base optimizer 'nope'"):
        Spectra([torch.nn.Parameter(torch.zeros(2))], "nope")
