"""SpectraOptimizerConfig: megatron-core's OptimizerConfig plus a `spectra_*` field per SPECTRA setting.

The fields (name, type, default; the doc of each) come from `megatron_spectra.settings`.
Plain data, validated once in __post_init__ by the settings' own checks, with errors that
name the field. Megatron-LM's `get_megatron_optimizer_config(args)` copies every dataclass
field it finds on `args`, so the `--spectra-*` flags (dest `spectra_*`) land here without
further plumbing; hence this stays a real dataclass subclass of OptimizerConfig.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from megatron.core.optimizer import OptimizerConfig

from .. import settings
from ..settings import OPTIMIZERS, SETTINGS, SettingError, config_fields

__all__ = ["OPTIMIZERS", "SpectraOptimizerConfig"]


def _with_setting_fields(cls):
    """Declare a field per Megatron setting on cls, for @dataclass to pick up."""
    annotations = dict(cls.__dict__.get("__annotations__", {}))
    for s in config_fields():
        annotations[s.megatron] = Optional[s.type] if s.optional else s.type
        setattr(cls, s.megatron, s.default)
    cls.__annotations__ = annotations
    return cls


@dataclass
@_with_setting_fields
class SpectraOptimizerConfig(OptimizerConfig):
    """`optimizer` is one of OPTIMIZERS; lr, weight_decay, adam_beta1/2, adam_eps, clip_grad,
    bf16/fp16 and use_distributed_optimizer keep their megatron-core meaning. The `spectra_*`
    fields: see `megatron_spectra.settings` (`spectra_warmup_steps` and `spectra_total_steps`
    come from --lr-warmup-iters and --train-iters)."""

    def __post_init__(self):
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer: {self.optimizer!r} is not a Spectra optimizer; expected one of {OPTIMIZERS}")
        # megatron-core's own checks key on 'adam' (precision-aware optimizer, CPU offload);
        # they do not apply to us, so run them on a copy of the name and restore it.
        name, self.optimizer = self.optimizer, "adam"
        try:
            super().__post_init__()
        finally:
            self.optimizer = name
        self._check()

    @property
    def base(self) -> str:
        return self.optimizer[len("spectra-"):]

    def _check(self) -> None:
        for s in config_fields():
            s.validate(getattr(self, s.megatron), s.megatron)
        for s in SETTINGS.values():  # megatron-core's fields that Spectra reads (lr may be unset)
            if s.core and getattr(self, s.megatron) is not None:
                s.validate(getattr(self, s.megatron), s.megatron)
        for name in ("adam_beta1", "adam_beta2"):
            problem = settings.beta(getattr(self, name))
            if problem:
                raise SettingError(f"{name} {problem}, got {getattr(self, name)!r}")
        settings.check_together({s.name: getattr(self, s.megatron) for s in config_fields()}, _spelled)
        if self.use_precision_aware_optimizer or self.optimizer_cpu_offload:
            raise ValueError("Spectra optimizers support neither the precision-aware optimizer nor CPU offload")

    def spectra_kwargs(self) -> dict:
        """The keywords of the reference `Spectra` that this config means."""
        return settings.spectra_kwargs(self)

    def base_hyperparameters(self) -> dict:
        """The base direction's hyperparameters, as param-group entries."""
        kwargs = self.spectra_kwargs()
        return {name: kwargs[name] for name in settings.hyperparameters(self.base)}


def _spelled(name: str) -> str:
    s = SETTINGS[name]
    return f"{s.megatron} (--{s.megatron_arg.replace('_', '-')})" if s.megatron_arg else s.megatron
