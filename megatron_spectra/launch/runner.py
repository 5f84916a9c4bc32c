"""Starting runs and telling where they stand. Every run has its own folder:

    <output.root>/<name>/
        config.yaml        the validated config (defaults filled, ${ENV} expanded)
        command.txt        the exact command line
        job.sh             SLURM: what runs inside the allocation; launch.sbatch: what was submitted
        logs/train.log     stdout + stderr of every attempt (appended)
        exit_code          written when an attempt ends; absent while running
        metrics.jsonl      builtin trainer: a record per iteration
        slurm_job_id       SLURM: the last submitted job
        checkpoints/ tensorboard/
"""

from __future__ import annotations

import contextlib
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import yaml

from .command import shell_join, to_command
from .config import Config
from .logs import RunLog, parse_logs, parse_metrics
from .slurm import render_job, render_sbatch

COMPLETED, FAILED, UNFINISHED, SUBMITTED, NOT_STARTED = "completed", "failed", "unfinished", "submitted", "not started"


def prepare(config: Config, where: str) -> Path:
    run_dir = config.run_dir
    if not config.data["output"]["checkpoints"]:
        forget_attempts(run_dir)
    (run_dir / "logs").mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config.data, sort_keys=False))
    (run_dir / "command.txt").write_text(shell_join(to_command(config, where)) + "\n")
    if where == "slurm":
        (run_dir / "job.sh").write_text(render_job(config))
        (run_dir / "launch.sbatch").write_text(render_sbatch(config))
    return run_dir


def forget_attempts(run_dir: Path) -> None:
    """Without checkpoints a restart is a new run: the old attempt's logs and metrics would
    mix into the new one's (both append)."""
    for path in [run_dir / "metrics.jsonl", run_dir / "exit_code", *(run_dir / "logs").glob("*.log")]:
        path.unlink(missing_ok=True)


class Interrupted(Exception):
    """SIGTERM or SIGINT stopped a local run: its processes were stopped and exit_code written.
    A sweep stops here too (the runs after it never start)."""

    def __init__(self, name: str, signum: int, run_dir: Path):
        self.code = 128 + signum  # the shell's convention: 143 for SIGTERM, 130 for SIGINT
        super().__init__(f"{name}: stopped by {signal.Signals(signum).name}; its processes were stopped, "
                         f"exit code {self.code} written to {run_dir / 'exit_code'}")


STOP_GRACE = 60.0  # seconds torchrun gets to stop its ranks (it gives them 30) before it is killed


def run_local(config: Config, stream=None) -> int:
    """torchrun on this machine; output goes to the terminal and to logs/train.log.

    SIGTERM (`timeout`, schedulers) or SIGINT (Ctrl-C) is passed on to torchrun, which stops
    its ranks; the run's exit_code is then 128 + the signal and Interrupted is raised."""
    run_dir = prepare(config, "local")
    if config.data["output"]["checkpoints"]:
        config.checkpoint_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "exit_code").unlink(missing_ok=True)
    stream = stream or sys.stdout
    with open(run_dir / "logs" / "train.log", "a", encoding="utf-8") as log:
        with _passed_on() as stopper:
            proc = stopper.start(to_command(config, "local"))
            pump = threading.Thread(target=_pump, args=(proc.stdout, log, stream), daemon=True)
            pump.start()
            rc = _wait(proc, stopper.received)
        received = stopper.received
        pump.join(timeout=10 if received else None)  # a rank that outlived a killed torchrun may hold the pipe
        if received:
            log.write(f"spectra launch: stopped by {signal.Signals(received[0]).name}\n")
    if received:
        (run_dir / "exit_code").write_text(f"{128 + received[0]}\n")
        raise Interrupted(config.name, received[0], run_dir)
    (run_dir / "exit_code").write_text(f"{rc}\n")
    return rc


def _pump(lines, log, stream) -> None:
    """Child output to the log and the terminal; it must keep reading whatever happens to the
    terminal (`| head` gone), or the child would block on a full pipe."""
    for line in lines:
        log.write(line)
        log.flush()  # collection may read a run that is still going
        if stream is not None:
            try:
                stream.write(line)
                stream.flush()
            except (OSError, ValueError):
                stream = None


class _Stopper:
    """Passes SIGTERM / SIGINT on to the child (a second one kills it); records them."""

    def __init__(self):
        self.received: list[int] = []
        self.child: subprocess.Popen | None = None

    def start(self, command: list[str]) -> subprocess.Popen:
        self.child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
        if self.received:  # a signal came while it was starting
            self.child.send_signal(signal.SIGTERM)
        return self.child

    def __call__(self, signum, frame):
        self.received.append(signum)
        if self.child is not None and self.child.poll() is None:
            self.child.send_signal(signal.SIGTERM if len(self.received) == 1 else signal.SIGKILL)


@contextlib.contextmanager
def _passed_on():
    stopper = _Stopper()
    here = threading.current_thread() is threading.main_thread()  # only it may set handlers
    previous = {s: signal.signal(s, stopper) for s in (signal.SIGTERM, signal.SIGINT)} if here else {}
    try:
        yield stopper
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def _wait(proc: subprocess.Popen, received: list[int]) -> int:
    stopped_at = None
    while True:
        try:
            return proc.wait(timeout=1.0)
        except subprocess.TimeoutExpired:
            if received and stopped_at is None:
                stopped_at = time.monotonic()
            if stopped_at is not None and time.monotonic() - stopped_at > STOP_GRACE:
                proc.kill()


def sbatch(script: Path) -> str:
    """Submit; the job id. Raises with sbatch's own message when it refuses."""
    try:
        out = subprocess.run(["sbatch", "--parsable", str(script)], capture_output=True, text=True, check=False)
    except FileNotFoundError:
        raise RuntimeError("sbatch not found: run this on a SLURM login node, or use --local") from None
    if out.returncode:
        raise RuntimeError(f"sbatch {script} failed ({out.returncode}): {out.stderr.strip()}")
    return out.stdout.strip().split(";")[0]


def submit(config: Config) -> str:
    run_dir = prepare(config, "slurm")
    (run_dir / "exit_code").unlink(missing_ok=True)
    job = sbatch(run_dir / "launch.sbatch")
    (run_dir / "slurm_job_id").write_text(job + "\n")
    return job


def run_state(run_dir: Path, train_iters: int | None = None) -> str:
    """completed: exited 0 having reached train_iters (when the log says how far it got);
    failed: exited non-zero; unfinished: exited 0 early, or started and still going;
    submitted: queued on SLURM, no log yet."""
    run_dir = Path(run_dir)
    logs = sorted((run_dir / "logs").glob("*.log")) if (run_dir / "logs").is_dir() else []
    code_file = run_dir / "exit_code"
    if code_file.is_file():
        code = code_file.read_text().strip()
        if code != "0":
            return FAILED
        log = read_progress(run_dir, logs)
        target = train_iters or (log.train_iters if log else None)
        if log and log.last_iteration and target and log.last_iteration + log.log_interval <= target:
            return UNFINISHED
        return COMPLETED
    if any(p.stat().st_size for p in logs):
        return UNFINISHED
    if (run_dir / "slurm_job_id").is_file():
        return SUBMITTED
    return NOT_STARTED


def read_progress(run_dir: Path, logs: list[Path]) -> RunLog | None:
    """How far a run got: the builtin trainer's metrics.jsonl (every iteration), else its logs."""
    if (run_dir / "metrics.jsonl").is_file():
        return parse_metrics(run_dir / "metrics.jsonl")
    return parse_logs(logs) if logs else None


def write_listing(sweep) -> Path:
    """sweep folder/runs.txt: every run, so collection lists the ones that never started."""
    sweep.dir.mkdir(parents=True, exist_ok=True)
    (sweep.dir / "logs").mkdir(exist_ok=True)
    (sweep.dir / "runs.txt").write_text("".join(f"{r.name}\n" for r in sweep.runs))
    return sweep.dir


def pending_runs(sweep) -> list[int]:
    """Indices of the runs to (re)start: all but the completed ones."""
    return [i for i, r in enumerate(sweep.runs) if run_state(r.config.run_dir, r.config["training"]["train_iters"]) != COMPLETED]


def submit_sweep(sweep, indices: list[int]) -> str:
    from .slurm import render_array

    write_listing(sweep)
    configs = [r.config for r in sweep.runs]
    script = sweep.dir / "array.sbatch"
    script.write_text(render_array(configs, sweep.dir, indices, f"spectra-{sweep.name}"))
    for i in indices:
        prepare(configs[i], "slurm")
        (configs[i].run_dir / "exit_code").unlink(missing_ok=True)
    job = sbatch(script)
    for i in indices:
        (configs[i].run_dir / "slurm_job_id").write_text(f"{job}_{i}\n")
    return job


def run_sweep_local(sweep, indices: list[int], stream=None) -> dict:
    """One run after another on this machine; a failed run does not stop the others."""
    write_listing(sweep)
    return {sweep.runs[i].name: run_local(sweep.runs[i].config, stream) for i in indices}
