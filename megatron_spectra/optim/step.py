"""The SPECTRA step, once for every path: the reference optimizer, Megatron's main params, FSDP2.

    X_{k+1} = (1 - lr_k·wd) X_k - lr_k·alpha·H_{c_k}(U_k)           (eq. 2 of arXiv 2603.14315)

`SpectraStep` runs it over whatever tensors its optimizer holds: whole weights, Megatron's
1-D ZeRO shards of them, or DTensors. The base direction U_k is element-wise, so it runs on
any piece. It knows nothing of processes; a distributed path plugs in at one seam, the
optimizer's `clipper` (`clipper.py`), which clips the directions (each full tensor once)
and tells whether every process's tensors are finite. What a piece cannot tell (how its
full tensor is clipped, its alpha) comes from `spec_of`, which an adapter answers from its
own records.

As in the official code (Algorithm 3 of the paper), a param group with lr = 0 (a frozen
group, or the first warm-up step) still advances its base moments and step count; only its
clip and update are skipped. Each param group gets its own c_k from the schedule at its step
count and lr; the warm-up rule's lr_max is the optimizer's global lr for every group, as the
official code passes --lr (threshold_base_lr="global"), or the group's own peak lr ("group").
The two agree unless groups have their own lr (µP, Megatron's decoupled lr). The pre-clip
threshold is the official one: one c for every matrix gradient, from the first group's lr
("global"), or per group ("group").
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Callable

import torch
from torch.utils.hooks import RemovableHandle

from ..ops.soft_clip import ClipNumerics
from .clipper import Clip, Clipped, Clipper, ParamSpec, clip_kind
from .guards import NonFiniteError, check_base, check_dense, check_lr_max, nonfinite_hint
from .schedules import ThresholdSchedule, matrix_scale


def _one_or_per_group(cs: list[float | None]):
    """One float when every moving group has the same c (the common case), else the list."""
    moving = {c for c in cs if c is not None}
    return moving.pop() if len(moving) == 1 else cs


class SpectraStep:
    """The step of a torch optimizer that is SPECTRA. The optimizer sets `base`, `schedule`,
    `pre_clip_schedule`, `numerics`, `nonfinite` ("raise" | "skip"), `track_update_norms`,
    `base_lr` (the global lr) and `threshold_base_lr` ("global" | "group"), then calls
    `init_step(clipper)`.

    Counters live in every param group, where torch, DCP and Megatron checkpoints keep them:
    `spectra_step` (steps taken) and `spectra_skipped_steps`; each param's `state["step"]`
    counts its own updates (its bias corrections). Every param has its state from the start,
    so every process's `state_dict()` has the same keys, and DCP does not run a step at lr 0
    to create it (which here would advance the counts).
    """

    base: object
    schedule: ThresholdSchedule
    pre_clip_schedule: ThresholdSchedule | None
    numerics: ClipNumerics
    nonfinite: str
    track_update_norms: bool = False
    base_lr: float | None = None
    threshold_base_lr: str = "global"
    gradients_checked_before: bool = False  # True where the caller's own step checked them over these processes

    def init_step(self, clipper: Clipper) -> None:
        self.clipper = clipper
        self._observers: OrderedDict[int, Callable] = OrderedDict()  # RemovableHandle needs a weak-referable dict
        self._pre_clipped = False
        self.last_threshold = self.schedule.c
        self.last_update_norms: dict[str, tuple[float, float]] = {}
        for group in self.param_groups:
            self._start_counters(group)
        self.init_state()

    def init_state(self) -> None:
        """The base's state (zero moments, step 0) for every param that has none yet."""
        for group in self.param_groups:
            for p in group["params"]:
                if not self.state[p]:
                    self.state[p].update(self.base.init_state(p))

    # ------------------------------------------------------------------ what adapters answer

    def spec_of(self, group: dict, param: torch.Tensor, name: str) -> ParamSpec:
        """The param's clip kind, alpha and matrix-ness, from its (global) shape and the group's
        "clip" key; an adapter whose params are pieces answers from its own records."""
        kind = clip_kind(param, self.apply_to, group.get("clip"), name)
        scale = matrix_scale(param.shape) if kind == "matrix" and param.numel() else 1.0  # (n, 0): no update
        return ParamSpec(name, kind, scale, param.ndim >= 2)

    def peak_lr(self, group: dict) -> float:
        return group["peak_lr"]

    def warmup_lr(self, group: dict) -> float:
        """lr_max of the warm-up rule c·lr_max/lr for this group (see the module doc)."""
        if self.threshold_base_lr == "global" and self.base_lr is not None:
            return self.base_lr
        return self.peak_lr(group)  # "group", or no global lr known (a Megatron config without lr)

    def spectral_norm(self, param: torch.Tensor, tensor: torch.Tensor) -> float:
        """||tensor||_2 of a param-shaped tensor, for `track_update_norms` (an SVD)."""
        if tensor.numel() == 0:
            return 0.0
        return float(torch.linalg.matrix_norm(tensor.reshape(tensor.shape[0], -1).float(), ord=2))

    # ------------------------------------------------------------------ observers

    def register_update_observer(self, observer: Callable[[list[Clipped]], None]) -> RemovableHandle:
        """Call `observer(updates)` after every step's clip, with this process's pieces of U and
        H_c(U) of every clipped param (not at a step whose groups all have lr = 0)."""
        handle = RemovableHandle(self._observers)
        self._observers[handle.id] = observer
        return handle

    # ------------------------------------------------------------------ the step

    @torch.no_grad()
    def step(self, closure: Callable | None = None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self.pre_clip_schedule is not None and not self._pre_clipped:
            self.pre_clip_gradients()
        self._pre_clipped = False
        params = [(group, p, spec) for group, p, spec in self._specs() if p.grad is not None]
        check_dense(params)
        grads_ok = self.gradients_checked_before or self._finite_or_skip(
            [p.grad for _, p, _ in params], [s.name for *_, s in params], "gradient")
        if not grads_ok:
            return loss
        moved = [(group, p, spec, self._direction(group, p)) for group, p, spec in params]  # lr 0 too
        moved = [(group, p, spec, u) for group, p, spec, u in moved if group["lr"] != 0]
        updates, verified = self._clip_updates(moved)
        # A non-finite direction (e.g. eps 0 and a zero gradient entry: 0/0) reaches this
        # check too: every clipper hands it back non-finite. The moments keep this step's
        # (finite) gradients either way; only the weights are left alone.
        if not verified and not self._finite_or_skip(updates, [s.name for _, _, s, _ in moved], "update", moved):
            return loss
        for (group, p, spec, _), h in zip(moved, updates):
            lr = group["lr"]
            p.mul_(1 - lr * group["weight_decay"]).add_(h.view_as(p), alpha=-lr * spec.scale)
        for group in self.param_groups:
            group["spectra_step"] += 1
        return loss

    def _direction(self, group: dict, p: torch.Tensor) -> torch.Tensor:
        """U_k; advances the param's moments and its step count."""
        return self.base.update(p, self.state[p], group)

    def _clip_updates(self, moved) -> tuple[list[torch.Tensor], bool]:
        """H_c(U) of every moved param (U itself where its kind is "none"), in one clipper call,
        and whether the clipper verified them all finite on every process."""
        cs = self.thresholds(self.schedule)
        if all(c is None for c in cs):  # every group has lr 0: nothing moves, on every process alike
            return [], True
        if self.numerics.post == "normalize":
            c = 1.0  # normalize has no threshold (and a wsd-* end at 0 must not zero it)
        else:
            self.last_threshold = next(c for c in cs if c is not None)
            c = _one_or_per_group(cs)
        index = {id(g): i for i, g in enumerate(self.param_groups)}
        chosen = [i for i, (*_, spec, _) in enumerate(moved) if spec.kind != "none"]
        items = [Clip(moved[i][1], moved[i][2], moved[i][3], moved[i][2].kind, index[id(moved[i][0])]) for i in chosen]
        unclipped = [u for *_, spec, u in moved if spec.kind == "none"]
        outs = self.clipper.clip(items, c, "update", also_check=unclipped)
        verified = self.clipper.verified_finite
        clipped = [Clipped(item.param, item.spec, item.tensor, out) for item, out in zip(items, outs)]
        self._observe(clipped)
        updates = [u for *_, u in moved]
        for i, out in zip(chosen, outs):
            updates[i] = out
        return updates, verified

    def _observe(self, clipped: list[Clipped]) -> None:
        if self.track_update_norms:
            self.last_update_norms = {
                c.spec.name: (self.spectral_norm(c.param, c.u), self.spectral_norm(c.param, c.h))
                for c in clipped if c.spec.kind == "matrix"
            }
        for observer in list(self._observers.values()):
            observer(clipped)

    def thresholds(self, schedule: ThresholdSchedule) -> list[float | None]:
        """c_k of every param group this step (None where its lr is 0: it does not move)."""
        cs = []
        for i, g in enumerate(self.param_groups):
            lr_max = self.warmup_lr(g)
            check_lr_max(i, g, lr_max, schedule, self.threshold_base_lr == "global" and self.base_lr is not None)
            cs.append(None if g["lr"] == 0 else schedule(g["spectra_step"], g["lr"], lr_max))
        return cs

    def pre_clip_thresholds(self):
        """The official pre-clip c: one for all, the schedule at the first group's lr (at lr 0
        a huge c, as the official lr floor 1e-10 makes it: a near-identity clip); per group
        with threshold_base_lr="group"."""
        schedule = self.pre_clip_schedule
        cs = [schedule(g["spectra_step"], g["lr"], self.warmup_lr(g)) for g in self.param_groups]
        return cs[0] if self.threshold_base_lr == "global" else _one_or_per_group(cs)

    # ------------------------------------------------------------------ pre-clipping

    @torch.no_grad()
    def pre_clip_gradients(self) -> None:
        """SSC of every matrix gradient at the pre-clip threshold, no alpha (official order:
        after the data-parallel reduction, before global-norm clipping)."""
        if self.pre_clip_schedule is None:
            raise RuntimeError(f"pre-clipping is off; construct {type(self).__name__}(..., pre_clip=True)")
        if self.param_groups:
            c = self.pre_clip_thresholds()
            index = {id(g): i for i, g in enumerate(self.param_groups)}
            items = [
                Clip(p, spec, p.grad, "matrix", index[id(group)])
                for group, p, spec in self._specs()
                if p.grad is not None and spec.matrix  # lr 0 too: its moments still advance (official)
            ]
            for item, out in zip(items, self.clipper.clip(items, c, "gradient")):
                item.tensor.copy_(out.view_as(item.tensor))
        self._pre_clipped = True

    # ------------------------------------------------------------------ bookkeeping

    def _specs(self):
        for gi, group in enumerate(self.param_groups):
            names = group.get("param_names") or [f"group{gi}.param{i}{tuple(p.shape)}" for i, p in enumerate(group["params"])]
            yield from ((group, p, self.spec_of(group, p, name)) for p, name in zip(group["params"], names))

    def _finite_or_skip(self, tensors, names, what: str, moved=None) -> bool:
        """True if every process's tensors are finite; else skip the step everywhere or raise
        a NonFiniteError naming the parameters and what went non-finite."""
        bad = self.clipper.find_nonfinite(tensors)
        if bad is None:
            return True
        if self.nonfinite == "raise":
            if moved is not None:  # which was it: the base direction U, or its clip H_c(U)?
                bad_u = self.clipper.find_nonfinite([u for *_, u in moved])  # every process is here alike
                what, bad = ("direction", bad_u) if bad_u is not None else ("update", bad)
            where = f"parameter(s) {[names[i] for i in bad]}" if bad else "a parameter of another process"
            bad_entries = [moved[i] for i in bad] if moved is not None else []
            hint = nonfinite_hint(what, bad_entries, self.base, self.numerics, self.pre_clip_schedule is not None, self.last_threshold)
            raise NonFiniteError(f"non-finite {what} in {where}{hint}; the weights were not changed")
        for group in self.param_groups:
            group["spectra_skipped_steps"] += 1
        return False

    @property
    def spectra_step(self) -> int:
        """Steps taken (skipped ones not counted)."""
        return self.param_groups[0]["spectra_step"] if self.param_groups else 0

    @property
    def skipped_steps(self) -> int:
        return self.param_groups[0]["spectra_skipped_steps"] if self.param_groups else 0

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        if hasattr(self, "clipper"):  # torch's constructor adds the first groups before init_step
            self._start_counters(self.param_groups[-1])
            self.init_state()

    def _start_counters(self, group: dict) -> None:
        group.setdefault("spectra_step", self.spectra_step if group is not self.param_groups[0] else 0)
        group.setdefault("spectra_skipped_steps", 0)
        group.setdefault("spectra_base", self.base.name)  # which base's moments the state holds

    def load_state_dict(self, state_dict) -> None:
        check_base(self.base, state_dict)
        super().load_state_dict(state_dict)
        self.restore_counters()

    def restore_counters(self) -> None:
        """After torch's load_state_dict, which replaces every group by the saved one: the step
        count from the checkpoint's `spectra_step`, else a plain Adam's group `step` (Megatron's
        FusedAdam convention) or its params' `state["step"]` (torch's)."""
        for group in self.param_groups:
            step = group.get("spectra_step", group.get("step"))
            if step is None:
                step = next((self.state[p]["step"] for p in group["params"] if "step" in self.state[p]), 0)
            group["spectra_step"] = int(step)
            group.setdefault("spectra_skipped_steps", 0)
            group.setdefault("spectra_base", self.base.name)
