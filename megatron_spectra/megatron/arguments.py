"""The `--spectra-*` command-line flags and the optimizer config they make.

One flag per setting of `megatron_spectra.settings` that has one; its dest is the
SpectraOptimizerConfig field, its help the setting's doc, and a bad value is an argparse
error naming the flag. Shared by the Megatron-LM hook (`megatron_lm/hook.py`, which installs itself on
import and so needs Megatron-LM) and the built-in trainer (`megatron_spectra.train`, which
needs only megatron-core): this module has no side effects.
"""

from __future__ import annotations

import argparse
import dataclasses

from ..settings import Setting, SettingError, config_fields, flag_settings
from .config import OPTIMIZERS, SpectraOptimizerConfig


def add_spectra_arguments(parser):
    """The --spectra-* flags; dest names are SpectraOptimizerConfig's field names."""
    action = next(a for a in parser._actions if "--optimizer" in a.option_strings)
    if action.choices is not None:
        action.choices = list(action.choices) + [n for n in OPTIMIZERS if n not in action.choices]
    group = parser.add_argument_group("spectra", "SPECTRA spectral clipping (megatron-spectra)")
    for s in flag_settings():
        group.add_argument(s.flag, dest=s.dest, help=s.doc.replace("%", "%%"), **_kind(s))
    return parser


def _kind(s: Setting) -> dict:
    if s.type is bool:
        return dict(action="store_false" if s.negated else "store_true")
    return dict(type=_checked(s), default=s.default, choices=list(s.choices) or None)


def _checked(s: Setting):
    """The flag's type: the value parsed, then the setting's check (argparse names the flag)."""

    def parse(text: str):
        try:
            value = s.type(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {s.type.__name__}, got {text!r}") from None
        try:
            return s.validate(value, "the value")
        except SettingError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    parse.__name__ = s.type.__name__
    return parse


def spectra_config_from_args(args) -> SpectraOptimizerConfig:
    kwargs = {f.name: getattr(args, f.name) for f in dataclasses.fields(SpectraOptimizerConfig) if f.init and hasattr(args, f.name)}
    for s in config_fields():
        if s.megatron_arg:  # no flag of its own: Megatron-LM's (--lr-warmup-iters, --train-iters)
            value = getattr(args, s.megatron_arg, None)
            kwargs[s.megatron] = s.default if value is None else value
    return SpectraOptimizerConfig(**kwargs)
