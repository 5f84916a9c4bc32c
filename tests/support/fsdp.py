"""FSDP training runs for the tests: one run of the benchmark's tiny LLaMA under FSDPSpectra
at a layout (`train`, inside spawned processes), and the same run with the single-process
reference `Spectra` on the whole batch (`reference_losses`), plus a DCP checkpoint round trip.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from megatron_spectra.bench.models import LlamaConfig, TinyLlama, batch, loss_fn, param_groups, parallelize


@dataclass(frozen=True)
class Run:
    """One training run: `layout` at the spawned world size, steps [start, stop)."""

    layout: str = "fsdp"
    base: str = "adamw"
    start: int = 0
    stop: int = 10
    options: tuple = ()  # extra Spectra keyword arguments, as (key, value) pairs
    save_at: int | None = None  # save a DCP checkpoint after this many steps ...
    path: str | None = None  # ... here; with start > 0, load from here first
    nan_at: int | None = None  # rank 1 (or 0) gets a NaN gradient at this step
    global_batch: int = 8


SPECTRA_OPTIONS = dict(lr=1e-2, clip_threshold=1.0)  # small c: the clip is active from step 1
FSDP_ONLY = ("strategy", "group")  # options of FSDPSpectra that the reference does not take


def train(rank: int, world: int, run: Run) -> dict:
    """Runs in every process; returns the global mean loss of each step and the counters."""
    import torch.distributed as dist

    from megatron_spectra.fsdp.optimizer import FSDPSpectra, local

    cfg = LlamaConfig()
    model = TinyLlama(cfg)
    dp_rank, dp_size = parallelize(model, run.layout, world)
    opt = FSDPSpectra(param_groups(model), base=run.base, **{**SPECTRA_OPTIONS, **dict(run.options)})
    if run.start:
        load_checkpoint(model, opt, run.path)
    out = {"loaded": (opt.spectra_step, opt.skipped_steps), "losses": []}
    for step in range(run.start, run.stop):
        x, y = batch(step, cfg, run.global_batch)
        loss = loss_fn(model, x.chunk(dp_size)[dp_rank], y.chunk(dp_size)[dp_rank])
        loss.backward()
        if step == run.nan_at and rank == min(1, world - 1):
            local(model.output.weight.grad).fill_(float("nan"))
        opt.step()
        opt.zero_grad()
        mean = loss.detach().clone()
        dist.all_reduce(mean)
        out["losses"].append(mean.item() / world)
        if run.save_at is not None and step + 1 == run.save_at:
            save_checkpoint(model, opt, run.path)
            out["saved"] = (opt.spectra_step, opt.skipped_steps)
    out["final"] = (opt.spectra_step, opt.skipped_steps)
    return out


def reference_losses(run: Run) -> list[float]:
    """The same run with the single-process reference `Spectra` on the whole batch."""
    from megatron_spectra.optim import Spectra

    cfg = LlamaConfig()
    model = TinyLlama(cfg)
    options = {k: v for k, v in run.options if k not in FSDP_ONLY}
    opt = Spectra(param_groups(model), base=run.base, **{**SPECTRA_OPTIONS, **options})
    losses, threads = [], torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model: threads only contend (measured 80x slower on 2 busy cores)
    try:
        for step in range(run.stop):
            x, y = batch(step, cfg, run.global_batch)
            loss = loss_fn(model, x, y)
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses.append(loss.item())
    finally:
        torch.set_num_threads(threads)
    return losses[run.start :]


def save_checkpoint(model: nn.Module, opt, path: str) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_sd, optim_sd = get_state_dict(model, opt)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=path)


def load_checkpoint(model: nn.Module, opt, path: str) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model_sd, optim_sd = get_state_dict(model, opt)
    state = {"model": model_sd, "optim": optim_sd}
    dcp.load(state, checkpoint_id=path)
    set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
