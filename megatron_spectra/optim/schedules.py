"""Clipping-threshold schedules (section 5.2 of arXiv 2603.14315, item 3) and the per-matrix scale alpha (item 1)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

SCHEDULES = ("constant", "standard", "wsd-sqrt")


@dataclass(frozen=True)
class ThresholdSchedule:
    """c_k as a function of the step k and the current lr eta_k.

    - constant: c_k = c.
    - standard: c_k = c·eta_max/eta_k while k < warmup_steps (keeps c_k·eta_k fixed), then c.
    - wsd-sqrt: standard, then c_k = c·(1 - sqrt((k - (T - T_d))/T_d)) over the last
      T_d = floor(decay_fraction·T) steps, which is c·eta_k/eta_max under the WSD sqrt lr.
    """

    c: float = 10.0
    kind: str = "standard"
    warmup_steps: int = 0
    total_steps: int | None = None
    decay_fraction: float = 0.2

    def __post_init__(self):
        if self.kind not in SCHEDULES:
            raise ValueError(f"unknown clipping schedule {self.kind!r}; expected one of {SCHEDULES}")
        if not (isinstance(self.c, (int, float)) and math.isfinite(self.c) and self.c > 0):
            raise ValueError(f"the clipping threshold must be finite and > 0, got {self.c!r}")
        if self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {self.warmup_steps}")
        if self.kind == "wsd-sqrt":
            if self.total_steps is None or self.total_steps <= 0:
                raise ValueError("the wsd-sqrt clipping schedule needs total_steps > 0")
            if not 0 < self.decay_fraction <= 1:
                raise ValueError(f"decay_fraction must lie in (0, 1], got {self.decay_fraction}")

    def __call__(self, step: int, lr: float, peak_lr: float) -> float:
        """c_k for the update at 0-based step k, taken with lr = eta_k; 0 means "no update"."""
        if self.kind == "constant":
            return self.c
        if step < self.warmup_steps:
            return self.c * peak_lr / max(lr, 1e-10)
        if self.kind == "standard":
            return self.c
        decay_steps = int(self.decay_fraction * self.total_steps)
        decay_start = self.total_steps - decay_steps
        if step < decay_start:
            return self.c
        progress = min((step - decay_start) / max(decay_steps, 1), 1.0)
        return self.c * (1.0 - math.sqrt(progress))


def matrix_scale(global_shape: Sequence[int]) -> float:
    """alpha = sqrt(max(1, d_out/d_in)) of a weight stored (d_out, d_in); 1 for vectors.

    Always from the global (unsharded) shape: a tensor-parallel shard has a different ratio.
    Weights with more than two dims count as (shape[0], prod(shape[1:])).
    """
    if len(global_shape) < 2:
        return 1.0
    d_out, d_in = global_shape[0], math.prod(global_shape[1:])
    return math.sqrt(max(1.0, d_out / d_in))
