"""Clipping-threshold schedules (section 5.2 of arXiv 2603.14315, item 3) and the per-matrix scale alpha (item 1)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

from ..settings import PRE_CLIP_SCHEDULES, SCHEDULES

DECAYS = tuple(k.removeprefix("wsd-") for k in SCHEDULES if k.startswith("wsd-"))


@dataclass(frozen=True)
class ThresholdSchedule:
    """c_k as a function of the step k, the current lr eta_k and the warm-up rule's lr_max
    (the official `_get_current_clip_c`, step for step).

    - constant: c_k = c (the official disable_dynamic_clip).
    - standard: c_k = c·lr_max/eta_k while k < warmup_steps (keeps c_k·eta_k fixed), then c.
    - wsd-<decay>: standard, then over the last T_d = floor(decay_fraction·T) steps
      c_k = c·(f + (1 - f)·d(p)), p = (k - (T - T_d))/T_d, f = final_scale, with d(p) =
      1 - p (linear), 1 - sqrt(p) (sqrt: c·eta_k/eta_max under the WSD sqrt lr),
      (1 + cos(pi p))/2 (cosine), 1 - p² (square); exp: c·f^p (f > 0; linear if f = 0).
    """

    c: float = 10.0
    kind: str = "standard"
    warmup_steps: int = 0
    total_steps: int | None = None
    decay_fraction: float = 0.2
    final_scale: float = 0.0

    def __post_init__(self):
        if self.kind not in SCHEDULES:
            raise ValueError(f"unknown clipping schedule {self.kind!r}; expected one of {SCHEDULES}")
        if not (isinstance(self.c, (int, float)) and math.isfinite(self.c) and self.c > 0):
            raise ValueError(f"the clipping threshold must be finite and > 0, got {self.c!r}")
        if self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {self.warmup_steps}")
        if self.kind.startswith("wsd-"):
            if self.total_steps is None or self.total_steps <= 0:
                raise ValueError(f"the {self.kind} clipping schedule needs total_steps > 0")
            if not 0 < self.decay_fraction <= 1:
                raise ValueError(f"decay_fraction must lie in (0, 1], got {self.decay_fraction}")
            if not (math.isfinite(self.final_scale) and self.final_scale >= 0):
                raise ValueError(f"final_scale must be finite and >= 0, got {self.final_scale}")

    def __call__(self, step: int, lr: float, peak_lr: float) -> float:
        """c_k for the update at 0-based step k, taken with lr = eta_k; 0 means "no update"."""
        if self.kind == "constant":
            return self.c
        if self.warmup_steps > 0 and step < self.warmup_steps:
            return self.c * peak_lr / max(lr, 1e-10)
        if self.kind == "standard":
            return self.c
        decay_steps = int(self.decay_fraction * self.total_steps)
        decay_start = self.total_steps - decay_steps
        if step < decay_start:
            return self.c
        progress = min((step - decay_start) / max(decay_steps, 1), 1.0)
        return self.c * decay_factor(self.kind.removeprefix("wsd-"), progress, self.final_scale)


def decay_factor(decay: str, p: float, final: float) -> float:
    """From 1 at p = 0 to `final` at p = 1 (written as the official code evaluates it)."""
    if decay == "exp":
        return final**p if final > 0 else 1 - p
    if decay == "cosine":
        return final + (1 - final) * (1 + math.cos(math.pi * p)) * 0.5
    shape = {"linear": 1 - p, "sqrt": 1 - math.sqrt(p), "square": 1 - p**2}
    return final + (1 - final) * shape[decay]


@dataclass(frozen=True)
class RampSchedule:
    """The official pre-clip threshold schedule (--spectral_grad_clip_schedule): from `c` to
    `end` over the whole run, t = min(k/T, 1), no warm-up rule. Called like ThresholdSchedule."""

    c: float
    end: float
    kind: str
    total_steps: int

    def __post_init__(self):
        if self.kind not in PRE_CLIP_SCHEDULES or self.kind == "constant":
            raise ValueError(f"unknown pre-clip ramp {self.kind!r}; expected one of {PRE_CLIP_SCHEDULES[1:]}")
        if not (self.c > 0 and self.end > 0 and self.total_steps > 0):
            raise ValueError(f"a pre-clip ramp needs c, end, total_steps > 0, got {self.c}, {self.end}, {self.total_steps}")

    def __call__(self, step: int, lr: float = 0.0, peak_lr: float = 0.0) -> float:
        t = min(step / max(self.total_steps, 1), 1.0)
        a, b = self.c, self.end
        if self.kind == "exp":
            return a * (b / max(a, 1e-10)) ** t
        if self.kind == "cos":
            return a + (b - a) * (1 - math.cos(math.pi * t)) * 0.5
        shape = {"linear": t, "sqrt": math.sqrt(t), "square": t**2}
        return a + (b - a) * shape[self.kind]


def pre_clip_schedule(s: dict) -> ThresholdSchedule | RampSchedule:
    """The pre-clip threshold's schedule from Spectra's settings `s`: the official one, a ramp
    if pre_clip_schedule says so, else pre_clip_threshold with the warm-up rule unless the
    update's clip_schedule is constant (no decay either way)."""
    if s["pre_clip_schedule"] != "constant":
        return RampSchedule(s["pre_clip_threshold"], s["pre_clip_threshold_end"], s["pre_clip_schedule"], s["total_steps"])
    kind = "constant" if s["clip_schedule"] == "constant" else "standard"
    return ThresholdSchedule(s["pre_clip_threshold"], kind, s["warmup_steps"])


def matrix_scale(global_shape: Sequence[int]) -> float:
    """alpha = sqrt(max(1, d_out/d_in)) of a weight stored (d_out, d_in); 1 for vectors.

    Always from the global (unsharded) shape: a tensor-parallel shard has a different ratio.
    Weights with more than two dims count as (shape[0], prod(shape[1:])).
    """
    if len(global_shape) < 2:
        return 1.0
    d_out, d_in = global_shape[0], math.prod(global_shape[1:])
    return math.sqrt(max(1.0, d_out / d_in))
