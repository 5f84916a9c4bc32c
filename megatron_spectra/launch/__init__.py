"""Launching training runs from YAML configs: locally with torchrun or on SLURM, and sweeps.

    config = load_config("configs/780m-deep/spectra-adamw.yaml")   # validated once
    to_command(config, "slurm")                                     # pure: the exact command line
"""

from .command import to_command, trainer_args
from .config import Config, load_config, missing_inputs, validate
from .errors import ConfigError
from .layout import Layout, layout

__all__ = ["Config", "ConfigError", "Layout", "layout", "load_config", "missing_inputs", "to_command", "trainer_args", "validate"]
