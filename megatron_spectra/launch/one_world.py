"""Many builtin-trainer runs in one world: the processes are spawned once and run every
config in turn, so torch and megatron-core are imported once instead of once per run.

    codes = run_in_one_world(configs)     # {run name: exit code, or None if it never started}

Each run is what torchrun would start, `python -m megatron_spectra.train FLAGS`, executed
inside the already-initialised process group (the trainer uses a group it finds). The run
folders are the runner's: config.yaml, command.txt (the equivalent torchrun command),
logs/train.log (rank 0's stdout and stderr) and exit_code. A failed run stops the ones after
it, as an exception in one process stops the world.
"""

from __future__ import annotations

import contextlib
import os
import runpy
import signal
import sys
import threading
import traceback
from pathlib import Path

from .command import program, trainer_args
from .config import Config
from .errors import ConfigError
from .runner import Interrupted, prepare

SAME_WORLD = ("parallel.gpus_per_node", "trainer.cpu")


def check_one_world(configs: list[Config]) -> None:
    """One world runs only local builtin-trainer runs with the same processes and device."""
    for c in configs:
        if c["entry"] != "builtin" or c["launcher"] != "local":
            raise ConfigError("entry", f"run {c.name} is {c['entry']} / {c['launcher']}: one world runs local builtin-trainer runs only")
        for key in SAME_WORLD:
            if c.get(key) != configs[0].get(key):
                raise ConfigError(key, f"differs between runs {configs[0].name} and {c.name}: one world has one size and device")


def run_in_one_world(configs: list[Config], timeout: float = 7 * 24 * 3600.0) -> dict:
    from .spawn import DistributedFailure, run_distributed

    check_one_world(configs)
    for c in configs:
        prepare(c, "local")
        (c.run_dir / "exit_code").unlink(missing_ok=True)
    backend = "gloo" if configs[0]["trainer"]["cpu"] else "nccl"
    runs = [(program(c)[1], trainer_args(c), str(c.run_dir)) for c in configs]
    try:
        with _stopped_by_signals():
            size = configs[0]["parallel"]["gpus_per_node"]
            # CPU: the machine's cores shared out among the processes (a one-process world uses them all)
            threads = max(1, (os.cpu_count() or 1) // size) if backend == "gloo" else 1
            run_distributed(_worker, size, args=(runs, backend), timeout=timeout, backend=backend, threads=threads)
    except DistributedFailure as failure:
        _record_failure(configs, str(failure))
    except _Stopped as stop:  # the spawner has killed the processes on the way out
        going = _record_failure(configs, f"stopped by {signal.Signals(stop.signum).name}", code=128 + stop.signum)
        raise Interrupted(going.name if going else configs[-1].name, stop.signum, (going or configs[-1]).run_dir) from None
    return {c.name: _exit_code(c.run_dir) for c in configs}


class _Stopped(Exception):
    def __init__(self, signum: int):
        self.signum = signum


@contextlib.contextmanager
def _stopped_by_signals():
    """SIGTERM / SIGINT become an exception here, so the spawner's clean-up stops the processes
    (SIGTERM's default would end this process alone and leave them running)."""

    def stop(signum, frame):
        raise _Stopped(signum)

    here = threading.current_thread() is threading.main_thread()
    previous = {s: signal.signal(s, stop) for s in (signal.SIGTERM, signal.SIGINT)} if here else {}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def _record_failure(configs: list[Config], text: str, code: int = 1) -> Config | None:
    """The run that was going when the world stopped failed; the ones after it never started."""
    if code == 1:
        print(text, file=sys.stderr)
    going = next((c for c in configs if not (c.run_dir / "exit_code").is_file()), None)
    if going is not None:
        with open(going.run_dir / "logs" / "train.log", "a", encoding="utf-8") as log:
            log.write(text + "\n")
        (going.run_dir / "exit_code").write_text(f"{code}\n")
    return going


def _exit_code(run_dir: Path) -> int | None:
    path = run_dir / "exit_code"
    return int(path.read_text().strip()) if path.is_file() else None


def _worker(rank: int, world_size: int, runs: list, backend: str) -> None:
    from ..known_warnings import quiet_known_warnings

    quiet_known_warnings()  # before megatron's imports, which warn
    if backend == "nccl":
        import torch

        torch.cuda.set_device(rank % torch.cuda.device_count())
    for module, argv, run_dir in runs:
        with _Tee(os.path.join(run_dir, "logs", "train.log") if rank == 0 else None) as tee:
            try:
                _run_module(module, argv)
            except BaseException:
                tee.write(traceback.format_exc())
                raise
        if rank == 0:
            Path(run_dir, "exit_code").write_text("0\n")


def _run_module(module: str, argv: list[str]) -> None:
    """`python -m module argv...` in this process."""
    saved = sys.argv
    sys.argv = [module, *argv]
    try:
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    except SystemExit as done:
        if done.code not in (None, 0):
            raise
    finally:
        sys.argv = saved


class _Tee:
    """stdout and stderr also into a file, for the duration of a run (rank 0 only)."""

    def __init__(self, path: str | None):
        self.path = path

    def __enter__(self):
        if self.path:
            self.file = open(self.path, "a", encoding="utf-8")
            self.streams = sys.stdout, sys.stderr
            sys.stdout, sys.stderr = _Both(self.file, sys.stdout), _Both(self.file, sys.stderr)
        return self

    def write(self, text: str) -> None:
        if self.path:
            self.file.write(text)

    def __exit__(self, *exc):
        if self.path:
            sys.stdout, sys.stderr = self.streams
            self.file.close()
        return False


class _Both:
    def __init__(self, file, stream):
        self.file, self.stream = file, stream

    def write(self, text: str) -> int:
        self.file.write(text)
        self.file.flush()  # collection may read a run that is still going
        return self.stream.write(text)

    def flush(self) -> None:
        self.file.flush()
        self.stream.flush()

    def isatty(self) -> bool:
        return self.stream.isatty()
