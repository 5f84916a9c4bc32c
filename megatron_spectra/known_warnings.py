"""Warnings that megatron-core and torch print once per process on our paths and that a user
cannot act on: optional CUDA accelerators, CUDA-only tuning advice, deprecations inside the
libraries themselves. Every entry point (`spectra`, the trainer, the Megatron-LM hook) calls
`quiet_known_warnings()` before megatron's imports, which warn. Imports nothing heavy.
"""

from __future__ import annotations

import warnings

KNOWN_NOISE = (
    ".*Transformer Engine and Apex are not installed.*",
    ".*Apex is not installed. Falling back to Torch Norm.*",
    ".*CUDA_DEVICE_MAX_CONNECTIONS.*",
    ".*full scope is deprecated.*",
    ".*is deprecated. Please use `torch.distributed.*",
    ".*The .grad attribute of a Tensor that is not a leaf Tensor.*",
)


def quiet_known_warnings() -> None:
    for message in KNOWN_NOISE:
        warnings.filterwarnings("ignore", message=message)
