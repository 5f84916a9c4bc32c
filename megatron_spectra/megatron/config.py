"""SpectraOptimizerConfig: megatron-core's OptimizerConfig plus the SPECTRA fields.

Plain data, validated once in __post_init__ with errors that name the field. Megatron-LM's
`get_megatron_optimizer_config(args)` copies every dataclass field it finds on `args`, so
the `--spectra-*` flags (dest `spectra_*`) land here without further plumbing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from megatron.core.optimizer import OptimizerConfig

from ..ops.soft_clip import MODES
from ..optim.directions import BASES
from ..optim.schedules import SCHEDULES

OPTIMIZERS = tuple(f"spectra-{name}" for name in BASES)  # spectra-adamw, spectra-signum, spectra-ademamix
APPLY_TO = ("all", "2d", "hidden", "none")
STRATEGIES = ("auto", "owner", "gram")
NONFINITE = ("skip", "raise")


@dataclass
class SpectraOptimizerConfig(OptimizerConfig):
    """`optimizer` is one of OPTIMIZERS; lr, weight_decay, adam_beta1/2, adam_eps, clip_grad,
    bf16/fp16 and use_distributed_optimizer keep their megatron-core meaning."""

    spectra_clip_threshold: float = 10.0
    """c: every applied matrix step has spectral norm <= lr * alpha * c."""

    spectra_clip_schedule: str = "standard"
    """constant | standard (c·lr_max/lr during warmup) | wsd-sqrt (also decays with a WSD sqrt lr)."""

    spectra_warmup_steps: int = 0
    """Warmup length for the threshold schedule (Megatron-LM: --lr-warmup-iters)."""

    spectra_total_steps: int | None = None
    """Training length for wsd-sqrt (Megatron-LM: --train-iters)."""

    spectra_decay_fraction: float = 0.2
    """Fraction of training over which wsd-sqrt decays the threshold."""

    spectra_mode: str = "paper"
    """paper (the official bf16 Newton-Schulz numerics) | accurate (fp32, 1e-3 on every singular value)."""

    spectra_ns_steps: int = 10
    """Newton-Schulz steps in paper mode."""

    spectra_ns_fp32: bool = False
    """Paper mode in fp32 instead of bf16 (the official --ns_float32)."""

    spectra_apply_to: str = "all"
    """all (official: matrices incl. embedding/output with alpha, 1-D params by the vector
    rule) | 2d (matrices only) | hidden (matrices except embedding and output layer)."""

    spectra_split_qkv: bool = False
    """Clip Q, K and V separately (per query group); the official code clips fused QKV whole."""

    spectra_split_fc1: bool = False
    """Clip SwiGLU gate and up separately; clipping fc1 whole is the official behaviour."""

    spectra_strategy: str = "auto"
    """How full matrices are rebuilt from shards: auto | owner (gather to one rank) | gram."""

    spectra_pre_clip: bool = False
    """SSC of every matrix gradient (no alpha) before global-norm clipping."""

    spectra_pre_clip_threshold: float = 0.1

    spectra_nonfinite: str = "skip"
    """A non-finite gradient without a loss scaler: skip the step everywhere, or raise."""

    spectra_log_update_norms: bool = False
    """Log the spectral norm of every matrix update before and after clipping (costs SVDs)."""

    spectra_signum_momentum: float = 0.95
    spectra_signum_nesterov: bool = True
    spectra_ademamix_beta3: float = 0.999
    spectra_ademamix_alpha: float = 8.0
    spectra_ademamix_warmup: int | None = None
    """Warmup of AdEMAMix's alpha and beta3 (the paper: about the whole run)."""

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
        def positive(field, value):
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ValueError(f"{field} must be a finite number > 0, got {value!r}")

        positive("spectra_clip_threshold", self.spectra_clip_threshold)
        positive("spectra_pre_clip_threshold", self.spectra_pre_clip_threshold)
        choices = {
            "spectra_clip_schedule": (self.spectra_clip_schedule, SCHEDULES),
            "spectra_mode": (self.spectra_mode, MODES),
            "spectra_apply_to": (self.spectra_apply_to, APPLY_TO),
            "spectra_strategy": (self.spectra_strategy, STRATEGIES),
            "spectra_nonfinite": (self.spectra_nonfinite, NONFINITE),
        }
        for field, (value, allowed) in choices.items():
            if value not in allowed:
                raise ValueError(f"{field} must be one of {allowed}, got {value!r}")
        if self.spectra_clip_schedule == "wsd-sqrt" and not self.spectra_total_steps:
            raise ValueError("spectra_clip_schedule='wsd-sqrt' needs spectra_total_steps (--train-iters)")
        if self.spectra_ns_steps < 1 or self.spectra_warmup_steps < 0:
            raise ValueError("spectra_ns_steps must be >= 1 and spectra_warmup_steps >= 0")
        if self.use_precision_aware_optimizer or self.optimizer_cpu_offload:
            raise ValueError("Spectra optimizers support neither the precision-aware optimizer nor CPU offload")

    def base_hyperparameters(self) -> dict:
        """The base direction's hyperparameters, as param-group entries."""
        if self.base == "adamw":
            return dict(betas=(self.adam_beta1, self.adam_beta2), eps=self.adam_eps)
        if self.base == "signum":
            return dict(momentum=self.spectra_signum_momentum, nesterov=self.spectra_signum_nesterov)
        return dict(
            betas=(self.adam_beta1, self.adam_beta2, self.spectra_ademamix_beta3),
            mix_alpha=self.spectra_ademamix_alpha,
            alpha_warmup=self.spectra_ademamix_warmup,
            beta3_warmup=self.spectra_ademamix_warmup,
            eps=self.adam_eps,
        )
