"""Megatron distributed checkpoints (torch_dist) of the Spectra optimizers.

What a Spectra optimizer keeps: the fp32 main params, the base direction's moments
(adamw: exp_avg, exp_avg_sq; signum: momentum_buffer; ademamix: exp_avg, exp_avg_slow,
exp_avg_sq; see optim/directions.py) and one integer, the step count, which drives the bias
corrections, AdEMAMix's warmups and the threshold schedule. The inner optimizer
(main_params.MainParamSpectra) keeps the count in the param groups (`spectra_step`, mirrored
in `step` for Megatron's FusedAdam convention, beside `spectra_skipped_steps`) and in every
param's `state["step"]` (torch's convention), so every Megatron format carries it.

The distributed optimizer's formats in megatron-core 0.16.1:
- `dp_reshardable` (Megatron-LM's default): bucket space, generic over the state keys;
  reshards over DP only.
- `fully_reshardable` (Megatron-LM `--dist-ckpt-optim-fully-reshardable`): gathered over DP
  into model space, so TP, PP and DP may all change on load. megatron-core 0.16-0.18
  hard-code Adam's keys in its gather (`get_parameter_state_dp_zero`) and in the copy back
  (`_set_main_param_and_optimizer_states` copies every key of the live state, `step`
  included, which the loaded dict lacks); `gather_dp_zero` and `set_states` are the same two
  functions over the base's own keys. 0.19 has `optimizer_state_keys` for the gather, which
  Spectra also answers, so there the override is merely equivalent.
- `fully_sharded_model_space` (megatron-core's default when no metadata says otherwise)
  needs `ShardedTensor.flattened_range`, which dist_checkpointing rejects in 0.16 to 0.19
  for every optimizer, Adam included: pass a sharding type (Megatron-LM always does).

A checkpoint says which base wrote it: every param group carries `spectra_base`. A group
without it comes from a plain Megatron optimizer (Adam): spectra-adamw takes it over (same
moments, same meaning), the others refuse, see `check_loadable`.
"""

from __future__ import annotations

import logging
import re

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)

PLAIN_ADAM_KEYS = ("exp_avg", "exp_avg_sq")


class CheckpointMismatch(RuntimeError):
    """The checkpoint's optimizer state cannot become this optimizer's."""


# ---------------------------------------------------------------------- saving (DP gather)


def gather_dp_zero(dopt, keys, use_gloo_comm=True, empty_data=False, return_on_all_ranks=False):
    """`DistributedOptimizer.get_parameter_state_dp_zero` for the state keys `keys`: per
    buffer, one fp32 CPU tensor per key ("param" and the moments) over the whole unpadded
    buffer, gathered over DP (on DP rank 0, or everywhere if `return_on_all_ranks`).
    `empty_data`: zeros of the right sizes, the template a load fills."""
    group = dopt.data_parallel_group_gloo if use_gloo_comm else dopt.data_parallel_group
    rank, size = group.rank(), group.size()
    keep = rank == 0 or return_on_all_ranks
    state = {"buckets_coalesced": True}
    for gbuf_idx, range_maps in enumerate(dopt.gbuf_ranges):
        assert len(range_maps) == 1, "single dtype supported, as in megatron-core"
        (dtype, bucket_maps), = range_maps.items()
        buffer = dopt.buffers[gbuf_idx]
        world = {key: torch.zeros(buffer.numel_unpadded, dtype=torch.float32) for key in keys} if keep else {}
        if keep:
            world["numel_unpadded"] = buffer.numel_unpadded
        if not empty_data:
            offset = 0
            for bucket, bucket_map in zip(buffer.buckets, bucket_maps):
                for key in keys:
                    full = _gather_bucket(dopt, bucket, bucket_map, key, group, use_gloo_comm, return_on_all_ranks)
                    if keep:
                        world[key][offset : offset + bucket.numel_unpadded] = full[: bucket.numel_unpadded]
                offset += bucket.numel_unpadded
        state[gbuf_idx] = {dtype: world}
    return state if keep else None


def _gather_bucket(dopt, bucket, bucket_map, key, group, use_gloo_comm, everywhere):
    """This DP rank's contiguous chunk of one bucket for one key, gathered over DP."""
    size = group.size()
    local_numel = bucket.grad_data.numel() // size
    device = "cpu" if use_gloo_comm else torch.cuda.current_device()
    local = torch.zeros(local_numel, dtype=torch.float32, device=device)
    for model_param, ranges in bucket_map["param_map"].items():
        r = ranges["gbuf_local"]
        local[r.start : r.end] = dopt._get_main_param_and_optimizer_states(model_param)[key].detach()
    pieces = [torch.empty_like(local) for _ in range(size)] if everywhere or group.rank() == 0 else None
    if everywhere:
        dist.all_gather(pieces, local, group=group)
    else:
        dist.gather(local, pieces, group=group, group_dst=0)
    return torch.cat(pieces).cpu() if pieces is not None else None


# ---------------------------------------------------------------------- loading


@torch.no_grad()  # fp32 main shards are views of the model params, which require grad
def set_states(dopt, model_param, tensors: dict) -> None:
    """Copy a loaded shard (main param and moments) into the live optimizer. The count
    `step` is not per-shard data: `MainParamSpectra.restore_step` sets it from the param groups."""
    group_index, order = dopt.model_param_group_index_map[model_param]
    main = dopt.optimizer.param_groups[group_index]["params"][order]
    live = {"param": main, **dopt.optimizer.state[main]}
    missing = [key for key in live if key != "step" and key not in tensors]
    if missing:
        raise CheckpointMismatch(f"the checkpoint has no {missing} for a parameter of shape {tuple(model_param.shape)}")
    for key, target in live.items():
        if key != "step":
            target.copy_(tensors[key])


def param_groups_of(state_dict: dict) -> list:
    """The inner optimizer's param groups in any Megatron optimizer's state_dict."""
    inner = state_dict.get("optimizer", state_dict)
    return inner.get("param_groups", []) if isinstance(inner, dict) else []


def check_origin(optimizer, state_dict: dict) -> None:
    """Before a load: refuse a checkpoint of another base; announce a plain Adam one."""
    groups = param_groups_of(state_dict)
    if not groups:
        return
    ours = optimizer.spectra_config.base
    theirs = {g.get("spectra_base") for g in groups}
    if None in theirs:  # written by megatron-core's own Adam
        if ours != "adamw":
            raise CheckpointMismatch(_adam_refusal(ours))
        step = groups[0].get("step")
        logger.warning(
            "Loading a plain Megatron Adam checkpoint into spectra-adamw: carried over the main "
            "params, exp_avg, exp_avg_sq and the step count (%s), which keep their meaning; "
            "starting fresh: nothing (SPECTRA has no state of its own beyond the step count). "
            "The base hyperparameters (betas, eps) come from the current config, and the "
            "update is clipped from this step on.", step,
        )
    elif theirs != {ours}:
        raise CheckpointMismatch(f"the checkpoint was written by spectra-{sorted(theirs)[0]}, not spectra-{ours}: "
                                 f"their moments differ; load the model only (Megatron-LM: --no-load-optim)")


def _adam_refusal(base: str) -> str:
    return (
        f"the checkpoint holds a plain Adam optimizer state (exp_avg, exp_avg_sq); spectra-{base} keeps "
        f"{_keys(base)}, which Adam's moments do not determine (different averaging and scale), so it "
        f"is not converted. Resume with spectra-adamw, or load the model only and start spectra-{base} "
        f"fresh (Megatron-LM: --no-load-optim)."
    )


def _keys(base: str) -> tuple:
    from ..optim.directions import get_base

    return get_base(base).state_keys


def check_loadable(checkpoint_dir: str, base: str, optimizer_name: str | None = None) -> None:
    """Before dist_checkpointing.load: does the checkpoint hold the moments `base` needs?
    Reads only the metadata. Without this a plain Adam checkpoint loaded into spectra-signum
    fails inside dist_checkpointing with a list of missing tensor keys. `optimizer_name` is
    how the error names the loading optimizer (megatron-core's own Adam keeps adamw's moments:
    `check_loadable(path, "adamw", "--optimizer adam")`)."""
    from megatron.core import dist_checkpointing

    present = saved_state_keys(dist_checkpointing.load_tensors_metadata(checkpoint_dir))
    if not present:
        return  # no optimizer state in it; the caller decides whether that is fine
    needed = set(_keys(base))
    if needed - present:
        if optimizer_name is None and present >= set(PLAIN_ADAM_KEYS):
            raise CheckpointMismatch(_adam_refusal(base))
        raise CheckpointMismatch(
            f"the checkpoint's optimizer holds {sorted(present)}; {optimizer_name or f'spectra-{base}'} needs "
            f"{sorted(needed)}. Resume with the optimizer that wrote it, or load the weights only (--no-load-optim)"
        )


def saved_state_keys(metadata: dict) -> set:
    """The moment names in a checkpoint's tensor keys: `optimizer.state.<key>.<param>`
    (model-space formats) and `optimizer.distributed....bucket_idx_<i>.<key>` (dp_reshardable),
    either after `chained_<i>.` when a ChainedOptimizer has several parts."""
    keys = set()
    for name in metadata:
        name = re.sub(r"^(chained_\d+\.)+", "", name)  # a ChainedOptimizer's prefix
        parts = name.split(".")
        if name.startswith("optimizer.state.") and len(parts) > 2:
            keys.add(parts[2])
        elif name.startswith("optimizer.distributed.") and "bucket_idx_" in name:
            keys.add(parts[-1])
    return keys - {"param", "fp32_param", "step", "padding"}


def checking_load(load, live_optimizers):
    """`dist_checkpointing.load` that first asks `check_loadable` when the state dict it is
    asked for holds the optimizer of a live Spectra optimizer (`live_optimizers()` returns
    the optimizers built so far). Megatron-LM's load_checkpoint calls
    `dist_checkpointing.load(sharded_state_dict, checkpoint_dir, ...)` for every dist format,
    after building the optimizer's part of the state dict: a checkpoint it cannot take is
    refused here with CheckpointMismatch, not by dist_checkpointing's list of missing keys."""

    def checked(*args, **kwargs):
        names = ("sharded_state_dict", "checkpoint_dir")
        given = dict(zip(names, args), **{k: v for k, v in kwargs.items() if k in names})
        wanted, where = given.get("sharded_state_dict"), given.get("checkpoint_dir")
        if isinstance(wanted, dict) and "optimizer" in wanted and where is not None:
            base = _spectra_base(live_optimizers())
            if base is not None:
                check_loadable(str(where), base)
        return load(*args, **kwargs)

    return checked


def _spectra_base(optimizers) -> str | None:
    for optimizer in optimizers:
        for part in getattr(optimizer, "chained_optimizers", [optimizer]):
            if hasattr(part, "spectra_config"):
                return part.spectra_config.base
    return None
