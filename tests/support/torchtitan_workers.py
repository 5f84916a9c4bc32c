"""torchtitan's own optimizer and LR-scheduler containers and its checkpoint path, in spawned
gloo processes, around a tiny LLaMA under FSDP2.

torchtitan 0.3.0's own LLaMA-3 cannot train on CPU (its attention is FlexAttention or varlen
only, and FlexAttention has no CPU backward), so the model is the project's TinyLlama; what
is torchtitan's is everything the optimizer meets in a torchtitan run: the container that
resolves optimizer names and builds the param groups from FQN patterns, the LambdaLR
schedulers, and the FQN-keyed flat optimizer state dict that its checkpointer hands to DCP.
"""

from __future__ import annotations

TT_OPTIONS = dict(clip_threshold=1.0)  # the reference run's c (tests.support.fsdp.SPECTRA_OPTIONS)
TT_LR = 1e-2


def _setup(world: int, warmup: int):
    from megatron_spectra.bench.models import LlamaConfig, TinyLlama, parallelize
    from megatron_spectra.fsdp.torchtitan import spectra_optimizer

    model = TinyLlama(LlamaConfig())
    dp_rank, dp_size = parallelize(model, "fsdp", world)
    config = spectra_optimizer(lr=TT_LR, base="adamw", weight_decay=0.1, warmup_steps=warmup, **TT_OPTIONS)
    optimizers = config.build(model_parts=[model])
    return model, optimizers, dp_rank, dp_size


def _steps(model, optimizers, schedulers, steps, dp_rank, dp_size) -> list[float]:
    import torch.distributed as dist

    from megatron_spectra.bench.models import LlamaConfig, batch, loss_fn

    losses = []
    for step in steps:
        x, y = batch(step, LlamaConfig(), 8)
        loss = loss_fn(model, x.chunk(dp_size)[dp_rank], y.chunk(dp_size)[dp_rank])
        loss.backward()
        optimizers.step()
        optimizers.zero_grad()
        if schedulers is not None:
            schedulers.step()
        dist.all_reduce(mean := loss.detach().clone())
        losses.append(mean.item() / dist.get_world_size())
    return losses


def _schedulers(optimizers, warmup: int):
    from torchtitan.components.optimizer import LRSchedulersContainer

    config = LRSchedulersContainer.Config(warmup_steps=warmup, decay_ratio=0.5, decay_type="linear", min_lr_factor=0.1)
    return config.build(optimizers=optimizers, training_steps=8)


def _state(model, optimizers, schedulers) -> dict:
    """What torchtitan's CheckpointManager saves: Stateful objects DCP calls state_dict() on."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return {"model": get_model_state_dict(model), "optimizer": optimizers, "lr_scheduler": schedulers}


def torchtitan_suite(rank: int, world: int, path: str) -> dict:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_model_state_dict

    from megatron_spectra.fsdp import FSDPSpectra

    out = {}
    # 1. constant lr: the container's Spectra is the reference Spectra (groups, decay, c)
    model, optimizers, dp_rank, dp_size = _setup(world, warmup=0)
    out["optimizers"] = [(type(o).__name__, [(g["weight_decay"], len(g["params"])) for g in o.param_groups]) for o in optimizers]
    assert all(isinstance(o, FSDPSpectra) for o in optimizers)
    out["constant"] = _steps(model, optimizers, None, range(10), dp_rank, dp_size)
    # 2. torchtitan's warmup + decay schedule (c follows lr in warmup), checkpointed after 4 steps
    model, optimizers, dp_rank, dp_size = _setup(world, warmup=2)
    schedulers = _schedulers(optimizers, warmup=2)
    first = _steps(model, optimizers, schedulers, range(4), dp_rank, dp_size)
    dcp.save(_state(model, optimizers, schedulers), checkpoint_id=path)
    out["scheduled"] = first + _steps(model, optimizers, schedulers, range(4, 8), dp_rank, dp_size)
    # 3. a fresh run that loads that checkpoint and continues
    model, optimizers, dp_rank, dp_size = _setup(world, warmup=2)
    schedulers = _schedulers(optimizers, warmup=2)
    state = _state(model, optimizers, schedulers)
    dcp.load(state, checkpoint_id=path)
    set_model_state_dict(model, state["model"])
    out["loaded_step"] = optimizers.optimizers[0].spectra_step
    out["resumed"] = _steps(model, optimizers, schedulers, range(4, 8), dp_rank, dp_size)
    return out
