"""What the trainer checks so that a run never continues from, or writes, broken state:
finite losses, gradients and weights (Megatron-LM's --check-for-nan-in-loss-and-grad), the
files of a checkpoint (sizes and CRC32s recorded at save, verified at load), and the shapes
of the tensors a checkpoint is about to fill.

Every check ends in an agreement over all ranks (one small all-reduce), so all ranks raise
the same error together instead of one raising and the others blocking in a collective.
"""

from __future__ import annotations

import glob
import math
import os
import zlib

import torch
import torch.distributed as dist

CHUNK = 1 << 24  # bytes read at a time for a checksum


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be read, or does not fit the run that loads it."""


class NonFiniteError(RuntimeError):
    """A non-finite loss, gradient or weight (--check-for-nan-in-loss-and-grad)."""


def any_rank(flag: bool) -> bool:
    """True on every rank if `flag` is true on any."""
    t = torch.tensor([1.0 if flag else 0.0])
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def first_nonfinite(named) -> str | None:
    """The name of the first (name, tensor) pair with a NaN or inf entry, else None."""
    for name, tensor in named:
        if tensor is not None and not torch.isfinite(tensor).all():
            return name
    return None


def check_loss(loss: float, iteration: int) -> None:
    """The global loss is the same number on every rank, so every rank raises alike."""
    if not math.isfinite(loss):
        raise NonFiniteError(f"iteration {iteration}: the loss is {loss}; stopping before the optimizer step, "
                             f"nothing was saved from this iteration (--check-for-nan-in-loss-and-grad; "
                             f"lower --lr, or --no-check-for-nan-in-loss-and-grad to carry on regardless)")


def check_gradients(model, iteration: int) -> None:
    """After the backward pass and DP reduction, before the optimizer step."""
    bad = first_nonfinite((n, getattr(p, "main_grad", p.grad)) for n, p in model.module.named_parameters())
    if any_rank(bad is not None):
        where = f" (on rank {dist.get_rank()}: {bad})" if bad else ""
        raise NonFiniteError(f"iteration {iteration}: non-finite gradient{where}; stopping before the optimizer "
                             f"step (--check-for-nan-in-loss-and-grad)")


def check_weights_before_save(model, iteration: int) -> None:
    bad = first_nonfinite(model.module.named_parameters())
    if any_rank(bad is not None):
        where = f" (on rank {dist.get_rank()}: {bad})" if bad else ""
        raise NonFiniteError(f"iteration {iteration}: non-finite weights{where}; the checkpoint was not saved "
                             f"and the latest-checkpoint pointer not moved")


# ---------------------------------------------------------------------- checkpoint files


def shard_files(path: str) -> list[str]:
    return sorted(os.path.basename(f) for f in glob.glob(os.path.join(path, "*.distcp")))


def crc32(path: str) -> int:
    value = 0
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            value = zlib.crc32(chunk, value)
    return value


def checksums(path: str) -> dict:
    """{file: [size, crc32]} of a saved checkpoint's shard files, computed in parallel (rank r
    reads every world-size-th file) and returned on every rank."""
    files, rank, world = shard_files(path), dist.get_rank(), dist.get_world_size()
    mine = {name: [os.path.getsize(os.path.join(path, name)), crc32(os.path.join(path, name))]
            for name in files[rank::world]}
    parts = [None] * world
    dist.all_gather_object(parts, mine)
    return {name: value for part in parts for name, value in sorted(part.items())}


def verify(path: str, recorded: dict | None) -> None:
    """Raise on every rank, naming the files, if a shard file is missing, truncated or altered
    since it was saved. Sizes are checked everywhere (cheap); each file's CRC32 by one rank."""
    if recorded is None:  # a checkpoint from before checksums were recorded, or not ours
        return
    rank, world = dist.get_rank(), dist.get_world_size()
    problems = []
    for i, (name, (size, crc)) in enumerate(sorted(recorded.items())):
        file = os.path.join(path, name)
        if not os.path.exists(file):
            problems.append(f"{file}: missing")
        elif os.path.getsize(file) != size:
            problems.append(f"{file}: {os.path.getsize(file)} bytes, saved with {size} (truncated or overwritten)")
        elif i % world == rank and crc32(file) != crc:
            problems.append(f"{file}: CRC32 differs from the one recorded at save (the data was altered)")
    parts = [None] * world
    dist.all_gather_object(parts, problems)
    problems = sorted({p for part in parts for p in part})
    if problems:
        raise CheckpointError(f"--load: the checkpoint {path} is damaged:\n  " + "\n  ".join(problems))


def check_shapes(path: str, model_state: dict, saved: dict) -> None:
    """Refuse a checkpoint whose model tensors have other global shapes than this run's
    (dist_checkpointing would otherwise cut or pad them silently), on every rank alike (a
    pipeline stage may not hold the tensor that differs). `saved`: its tensor metadata."""
    parts = [None] * dist.get_world_size()
    dist.all_gather_object(parts, _shape_problem(path, model_state, saved))
    problems = sorted({p for p in parts if p})
    if problems:
        raise CheckpointError(problems[0])


def _shape_problem(path: str, model_state: dict, saved: dict) -> str | None:
    for value in model_state.values():
        shape = getattr(value, "global_shape", None)
        if shape is None or value.key not in saved:
            continue
        theirs = tuple(saved[value.key].global_shape) if hasattr(saved[value.key], "global_shape") else None
        if theirs is not None and theirs != tuple(shape):
            hint = ""
            if "embedding" in value.key or "output_layer" in value.key:
                hint = (" The padded vocabulary is a multiple of --make-vocab-size-divisible-by x TP (as in "
                        "Megatron-LM), so it changes with the TP size: choose --make-vocab-size-divisible-by "
                        "so that it pads to the saved size.")
            return f"--load {path}: tensor {value.key} has shape {theirs} in the checkpoint and {tuple(shape)} in this run.{hint}"
    return None
