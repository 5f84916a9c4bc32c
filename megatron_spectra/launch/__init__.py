"""Launching training runs from YAML configs: locally with torchrun or on SLURM, and sweeps.

    config = load_config("configs/780m-deep/spectra-adamw.yaml")   # validated once
    to_command(config, "slurm")                                     # pure: the exact command line
"""

from .command import to_command, trainer_args
from .config import Config, ConfigError, check_paths, load_config, validate
from .layout import Layout, layout

__all__ = ["Config", "ConfigError", "Layout", "check_paths", "layout", "load_config", "to_command", "trainer_args", "validate"]
