"""Training the tiny GPT with megatron-core's own machinery: DDP, the optimizer factory and
the pipeline schedules. One function per side of the comparison the tests make: the
distributed run at any layout, and the single-process reference with `Spectra`.
"""

from __future__ import annotations

import torch

from .testing import TinyGPT, batches, build_model, init_parallel, lm_forward_step


def megatron_run(optimizer_config, spec: TinyGPT, tp: int, pp: int, steps: int, global_batch: int,
                 micro_batch: int, use_distributed_optimizer: bool, bf16: bool = False, hook=None,
                 first_step: int = 0, load_dir: str | None = None, save_dir: str | None = None,
                 checkpoint_format: str = "fully_reshardable") -> dict:
    """Train steps [first_step, steps) on this rank, after loading a checkpoint if given and
    saving one at the end if asked (`checkpoint_format`: the distributed optimizer's
    sharding type); returns the global mean loss per step (on every rank)."""
    from megatron.core import parallel_state
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from .factory import get_megatron_optimizer

    init_parallel(tp, pp, spec.seed)
    module = build_model(spec, tp, pp, bf16)
    ddp_config = DistributedDataParallelConfig(
        use_distributed_optimizer=use_distributed_optimizer, grad_reduce_in_fp32=True, overlap_grad_reduce=False
    )
    model = DistributedDataParallel(config=module.config, ddp_config=ddp_config, module=module)
    # As Megatron-LM does: the schedule then reduces grads over DP (and ties PP stages) itself.
    module.config.finalize_model_grads_func = finalize_model_grads
    optimizer = get_megatron_optimizer(optimizer_config, [model])
    if load_dir is not None:
        load_checkpoint(model, optimizer, load_dir, checkpoint_format)
    dp, dp_rank = parallel_state.get_data_parallel_world_size(), parallel_state.get_data_parallel_rank()
    per_rank = global_batch // dp
    losses, successes = [], []
    for step, batch in enumerate(batches(spec, steps, global_batch)):
        if step < first_step:
            continue
        mine = batch[dp_rank * per_rank : (dp_rank + 1) * per_rank]
        micro = iter(mine.split(micro_batch))
        model.zero_grad_buffer()
        optimizer.zero_grad()
        if hook is not None:
            hook(step, model, optimizer)
        reduced = get_forward_backward_func()(
            forward_step_func=lm_forward_step, data_iterator=micro, model=[model],
            num_microbatches=per_rank // micro_batch, seq_length=spec.seq, micro_batch_size=micro_batch,
            forward_only=False,
        )
        ok, _, _ = optimizer.step()
        successes.append(bool(ok))
        losses.append(_global_mean_loss(reduced))
    if save_dir is not None:
        save_checkpoint(model, optimizer, save_dir, checkpoint_format)
    return {"losses": losses, "successes": successes, "optimizer": optimizer, "model": model}


def _sharded_state(model, optimizer, sharding: str, is_loading: bool) -> dict:
    # Of the unwrapped model, as Megatron-LM does: the DDP wrapper would prefix "module.".
    model_state = model.module.sharded_state_dict()
    metadata = {"distrib_optim_sharding_type": sharding}
    return {"model": model_state, "optimizer": optimizer.sharded_state_dict(model_state, is_loading, metadata=metadata)}


def save_checkpoint(model, optimizer, path: str, sharding: str = "fully_reshardable") -> None:
    """Megatron's distributed checkpoint (torch_dist) of the model and the optimizer, as
    Megatron-LM writes one. `fully_reshardable` may be loaded at another TP/PP/DP layout,
    `dp_reshardable` (Megatron-LM's default) at another DP size only. megatron-core's
    torch_dist writer needs psutil."""
    import os

    from megatron.core import dist_checkpointing

    if torch.distributed.get_rank() == 0:
        os.makedirs(path, exist_ok=True)
    torch.distributed.barrier()
    dist_checkpointing.save(_sharded_state(model, optimizer, sharding, False), path)


def load_checkpoint(model, optimizer, path: str, sharding: str = "fully_reshardable") -> None:
    """Load what `save_checkpoint` (or Megatron-LM) wrote; a Spectra optimizer first checks
    that the checkpoint holds the moments its base needs (checkpoint.check_loadable)."""
    from megatron.core import dist_checkpointing

    from .checkpoint import check_loadable

    for part in getattr(optimizer, "chained_optimizers", [optimizer]):
        if hasattr(part, "spectra_config"):
            check_loadable(path, part.spectra_config.base)
    state = dist_checkpointing.load(_sharded_state(model, optimizer, sharding, True), path)
    model.module.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])


def _global_mean_loss(reduced) -> float:
    """Mean loss over the global batch, known on every rank. The schedules already divide
    each micro-batch's loss by the number of micro-batches, so a rank's mean is their sum."""
    from megatron.core import parallel_state

    total = torch.tensor([0.0, 0.0], dtype=torch.float64)
    if parallel_state.is_pipeline_last_stage():
        total += torch.tensor([float(sum(r["lm loss"] for r in reduced)), 1.0], dtype=torch.float64)
    torch.distributed.all_reduce(total)
    return (total[0] / total[1]).item()


def reference_run(spec: TinyGPT, steps: int, global_batch: int, spectra_kwargs: dict, clip_grad: float,
                  weight_decay: float, plain_adamw: bool = False) -> list[float]:
    """The same model and data in one process, trained by the reference `Spectra`."""
    from ..optim import Spectra

    init_parallel(1, 1, spec.seed)
    model = build_model(spec)
    named = list(model.named_parameters())
    groups = [
        {"params": [p for _, p in named if p.ndim >= 2], "param_names": [n for n, p in named if p.ndim >= 2], "weight_decay": weight_decay},
        {"params": [p for _, p in named if p.ndim < 2], "param_names": [n for n, p in named if p.ndim < 2], "weight_decay": 0.0},
    ]
    opt = torch.optim.AdamW(groups, lr=spectra_kwargs["lr"], eps=1e-4) if plain_adamw else Spectra(groups, **spectra_kwargs)
    losses = []
    for batch in batches(spec, steps, global_batch):
        opt.zero_grad()
        output, loss_func = lm_forward_step(iter([batch]), model)
        loss, _ = loss_func(output)
        loss.backward()
        if clip_grad > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip_grad)
        opt.step()
        losses.append(loss.item())
    return losses

