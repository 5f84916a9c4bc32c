"""The single-process SPECTRA optimizer: the reference every distributed version is checked against.

    X_{k+1} = (1 - lr_k·wd) X_k - lr_k·alpha·H_{c_k}(U_k)           (eq. 2 of arXiv 2603.14315)

U_k is the base optimizer's direction (AdamW, Signum, AdEMAMix), clipped before lr and weight
decay are applied; the official code instead recovers U_k from the weight difference after
a base-optimizer step, which is the same update at the cost of a copy of every weight. The
step itself is `optim.step.SpectraStep`, shared with the Megatron and FSDP optimizers.
"""

from __future__ import annotations

import inspect
from typing import Iterable

import torch

from ..ops.soft_clip import ClipNumerics
from ..settings import SETTINGS, hyperparameters, resolve, spectra_settings
from .directions import BASES, BUILT_IN, get_base
from .schedules import ThresholdSchedule, pre_clip_schedule
from .clipper import LocalClipper
from .step import SpectraStep

CLIP_KINDS = ("matrix", "vector", "none")
DEFAULT = {s.name: s.default for s in spectra_settings()}


class Spectra(SpectraStep, torch.optim.Optimizer):
    """SPECTRA around AdamW, Signum or AdEMAMix (decoupled weight decay), in one process or DDP.

    `base` is a built-in name, the name of a registered base (`optim.directions.register_base`;
    "sgd-momentum" and "lion" ship as examples) or a `Base` object; a base that is not built in
    takes its own hyperparameters (its `defaults`' keys) instead of the built-in ones.

    The keywords (base, lr, weight_decay, the base's hyperparameters, the threshold and its
    schedule, apply_to, mode, pre_clip, nonfinite, track_update_norms) with their types,
    defaults, choices and checks are declared in `megatron_spectra.settings`; `help(Spectra)`
    lists them, and an unknown keyword is an error naming the known ones. What they do here:
    - weight decay only where the param groups put it; a group's own lr, weight_decay and
      base hyperparameters win, and its "clip" key ("matrix" | "vector" | "none") overrides
      apply_to;
    - pre_clip: call `pre_clip_gradients()` after the backward (and the DDP reduction) and
      before global-norm clipping; `step()` does it itself if nobody did;
    - nonfinite="skip": a step with a non-finite gradient changes nothing and counts in
      `skipped_steps`; so does one whose direction U (e.g. eps=0 and a zero gradient entry:
      0/0) or its clip (paper mode's bf16 overflow) is non-finite from finite gradients,
      except that the base moments keep those gradients. "raise" raises a NonFiniteError
      naming the parameter and which of gradient, direction or update it was;
    - track_update_norms: the spectral norm of every matrix direction before and after
      clipping in `last_update_norms` (costs an SVD per matrix).

    `last_threshold` holds the c_k of the last step for logging; `spectra_step` and
    `skipped_steps` count the steps taken and skipped (kept in every param group, so they
    travel with `state_dict()`, with the base's name, `spectra_base`: `load_state_dict` of
    another base's state is refused); `register_update_observer(fn)` hands fn the U and
    H_c(U) of every clipped param after each step's clip. A (0, n) param is left as it is;
    a sparse gradient is a TypeError naming its param.
    """

    def __init__(self, params: Iterable, base: str = DEFAULT["base"], lr: float = DEFAULT["lr"],
                 weight_decay: float = DEFAULT["weight_decay"], **settings):
        # The keywords, their defaults and checks: megatron_spectra.settings (help(Spectra) lists them).
        self.base = get_base(base)
        own = None if BASES.get(self.base.name) is self.base and self.base.name in BUILT_IN else self.base.defaults
        self.settings = resolve(dict(base=self.base.name, lr=lr, weight_decay=weight_decay, **settings), own)
        s = self.settings
        self.schedule = ThresholdSchedule(s["clip_threshold"], s["clip_schedule"], s["warmup_steps"], s["total_steps"],
                                          s["decay_fraction"], s["clip_final_scale"])
        self.pre_clip_schedule = pre_clip_schedule(s) if s["pre_clip"] else None
        self.base_lr, self.threshold_base_lr = s["lr"], s["threshold_base_lr"]  # the official base_lr=--lr
        _check_warmup_lr(s)
        self.numerics = ClipNumerics(s["mode"], s["ns_steps"], s["ns_fp32"], s["post_process"])
        self.apply_to, self.nonfinite, self.track_update_norms = s["apply_to"], s["nonfinite"], s["track_update_norms"]
        hyper = {k: s[k] for k in (hyperparameters(s["base"]) if own is None else own)}
        super().__init__(params, dict(lr=s["lr"], weight_decay=s["weight_decay"], clip=None, **hyper))
        for i, group in enumerate(self.param_groups):
            for key in ("lr", "weight_decay", *(hyper if own is None else ())):  # a group may set its own
                SETTINGS[key].validate(group[key], f"param group {i}'s {key}")
            _check_choice("a param group's clip", group["clip"], CLIP_KINDS + (None,))
            group.setdefault("peak_lr", group["lr"])
        self.init_step(LocalClipper(self.numerics))


def _check_warmup_lr(s: dict) -> None:
    """The warm-up rule c_k = c·lr_max/lr_k takes lr_max from `lr` (threshold_base_lr="global",
    the official base_lr): lr = 0 would make c_k = 0 through the warm-up, so that nothing moves
    (the official code divides by c = 0 and gets NaN weights)."""
    warms = s["warmup_steps"] > 0 and s["clip_schedule"] != "constant" and s["threshold_base_lr"] == "global"
    used = s["post_process"] == "clip" or (s["pre_clip"] and s["pre_clip_schedule"] == "constant")
    if warms and used and s["lr"] == 0:
        raise ValueError(f"lr=0 with warmup_steps={s['warmup_steps']}: the threshold warm-up c_k = c·lr_max/lr_k takes "
                         f"lr_max from lr, so c_k would be 0 and nothing would move during the warm-up. Pass the "
                         f"peak lr as lr (a scheduler sets each step's lr), or threshold_base_lr='group' with each "
                         f"param group's 'peak_lr', or clip_schedule='constant'")


def _check_choice(what: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"unknown {what} {value!r}; expected one of {tuple(c for c in choices if c is not None)}")


def _signature() -> inspect.Signature:
    """Spectra's keywords as declared in settings, for help() and inspect."""
    P = inspect.Parameter
    head = [P("self", P.POSITIONAL_OR_KEYWORD), P("params", P.POSITIONAL_OR_KEYWORD)]
    head += [P(n, P.POSITIONAL_OR_KEYWORD, default=DEFAULT[n]) for n in ("base", "lr", "weight_decay")]
    rest = [P(s.name, P.KEYWORD_ONLY, default=s.default) for s in spectra_settings() if s.name not in ("base", "lr", "weight_decay")]
    return inspect.Signature(head + rest)


Spectra.__init__.__signature__ = _signature()
