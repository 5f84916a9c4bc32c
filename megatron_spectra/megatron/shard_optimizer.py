"""The torch optimizer Megatron steps: SPECTRA on its fp32 main params.

Megatron hands its inner optimizer the fp32 main params: whole TP-local tensors (Float16 /
FP32 optimizers) or 1-D ZeRO shards of them (DistributedOptimizer). The base directions are
element-wise, so they run on whatever piece is here; the clip needs the full matrices and is
delegated to `clip_fn`, set by the Megatron wrapper, which sends all directions through the
distributed engine in one call. Then eq. (2): p <- (1 - lr·wd)·p - lr·alpha·H_c(U).
"""

from __future__ import annotations

from typing import Callable

import torch

from ..optim.directions import Base
from ..optim.schedules import ThresholdSchedule


class SpectraShardOptimizer(torch.optim.AdamW):
    """SPECTRA over Megatron main params.

    It subclasses AdamW only because megatron-core 0.16's DistributedOptimizer asserts that
    its inner optimizer is an Adam/AdamW (for its checkpoint code); AdamW's own step is never
    used. The per-param `state["step"]` tensors and the group "step" follow both of Megatron's
    step conventions (torch optimizers and TE/apex FusedAdam).
    """

    def __init__(self, param_groups, base: Base, hyper: dict, schedule: ThresholdSchedule):
        defaults = dict(lr=1e-3, weight_decay=0.0, **hyper)
        # Megatron's fp32 main shards are views of the params, which add_param_group refuses;
        # like DistributedOptimizer does with its Adam, we take the groups as they are.
        torch.optim.Optimizer.__init__(self, [torch.zeros(0, requires_grad=True)], defaults)
        self.param_groups = list(param_groups)
        for group in self.param_groups:
            for key, value in defaults.items():
                group.setdefault(key, value)
            for key, value in hyper.items():  # the Megatron groups carry Adam's keys: ours win
                group[key] = value
            group.setdefault("spectra_step", 0)
            group["spectra_base"] = base.name  # tells a checkpoint's reader who wrote it
        self.base, self.hyper, self.hyper_keys, self.schedule = base, dict(hyper), tuple(hyper), schedule
        self.clip_fn: Callable[[dict, float], dict] | None = None
        self.scales: dict[torch.Tensor, float] = {}
        self.last_threshold = schedule.c
        self.init_all_state()

    def init_all_state(self) -> None:
        """State for every param up front, so that every checkpoint sees the same keys."""
        for group in self.param_groups:
            for p in group["params"]:
                if not self.state[p]:
                    self.state[p].update(self.base.init_state(p))

    def restore_step(self) -> None:
        """After torch's load_state_dict, which replaces every group by the saved one: put
        back our keys and give every param its own `step` tensor. The count comes from the
        checkpoint (`spectra_step`, or a plain Adam's `step`); the base hyperparameters come
        from the config, as at construction. Megatron's loaders hand all params one shared
        step tensor (torch convention) or none (FusedAdam convention); our in-place
        `state["step"] += 1` needs one each."""
        for group in self.param_groups:
            step = group.get("spectra_step")
            if step is None:
                step = group.get("step")
            if step is None:  # torch AdamW keeps the count per param
                step = next((self.state[p]["step"] for p in group["params"] if "step" in self.state[p]), 0)
            step = int(step)
            group.update(self.hyper, spectra_base=self.base.name, spectra_step=step, step=step)
            for p in group["params"]:
                self.state[p]["step"] = torch.tensor(float(step))

    @property
    def spectra_step(self) -> int:
        return self.param_groups[0]["spectra_step"] if self.param_groups else 0

    def threshold(self) -> float:
        """c_k. Every group gets the same: Megatron's schedulers scale all groups' lr by the
        same warmup factor, so c·lr_max/lr does not depend on the group."""
        group = self.param_groups[0]
        return self.schedule(self.spectra_step, group["lr"], group.get("max_lr", group["lr"]))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        directions = {}
        for group in self.param_groups:
            hyper = {k: group[k] for k in self.hyper_keys}
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                state["step"] += 1
                directions[p] = self.base.direction(p.grad, state, int(state["step"]), **hyper)
        c = self.last_threshold = self.threshold()
        clipped = self.clip_fn(directions, c) if self.clip_fn is not None else directions
        for group in self.param_groups:
            lr = group["lr"]
            for p in group["params"]:
                if p in clipped and lr != 0:  # official: a frozen group is not stepped
                    p.mul_(1 - lr * group["weight_decay"]).add_(clipped[p], alpha=-lr * self.scales.get(p, 1.0))
            group["spectra_step"] += 1
            group["step"] = group["spectra_step"]
        return loss
