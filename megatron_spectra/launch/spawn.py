"""Running a function in N local processes under a CPU process group (gloo), for tests and benchmarks.

    results = run_distributed(fn, world_size=4, args=(...))

Each process calls fn(rank, world_size, *args) after init_process_group; the return values
come back in rank order. A child's exception is re-raised here with its traceback, and a
run that exceeds `timeout` seconds kills every child and raises: a test never hangs.
"""

from __future__ import annotations

import io
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
        results.put((rank, True, _packed(fn(rank, world_size, *args))))
    except BaseException:  # noqa: BLE001 - everything goes back to the parent
        results.put((rank, False, traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _packed(value) -> bytes:
    """The value as plain bytes: a tensor put on the queue as is travels as a file descriptor
    that the parent fetches from the child, which may have exited by then."""
    buffer = io.BytesIO()
    torch.save(value, buffer)
    return buffer.getvalue()


def _unpacked(data: bytes):
    return torch.load(io.BytesIO(data), weights_only=False)


def run_distributed(fn, world_size: int, args: tuple = (), timeout: float = 300.0, backend: str = "gloo", threads: int = 1):
    outcomes = _run(fn, world_size, args, timeout, backend, threads, stop_at_first_error=True)
    for rank, (ok, value) in sorted(outcomes.items()):
        if not ok:
            raise DistributedFailure(f"rank {rank} of {world_size} failed:\n{value}")
    return [outcomes[r][1] for r in range(world_size)]


def run_all_failures(fn, world_size: int, args: tuple = (), timeout: float = 60.0, backend: str = "gloo"):
    """Like run_distributed, but waits for every process and returns (ok, value) per rank.

    For tests that expect every process to raise (e.g. a layout mismatch): a process that
    hangs instead shows up as a timeout.
    """
    outcomes = _run(fn, world_size, args, timeout, backend, 1, stop_at_first_error=False)
    return [outcomes[r] for r in range(world_size)]


def _run(fn, world_size, args, timeout, backend, threads, stop_at_first_error: bool) -> dict:
    """Starts the world; again on another port (3 tries) where rank 0 could not listen on the
    one `free_port` found: something else took it in between (another test run's sockets)."""
    for _ in range(3):
        outcomes = _run_once(fn, world_size, args, timeout, backend, threads, stop_at_first_error)
        if not any(not ok and _port_taken(value) for ok, value in outcomes.values()):
            break
    return outcomes


def _port_taken(trace: str) -> bool:
    """Did the process group's store fail to listen (fn never ran)?"""
    return "EADDRINUSE" in trace and "init_process_group" in trace


def _run_once(fn, world_size, args, timeout, backend, threads, stop_at_first_error: bool) -> dict:
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [
        ctx.Process(target=_child, args=(fn, r, world_size, port, args, results, backend, threads), daemon=False)  # megatron checkpointing starts processes of its own
        for r in range(world_size)
    ]
    for p in procs:
        p.start()
    outcomes: dict = {}
    try:
        while len(outcomes) < world_size:
            try:
                rank, ok, value = results.get(timeout=timeout)
            except queue.Empty:
                done = sorted(outcomes)
                raise DistributedFailure(f"{fn.__name__}: only ranks {done} of {world_size} finished within {timeout}s") from None
            outcomes[rank] = (ok, _unpacked(value) if ok else value)
            if not ok and stop_at_first_error:
                break  # the others may be stuck in a collective with the failed one
    finally:
        for p in procs:
            p.join(timeout=5 if len(outcomes) == world_size else 0.5)
            if p.is_alive():
                p.kill()
    return outcomes
