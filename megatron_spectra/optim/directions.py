"""Base-optimizer directions U_k, as pure element-wise functions of a gradient and a state.

Every function is element-wise, so the same code runs on a full tensor or on any flat shard
of it (ZeRO, FSDP): the shard's state is the matching shard of the full state. Each takes the
1-based step count of this update and the hyperparameters, updates its moments in place and
returns the direction U (a new tensor) that SPECTRA clips and then applies as
X <- (1 - lr·wd) X - lr·alpha·H_c(U).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

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
    """sign of the (Nesterov) momentum; dampening 0, as in the official Signum."""
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


@dataclass(frozen=True)
class Base:
    """A base optimizer: its direction, the moments it keeps, and its default hyperparameters."""

    name: str
    direction: Callable[..., Tensor]
    state_keys: tuple[str, ...]
    defaults: dict

    def init_state(self, like: Tensor) -> dict:
        state = {key: torch.zeros_like(like, memory_format=torch.preserve_format) for key in self.state_keys}
        state["step"] = torch.zeros((), dtype=torch.float32)
        return state


BASES: dict[str, Base] = {
    "adamw": Base("adamw", adamw, ("exp_avg", "exp_avg_sq"), {"betas": (0.9, 0.999), "eps": 1e-8}),
    "signum": Base("signum", signum, ("momentum_buffer",), {"momentum": 0.95, "nesterov": True}),
    "ademamix": Base(
        "ademamix",
        ademamix,
        ("exp_avg", "exp_avg_slow", "exp_avg_sq"),
        {"betas": (0.9, 0.999, 0.999), "mix_alpha": 8.0, "alpha_warmup": None, "beta3_warmup": None, "eps": 1e-8},
    ),
}


def get_base(name: str) -> Base:
    if name not in BASES:
        raise ValueError(f"unknown base optimizer {name!r}; expected one of {sorted(BASES)}")
    return BASES[name]
