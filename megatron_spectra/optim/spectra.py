"""The single-process SPECTRA optimizer: the reference every distributed version is checked against.

    X_{k+1} = (1 - lr_k·wd) X_k - lr_k·alpha·H_{c_k}(U_k)                     (eq. 2 of the paper)

U_k is the base optimizer's direction (AdamW, Signum, AdEMAMix), clipped before lr and weight
decay are applied; the official code instead recovers U_k from the weight difference after
a base-optimizer step, which is the same update at the cost of a copy of every weight.
"""

from __future__ import annotations

import math
from typing import Callable, Iterable

import torch

from ..ops.soft_clip import ClipNumerics, check_threshold, clip_vector, clip_wide
from .directions import get_base
from .schedules import ThresholdSchedule, matrix_scale

APPLY_TO = ("all", "2d", "none")
CLIP_KINDS = ("matrix", "vector", "none")
NONFINITE = ("raise", "skip")


class NonFiniteError(ValueError):
    """A gradient or update with inf/NaN was about to reach the weights."""


def clip_kind(param: torch.Tensor, apply_to: str, override: str | None = None) -> str:
    """How a parameter's update is clipped: "matrix" (SSC), "vector" (the vector rule) or "none".

    apply_to="all" is the official default: every matrix (embedding and output layer too)
    gets SSC and every 1-D parameter the vector rule. apply_to="2d" leaves 1-D parameters
    with their plain base update. apply_to="none" clips nothing: the plain base optimizer
    (AdamW, Signum, AdEMAMix), the paper's baselines through the same code. A param group's
    "clip" key overrides all of these, e.g. to exclude the embedding and output layer with
    clip="none".
    """
    if override is not None:
        return override
    if apply_to == "none":
        return "none"
    if param.ndim >= 2:
        return "matrix"
    return "vector" if apply_to == "all" else "none"


class Spectra(torch.optim.Optimizer):
    """SPECTRA around AdamW, Signum or AdEMAMix (decoupled weight decay), in one process or DDP.

    Args:
        base: "adamw" | "signum" | "ademamix".
        lr, weight_decay: as in torch.optim.AdamW; weight decay only where the param groups put it.
        betas, eps (adamw, ademamix), momentum, nesterov (signum), mix_alpha, alpha_warmup,
            beta3_warmup (ademamix): base hyperparameters; None keeps the paper's default.
        clip_threshold: c. clip_schedule: "constant" | "standard" | "wsd-sqrt" (needs
            total_steps); warmup_steps, total_steps, decay_fraction: its parameters.
        apply_to: "all" (official), "2d" or "none" (the unclipped base optimizer); a group's "clip" key ("matrix"|"vector"|"none") overrides.
        mode: "paper" (official numerics: bf16, ns_steps coupled Newton-Schulz steps, fp32 with
            ns_fp32) or "accurate" (fp32, error <= 1e-3 on every singular value at any s_max/c).
        pre_clip, pre_clip_threshold: SSC of every matrix gradient at 0.1 (no alpha), before
            global-norm clipping: call `pre_clip_gradients()` after the backward (and the DDP
            reduction) and before clipping; `step()` does it itself if nobody did.
        nonfinite: "raise" (a NonFiniteError naming the parameter) or "skip": a step with a
            non-finite gradient changes nothing and counts in `skipped_steps`; a non-finite
            update from finite gradients (paper-mode bf16 overflow) leaves the weights unchanged.
        track_update_norms: record the spectral norm of every matrix direction before and
            after clipping in `last_update_norms` (costs an SVD per matrix).

    `last_threshold` holds the c_k of the last step (of the first group) for logging.
    """

    def __init__(
        self,
        params: Iterable,
        base: str = "adamw",
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        *,
        betas: tuple | None = None,
        eps: float | None = None,
        momentum: float | None = None,
        nesterov: bool | None = None,
        mix_alpha: float | None = None,
        alpha_warmup: int | None = None,
        beta3_warmup: int | None = None,
        clip_threshold: float = 10.0,
        clip_schedule: str = "standard",
        warmup_steps: int = 0,
        total_steps: int | None = None,
        decay_fraction: float = 0.2,
        apply_to: str = "all",
        mode: str = "paper",
        ns_steps: int = 10,
        ns_fp32: bool = False,
        pre_clip: bool = False,
        pre_clip_threshold: float = 0.1,
        nonfinite: str = "raise",
        track_update_norms: bool = False,
    ):
        self.base = get_base(base)
        _check_lr(lr)
        if weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
        _check_choice("apply_to", apply_to, APPLY_TO)
        _check_choice("nonfinite", nonfinite, NONFINITE)
        check_threshold(clip_threshold)
        if pre_clip:
            check_threshold(pre_clip_threshold)
        self.schedule = ThresholdSchedule(clip_threshold, clip_schedule, warmup_steps, total_steps, decay_fraction)
        self.pre_clip_schedule = (
            ThresholdSchedule(pre_clip_threshold, "standard", warmup_steps) if pre_clip else None
        )
        self.numerics = ClipNumerics(mode, ns_steps, ns_fp32)
        self.apply_to, self.nonfinite, self.track_update_norms = apply_to, nonfinite, track_update_norms
        overrides = dict(
            betas=betas, eps=eps, momentum=momentum, nesterov=nesterov, mix_alpha=mix_alpha,
            alpha_warmup=alpha_warmup, beta3_warmup=beta3_warmup,
        )
        hyper = {**self.base.defaults, **{k: v for k, v in overrides.items() if v is not None and k in self.base.defaults}}
        unused = [k for k, v in overrides.items() if v is not None and k not in self.base.defaults]
        if unused:
            raise ValueError(f"{unused} do not apply to base {base!r} (its hyperparameters: {sorted(self.base.defaults)})")
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, clip=None, **hyper))
        for group in self.param_groups:
            _check_lr(group["lr"])
            _check_choice("a param group's clip", group["clip"], CLIP_KINDS + (None,))
            group.setdefault("peak_lr", group["lr"])
        self._step = 0
        self._pre_clipped = False
        self.skipped_steps = 0
        self.last_threshold = self.schedule.c
        self.last_update_norms: dict[str, tuple[float, float]] = {}

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
        entries = [(g, p, name) for g, p, name in self._named_params() if p.grad is not None]
        if not self._finite_or_skip([p.grad for _, p, _ in entries], [n for *_, n in entries], "gradient"):
            return loss
        updates = self._clipped_updates(entries)
        if not self._finite_or_skip([u for *_, u in updates], [n for _, _, n, _ in updates], "update"):
            return loss
        for group, p, _, update in updates:
            lr = group["lr"]
            p.mul_(1 - lr * group["weight_decay"]).add_(update.view_as(p), alpha=-lr * _scale(p, group, self.apply_to))
        self._step += 1
        return loss

    def _clipped_updates(self, entries):
        """Advance the moments and return (group, param, name, H_c(U)) for every stepped param."""
        stepped = []
        for group, p, name in entries:
            if group["lr"] == 0:  # official: a frozen group is not stepped at all
                continue
            state = self.state[p]
            if not state:
                state.update(self.base.init_state(p))
            state["step"] += 1
            u = self.base.direction(p.grad, state, int(state["step"]), **_hyper(group, self.base.defaults))
            c = self.schedule(self._step, group["lr"], group["peak_lr"])
            if group is self.param_groups[0]:
                self.last_threshold = c
            stepped.append((group, p, name, u, c, clip_kind(p, self.apply_to, group["clip"])))
        clipped = self.clip_directions([(p, name, u, c, kind) for _, p, name, u, c, kind in stepped])
        self.last_update_norms = {}
        if self.track_update_norms:
            for (_, p, name, u, _, kind), out in zip(stepped, clipped):
                if kind == "matrix":
                    self.last_update_norms[name] = (self.spectral_norm(p, u), self.spectral_norm(p, out))
        return [(group, p, name, out) for (group, p, name, *_), out in zip(stepped, clipped)]

    def clip_directions(self, items) -> list[torch.Tensor]:
        """H_c of every (param, name, direction, c, kind). The one place a distributed
        subclass changes: here every tensor is whole and clipped in this process."""
        return [clip_update(u, c, kind, self.numerics) for _, _, u, c, kind in items]

    def spectral_norm(self, param: torch.Tensor, tensor: torch.Tensor) -> float:
        """||tensor||_2 of a param-shaped tensor, for logging (an SVD)."""
        return _spectral_norm(tensor)

    # ------------------------------------------------------------------ pre-clipping

    @torch.no_grad()
    def pre_clip_gradients(self) -> None:
        """SSC of every matrix gradient at the pre-clip threshold, no alpha (official order:
        after the data-parallel reduction, before global-norm clipping)."""
        if self.pre_clip_schedule is None:
            raise RuntimeError("pre-clipping is off; construct Spectra(..., pre_clip=True)")
        for group, p, _ in self._named_params():
            if p.grad is not None and p.ndim >= 2 and group["lr"] > 0:
                c = self.pre_clip_schedule(self._step, group["lr"], group["peak_lr"])
                p.grad.copy_(_clip_matrix(p.grad, c, self.numerics).view_as(p.grad))
        self._pre_clipped = True

    # ------------------------------------------------------------------ bookkeeping

    def _named_params(self):
        for gi, group in enumerate(self.param_groups):
            names = group.get("param_names") or [f"group{gi}.param{i}{tuple(p.shape)}" for i, p in enumerate(group["params"])]
            yield from ((group, p, name) for p, name in zip(group["params"], names))

    def _finite_or_skip(self, tensors, names, what: str) -> bool:
        if not tensors:
            return True
        finite = self.agree_on_finite(torch.stack([torch.isfinite(t).all() for t in tensors]))
        if bool(finite.all()):
            return True
        bad = [n for n, ok in zip(names, finite.tolist()) if not ok]
        if self.nonfinite == "raise":
            hint = " (paper-mode bf16 overflow? try mode='accurate')" if what == "update" else ""
            raise NonFiniteError(f"non-finite {what} for parameter(s) {bad}{hint}; the weights were not changed")
        self.skipped_steps += 1
        return False

    def agree_on_finite(self, finite: torch.Tensor) -> torch.Tensor:
        """Per-tensor finiteness flags; a distributed subclass combines them over processes
        so that every process raises or skips together."""
        return finite

    def state_dict(self):
        sd = super().state_dict()
        sd["spectra"] = {"step": self._step, "skipped_steps": self.skipped_steps}
        return sd

    def load_state_dict(self, state_dict):
        state_dict = dict(state_dict)
        extra = state_dict.pop("spectra", {"step": 0, "skipped_steps": 0})
        super().load_state_dict(state_dict)
        self._step, self.skipped_steps = extra["step"], extra["skipped_steps"]


def clip_update(u: torch.Tensor, c: float, kind: str, numerics: ClipNumerics) -> torch.Tensor:
    if kind == "none":
        return u
    if c <= 0:  # the end of a wsd-sqrt schedule: H_c -> 0 as c -> 0
        return torch.zeros_like(u)
    if kind == "vector":
        return clip_vector(u.reshape(-1), c, numerics).view_as(u)
    return _clip_matrix(u, c, numerics)


def _clip_matrix(u: torch.Tensor, c: float, numerics: ClipNumerics) -> torch.Tensor:
    """SSC of a weight (d_out, *d_in) seen as a d_out x prod(d_in) matrix."""
    m = u.reshape(u.shape[0], -1)
    tall = m.shape[0] > m.shape[1]
    (out,) = clip_wide([m.mT if tall else m], [c], numerics)
    return (out.mT if tall else out).reshape(u.shape)


def _scale(p: torch.Tensor, group: dict, apply_to: str) -> float:
    kind = clip_kind(p, apply_to, group["clip"])
    return matrix_scale(p.shape) if kind == "matrix" else 1.0


def _hyper(group: dict, defaults: dict) -> dict:
    return {k: group[k] for k in defaults}


def _spectral_norm(t: torch.Tensor) -> float:
    return float(torch.linalg.matrix_norm(t.reshape(t.shape[0], -1).float(), ord=2))


def _check_lr(lr) -> None:
    if not isinstance(lr, (int, float)) or isinstance(lr, bool) or not math.isfinite(lr) or lr < 0:
        raise ValueError(f"the learning rate must be a finite number >= 0, got {lr!r}")


def _check_choice(what: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"unknown {what} {value!r}; expected one of {tuple(c for c in choices if c is not None)}")
