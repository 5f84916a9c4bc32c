"""Sweep expansion, sbatch scripts, collection of fabricated run folders, a tiny local launch."""

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from megatron_spectra.launch import load_config
from megatron_spectra.launch.collect import collect, to_markdown, write_outputs
from megatron_spectra.launch.config import ConfigError, resolve_bases, set_dotted, validate
from megatron_spectra.launch.runner import COMPLETED, FAILED, NOT_STARTED, UNFINISHED, pending_runs, prepare, run_state
from megatron_spectra.launch.slurm import render_array, render_sbatch
from megatron_spectra.launch.sweep import expand, load_sweep

ROOT = Path(__file__).resolve().parents[2]
ENV = {"DATA_PATH": "/data/fwe", "VOCAB_FILE": "/v", "MERGE_FILE": "/m", "MEGATRON_LM": "/opt/mlm"}


def test_expand_grid_times_zip():
    runs = expand({"grid": {"a.x": [1, 2], "a.y": ["p", "q"]}, "zip": {"b.u": [1, 2, 3], "b.v": [4, 5, 6]}})
    assert len(runs) == 12
    assert runs[0] == {"a.x": 1, "a.y": "p", "b.u": 1, "b.v": 4}
    assert {(r["b.u"], r["b.v"]) for r in runs} == {(1, 4), (2, 5), (3, 6)}
    with pytest.raises(ConfigError, match="zip"):
        expand({"zip": {"b.u": [1, 2], "b.v": [1]}})


def test_paper_sweep_names_and_array(tmp_path):
    sweep = load_sweep(ROOT / "configs/sweeps/160m-spectra-adamw-lr-threshold.yaml", env={**ENV, "SPECTRA_RUNS": str(tmp_path)})
    assert [r.name for r in sweep.runs][:2] == ["lr=0.0005_clip_threshold=5", "lr=0.0005_clip_threshold=10"]
    assert {(r.config["training"]["lr"], r.config["optimizer"]["spectra"]["clip_threshold"]) for r in sweep.runs} == {
        (lr, c) for lr in (5e-4, 1e-3, 2e-3) for c in (5.0, 10.0)}
    script = render_array([r.config for r in sweep.runs], sweep.dir, [0, 3, 5], "s")
    assert "#SBATCH --array=0,3,5" in script and '  3) RUN_DIR=' in script
    _bash_n(script, tmp_path)


def test_bad_sweep_key_is_named(tmp_path):
    bad = tmp_path / "s.yaml"
    bad.write_text(yaml.safe_dump({"base": str(ROOT / "configs/tiny-cpu.yaml"), "name": "s", "grid": {"training.lrr": [1.0]}}))
    with pytest.raises(ConfigError, match="training.lrr"):
        load_sweep(bad, env={})


def _bash_n(script: str, tmp_path: Path):
    path = tmp_path / "script.sh"
    path.write_text(script)
    out = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


@pytest.mark.parametrize("name", ["780m-deep/spectra-adamw", "820m-wide/spectra-signum"])
def test_sbatch_rendezvous(name, tmp_path):
    config = load_config(ROOT / f"configs/{name}.yaml", env={**ENV, "SPECTRA_RUNS": str(tmp_path)},
                         overrides={"slurm.env": {"NCCL_SOCKET_IFNAME": "ib0"}})
    script = render_sbatch(config)
    _bash_n(script, tmp_path)
    nodes = config["parallel"]["nodes"]
    assert f"#SBATCH --nodes={nodes}" in script and "#SBATCH --ntasks-per-node=1" in script
    assert "#SBATCH --gpus-per-node=8" in script
    assert 'MASTER_ADDR="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)"' in script
    assert "srun --ntasks-per-node=1" in script
    assert '--rdzv-backend c10d --rdzv-endpoint "$MASTER_ADDR:$MASTER_PORT"' in script
    assert '--nnodes "$SLURM_NNODES" --nproc-per-node 8 --rdzv-id "$SLURM_JOB_ID"' in script
    assert "export CUDA_DEVICE_MAX_CONNECTIONS=1" in script and "export NCCL_SOCKET_IFNAME=ib0" in script
    assert f"-m megatron_spectra.megatron_lm /opt/mlm/pretrain_gpt.py" in script
    assert f"--save {tmp_path}/{config.name}/checkpoints" in script


# Real log formats: Megatron-LM core_r0.16 training_log and evaluate_and_print_results.
def _megatron_log(losses, total, val=None, final=None):
    lines = []
    for it, loss in losses:
        lines.append(f" [2026-11-23 10:00:00.123456] iteration {it:8d}/{total:8d} | consumed samples: {it * 256:12d} | "
                     f"elapsed time per iteration (ms): {100.0 + it:.1f} | throughput per GPU (TFLOP/s/GPU): 123.4 | "
                     f"learning rate: 1.000000E-03 | global batch size:   256 | lm loss: {loss:.6E} | loss scale: 1.0 | "
                     f"grad norm: 0.512 | number of skipped iterations:   0 | number of nan iterations:   0 |")
    for it, loss in (val or []):
        lines.append(f" validation loss at iteration {it} | lm loss value: {loss:.6E} | lm loss PPL: 2.0E+01 | ")
    if final is not None:
        lines.append(f" validation loss at iteration {total} on validation set | lm loss value: {final:.6E} | lm loss PPL: 1.9E+01 | ")
    return "\n".join(lines) + "\n"


def _fake_run(sweep, i, log_text, code):
    config = sweep.runs[i].config
    prepare(config, "slurm")
    if log_text is not None:
        (config.run_dir / "logs" / "train.log").write_text(log_text)
    if code is not None:
        (config.run_dir / "exit_code").write_text(f"{code}\n")


def test_collect_and_resubmit(tmp_path):
    sweep = load_sweep(ROOT / "configs/sweeps/160m-threshold.yaml",
                       env={**ENV, "SPECTRA_RUNS": str(tmp_path)}, overrides={"training.train_iters": 20, "training.lr_warmup_iters": 2})
    from megatron_spectra.launch.runner import write_listing

    write_listing(sweep)
    _fake_run(sweep, 0, _megatron_log([(10, 4.0), (20, 3.5)], 20, val=[(10, 3.9)], final=3.2), 0)  # completed
    _fake_run(sweep, 1, _megatron_log([(10, 4.1)], 20), 1)  # failed
    _fake_run(sweep, 2, _megatron_log([(10, 4.2)], 20, val=[(10, 4.0)]), None)  # still running
    _fake_run(sweep, 3, _megatron_log([(10, 4.2)], 20), 0)  # exited early: unfinished
    states = [run_state(r.config.run_dir, 20) for r in sweep.runs]
    assert states == [COMPLETED, FAILED, UNFINISHED, UNFINISHED, NOT_STARTED]
    assert pending_runs(sweep) == [1, 2, 3, 4]  # re-submitting skips the completed run

    results, notes = collect(sweep.dir)
    rows = {r.row["run"]: r.row for r in results}
    assert len(rows) == 5  # failed and never-started runs are listed, not dropped
    done = rows["clip_threshold=1"]
    assert done["state"] == COMPLETED and done["final_val_loss"] == pytest.approx(3.2)
    assert done["val_ppl"] == pytest.approx(2.71828 ** 3.2, rel=1e-4)
    assert done["tokens_per_s"] == pytest.approx(256 * 512 / 0.120)  # median after the first interval: 120 ms
    assert rows["clip_threshold=5"]["state"] == FAILED
    assert rows["clip_threshold=10"]["final_val_loss"] == pytest.approx(4.0)
    assert rows["clip_threshold=50"]["state"] == NOT_STARTED and rows["clip_threshold=50"]["final_val_loss"] is None
    paths = write_outputs(sweep.dir, results)
    assert paths["csv"].read_text().count("\n") == 6 and "plot" in paths and paths["plot"].stat().st_size > 0
    assert "| clip_threshold=5 | failed |" in to_markdown(results)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_tiny_local_launch(tmp_path):
    pytest.importorskip("megatron_spectra.train.args", reason="the builtin trainer is not there")
    import os

    # Without the interpreter's folder (a venv's bin/) on PATH: no `torchrun` to find, and none is needed.
    bin_dir = str(Path(sys.executable).parent)
    path = os.pathsep.join(d for d in os.environ.get("PATH", "").split(os.pathsep) if d and d != bin_dir)
    out = subprocess.run([sys.executable, "-m", "megatron_spectra.cli.main", "launch", str(ROOT / "configs/tiny-cpu.yaml"),
                          "--set", "training.train_iters=4", "--set", "training.save_interval=4"],
                         capture_output=True, text=True, timeout=280, cwd=ROOT,
                         env={**os.environ, "SPECTRA_RUNS": str(tmp_path), "PATH": path})
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    run = tmp_path / "tiny-cpu"
    assert (run / "exit_code").read_text().strip() == "0"
    assert run_state(run, 4) == COMPLETED
    results, _ = collect(tmp_path)
    assert results[0].row["iteration"] == 4 and results[0].row["final_val_loss"] is not None


def test_run_names_say_what_varies():
    from megatron_spectra.launch.sweep import run_name_of

    assert run_name_of({"training.lr": 1e-3, "optimizer.name": "adam"}) == "lr=0.001_optimizer=adam"
    assert run_name_of({"training.seed": 1, "data.seed": 2}) == "training.seed=1_data.seed=2"


def _builtin_run(root: Path, name: str, optimizer: str, losses: list, norms: dict, exit_code: int | None = 0) -> Path:
    """A run folder as the builtin trainer leaves it: config.yaml, metrics.jsonl, exit_code."""
    import json

    data = resolve_bases(ROOT / "configs/demo.yaml")
    for key, value in {"name": name, "optimizer.name": optimizer, "training.train_iters": len(losses)}.items():
        data = set_dotted(data, key, value)
    config = validate(data, env={"SPECTRA_RUNS": str(root)})  # named <sweep>/<run>, as a sweep's runs are
    prepare(config, "local")
    records = []
    for it, loss in enumerate(losses, 1):
        record = {"kind": "train", "iteration": it, "lm_loss": loss}
        if it in norms:
            record.update(update_norm_before=norms[it][0], update_norm_after=norms[it][1])
        records.append(record)
    records += [{"kind": "valid", "iteration": len(losses), "lm_loss": 2.5},
                {"kind": "summary", "val_loss": 2.5, "tokens_per_s": 1234.0, "optimizer_share": 0.2}]
    (config.run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (config.run_dir / "logs" / "train.log").write_text(_megatron_log([(10, 3.0), (20, 2.0)], len(losses)))
    if exit_code is not None:
        (config.run_dir / "exit_code").write_text(f"{exit_code}\n")
    return config.run_dir


def test_collect_reads_the_builtin_trainers_metrics(tmp_path):
    losses = [4.0, 3.0, 3.5, 2.0] + [2.0] * 18  # 22 iterations, logged at 10 and 20 only
    _builtin_run(tmp_path, "s/clipped", "spectra-adamw", losses, {1: (50.0, 40.0), 10: (30.0, 9.9), 20: (20.0, 9.5)})
    _builtin_run(tmp_path, "s/baseline", "adam", [4.0, 2.0] + [float("inf")] + [2.0] * 19, {10: (30.0, 30.0)}, exit_code=1)
    results, _ = collect(tmp_path / "s")
    rows = {r.row["run"]: r.row for r in results}
    clipped, baseline = rows["clipped"], rows["baseline"]
    assert clipped["state"] == COMPLETED  # from metrics.jsonl: 22 of 22, though the log stops at 20
    assert clipped["final_train_loss"] == pytest.approx(2.0) and clipped["final_val_loss"] == 2.5
    assert clipped["largest_loss_rise"] == pytest.approx(0.5)  # 3.0 -> 3.5 after the first 10% (2 iterations)
    assert clipped["max_update_norm"] == 9.9 and clipped["max_update_norm_before"] == 30.0  # iteration 1 is warm-up
    assert clipped["tokens_per_s"] == 1234.0 and clipped["optimizer_share"] == 0.2 and clipped["clip_threshold"] == 10.0
    assert baseline["state"] == FAILED and baseline["largest_loss_rise"] == float("inf")
    assert baseline["clip_threshold"] is None  # its config's spectra section is defaults it never used
    table = to_markdown(results)
    assert "| largest ‖U‖₂ after clipping |" in table and "| 20% |" in table and "diverged" in table
    megatron_only = [r for r in results if r.row["run"] == "clipped"]
    megatron_only[0].row.update(max_update_norm=None, optimizer_share=None)
    assert "optimizer step share" not in to_markdown(megatron_only)  # a column no run has is left out
    paths = write_outputs(tmp_path / "s", results, plot_name="demo.png")
    assert paths["plot"].name == "demo.png" and paths["plot"].stat().st_size > 10_000


def test_one_world_takes_local_builtin_runs_of_one_size(tmp_path):
    from megatron_spectra.launch.one_world import check_one_world

    demo = load_config(ROOT / "configs/demo.yaml", env={"SPECTRA_RUNS": str(tmp_path)})
    check_one_world([demo, demo])
    paper = load_config(ROOT / "configs/160m/adamw.yaml", env={**ENV, "SPECTRA_RUNS": str(tmp_path)})
    with pytest.raises(ConfigError, match="entry"):
        check_one_world([demo, paper])
    other = load_config(ROOT / "configs/tiny-cpu.yaml", env={"SPECTRA_RUNS": str(tmp_path)})
    with pytest.raises(ConfigError, match="parallel.gpus_per_node: differs"):
        check_one_world([demo, other])
