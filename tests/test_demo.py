"""`spectra demo`: its flags on the demo sweep's keys, checked before any process starts, and
one tiny TP=2 x DP=2 run end to end through the launcher and the sweep collector."""

from __future__ import annotations

import json
import math

import pytest

from megatron_spectra.cli.demo import add_parser, demo_sweep
from megatron_spectra.cli.main import main
from megatron_spectra.launch import trainer_args


def demo_args(*argv: str):
    import argparse

    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers())
    return parser.parse_args(["demo", "--out", "/tmp/nowhere/demo", *argv])


def flag(args: list, name: str) -> str:
    return args[args.index(name) + 1]


def test_default_runs_are_the_sweep_file():
    sweep = demo_sweep(demo_args(), gpus=False)
    assert [r.name for r in sweep.runs] == ["lr=0.001_optimizer=spectra-adamw", "lr=0.001_optimizer=adam",
                                            "lr=0.1_optimizer=spectra-adamw", "lr=0.1_optimizer=adam"]
    assert str(sweep.dir) == "/tmp/nowhere/demo"
    args = trainer_args(sweep.runs[0].config)
    recipe = {"--train-iters": "120", "--lr-warmup-iters": "12", "--lr-wsd-decay-iters": "24", "--eval-interval": "30",
              "--micro-batch-size": "4", "--global-batch-size": "16", "--clip-grad": "0.5", "--adam-beta1": "0.8",
              "--tensor-model-parallel-size": "2", "--make-vocab-size-divisible-by": "64", "--split": "95,5,0",
              "--spectra-clip-threshold": "10.0", "--spectra-mode": "paper", "--seed": "1234", "--log-interval": "5"}
    assert {name: flag(args, name) for name in recipe} == recipe
    for switch in ("--trainer-cpu", "--spectra-ns-fp32", "--trainer-progress", "--trainer-update-norms", "--use-distributed-optimizer"):
        assert switch in args
    assert "--save" not in args and "--data-path" not in args  # no checkpoints; the builtin corpus


def test_flags_map_onto_the_keys():
    sweep = demo_sweep(demo_args("--steps", "13", "--tp", "1", "--dp", "4", "--high-lr", "0", "--lr", "3e-3",
                                 "--optimizer", "spectra-signum", "--trainer-args", "--spectra-mode", "accurate"), gpus=True)
    assert [r.name for r in sweep.runs] == ["lr=0.003_optimizer=spectra-signum", "lr=0.003_optimizer=adam"]
    args = trainer_args(sweep.runs[0].config)
    # the demo's own lengths: warm-up steps // 10, decay steps // 5 (not rounded), evaluation every quarter
    assert (flag(args, "--lr-warmup-iters"), flag(args, "--lr-wsd-decay-iters"), flag(args, "--eval-interval")) == ("1", "2", "5")
    assert flag(args, "--make-vocab-size-divisible-by") == "64" and flag(args, "--tensor-model-parallel-size") == "1"
    assert "--trainer-cpu" not in args and "--spectra-ns-fp32" not in args  # GPUs
    assert args[-2:] == ["--spectra-mode", "accurate"]  # --trainer-args last, as given


@pytest.mark.parametrize("argv, named", [
    (["--dp", "3"], "training.global_batch_size"),
    (["--optimizer", "lion"], "optimizer.name"),
    (["--baseline", "spectra-adamw"], "two runs get the same name"),
    (["--steps", "0"], "training.train_iters"),
])
def test_bad_flags_stop_before_any_process_starts(tmp_path, capsys, argv, named):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), *argv]) == 2
    assert named in capsys.readouterr().err
    assert not out.exists()


def test_bad_trainer_args_stop_before_any_process_starts(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--trainer-args", "--bogus-flag", "1"]) == 2
    assert "unrecognized arguments: --bogus-flag" in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_demo_tiny_tp2_dp2(tmp_path, capsys):
    """`spectra demo` end to end at TP=2 x DP=2 on CPU (a tinier model, few steps): both runs
    train through the real optimizers, and the table, plot and metrics are written."""
    out = tmp_path / "demo"
    tiny = ("--num-layers 2 --hidden-size 64 --ffn-hidden-size 128 --seq-length 32 --max-position-embeddings 32 "
            "--eval-iters 2 --lr-warmup-iters 1").split()
    assert main(["demo", "--out", str(out), "--steps", "12", "--high-lr", "0", "--lr", "3e-3", "--trainer-args", *tiny]) == 0
    printed = capsys.readouterr()
    assert "Transformer Engine" not in printed.out + printed.err and "Warning" not in printed.out + printed.err
    assert (out / "demo.png").stat().st_size > 10_000
    table = (out / "results.md").read_text()
    for run in ("lr=0.003_optimizer=spectra-adamw", "lr=0.003_optimizer=adam"):
        assert f"| {run} | completed |" in table
        records = [json.loads(line) for line in (out / run / "metrics.jsonl").read_text().splitlines()]
        losses = [r["lm_loss"] for r in records if r["kind"] == "train"]
        assert len(losses) == 12 and all(math.isfinite(x) for x in losses)
        assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.3, losses
        measured = [r for r in records if "update_norm_after" in r]
        assert measured and all(r["update_norm_after"] <= r["update_norm_before"] * (1 + 1e-4) for r in measured)
        if "spectra" in run:  # the clipped direction stays under c = 10
            assert all(r["update_norm_after"] <= 10.0 * (1 + 1e-3) for r in measured)
        assert math.isfinite(records[-1]["val_loss"]) and records[-1]["kind"] == "summary"
        log = (out / run / "logs" / "train.log").read_text()
        assert "iteration       10/      12 |" in log and "validation loss at iteration 12 |" in log
    rows = {row["run"]: row for row in json.loads((out / "summary.json").read_text())["rows"]}
    assert rows["lr=0.003_optimizer=spectra-adamw"]["max_update_norm"] <= 10.0 * (1 + 1e-3)
    assert rows["lr=0.003_optimizer=adam"]["max_update_norm"] > 10.0  # AdamW's updates are not clipped


def test_config_file_sets_the_flags_left_out(tmp_path):
    from megatron_spectra.cli.demo import apply_config
    from megatron_spectra.launch import ConfigError

    path = tmp_path / "demo.yaml"
    path.write_text("steps: 40\nhigh_lr: 0\nlr: 2e-3\ntrainer_args: [--spectra-mode, accurate]\n")
    args = demo_args("--config", str(path), "--lr", "5e-3")
    apply_config(args)
    assert (args.steps, args.high_lr, args.lr, args.trainer_args) == (40, 0, 5e-3, ["--spectra-mode", "accurate"])  # the command line wins
    path.write_text("stepz: 40\n")
    with pytest.raises(ConfigError, match="stepz"):
        apply_config(demo_args("--config", str(path)))
