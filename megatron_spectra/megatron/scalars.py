"""Spectra's scalars, for Megatron's writers (TensorBoard's SummaryWriter, W&B) and our trainer.

`spectra_scalars` is the one place they are read off an optimizer; Megatron-LM hands its
writers around as plain objects (`add_scalar(name, value, step)`, `log(dict, step)`), and
`write_spectra_scalars` writes to whichever it is given, so the same code serves Megatron-LM
(megatron_lm/hook.py), the built-in trainer and a megatron-core training loop of one's own.
"""

from __future__ import annotations


def spectra_scalars(optimizer) -> dict:
    """The spectra scalars of every Spectra part of a (chained) Megatron optimizer; a part
    other than the first gets its index as a suffix ("spectra/clip-threshold/1")."""
    parts = getattr(optimizer, "chained_optimizers", [optimizer])
    scalars = {}
    for i, part in enumerate(parts):
        suffix = "" if i == 0 else f"/{i}"
        scalars.update({k + suffix: v for k, v in part_scalars(part).items()})
    return scalars


def part_scalars(part) -> dict:
    """One Megatron optimizer's: c_k, what the last clip cost, and the update norms if kept
    (`spectra_log_update_norms`); nothing for a part that is not Spectra or holds no params."""
    if not getattr(part, "spectra_entries", None):
        return {}
    stats = part.spectra_clipper.stats
    return {
        "spectra/clip-threshold": part.optimizer.last_threshold,
        "spectra/bytes-sent": stats.bytes_sent,
        "spectra/clip-seconds": stats.seconds,
        **part.spectra_update_norms,
    }


def write_spectra_scalars(optimizer, iteration: int, tensorboard=None, wandb=None) -> dict:
    """Write the optimizer's spectra scalars at `iteration`; returns what was written."""
    scalars = spectra_scalars(optimizer)
    if tensorboard is not None:
        for key, value in scalars.items():
            tensorboard.add_scalar(key, value, iteration)
    if wandb is not None and scalars:
        wandb.log(scalars, iteration)
    return scalars
