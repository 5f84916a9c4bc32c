"""`spectra launch` as a user gets it wrong: every bad value, file or signal is one line on
stderr and exit 2 (or 128 + the signal), never a traceback, never a run that starts anyway."""

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from megatron_spectra.cli.main import main
from megatron_spectra.launch import load_config
from megatron_spectra.launch.command import to_command

ROOT = Path(__file__).resolve().parents[2]
TINY = str(ROOT / "configs/tiny-cpu.yaml")
SWEEP = str(ROOT / "configs/sweeps/160m-spectra-adamw-lr-threshold.yaml")


def spectra(capsys, *argv) -> tuple[int, list[str]]:
    """Exit code and stderr lines of the command, run here (a traceback would fail the test)."""
    capsys.readouterr()
    rc = main(list(argv))
    return rc, capsys.readouterr().err.strip().splitlines()


@pytest.fixture(autouse=True)
def runs_in_tmp(tmp_path, monkeypatch):
    monkeypatch.setenv("SPECTRA_RUNS", str(tmp_path / "runs"))


# Every value the schema refuses, as `--set key=value` (YAML), and the key the error names.
BAD_VALUES = [
    ("training.lr", "0"), ("training.lr", "-1e-3"), ("training.lr", ".nan"), ("training.lr", ".inf"),
    ("optimizer.spectra.clip_threshold", "0"), ("optimizer.spectra.clip_threshold", "-1"),
    ("optimizer.spectra.clip_threshold", ".nan"), ("optimizer.spectra.ns_steps", "0"),
    ("training.adam_beta1", "1.0"), ("training.adam_beta1", "-0.1"), ("training.adam_beta2", "1.5"),
    ("training.adam_eps", "-1e-8"), ("training.adam_eps", ".nan"), ("training.weight_decay", "-0.1"),
    ("training.weight_decay", ".inf"), ("training.clip_grad", "-1"),
    ("training.log_interval", "0"), ("training.eval_interval", "0"), ("training.save_interval", "0"),
    ("training.min_lr", "1.0"), ("training.min_lr", "-1e-5"), ("training.lr_warmup_iters", "6"),
    ("training.train_iters", "0"), ("training.global_batch_size", "0"), ("training.micro_batch_size", "0"),
    ("model.num_layers", "0"), ("model.hidden_size", "0"), ("model.seq_length", "0"),
    ("model.num_attention_heads", "0"), ("model.num_attention_heads", "3"), ("model.dropout", "1.0"),
    ("data.vocab_multiple", "0"), ("data.vocab_size", "0"),
    ("parallel.gpus_per_node", "0"), ("parallel.tensor_parallel", "0"), ("parallel.tensor_parallel", "3"),
    ("slurm.master_port", "0"), ("slurm.master_port", "65000"), ("slurm.array_parallelism", "0"),
    ("slurm.cpus_per_task", "0"),
    ("name", "../../../etc"), ("name", "/etc"), ("name", ".."), ("name", "a/b"), ("name", "-rf"), ("name", "a b"),
]


@pytest.mark.parametrize("key, value", BAD_VALUES)
def test_a_bad_value_is_one_line_naming_the_key(capsys, key, value):
    rc, err = spectra(capsys, "launch", TINY, "--dry-run", "--set", f"{key}={value}")
    assert rc == 2 and len(err) == 1, err
    named = {"model.num_attention_heads": ("model.num_attention_heads", "model.hidden_size"),
             "parallel.tensor_parallel": ("parallel.tensor_parallel",), "training.lr_warmup_iters": ("training.lr_warmup_iters",)}
    assert err[0].startswith(f"error: {TINY}: ") and any(f": {k}: " in err[0] for k in named.get(key, (key,))), err


def test_values_at_the_edges_are_accepted(capsys):
    edges = ["training.adam_beta1=0", "training.adam_eps=0", "training.weight_decay=0", "training.clip_grad=0",
             "training.min_lr=3.0e-3", "model.num_layers=1", "slurm.master_port=1024", "name=tiny_2.lr=1e-3"]
    for edge in edges:
        rc, err = spectra(capsys, "launch", TINY, "--dry-run", "--set", edge)
        assert rc == 0, (edge, err)


def _write(tmp_path: Path, name: str, text) -> str:
    path = tmp_path / name
    path.write_bytes(text if isinstance(text, bytes) else textwrap.dedent(text).encode())
    return str(path)


def test_bad_files_are_one_line_naming_the_file(tmp_path, capsys):
    cases = {
        "syntax.yaml": ("base: tiny.yaml\nmodel:\n  hidden_size: [64,\n", r"line 4, column 1: invalid YAML"),
        "tab.yaml": ("name: x\n\tmodel: {}\n", r"line 2, column 1: invalid YAML: .*'\\t'"),
        "latin1.yaml": ("name: caf\xe9\n".encode("latin-1"), r"not UTF-8 text"),
        "list.yaml": ("- a\n- b\n", r"a config is a mapping of sections"),
    }
    import re

    for name, (text, message) in cases.items():
        path = _write(tmp_path, name, text)
        rc, err = spectra(capsys, "launch", path, "--dry-run")
        assert rc == 2 and len(err) == 1 and re.fullmatch(f"error: {re.escape(path)}: {message}.*", err[0]), err
    for path, message in ((str(tmp_path), "is a directory, not a YAML file"), (str(tmp_path / "nope.yaml"), "no such file")):
        rc, err = spectra(capsys, "launch", path, "--dry-run")
        assert rc == 2 and err == [f"error: {path}: {message}"], err
    rc, err = spectra(capsys, "launch", TINY, "--dry-run", "--set", "training.lr=[1,")
    assert rc == 2 and len(err) == 1 and err[0].startswith("error: --set training.lr: line 1"), err


def test_a_key_or_section_given_twice_is_refused(tmp_path, capsys):
    base = Path(TINY).read_text()
    lr_line = base[: base.index("  lr: 3.0e-3\n")].count("\n") + 2
    twice = {
        "key.yaml": (base.replace("  lr: 3.0e-3\n", "  lr: 3.0e-3\n  lr: 3.0e-2\n"), f"line {lr_line}, column 3", "'lr'"),
        "section.yaml": (base + "model:\n  num_layers: 4\n", f"line {base.count(chr(10)) + 1}, column 1", "'model'"),
    }
    for name, (text, where, key) in twice.items():
        path = _write(tmp_path, name, text)
        rc, err = spectra(capsys, "launch", path, "--dry-run")
        assert rc == 2 and err == [f"error: {path}: {where}: invalid YAML: duplicate key {key} "
                                   "(the earlier value would be silently dropped)"], err
    # A YAML merge (`<<`) is not a duplicate: the mapping's own key overrides the merged one.
    path = _write(tmp_path, "merge.yaml", base.replace("model:\n", "model:\n  <<: {num_layers: 4, hidden_size: 32}\n"))
    assert spectra(capsys, "launch", path, "--dry-run")[0] == 0
    assert load_config(path)["model"]["num_layers"] == 2 and load_config(path)["model"]["hidden_size"] == 64


def test_a_sweep_name_cannot_leave_the_output_root(tmp_path, capsys):
    base = ROOT / "configs/160m/spectra-adamw.yaml"
    path = _write(tmp_path, "sweep.yaml", f"base: {base}\nname: ../up\ngrid: {{training.lr: [1.0e-3]}}\n")
    rc, err = spectra(capsys, "sweep", path, "--dry-run")
    assert rc == 2 and len(err) == 1 and "name: must be a single plain folder name" in err[0], err


def test_local_runs_need_no_torchrun_on_path_and_slurm_jobs_use_their_python(tmp_path):
    config = load_config(TINY, env={"SPECTRA_RUNS": str(tmp_path)})
    assert to_command(config, "local")[:3] == [sys.executable, "-m", "torch.distributed.run"]
    assert to_command(config, "slurm")[:3] == ["python3", "-m", "torch.distributed.run"]


def test_trainer_argument_errors_are_caught_once_before_anything_starts(tmp_path, capsys):
    pytest.importorskip("megatron_spectra.train.args")
    cases = [('trainer.extra_args=["--no-such-flag", "3"]', "unrecognized arguments: --no-such-flag 3"),
             ('trainer.extra_args=["--lr-warmup-iters", "9"]', "--lr-warmup-iters 9 must be at least 0")]
    for change, message in cases:
        rc, err = spectra(capsys, "launch", TINY, "--set", change)
        assert rc == 2 and len(err) == 1 and message in err[0] and "(trainer.extra_args)" in err[0], err
    assert not (tmp_path / "runs").exists()  # no run folder, no process


# ----------------------------------------------------------------------------- signals

# Stands in for torchrun: says it is ready, records the signal it gets, exits as torchrun does.
FAKE_TORCHRUN = """
import signal, sys, time
def stop(signum, frame):
    open(sys.argv[1], "w").write(signal.Signals(signum).name)
    sys.exit(1)
signal.signal(signal.SIGTERM, stop)
print("ready", flush=True)
time.sleep(120)
"""

DRIVER = """
import sys
from megatron_spectra.launch import runner
runner.to_command = lambda config, where: [sys.executable, "-c", {fake!r}, {marker!r}]
from megatron_spectra.cli.main import main
sys.exit(main(["launch", {config!r}]))
"""


@pytest.mark.parametrize("signum, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_stops_the_run_its_processes_and_writes_the_exit_code(tmp_path, signum, code):
    marker = tmp_path / "child_got"
    driver = DRIVER.format(fake=FAKE_TORCHRUN, marker=str(marker), config=TINY)
    proc = subprocess.Popen([sys.executable, "-c", driver], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env={**os.environ, "SPECTRA_RUNS": str(tmp_path / "runs")})
    assert proc.stdout.readline().strip() == "ready"  # the child is running under the launcher
    proc.send_signal(signum)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == code, err
    run = tmp_path / "runs" / "tiny-cpu"
    assert err.strip().splitlines() == [f"spectra launch: tiny-cpu: stopped by {signal.Signals(signum).name}; its processes "
                                        f"were stopped, exit code {code} written to {run / 'exit_code'}"]
    assert (run / "exit_code").read_text() == f"{code}\n"
    assert marker.read_text() == "SIGTERM"  # the child was told to stop (torchrun stops its ranks then)
    assert "ready" in (run / "logs" / "train.log").read_text()
    assert "stopped by" in (run / "logs" / "train.log").read_text()


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_sigterm_stops_a_one_world_sweep_and_its_processes(tmp_path):
    """The one world's processes are the spawner's children: SIGTERM must not end the parent
    alone and leave them training."""
    pytest.importorskip("megatron_spectra.train.args")
    runs = tmp_path / "runs"
    long = ["--set", "training.train_iters=100000", "--set", "training.save_interval=100000",
            "--set", "training.eval_interval=100000"]
    proc = subprocess.Popen([sys.executable, "-m", "megatron_spectra.cli.main", "sweep", "configs/sweeps/tiny-cpu.yaml",
                             "--local", "--one-world", *long], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, env={**os.environ, "SPECTRA_RUNS": str(runs)})
    first = runs / "tiny-cpu-sweep" / "clip_threshold=1"
    deadline = time.monotonic() + 180
    while "iteration" not in _text(first / "logs" / "train.log"):  # training, in the spawned processes
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read() if proc.poll() is not None else "slow"
        time.sleep(0.5)
    children = _children(proc.pid)
    assert children
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143 and err.strip().splitlines()[-1].startswith(
        "spectra sweep: tiny-cpu-sweep/clip_threshold=1: stopped by SIGTERM"), err
    assert (first / "exit_code").read_text() == "143\n"
    assert not (runs / "tiny-cpu-sweep" / "clip_threshold=10" / "exit_code").exists()  # never started
    time.sleep(1)
    assert not [pid for pid in children if Path(f"/proc/{pid}").exists() and "Z" not in _state(pid)], "processes left"


def _text(path: Path) -> str:
    return path.read_text() if path.is_file() else ""


def _children(pid: int) -> list[int]:
    out = subprocess.run(["ps", "-e", "-o", "pid=,ppid="], capture_output=True, text=True).stdout.split()
    pairs = list(zip(map(int, out[::2]), map(int, out[1::2])))
    return [child for child, parent in pairs if parent == pid]


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
    except OSError:
        return "Z"
