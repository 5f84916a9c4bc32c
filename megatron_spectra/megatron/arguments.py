"""The `--spectra-*` command-line flags and the optimizer config they make.

Shared by the Megatron-LM hook (`lm.py`, which installs itself on import and so needs
Megatron-LM) and the built-in trainer (`megatron_spectra.train`, which needs only
megatron-core): this module has no side effects.
"""

from __future__ import annotations

import dataclasses

from .config import OPTIMIZERS, SpectraOptimizerConfig


def add_spectra_arguments(parser):
    """The --spectra-* flags; dest names are SpectraOptimizerConfig's field names."""
    action = next(a for a in parser._actions if "--optimizer" in a.option_strings)
    if action.choices is not None:
        action.choices = list(action.choices) + [n for n in OPTIMIZERS if n not in action.choices]
    group = parser.add_argument_group("spectra", "SPECTRA spectral clipping (megatron-spectra)")
    group.add_argument("--spectra-clip-threshold", type=float, default=10.0, help="clipping threshold c")
    group.add_argument("--spectra-clip-schedule", default="standard", choices=["constant", "standard", "wsd-sqrt"])
    group.add_argument("--spectra-decay-fraction", type=float, default=0.2, help="wsd-sqrt: decay fraction of training")
    group.add_argument("--spectra-mode", default="paper", choices=["paper", "accurate"])
    group.add_argument("--spectra-ns-steps", type=int, default=10, help="Newton-Schulz steps (paper mode)")
    group.add_argument("--spectra-ns-fp32", action="store_true", help="paper mode in fp32 instead of bf16")
    group.add_argument("--spectra-apply-to", default="all", choices=["all", "2d", "hidden", "none"])
    group.add_argument("--spectra-split-qkv", action="store_true", help="clip Q, K, V separately")
    group.add_argument("--spectra-split-fc1", action="store_true", help="clip SwiGLU gate and up separately")
    group.add_argument("--spectra-strategy", default="auto", choices=["auto", "owner", "gram"])
    group.add_argument("--spectra-pre-clip", action="store_true", help="pre-clip matrix gradients")
    group.add_argument("--spectra-pre-clip-threshold", type=float, default=0.1)
    group.add_argument("--spectra-nonfinite", default="skip", choices=["skip", "raise"])
    group.add_argument("--spectra-log-update-norms", action="store_true")
    group.add_argument("--spectra-signum-momentum", type=float, default=0.95)
    group.add_argument("--spectra-signum-no-nesterov", dest="spectra_signum_nesterov", action="store_false")
    group.add_argument("--spectra-ademamix-beta3", type=float, default=0.999)
    group.add_argument("--spectra-ademamix-alpha", type=float, default=8.0)
    group.add_argument("--spectra-ademamix-warmup", type=int, default=None)
    group.add_argument("--spectra-cpu", action="store_true", help="run megatron on CPU under gloo (no GPU machines only)")
    return parser


def spectra_config_from_args(args) -> SpectraOptimizerConfig:
    kwargs = {f.name: getattr(args, f.name) for f in dataclasses.fields(SpectraOptimizerConfig) if f.init and hasattr(args, f.name)}
    kwargs["spectra_warmup_steps"] = getattr(args, "lr_warmup_iters", 0) or 0
    kwargs["spectra_total_steps"] = getattr(args, "train_iters", None)
    return SpectraOptimizerConfig(**kwargs)
