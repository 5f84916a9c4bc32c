"""The `spectra` command as a user runs it: a dry run is fast (neither torch nor megatron-core
is imported), quiet (no library warnings), and treats every missing input alike."""

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PAPER_RUN = "configs/780m-deep/spectra-adamw.yaml"
INPUTS = ("DATA_PATH", "VOCAB_FILE", "MERGE_FILE", "MEGATRON_LM")
HEAVY = ("torch", "megatron")  # megatron-core's package; megatron_spectra is ours


def spectra(*argv: str, importtime: bool = False, env: dict | None = None) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if k not in INPUTS}
    command = [sys.executable, *(["-X", "importtime"] if importtime else []), "-m", "megatron_spectra.cli.main", *argv]
    return subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=ROOT, env={**base, **(env or {})})


def imported(stderr: str) -> set:
    """Top-level packages from `python -X importtime`'s report."""
    return {line.split("|")[-1].strip().split(".")[0] for line in stderr.splitlines() if line.startswith("import time:")}


def test_dry_runs_and_help_import_neither_torch_nor_megatron(tmp_path):
    runs = {"SPECTRA_RUNS": str(tmp_path)}
    for argv in (["--help"], ["launch", PAPER_RUN, "--dry-run"], ["launch", "configs/tiny-cpu.yaml", "--dry-run"],
                 ["sweep", "configs/sweeps/160m-spectra-adamw-lr-threshold.yaml", "--dry-run"], ["sweep", "--help"]):
        done = spectra(*argv, importtime=True, env=runs)
        assert done.returncode == 0, done.stderr[-2000:]
        packages = imported(done.stderr)
        assert "megatron_spectra" in packages and not packages & set(HEAVY), (argv, packages & set(HEAVY))
        assert "Transformer Engine" not in done.stdout + done.stderr and "Warning" not in done.stdout + done.stderr


def test_dry_run_warns_and_launch_refuses_with_every_missing_input(tmp_path):
    runs = {"SPECTRA_RUNS": str(tmp_path)}
    dry = spectra("launch", PAPER_RUN, "--dry-run", env=runs)
    assert dry.returncode == 0, dry.stderr
    warned = re.findall(r"# warning \(a real launch stops here\): .*?: (\S+): (.*)", dry.stdout)
    unset = {"data.path": "DATA_PATH", "data.vocab_file": "VOCAB_FILE", "data.merge_file": "MERGE_FILE", "megatron.path": "MEGATRON_LM"}
    assert dict(warned) == {key: f"environment variable {var} is not set" for key, var in unset.items()}
    assert "--data-path '${DATA_PATH}'" in dry.stdout  # the command, with the placeholder where the value goes
    real = spectra("launch", PAPER_RUN, env=runs)
    assert real.returncode == 2 and real.stdout == ""
    assert len(re.findall(r"^error: .*is not set$", real.stderr, re.M)) == 4 and "4 missing input(s)" in real.stderr
    assert not (tmp_path / "780m-deep-spectra-adamw").exists()  # nothing prepared, nothing started
    sweep = spectra("sweep", "configs/sweeps/160m-spectra-adamw-lr-threshold.yaml", "--dry-run", env=runs)
    assert sweep.returncode == 0 and sweep.stdout.count("# warning") == 4, sweep.stdout  # once each, not once per run
    refused = spectra("sweep", "configs/sweeps/160m-spectra-adamw-lr-threshold.yaml", env=runs)
    assert refused.returncode == 2 and "4 missing input(s)" in refused.stderr


def test_help_examples_name_files_that_exist():
    from megatron_spectra.cli import launch, sweep

    for module in (launch, sweep):
        named = re.findall(r"spectra (?:launch|sweep) (configs/\S+\.yaml)", module.__doc__)
        assert named and all((ROOT / path).is_file() for path in named), named
