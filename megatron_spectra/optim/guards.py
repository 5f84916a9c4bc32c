"""What can go wrong in a SPECTRA step, found early and named: the step's own checks.

Each check either passes or raises an error that names the parameter (or param group) and
says what to change. They run on the host, from what the step already knows: no extra
device work on a step that goes well.
"""

from __future__ import annotations

import torch

from ..ops.soft_clip import ClipNumerics
from .directions import BASES, Base


class NonFiniteError(ValueError):
    """A gradient or update with inf/NaN was about to reach the weights."""


def check_dense(params) -> None:
    """(group, param, spec) triples: every gradient dense, or a TypeError naming the param."""
    for _, p, spec in params:
        if p.grad.layout != torch.strided:
            raise TypeError(f"parameter {spec.name} has a sparse gradient ({p.grad.layout}): SPECTRA clips dense "
                            f"updates; make its module dense (e.g. nn.Embedding(..., sparse=False))")


def check_lr_max(index: int, group: dict, lr_max: float, schedule, of_global: bool) -> None:
    """A group that moves inside the threshold warm-up needs lr_max > 0: c_k = c·lr_max/lr_k."""
    if lr_max == 0 and group["lr"] != 0 and schedule.kind != "constant" and group["spectra_step"] < schedule.warmup_steps:
        raise ValueError(
            f"param group {index} moves (lr={group['lr']:g}) in the threshold warm-up, but its lr_max is 0 "
            f"({'the global lr' if of_global else 'its peak_lr'}): c_k = c·lr_max/lr_k would be 0 and nothing would "
            f"move until step {schedule.warmup_steps}; give the peak lr (as lr, or as the group's 'peak_lr' with "
            f"threshold_base_lr='group')")


def nonfinite_hint(what: str, bad: list, base: Base, numerics: ClipNumerics, pre_clipped: bool, c: float) -> str:
    """What can make a `what` ("gradient" | "direction" | "update") non-finite, from the first
    of this process's bad (group, param, spec, U) entries (none: the bad one is elsewhere)."""
    if what == "gradient":
        return " (after pre-clipping)" if pre_clipped else ""
    u = bad[0][3] if bad else None
    if what == "direction":
        if u is None:
            return " from finite gradients"
        eps = bad[0][0].get("eps")
        if eps == 0:
            return f" from finite gradients: {base.name} with eps=0 divides 0 by 0 where a gradient entry and its second moment are 0"
        if eps is not None and float(torch.tensor(eps, dtype=u.dtype)) == 0:
            return (f" from finite gradients: eps={eps} is 0 in {u.dtype}, the dtype of {base.name}'s moments (the "
                    f"param's), so a zero second moment divides 0 by 0; keep fp32 params (master weights)")
        return f" from finite gradients: {base.name}'s direction overflowed in {u.dtype}"
    narrow = f", or H_c(U) overflowed {u.dtype}" if u is not None and u.dtype == torch.float16 else ""
    if numerics.mode == "paper":
        ns = "fp32" if numerics.fp32 else "bf16"
        return (f" from a finite direction: paper mode's one {ns} Newton-Schulz stage overflows once s_max/c_k "
                f"passes ~1e19 (c_k = {c:g}; mode='accurate' clips in stages){narrow}")
    return f" from a finite direction{narrow}"


def check_base(base: Base, state_dict: dict) -> None:
    """Refuse the state of another base before it is loaded (its moments would load, and the
    first step fail on a missing key or hyperparameter). The param groups name their base
    (`spectra_base`); a state dict from before they did is told by its moments' keys."""
    ours = base.name
    theirs = sorted({g.get("spectra_base") for g in state_dict.get("param_groups", [])} - {None})
    if theirs and theirs != [ours]:
        raise ValueError(f"the state dict was written by SPECTRA over base {theirs[0]!r}, and this optimizer's base "
                         f"is {ours!r}: their moments and hyperparameters differ. Build the optimizer with "
                         f"base={theirs[0]!r}, or load the model only and start the optimizer fresh")
    keys = {k for state in state_dict.get("state", {}).values() for k in state} - {"step"}
    if not theirs and keys and keys != set(base.state_keys):
        names = " or ".join(repr(b.name) for b in BASES.values() if set(b.state_keys) == keys) or "unknown"
        raise ValueError(f"the state dict holds the moments {sorted(keys)} (base {names}), and this optimizer's base "
                         f"{ours!r} keeps {sorted(base.state_keys)}: build the optimizer with the base that wrote it, "
                         f"or load the model only and start the optimizer fresh")
