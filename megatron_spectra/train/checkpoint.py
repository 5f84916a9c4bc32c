"""--save / --load: megatron-core's distributed checkpoint (torch_dist) of the model and the
optimizer, in Megatron-LM's folder layout (`iter_0000100/`, `latest_checkpointed_iteration.txt`),
plus the trainer's own state (iteration, lr scheduler) as JSON beside it.
"""

from __future__ import annotations

import json
import os

import torch

LATEST = "latest_checkpointed_iteration.txt"
STATE = "trainer_state.json"


def _sharded_state(model, optimizer, is_loading: bool) -> dict:
    # The GPTModel's own keys (as Megatron-LM stores them), not the DDP wrapper's "module." ones.
    model_state = model.module.sharded_state_dict()
    metadata = {"distrib_optim_sharding_type": "fully_reshardable"}
    return {"model": model_state, "optimizer": optimizer.sharded_state_dict(model_state, is_loading, metadata=metadata)}


def save(root: str, iteration: int, model, optimizer, scheduler) -> str:
    from megatron.core import dist_checkpointing

    path = os.path.join(root, f"iter_{iteration:07d}")
    if torch.distributed.get_rank() == 0:
        os.makedirs(path, exist_ok=True)
    torch.distributed.barrier()
    dist_checkpointing.save(_sharded_state(model, optimizer, False), path)
    if torch.distributed.get_rank() == 0:
        with open(os.path.join(path, STATE), "w") as f:
            json.dump({"iteration": iteration, "scheduler": scheduler.state_dict()}, f)
        with open(os.path.join(root, LATEST), "w") as f:
            f.write(str(iteration))
    torch.distributed.barrier()
    return path


def load(root: str, model, optimizer, scheduler) -> int:
    """Restore the latest checkpoint under `root`; its iteration (0 when there is none)."""
    from megatron.core import dist_checkpointing

    latest = os.path.join(root, LATEST)
    if not os.path.exists(latest):
        return 0
    with open(latest) as f:
        iteration = int(f.read().strip())
    path = os.path.join(root, f"iter_{iteration:07d}")
    state = dist_checkpointing.load(_sharded_state(model, optimizer, True), path)
    model.module.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    with open(os.path.join(path, STATE)) as f:
        scheduler.load_state_dict(json.load(f)["scheduler"])
    return iteration
