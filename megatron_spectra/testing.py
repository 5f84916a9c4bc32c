"""Running a function in N local processes under a CPU process group (gloo), for tests and benchmarks.

    results = run_distributed(fn, world_size=4, args=(...))

Each process calls fn(rank, world_size, *args) after init_process_group; the return values
come back in rank order. A child's exception is re-raised here with its traceback, and a
run that exceeds `timeout` seconds kills every child and raises: a test never hangs.
"""

from __future__ import annotations

import os
import queue
import socket
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


class DistributedFailure(RuntimeError):
    pass


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _child(fn, rank, world_size, port, args, results, backend, threads):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size))
    os.environ.setdefault("LOCAL_RANK", str(rank))
    torch.set_num_threads(threads)
    try:
        dist.init_process_group(backend, rank=rank, world_size=world_size)
        results.put((rank, True, fn(rank, world_size, *args)))
    except BaseException:  # noqa: BLE001 - everything goes back to the parent
        results.put((rank, False, traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_distributed(fn, world_size: int, args: tuple = (), timeout: float = 300.0, backend: str = "gloo", threads: int = 1):
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_child, args=(fn, r, world_size, port, args, results, backend, threads), daemon=True) for r in range(world_size)]
    for p in procs:
        p.start()
    out, errors = {}, []
    try:
        for _ in range(world_size):
            try:
                rank, ok, value = results.get(timeout=timeout)
            except queue.Empty:
                raise DistributedFailure(f"{fn.__name__} on {world_size} processes timed out after {timeout}s") from None
            if ok:
                out[rank] = value
            else:
                errors.append((rank, value))
                break  # the others may be stuck in a collective with the failed one
    finally:
        for p in procs:
            p.join(timeout=5 if not errors else 0.5)
            if p.is_alive():
                p.kill()
    if errors:
        rank, tb = errors[0]
        raise DistributedFailure(f"rank {rank} of {world_size} failed:\n{tb}")
    return [out[r] for r in range(world_size)]


def run_all_failures(fn, world_size: int, args: tuple = (), timeout: float = 60.0, backend: str = "gloo"):
    """Like run_distributed, but waits for every process and returns (ok, value) per rank.

    For tests that expect every process to raise (e.g. a layout mismatch): a process that
    hangs instead shows up as a timeout.
    """
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_child, args=(fn, r, world_size, port, args, results, backend, 1), daemon=True) for r in range(world_size)]
    for p in procs:
        p.start()
    out = {}
    try:
        for _ in range(world_size):
            try:
                rank, ok, value = results.get(timeout=timeout)
            except queue.Empty:
                raise DistributedFailure(f"{fn.__name__}: only {sorted(out)} of {world_size} processes finished in {timeout}s") from None
            out[rank] = (ok, value)
    finally:
        for p in procs:
            p.join(timeout=1)
            if p.is_alive():
                p.kill()
    return [out[r] for r in range(world_size)]
