"""`spectra demo`: the main job.

    spectra demo --out runs/demo [--steps N] [--optimizer NAME] [--lr X] [--high-lr Y] [--config FILE.yaml]

Pretrains a small LLaMA-style megatron-core GPT on the Python language reference (text that
ships with CPython) with spectra-adamw through the SpectraDistributedOptimizer, and the same
run with plain AdamW (same seed, same data), on TP=2 x DP=2 processes; then both again at a
learning rate where AdamW's loss spikes.

The runs are a sweep, configs/sweeps/demo.yaml over configs/demo.yaml, with the flags below
put on their keys (a flag left out keeps the files' value) and every run validated before
any process starts. The launcher runs them all in one world of processes, spawned once
(--torchrun: one torchrun per run), and the sweep collector tabulates them. --out is the
sweep's folder: results.md and results.csv (the table), demo.png (loss curves; update
spectral norms clipped against unclipped), summary.json, and per run <run>/ with
config.yaml, command.txt, logs/train.log (Megatron-LM log lines) and metrics.jsonl.

A --config YAML file sets any of these flags by their long name (`steps: 400`,
`high_lr: 0.02`, `trainer_args: ["--spectra-mode", "accurate"]`); flags on the command line win.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from ..launch.config import read_yaml
from ..launch.errors import ConfigError

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
DEMO_SWEEP = CONFIGS / "sweeps" / "demo.yaml"
# The flag that sets each key, for errors about a value the user gave.
FLAG_OF = {"training.train_iters": "--steps", "training.lr": "--lr / --high-lr", "optimizer.name": "--optimizer / --baseline",
           "parallel.tensor_parallel": "--tp", "parallel.gpus_per_node": "--tp x --dp",
           "training.global_batch_size": "--dp", "training.lr_warmup_iters": "--steps"}


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("demo", help="the main job: spectra-adamw vs AdamW pretraining, table and plot",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="output folder (the sweep's folder)")
    p.add_argument("--config", default=None, help="YAML file with any of these flags (command line wins)")
    p.add_argument("--steps", type=int, help="iterations per run (configs/demo.yaml: 120)")
    p.add_argument("--optimizer", help="the clipped optimizer (spectra-adamw|spectra-signum|spectra-ademamix)")
    p.add_argument("--baseline", help="the unclipped optimizer (Megatron's adam = AdamW)")
    p.add_argument("--lr", type=float, help="the recipe's learning rate (1e-3)")
    p.add_argument("--high-lr", type=float, help="the large learning rate of the second pair (1e-1; 0: no second pair)")
    p.add_argument("--tp", type=int, help="tensor-parallel size (2)")
    p.add_argument("--dp", type=int, help="data-parallel size (2)")
    p.add_argument("--torchrun", action="store_true", help="one torchrun per run instead of one world of processes for all")
    p.add_argument("--trainer-args", nargs=argparse.REMAINDER, default=None, help="more trainer flags, passed on as they are (last)")
    p.add_argument("--timeout", type=float, default=3600.0, help="give up after this many seconds (one world)")
    p.set_defaults(run=run)


def apply_config(args: argparse.Namespace) -> None:
    """Values from --config for the flags the command line left out."""
    values = read_yaml(args.config)
    unknown = sorted(set(values) - set(vars(args)) - {"config", "out", "run"})
    if unknown:
        raise ConfigError(", ".join(unknown), "unknown key(s): give flags by their long name (steps, high_lr, ...)", args.config)
    for key, value in values.items():
        if getattr(args, key) in (None, False):
            setattr(args, key, value)


def demo_sweep(args: argparse.Namespace, gpus: bool):
    """The demo's runs: the sweep file's spec, its grid from the flags, the rest as overrides."""
    from ..launch.sweep import expand_sweep

    if not DEMO_SWEEP.is_file():
        raise ConfigError("configs", f"no {DEMO_SWEEP}: spectra demo runs from a checkout (pip install -e .)")
    spec = read_yaml(DEMO_SWEEP)
    out = Path(args.out).absolute()
    spec["name"] = out.name  # the sweep's folder is output.root/name = --out
    grid = dict(spec["grid"])
    lrs = list(grid["training.lr"])
    lrs[0] = lrs[0] if args.lr is None else args.lr
    if args.high_lr is not None:
        lrs = lrs[:1] + ([args.high_lr] if args.high_lr else [])
    names = list(grid["optimizer.name"])
    names = [args.optimizer or names[0], args.baseline or names[1]]
    spec["grid"] = {"training.lr": lrs, "optimizer.name": names}
    return expand_sweep(spec, DEMO_SWEEP, overrides(args, out, gpus))


def world_of(args: argparse.Namespace) -> tuple[int, int]:
    """(TP, DP): the flags', else configs/demo.yaml's."""
    parallel = read_yaml(CONFIGS / "demo.yaml")["parallel"]
    tp = parallel["tensor_parallel"] if args.tp is None else args.tp
    dp = parallel["gpus_per_node"] // parallel["tensor_parallel"] if args.dp is None else args.dp
    return tp, dp


def overrides(args: argparse.Namespace, out: Path, gpus: bool) -> dict:
    tp, dp = world_of(args)
    keys = {
        "output.root": str(out.parent),
        "parallel.tensor_parallel": tp,
        "parallel.gpus_per_node": tp * dp,
        "data.vocab_multiple": 64 * tp,  # --make-vocab-size-divisible-by 64 at any TP, as the demo always had
        "trainer.cpu": not gpus,
        "optimizer.spectra.ns_fp32": not gpus,  # CPUs without native bf16 matmuls run the bf16 paper mode ~100x slower
    }
    steps = args.steps
    if steps is not None:
        keys["training.train_iters"] = steps
    if steps is not None and steps > 0:  # else validation names training.train_iters
        keys.update({
            # The demo's lengths: 10% warm-up, WSD decay over steps // 5, an evaluation every quarter.
            "training.lr_warmup_iters": max(1, steps // 10),
            "training.wsd_decay_fraction": max(1, steps // 5) / steps,
            "training.eval_interval": max(5, steps // 4),
        })
    if args.trainer_args is not None:
        keys["trainer.extra_args"] = list(args.trainer_args)
    return keys


def check_trainer_flags(sweep) -> str | None:
    """The builtin trainer's parser and checks on every run's flags (--trainer-args too), here
    and now rather than in every process after the world has started: the first problem."""
    from .launch import trainer_problem

    return next((f"run {run.name}: {p}" for run in sweep.runs if (p := trainer_problem(run.config))), None)


def gpus_for(size: int) -> bool:
    """GPUs under NCCL when there are enough of them, else CPU and gloo."""
    import torch

    return torch.cuda.is_available() and torch.cuda.device_count() >= size


def run(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    try:
        if args.config:
            apply_config(args)
        tp, dp = world_of(args)
        gpus = gpus_for(tp * dp)
        sweep = demo_sweep(args, gpus)
    except (ConfigError, FileNotFoundError) as e:
        flag = FLAG_OF.get(getattr(e, "key", ""), "")
        print(f"error: {flag + ': ' if flag else ''}{e}", file=sys.stderr)
        return 2
    problem = check_trainer_flags(sweep)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    first = sweep.runs[0].config
    steps, tp = first["training"]["train_iters"], first["parallel"]["tensor_parallel"]
    size = first["parallel"]["gpus_per_node"]
    print(f"spectra demo: {len(sweep.runs)} runs of {steps} iterations on {size} processes "
          f"(TP={tp} x DP={size // tp}, {'GPUs, NCCL' if gpus else 'CPU, gloo'}); output in {sweep.dir}", flush=True)
    codes = start(sweep, args)
    return report(sweep, codes, started, gpus)


def start(sweep, args) -> dict:
    from ..launch import runner

    if args.torchrun:
        return runner.run_sweep_local(sweep, list(range(len(sweep.runs))))
    from ..launch.one_world import run_in_one_world

    runner.write_listing(sweep)
    return run_in_one_world([r.config for r in sweep.runs], timeout=args.timeout)


def report(sweep, codes: dict, started: float, gpus: bool) -> int:
    from ..launch.collect import collect, to_markdown, write_outputs

    results, notes = collect(sweep.dir, runs=[r.config.run_dir for r in sweep.runs])
    for note in notes:
        print(f"note: {note}", file=sys.stderr)
    paths = write_outputs(sweep.dir, results, plot_name="demo.png")
    wall = time.perf_counter() - started
    summary = {"rows": [r.row for r in results], "wall_seconds": wall, "steps": sweep.runs[0].config["training"]["train_iters"],
               "backend": "nccl" if gpus else "gloo"}
    (sweep.dir / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
    print("\n" + to_markdown(results) + f"\nwall time {wall:.0f} s; {', '.join(p.name for p in paths.values())} "
          f"and per run logs in {sweep.dir}", flush=True)
    failed = {name: rc for name, rc in codes.items() if rc != 0}
    for name, rc in failed.items():
        print(f"error: {name}: {'not started' if rc is None else f'exit code {rc}'}", file=sys.stderr)
    return 1 if failed else 0
