"""--save / --load: megatron-core's distributed checkpoint (torch_dist) of the model and the
optimizer, in Megatron-LM's folder layout (`iter_0000100/`, `latest_checkpointed_iteration.txt`),
plus the trainer's own state (iteration, lr scheduler) as JSON beside it.

The distributed optimizer's sharding type is Megatron-LM's: `dp_reshardable` by default
(reshards over DP only), `fully_reshardable` with --dist-ckpt-optim-fully-reshardable
(gathered into model space: TP, PP and DP may all change on load). As Megatron-LM does, the
type is stored in the checkpoint's content metadata and read back from there on load, so a
checkpoint loads whatever the loading run's flag says. Before loading into a Spectra
optimizer, `check_loadable` makes sure the checkpoint holds the moments its base needs (a
plain Adam checkpoint is refused by signum and ademamix with a message saying why).
"""

from __future__ import annotations

import json
import os

import torch

LATEST = "latest_checkpointed_iteration.txt"
STATE = "trainer_state.json"
DP_RESHARDABLE, FULLY_RESHARDABLE = "dp_reshardable", "fully_reshardable"


def _sharded_state(model, optimizer, metadata: dict, is_loading: bool) -> dict:
    # The GPTModel's own keys (as Megatron-LM stores them), not the DDP wrapper's "module." ones.
    model_state = model.module.sharded_state_dict()
    return {"model": model_state, "optimizer": optimizer.sharded_state_dict(model_state, is_loading, metadata=metadata)}


def iteration_dir(root: str, iteration: int) -> str:
    return os.path.join(root, f"iter_{iteration:07d}")


def save(root: str, iteration: int, model, optimizer, scheduler, fully_reshardable: bool = False) -> str:
    from megatron.core import dist_checkpointing

    path = iteration_dir(root, iteration)
    if torch.distributed.get_rank() == 0:
        os.makedirs(path, exist_ok=True)
    torch.distributed.barrier()
    metadata = {"distrib_optim_sharding_type": FULLY_RESHARDABLE if fully_reshardable else DP_RESHARDABLE}
    dist_checkpointing.save(_sharded_state(model, optimizer, metadata, False), path, content_metadata=metadata)
    if torch.distributed.get_rank() == 0:
        with open(os.path.join(path, STATE), "w") as f:
            json.dump({"iteration": iteration, "scheduler": scheduler.state_dict()}, f)
        with open(os.path.join(root, LATEST), "w") as f:
            f.write(str(iteration))
    torch.distributed.barrier()
    return path


def load(root: str, model, optimizer, scheduler, iteration: int | None = None) -> int:
    """Restore the checkpoint of `iteration` (default: the latest) under `root`; returns its
    iteration (0 when `root` holds none and none was asked for)."""
    from megatron.core import dist_checkpointing

    if iteration is None:
        latest = os.path.join(root, LATEST)
        if not os.path.exists(latest):
            return 0
        with open(latest) as f:
            iteration = int(f.read().strip())
    path = iteration_dir(root, iteration)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"--load {root}: no checkpoint of iteration {iteration} ({path})")
    _check_optimizer(path, optimizer)
    # Megatron-LM's default for a checkpoint that does not say (it writes the type since 0.14).
    metadata = dist_checkpointing.load_content_metadata(path) or {"distrib_optim_sharding_type": DP_RESHARDABLE}
    state = dist_checkpointing.load(_sharded_state(model, optimizer, metadata, True), path)
    model.module.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    with open(os.path.join(path, STATE)) as f:
        scheduler.load_state_dict(json.load(f)["scheduler"])
    return iteration


def _check_optimizer(path: str, optimizer) -> None:
    from ..megatron.checkpoint import check_loadable

    for part in getattr(optimizer, "chained_optimizers", [optimizer]):
        if hasattr(part, "spectra_config"):
            check_loadable(path, part.spectra_config.base)
