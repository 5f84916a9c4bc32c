"""Process set-up around the Trainer: the process group (torchrun's environment, a single
process, or one that already exists, as in tests), the device, megatron-core on CPU where
there is no GPU, parallel_state and Megatron-LM's seeding."""

from __future__ import annotations

import contextlib
import datetime
import os

import torch
import torch.distributed as dist

from ..engine import comm_device
from .args import parse_args
from .logs import quiet_known_warnings


def main(argv: list[str] | None = None) -> int:
    train(argv)
    return 0


def train(argv: list[str] | None = None, **hooks) -> dict:
    """Parse, set up, train; the run's summary (also the last line of metrics.jsonl).
    `hooks`: the Trainer's optional init_model and on_step."""
    quiet_known_warnings()
    world = dist.get_world_size() if dist.is_initialized() else int(os.environ.get("WORLD_SIZE", "1"))
    args = parse_args(argv, world)
    cpu = args.cpu or not torch.cuda.is_available()
    with _process_group(cpu, args.distributed_timeout_minutes), _megatron_device(cpu, force=args.cpu):
        return run(args, **hooks)


def run(args, **hooks) -> dict:
    from megatron.core import parallel_state as ps

    from .loop import Trainer, set_seed

    if dist.get_rank() == 0:
        os.makedirs(args.trainer_out, exist_ok=True)
    ps.initialize_model_parallel(
        tensor_model_parallel_size=args.tensor_model_parallel_size,
        pipeline_model_parallel_size=args.pipeline_model_parallel_size,
    )
    try:
        set_seed(args.seed)
        return Trainer(args, comm_device(), **hooks).run()
    finally:
        from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

        get_cuda_rng_tracker().reset()
        ps.destroy_model_parallel()


@contextlib.contextmanager
def _process_group(cpu: bool, timeout_minutes: float = 10):
    """The default process group: the caller's if there is one, else from torchrun's
    environment (or a single process), torn down again at the end. A collective that waits
    longer than `timeout_minutes` for a stalled rank fails on every rank that waits
    (Megatron-LM's --distributed-timeout-minutes); a caller's own group keeps its timeout."""
    if dist.is_initialized():
        yield
        return
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    if "MASTER_PORT" not in os.environ:
        from ..launch.spawn import free_port

        os.environ["MASTER_PORT"] = str(free_port())
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    if not cpu:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("gloo" if cpu else "nccl", rank=rank, world_size=world,
                            timeout=datetime.timedelta(minutes=timeout_minutes))
    try:
        yield
    finally:
        dist.destroy_process_group()


@contextlib.contextmanager
def _megatron_device(cpu: bool, force: bool):
    """megatron-core on CPU under gloo where there is no GPU (or --trainer-cpu asks for it)."""
    if not cpu:
        yield
        return
    from ..megatron.cpu import megatron_on_cpu

    with megatron_on_cpu(force=force):
        yield
