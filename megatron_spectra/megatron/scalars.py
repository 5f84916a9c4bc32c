"""Spectra's scalars for Megatron's writers: TensorBoard's SummaryWriter and W&B.

Megatron-LM hands its writers around as plain objects (`add_scalar(name, value, step)`,
`log(dict, step)`); `write_spectra_scalars` writes to whichever it is given, so it is the
same code under Megatron-LM (lm.py) and in a megatron-core training loop of one's own.
"""

from __future__ import annotations


def spectra_scalars(optimizer) -> dict:
    """The spectra scalars of every Spectra part of a (chained) Megatron optimizer; a part
    other than the first gets its index as a suffix ("spectra/clip-threshold/1")."""
    parts = getattr(optimizer, "chained_optimizers", [optimizer])
    scalars = {}
    for i, part in enumerate(parts):
        if hasattr(part, "spectra_log"):
            suffix = "" if i == 0 else f"/{i}"
            scalars.update({k + suffix: v for k, v in part.spectra_log().items()})
    return scalars


def write_spectra_scalars(optimizer, iteration: int, tensorboard=None, wandb=None) -> dict:
    """Write the optimizer's spectra scalars at `iteration`; returns what was written."""
    scalars = spectra_scalars(optimizer)
    if tensorboard is not None:
        for key, value in scalars.items():
            tensorboard.add_scalar(key, value, iteration)
    if wandb is not None and scalars:
        wandb.log(scalars, iteration)
    return scalars
