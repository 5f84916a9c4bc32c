"""--save / --load: megatron-core's distributed checkpoint (torch_dist) of the model, the
optimizer and every rank's RNG state, in Megatron-LM's folder layout (`iter_0000100/`,
`latest_checkpointed_iteration.txt`), plus the trainer's own state as JSON beside it
(`trainer_state.json`: iteration, lr scheduler, evaluation round, layout, and the size and
CRC32 of every shard file).

The distributed optimizer's sharding type is Megatron-LM's: `dp_reshardable` by default
(reshards over DP only), `fully_reshardable` with --dist-ckpt-optim-fully-reshardable
(gathered into model space: TP, PP and DP may all change on load). As Megatron-LM does, the
type is stored in the checkpoint's content metadata and read back from there on load, so a
checkpoint loads whatever the loading run's flag says. Before loading into a Spectra
optimizer, `check_loadable` makes sure the checkpoint holds the moments its base needs (a
plain Adam checkpoint is refused by signum and ademamix with a message saying why).

Resubmitting a job with the same --save and --load is the intended way to resume:
- A checkpoint is complete once its `trainer_state.json` exists (written atomically after
  every rank's shards); the pointer is written atomically after that. A pointer that cannot
  be read falls back to the newest complete checkpoint, with a warning.
- --load of a folder without any checkpoint starts from scratch with a warning on rank 0
  (Megatron-LM's behaviour; the first submission of a resubmitted job has nothing to load).
- Megatron-LM's --no-load-optim (weights and iteration only), --no-load-rng and --finetune
  (weights only, iteration 0). The RNG states are restored only at the layout (TP, PP) that
  saved them, as in Megatron-LM.
"""

from __future__ import annotations

import json
import os
import random
import re

import numpy
import torch
import torch.distributed as dist

from . import integrity

LATEST = "latest_checkpointed_iteration.txt"
STATE = "trainer_state.json"
DP_RESHARDABLE, FULLY_RESHARDABLE = "dp_reshardable", "fully_reshardable"


def iteration_dir(root: str, iteration: int) -> str:
    return os.path.join(root, f"iter_{iteration:07d}")


# ---------------------------------------------------------------------- what is saved


def _layout() -> dict:
    from megatron.core import parallel_state as ps

    return {"tp": ps.get_tensor_model_parallel_world_size(), "pp": ps.get_pipeline_model_parallel_world_size(),
            "tp_rank": ps.get_tensor_model_parallel_rank(), "pp_rank": ps.get_pipeline_model_parallel_rank(),
            "dp_rank": ps.get_data_parallel_rank()}


def rng_state() -> dict:
    """Megatron-LM's `get_rng_state` of this rank."""
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    state = {"random": random.getstate(), "numpy": numpy.random.get_state(), "torch": torch.get_rng_state(),
             "tracker": get_cuda_rng_tracker().get_states()}
    if torch.cuda.is_available() and dist.get_backend() == "nccl":
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    random.setstate(state["random"])
    numpy.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"])
    get_cuda_rng_tracker().set_states(state["tracker"])


def _rng_object(layout: dict, data):
    """Megatron-LM's sharding of the RNG states: one per (PP, TP) rank, DP ranks are replicas."""
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    return ShardedObject("rng_state", data, (layout["pp"], layout["tp"]), (layout["pp_rank"], layout["tp_rank"]),
                         replica_id=layout["dp_rank"])


def _sharded_state(model, optimizer, metadata: dict, is_loading: bool, with_optimizer=True, rng=None) -> dict:
    # The GPTModel's own keys (as Megatron-LM stores them), not the DDP wrapper's "module." ones.
    state = {"model": model.module.sharded_state_dict()}
    if with_optimizer:
        state["optimizer"] = optimizer.sharded_state_dict(state["model"], is_loading, metadata=metadata)
    if rng is not None:
        state["rng_state"] = rng
    return state


# ---------------------------------------------------------------------- save


def save(root: str, iteration: int, model, optimizer, scheduler, fully_reshardable: bool = False,
         eval_round: int = 0) -> str:
    from megatron.core import dist_checkpointing

    integrity.check_weights_before_save(model, iteration)
    path = iteration_dir(root, iteration)
    if dist.get_rank() == 0:
        os.makedirs(path, exist_ok=True)
    dist.barrier()
    layout = _layout()
    metadata = {"distrib_optim_sharding_type": FULLY_RESHARDABLE if fully_reshardable else DP_RESHARDABLE}
    state = _sharded_state(model, optimizer, metadata, False, rng=_rng_object(layout, rng_state()))
    dist_checkpointing.save(state, path, content_metadata=metadata)
    dist.barrier()
    files = integrity.checksums(path)
    if dist.get_rank() == 0:
        trainer_state = {"iteration": iteration, "scheduler": scheduler.state_dict(), "eval_round": eval_round,
                         "tp": layout["tp"], "pp": layout["pp"], "files": files}
        _write_atomically(os.path.join(path, STATE), json.dumps(trainer_state))
        _write_atomically(os.path.join(root, LATEST), str(iteration))
    dist.barrier()
    return path


def _write_atomically(path: str, text: str) -> None:
    """Readers see the old file or the new one, never a torn one: temp file, fsync, rename,
    fsync of the folder (so the rename itself survives a crash)."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    folder = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
    try:
        os.fsync(folder)
    finally:
        os.close(folder)


# ---------------------------------------------------------------------- load


def complete_iterations(root: str) -> list[int]:
    """The iterations under `root` whose checkpoint was completely written, ascending."""
    found = []
    for name in os.listdir(root) if os.path.isdir(root) else []:
        match = re.fullmatch(r"iter_(\d+)", name)
        if match and os.path.exists(os.path.join(root, name, STATE)):
            found.append(int(match.group(1)))
    return sorted(found)


def _warn(message: str) -> None:
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(f"WARNING: {message}", flush=True)


def resolve(root: str, iteration: int | None) -> int | None:
    """The iteration to load: `iteration` if given, else the pointer's, else (torn or missing
    pointer) the newest complete checkpoint; None when `root` holds no checkpoint at all."""
    if iteration is not None:
        return iteration
    pointer = os.path.join(root, LATEST)
    newest = complete_iterations(root)
    if not os.path.exists(pointer):
        if newest:
            _warn(f"--load {root}: no {LATEST}; loading the newest complete checkpoint, iteration {newest[-1]}")
            return newest[-1]
        why = "the folder does not exist" if not os.path.isdir(root) else "it holds no checkpoint"
        _warn(f"--load {root}: {why}; training from scratch (as Megatron-LM does)")
        return None
    with open(pointer) as f:
        text = f.read().strip()
    if text.isdigit() and int(text) in newest:
        return int(text)
    if not newest:
        raise integrity.CheckpointError(f"--load {root}: {LATEST} says {text!r}, and no complete checkpoint "
                                        f"(iter_*/{STATE}) is there")
    _warn(f"--load {root}: {LATEST} says {text!r}, which is not a complete checkpoint; loading the newest "
          f"complete one instead, iteration {newest[-1]}")
    return newest[-1]


def load(root: str, model, optimizer, scheduler, iteration: int | None = None, *, load_optim: bool = True,
         load_rng: bool = True, finetune: bool = False) -> dict:
    """Restore a checkpoint under `root` (`iteration`'s, default the latest). Returns
    {"iteration", "eval_round"} to continue from ({0, 0} when there is none, or --finetune)."""
    from megatron.core import dist_checkpointing

    iteration = resolve(root, iteration)
    if iteration is None:
        return {"iteration": 0, "eval_round": 0}
    path = iteration_dir(root, iteration)
    if not os.path.exists(os.path.join(path, STATE)):
        raise integrity.CheckpointError(f"--load {root}: no complete checkpoint of iteration {iteration} "
                                        f"({path}/{STATE} is missing)")
    with open(os.path.join(path, STATE)) as f:
        saved = json.load(f)
    integrity.verify(path, saved.get("files"))
    load_optim = load_optim and not finetune
    layout = _layout()
    same_layout = (saved.get("tp"), saved.get("pp")) == (layout["tp"], layout["pp"])
    rng = None
    if load_rng and not finetune:
        if same_layout:
            rng = _rng_object(layout, None)
        else:
            _warn(f"--load {root}: saved at TP={saved.get('tp')} PP={saved.get('pp')}, loading at TP={layout['tp']} "
                  f"PP={layout['pp']}: the RNG states are not restored (as in Megatron-LM)")
    if load_optim:
        _check_optimizer(path, optimizer)
        _prime_torch_adam(optimizer)
    # Megatron-LM's default for a checkpoint that does not say (it writes the type since 0.14).
    metadata = dist_checkpointing.load_content_metadata(path) or {"distrib_optim_sharding_type": DP_RESHARDABLE}
    request = _sharded_state(model, optimizer, metadata, True, with_optimizer=load_optim, rng=rng)
    integrity.check_shapes(path, request["model"], dist_checkpointing.load_tensors_metadata(path))
    try:
        state = dist_checkpointing.load(request, path)
    except Exception as error:  # noqa: BLE001 - torch's DCP errors name no file
        raise integrity.CheckpointError(f"--load {root}: reading {path} failed "
                                        f"({type(error).__name__}: {error})") from error
    model.module.load_state_dict(state["model"])
    if load_optim:
        with torch.no_grad():  # fp32 main params are views of the model's, which require grad
            optimizer.load_state_dict(state["optimizer"])
        _restore_torch_adam_steps(optimizer)
        scheduler.load_state_dict(saved["scheduler"])
    if finetune:
        return {"iteration": 0, "eval_round": 0}
    if not load_optim:  # the schedule follows this run's flags from the loaded iteration on
        scheduler.step(increment=iteration)
    if rng is not None:
        set_rng_state(state["rng_state"])
    return {"iteration": iteration, "eval_round": saved.get("eval_round", 0)}


def _prime_torch_adam(optimizer) -> None:
    """Without Apex/TE, megatron-core's DistributedOptimizer wraps torch's Adam, whose state
    is empty until the first step; its `state_dict()` (called to build the load request)
    then asserts that all params share one `step` and finds none. Megatron-LM never meets
    this (it always has TE's FusedAdam). Allocate the state as the first step would, step 0;
    the load then overwrites the moments and sets `step` from the checkpoint."""
    for part, inner in _torch_adams(optimizer):
        if len(inner.state) == 0 and part.init_state_fn is not None:
            part.init_state_fn(inner, part.config)
            for state in inner.state.values():
                state["step"] = torch.tensor(0.0)


def _torch_adams(optimizer):
    """The inner torch Adam(W)s of megatron-core's own distributed optimizer (not Spectra's)."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    for part in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = getattr(part, "optimizer", None)
        if (isinstance(part, DistributedOptimizer) and not hasattr(part, "spectra_config")
                and isinstance(inner, torch.optim.Adam | torch.optim.AdamW)):
            yield part, inner


def _restore_torch_adam_steps(optimizer) -> None:
    """megatron-core 0.16's load without Apex/TE leaves torch Adam's per-param `step` wrong:
    one tensor shared by every param (torch increments each in place, so the count would grow
    by the number of params per iteration), then overwritten with the template's 0 by the
    dp_reshardable copy. The saved count is in the param groups (megatron's `step`): give
    every param its own tensor of it."""
    for _, inner in _torch_adams(optimizer):
        for group in inner.param_groups:
            if group.get("step") is None:
                continue
            for p in group["params"]:
                if p in inner.state:
                    inner.state[p]["step"] = torch.tensor(float(group["step"]))


def _check_optimizer(path: str, optimizer) -> None:
    """Before reading anything: does the checkpoint hold the state this optimizer needs?
    (Otherwise torch's DCP fails with a bare KeyError of a tensor name.)"""
    from ..megatron.checkpoint import check_loadable

    for part in getattr(optimizer, "chained_optimizers", [optimizer]):
        if hasattr(part, "spectra_config"):
            check_loadable(path, part.spectra_config.base)
        elif isinstance(getattr(part, "optimizer", None), torch.optim.Adam | torch.optim.AdamW):
            check_loadable(path, "adamw", "--optimizer adam")  # megatron-core's Adam keeps adamw's moments
