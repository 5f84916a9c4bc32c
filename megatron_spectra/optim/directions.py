"""Base-optimizer directions U_k, as pure element-wise functions of a gradient and a state.

Every function is element-wise, so the same code runs on a full tensor or on any flat shard
of it (ZeRO, FSDP): the shard's state is the matching shard of the full state. Each takes the
1-based step count of this update and the hyperparameters, updates its moments in place and
returns the direction U (a new tensor) that SPECTRA clips and then applies as
X <- (1 - lr·wd) X - lr·alpha·H_c(U).

A `Base` bundles a direction with its moments and hyperparameters. The three built in
(adamw, signum, ademamix) have Megatron optimizer names and settings of their own; any other
base with decoupled weight decay plugs in as a `Base` passed to `Spectra(base=...)` or
registered by name (`register_base`), as the two examples below are (sgd-momentum, lion).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

from ..settings import generic_settings

Tensor = torch.Tensor


def adamw(grad: Tensor, state: dict, step: int, *, betas=(0.9, 0.999), eps=1e-8, **_) -> Tensor:
    """m̂ / (sqrt(v̂) + eps), with bias-corrected first and second moments."""
    beta1, beta2 = betas
    m, v = state["exp_avg"], state["exp_avg_sq"]
    m.lerp_(grad, 1 - beta1)
    v.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    denom = (v.sqrt() / math.sqrt(1 - beta2**step)).add_(eps)  # torch.optim.AdamW's rounding
    return (m / (1 - beta1**step)).div_(denom)


def signum(grad: Tensor, state: dict, step: int, *, momentum=0.95, nesterov=True, **_) -> Tensor:
    """sign of the (Nesterov) momentum, dampening 0 (the official scripts' --dampening 0); the
    buffer's start is `signum_start`'s."""
    buf = state["momentum_buffer"]
    buf.mul_(momentum).add_(grad)
    return (grad.add(buf, alpha=momentum) if nesterov else buf.clone()).sign_()


def ademamix(
    grad: Tensor,
    state: dict,
    step: int,
    *,
    betas=(0.9, 0.999, 0.999),
    mix_alpha=8.0,
    alpha_warmup=None,
    beta3_warmup=None,
    eps=1e-8,
    **_,
) -> Tensor:
    """(m̂_fast + alpha·m_slow) / (sqrt(v̂) + eps), with the alpha and beta3 warmups of AdEMAMix."""
    beta1, beta2, beta3_final = betas
    alpha = _linear_warmup(step, mix_alpha, alpha_warmup)
    beta3 = _half_life_warmup(step, beta3_final, beta1, beta3_warmup)
    fast, slow, v = state["exp_avg"], state["exp_avg_slow"], state["exp_avg_sq"]
    fast.lerp_(grad, 1 - beta1)
    slow.lerp_(grad, 1 - beta3)
    v.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    denom = (v.sqrt() / math.sqrt(1 - beta2**step)).add_(eps)
    return (fast / (1 - beta1**step)).add_(slow, alpha=alpha).div_(denom)


def _linear_warmup(step: int, end: float, warmup: int | None) -> float:
    if not warmup or step >= warmup:
        return end
    return end * step / warmup


def _half_life_warmup(step: int, end: float, start: float, warmup: int | None) -> float:
    """beta3 warmup of AdEMAMix: linear in the half-life ln(0.5)/ln(beta) - 1, not in beta."""
    if not warmup or step >= warmup:
        return end

    def half_life(beta: float) -> float:
        return math.log(0.5) / math.log(beta + 1e-8) - 1

    frac = step / warmup
    return math.pow(0.5, 1 / ((1 - frac) * half_life(start) + frac * half_life(end) + 1))


def signum_start(state: dict, weight: Tensor, decay: float, *, signum_init="weight", **_) -> None:
    """signum_init="weight": the buffer starts as the weight, after this step's decay, as in the
    official Signum (sign.py creates it with `torch.clone(p)` at the param's first step, after
    `p.mul_(1 - lr·wd)`); "zero": it stays zero (torch's SGD convention)."""
    if signum_init == "weight":
        state["momentum_buffer"].copy_(weight).mul_(decay)


def sgd_momentum(grad: Tensor, state: dict, step: int, *, momentum=0.9, dampening=0.0, nesterov=False, **_) -> Tensor:
    """torch.optim.SGD's direction: buf = momentum·buf + (1 - dampening)·g (buf = g at the first
    step), U = g + momentum·buf with Nesterov, else buf."""
    if momentum == 0:  # torch keeps no buffer then, and ignores dampening
        return grad.clone()
    buf = state["momentum_buffer"]
    if step == 1:
        buf.copy_(grad)
    else:
        buf.mul_(momentum).add_(grad, alpha=1 - dampening)
    return grad.add(buf, alpha=momentum) if nesterov else buf.clone()


def lion(grad: Tensor, state: dict, step: int, *, betas=(0.9, 0.99), **_) -> Tensor:
    """Lion (Chen et al. 2023): U = sign(beta1·m + (1 - beta1)·g), then m = beta2·m + (1 - beta2)·g."""
    beta1, beta2 = betas
    m = state["exp_avg"]
    u = m.lerp(grad, 1 - beta1).sign_()
    m.lerp_(grad, 1 - beta2)
    return u


@dataclass(frozen=True)
class Base:
    """A base optimizer with decoupled weight decay, as SPECTRA sees it: its direction U, the
    moments it keeps and its hyperparameters with their defaults (param-group keys).

    - `direction(grad, state, step, **hyper)`: U of this step (a new tensor), advancing the
      moments in `state` in place; `step` is the param's 1-based update count. Element-wise,
      so that it runs on any shard of a param (ZeRO, FSDP) with the matching shard of its state.
    - `state_keys`: the moments, created as zeros shaped like the param.
    - `defaults`: every hyperparameter `direction` reads, with its default.
    - `start(state, weight, decay, **hyper)` (optional): called at the param's first update,
      before `direction`, with the weight and this step's decay factor 1 - lr·wd: for a state
      that starts from the weight (Signum's buffer in the official code).
    Weight decay and the learning rate are SPECTRA's: X <- (1 - lr·wd) X - lr·alpha·H_c(U).
    """

    name: str
    direction: Callable[..., Tensor]
    state_keys: tuple[str, ...]
    defaults: dict
    start: Callable[..., None] | None = None

    def __post_init__(self):
        taken = sorted(set(self.defaults) & ({s.name for s in generic_settings()} | {"params", "clip"}))
        if taken:
            raise ValueError(f"base {self.name!r}: hyperparameter(s) {taken} are SPECTRA's own settings; rename them")

    def init_state(self, like: Tensor) -> dict:
        state = {key: torch.zeros_like(like, memory_format=torch.preserve_format) for key in self.state_keys}
        state["step"] = torch.zeros((), dtype=torch.float32)
        return state

    def update(self, param: Tensor, state: dict, group: dict) -> Tensor:
        """U of `param` (its grad, its state, its group's hyperparameters); counts the update."""
        state["step"] += 1
        step = int(state["step"])
        hyper = {k: group[k] for k in self.defaults}
        if step == 1 and self.start is not None:
            self.start(state, param, 1 - group["lr"] * group["weight_decay"], **hyper)
        return self.direction(param.grad, state, step, **hyper)


BASES: dict[str, Base] = {
    "adamw": Base("adamw", adamw, ("exp_avg", "exp_avg_sq"), {"betas": (0.9, 0.999), "eps": 1e-8}),
    "signum": Base(
        "signum", signum, ("momentum_buffer",), {"momentum": 0.95, "nesterov": True, "signum_init": "weight"}, signum_start
    ),
    "ademamix": Base(
        "ademamix",
        ademamix,
        ("exp_avg", "exp_avg_slow", "exp_avg_sq"),
        {"betas": (0.9, 0.999, 0.999), "mix_alpha": 8.0, "alpha_warmup": None, "beta3_warmup": None, "eps": 1e-8},
    ),
}
BUILT_IN = tuple(BASES)

# Two bases that are not built in, registered as a user would (`register_base`), by name in
# Spectra(..., base="sgd-momentum" | "lion") once this module is imported.
SGD_MOMENTUM = Base("sgd-momentum", sgd_momentum, ("momentum_buffer",), {"momentum": 0.9, "dampening": 0.0, "nesterov": False})
LION = Base("lion", lion, ("exp_avg",), {"betas": (0.9, 0.99)})


def register_base(base: Base) -> Base:
    """Make `base` usable by name: `Spectra(params, base=base.name, <its hyperparameters>)`.
    (A Base object may also be passed as `base=` without registering it.) The built-in names
    cannot be replaced; registering the same object twice is harmless."""
    if not isinstance(base, Base):
        raise TypeError(f"register_base takes a Base, got {type(base).__name__}")
    if BASES.get(base.name, base) is not base:
        raise ValueError(f"a base named {base.name!r} is already registered")
    BASES[base.name] = base
    return base


register_base(SGD_MOMENTUM)
register_base(LION)


def get_base(base: str | Base) -> Base:
    """The Base of a name (built in or registered), or `base` itself."""
    if isinstance(base, Base):
        return base
    if base not in BASES:
        raise ValueError(f"unknown base optimizer {base!r}; expected one of {sorted(BASES)} or a Base (see register_base)")
    return BASES[base]
