"""`spectra demo`: its flags on the demo sweeps' keys, bad flags refused in one line before any
process starts, the report's numbers against their definitions on fabricated runs, and one
tiny lr sweep plus its TP=2 x DP=2 pair end to end through the launcher."""

from __future__ import annotations

import json
import math
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest

from megatron_spectra.cli.demo import add_parser, demo_sweeps
from megatron_spectra.cli.main import main
from megatron_spectra.launch import trainer_args

ROOT = Path(__file__).resolve().parents[1]


def demo_args(*argv: str):
    import argparse

    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers())
    return parser.parse_args(["demo", "--out", "/tmp/nowhere/demo", *argv])


def flag(args: list, name: str) -> str:
    return args[args.index(name) + 1]


def test_default_runs_are_the_sweep_files():
    sweep, pair = demo_sweeps(demo_args(), gpus=False)
    lrs = ("0.001", "0.003", "0.01", "0.03", "0.1")
    assert [r.name for r in sweep.runs] == [f"lr={lr}_optimizer={o}" for lr in lrs for o in ("spectra-adamw", "adam")]
    assert [r.name for r in pair.runs] == ["tensor_parallel=2_lr=0.001_optimizer=spectra-adamw", "tensor_parallel=2_lr=0.001_optimizer=adam"]
    assert str(sweep.dir) == str(pair.dir) == "/tmp/nowhere/demo"
    args = trainer_args(sweep.runs[0].config)
    recipe = {"--train-iters": "100", "--lr-warmup-iters": "10", "--lr-wsd-decay-iters": "20", "--eval-interval": "25",
              "--micro-batch-size": "16", "--global-batch-size": "16", "--clip-grad": "0.5", "--adam-beta1": "0.8",
              "--tensor-model-parallel-size": "1", "--make-vocab-size-divisible-by": "128", "--split": "95,5,0",
              "--spectra-clip-threshold": "10.0", "--spectra-mode": "paper", "--seed": "1234", "--log-interval": "5"}
    assert {name: flag(args, name) for name in recipe} == recipe
    for switch in ("--trainer-cpu", "--spectra-ns-fp32", "--trainer-progress", "--trainer-update-norms", "--use-distributed-optimizer"):
        assert switch in args
    assert "--save" not in args and "--data-path" not in args  # no checkpoints; the builtin corpus
    assert sweep.runs[0].config["parallel"]["gpus_per_node"] == 1
    distributed = trainer_args(pair.runs[0].config)
    # the same model and batch: padded vocab 64 x TP 2 = 128, micro 8 x DP 2 = 16
    assert (flag(distributed, "--tensor-model-parallel-size"), flag(distributed, "--make-vocab-size-divisible-by"),
            flag(distributed, "--micro-batch-size"), flag(distributed, "--lr")) == ("2", "64", "8", "0.001")
    assert pair.runs[0].config["parallel"]["gpus_per_node"] == 4 and "--use-distributed-optimizer" in distributed


def test_flags_map_onto_the_keys():
    sweep, pair = demo_sweeps(demo_args("--steps", "13", "--tp", "1", "--dp", "4", "--lrs", "1e-3", "1e-2", "--lr", "3e-3",
                                        "--optimizer", "spectra-signum", "--trainer-args", "--spectra-mode", "accurate"), gpus=True)
    assert [r.name for r in sweep.runs] == ["lr=0.001_optimizer=spectra-signum", "lr=0.001_optimizer=adam",
                                            "lr=0.01_optimizer=spectra-signum", "lr=0.01_optimizer=adam"]
    assert [r.name for r in pair.runs] == ["tensor_parallel=1_lr=0.003_optimizer=spectra-signum", "tensor_parallel=1_lr=0.003_optimizer=adam"]
    args = trainer_args(sweep.runs[0].config)
    # the demo's own lengths: warm-up steps // 10, decay steps // 5 (not rounded), evaluation every quarter
    assert (flag(args, "--lr-warmup-iters"), flag(args, "--lr-wsd-decay-iters"), flag(args, "--eval-interval")) == ("1", "2", "5")
    assert "--trainer-cpu" not in args and "--spectra-ns-fp32" not in args  # GPUs
    assert args[-2:] == ["--spectra-mode", "accurate"]  # --trainer-args last, as given
    distributed = trainer_args(pair.runs[0].config)
    assert (flag(distributed, "--micro-batch-size"), pair.runs[0].config["parallel"]["gpus_per_node"]) == ("4", 4)
    assert len(demo_sweeps(demo_args("--lr", "0"), gpus=False)) == 1  # --lr 0: no pair


@pytest.mark.parametrize("argv, named", [
    (["--optimizer", "lion"], "'lion' is not one of"),
    (["--tp", "3"], "TP 3 does not divide model.num_attention_heads 4"),
    (["--dp", "3"], "--dp"),
    (["--tp", "0"], "--tp: must be an integer >= 1"),
    (["--config", "/nonexistent/demo.yaml"], "/nonexistent/demo.yaml"),
    (["--steps", "0"], "training.train_iters"),
    (["--lrs", "1e-2", "-1"], "training.lr"),
    (["--baseline", "spectra-adamw"], "two runs get the same name"),
])
def test_bad_flags_one_line_under_2s(tmp_path, argv, named):
    """The CLI as a user runs it: exit 2, one line on stderr naming the problem, nothing on
    stdout, no traceback or usage text, no output folder, in under 2 s (torch is not imported)."""
    out = tmp_path / "demo"
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "megatron_spectra.cli.main", "demo", "--out", str(out), *argv],
                          capture_output=True, text=True, cwd=ROOT, timeout=60)
    elapsed = time.perf_counter() - start
    assert done.returncode == 2 and done.stdout == ""
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and named in lines[0], done.stderr
    assert not out.exists()
    assert elapsed < 2.0, f"{elapsed:.2f} s"


def test_bad_trainer_args_stop_before_any_process_starts(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--trainer-args", "--bogus-flag", "1"]) == 2
    err = capsys.readouterr().err
    assert "unrecognized arguments: --bogus-flag" in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_config_file_sets_the_flags_left_out(tmp_path):
    from megatron_spectra.cli.demo import apply_config
    from megatron_spectra.launch import ConfigError

    path = tmp_path / "demo.yaml"
    path.write_text("steps: 40\nlrs: [1e-3, 1e-2]\nlr: 2e-3\ntrainer_args: [--spectra-mode, accurate]\n")
    args = demo_args("--config", str(path), "--lr", "5e-3")
    apply_config(args)
    assert (args.steps, args.lrs, args.lr, args.trainer_args) == (40, [1e-3, 1e-2], 5e-3, ["--spectra-mode", "accurate"])
    path.write_text("stepz: 40\n")
    with pytest.raises(ConfigError, match="stepz"):
        apply_config(demo_args("--config", str(path)))


# ---------------------------------------------------------------- the report on fabricated runs

def _run(root: Path, name: str, optimizer: str, lr: float, losses: list, val: float | None, code: int = 0, log: str = "") -> Path:
    """A run folder as the builtin trainer leaves it."""
    from megatron_spectra.launch.config import resolve_bases, set_dotted, validate
    from megatron_spectra.launch.runner import prepare

    data = resolve_bases(ROOT / "configs/demo.yaml")
    for key, value in {"name": f"s/{name}", "optimizer.name": optimizer, "training.lr": lr, "training.train_iters": len(losses)}.items():
        data = set_dotted(data, key, value)
    config = validate(data, env={"SPECTRA_RUNS": str(root)})
    prepare(config, "local")
    records = [{"kind": "train", "iteration": i, "lm_loss": x, "lr": lr, "spectra/clip-threshold": 10.0} for i, x in enumerate(losses, 1)]
    records[len(losses) // 2].update(update_norm_before=150.0, update_norm_after=9.9 if optimizer != "adam" else 150.0)
    if val is not None:
        records += [{"kind": "valid", "iteration": len(losses), "lm_loss": val}, {"kind": "summary", "val_loss": val}]
    (config.run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (config.run_dir / "logs" / "train.log").write_text(log)
    (config.run_dir / "exit_code").write_text(f"{code}\n")
    return config.run_dir


def test_report_best_lr_range_noise_and_divergence(tmp_path):
    from megatron_spectra.launch.demo_report import WITHIN, write_demo

    rng = random.Random(0)
    sigma = 0.1
    noisy = [4.0 - 0.002 * i + rng.gauss(0, sigma) for i in range(400)]
    finals = {("spectra-adamw", 1e-3): 2.50, ("adam", 1e-3): 2.30, ("spectra-adamw", 1e-2): 2.20, ("adam", 1e-2): 2.45,
              ("spectra-adamw", 1e-1): 2.28, ("adam", 1e-1): None}
    dirs = []
    for (opt, lr), val in finals.items():
        losses = list(noisy) if val is not None else noisy[:50] + [math.inf]
        log = "" if val is not None else "NonFiniteError: iteration 51: the loss is inf\n"
        dirs.append(_run(tmp_path, f"lr={lr:g}_optimizer={opt}", opt, lr, losses, val, code=0 if val is not None else 1, log=log))
    text, _ = write_demo(tmp_path / "s", dirs, n_sweep=len(dirs))
    summary = json.loads((tmp_path / "s" / "summary.json").read_text())
    for opt in ("spectra-adamw", "adam"):
        vals = {lr: v for (o, lr), v in finals.items() if o == opt}
        best = min((lr for lr, v in vals.items() if v is not None), key=lambda lr: vals[lr])
        arm = summary["arms"][opt]
        assert arm["best_lr"] == best and arm["best_val_loss"] == vals[best]
        assert arm["lrs_within"] == sorted(lr for lr, v in vals.items() if v is not None and v <= vals[best] + WITHIN)
    assert summary["arms"]["adam"]["val_loss_by_lr"]["0.1"] is None  # diverged: infinite, null in strict JSON
    rows = {r["run"]: r for r in summary["rows"]}
    assert rows["lr=0.1_optimizer=adam"]["state"] == "diverged"
    assert rows["lr=0.01_optimizer=adam"]["loss_noise"] == pytest.approx(sigma, rel=0.1)  # the definition recovers sigma
    # curves: every iteration's loss, the norms where measured
    curve = summary["curves"]["lr=0.01_optimizer=spectra-adamw"]
    assert len(curve["train_loss"]) == 400 and curve["update_norm_after"] == [[201, 9.9]] and len(curve["clip_threshold"]) == 400
    assert curve["lr"][0] == [1, 0.01] and curve["clip_threshold"][-1] == [400, 10.0]
    assert "spectra-adamw ends 0.100 nats lower than AdamW at its best" in text and "over 2 and 1 of the 3 lrs" in text
    assert "and a divergence for AdamW" in text  # at the largest lr
    assert "| best lr | 0.01 | 0.001 |" in text and "| lrs within 0.1 of best | 0.01..0.1 (2 of 3) | 0.001 only (1 of 3) |" in text
    md = (tmp_path / "s" / "results.md").read_text()
    assert "## How each number is computed" in md and "diverged" in md
    assert (tmp_path / "s" / "demo.png").stat().st_size > 20_000
    # a demo with a diverged run is a result, not an error
    from megatron_spectra.launch.collect import DIVERGED, state_of

    assert state_of(dirs[-1], None) == DIVERGED and state_of(dirs[0], None) == "completed"


# ---------------------------------------------------------------- end to end

@pytest.mark.slow
@pytest.mark.timeout(900)
def test_demo_tiny_sweep_and_tp2_dp2_pair(tmp_path, capsys):
    """`spectra demo` end to end on CPU (a tinier model, few steps): an lr sweep of two lrs and
    the pair at TP=2 x DP=2 through the real optimizers; the pair ends where the one-process
    run at its lr does; the table's best lr is the argmin of the runs' final val losses."""
    out = tmp_path / "demo"
    tiny = ("--num-layers 2 --hidden-size 64 --ffn-hidden-size 128 --seq-length 32 --max-position-embeddings 32 "
            "--eval-iters 2").split()
    assert main(["demo", "--out", str(out), "--steps", "12", "--lrs", "1e-3", "1e-2", "--lr", "1e-2", "--trainer-args", *tiny]) == 0
    printed = capsys.readouterr()
    assert "Transformer Engine" not in printed.out + printed.err and "Warning" not in printed.out + printed.err
    assert (out / "demo.png").stat().st_size > 20_000
    summary = json.loads((out / "summary.json").read_text())
    rows = {r["run"]: r for r in summary["rows"]}
    for opt in ("spectra-adamw", "adam"):
        finals = {lr: summary["curves"][f"lr={lr:g}_optimizer={opt}"]["val_loss"][-1][1] for lr in (1e-3, 1e-2)}
        assert summary["arms"][opt]["best_lr"] == min(finals, key=finals.get)
        run = f"lr=0.01_optimizer={opt}"
        records = [json.loads(line) for line in (out / run / "metrics.jsonl").read_text().splitlines()]
        losses = [r["lm_loss"] for r in records if r["kind"] == "train"]
        assert len(losses) == 12 and all(math.isfinite(x) for x in losses)
        assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.3, losses
        measured = [r for r in records if "update_norm_after" in r]
        assert measured and all(r["update_norm_after"] <= r["update_norm_before"] * (1 + 1e-4) for r in measured)
        if opt != "adam":  # the clipped direction stays under c = 10 (the warm-up is 1 iteration)
            assert all(r["update_norm_after"] <= 10.0 * (1 + 1e-3) for r in measured)
        log = (out / run / "logs" / "train.log").read_text()
        assert "iteration       10/      12 |" in log and "validation loss at iteration 12 |" in log
        # the same model, data and initial weights at TP=2 x DP=2: the same loss up to float rounding
        pair = rows[f"tensor_parallel=2_{run}"]
        assert pair["state"] == "completed"
        assert pair["final_val_loss"] == pytest.approx(rows[run]["final_val_loss"], abs=2e-3)
    assert rows["lr=0.01_optimizer=spectra-adamw"]["max_update_norm"] <= 10.0 * (1 + 1e-3)
    assert rows["lr=0.01_optimizer=adam"]["max_update_norm"] > 10.0  # AdamW's updates are not clipped
    assert f"| best lr | {summary['arms']['spectra-adamw']['best_lr']:g} | {summary['arms']['adam']['best_lr']:g} |" in (out / "results.md").read_text()
