"""`spectra demo`: the main job.

    spectra demo --out runs/demo [--steps N] [--lrs LR ...] [--lr X] [--tp T --dp D]
                 [--optimizer NAME] [--baseline NAME] [--config FILE.yaml] [--trainer-args ...]

Pretrains a small LLaMA-style megatron-core GPT on the Python language reference (text that
ships with CPython) with spectra-adamw and with plain AdamW (Megatron's adam), same seed and
data, at five learning rates from 1e-3 to 1e-1 (the lr sweep, one process per run), and once
more as a pair at TP=2 x DP=2 (4 processes, through the real SpectraDistributedOptimizer's
TP and ZeRO shards). Then it compares each optimizer at its own best lr, and the range of lr
over which each trains well (the paper's lr-sensitivity figure).

The runs are two sweeps over configs/demo.yaml: configs/sweeps/demo.yaml (the lr sweep) and
configs/sweeps/demo-tp2dp2.yaml (the pair), with the flags below put on their keys (a flag
left out keeps the files' value). Every run is validated before any process starts, and
each sweep runs in one world of processes spawned once (--torchrun: one torchrun per run).
--out holds: results.md (the finding, the best-vs-best table, the lr table, every run, and
how each number is computed), results.csv, demo.png, summary.json (every run's curves), and
per run <run>/ with config.yaml, command.txt, logs/train.log and metrics.jsonl.

A --config YAML file sets any of these flags by their long name (`steps: 60`,
`lrs: [1e-3, 1e-2]`, `trainer_args: ["--spectra-mode", "accurate"]`); flags on the command line win.
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
LR_SWEEP, PAIR = CONFIGS / "sweeps" / "demo.yaml", CONFIGS / "sweeps" / "demo-tp2dp2.yaml"
# The flag that sets each key, for errors about a value the user gave.
FLAG_OF = {"training.train_iters": "--steps", "training.lr": "--lrs / --lr", "optimizer.name": "--optimizer / --baseline",
           "parallel.tensor_parallel": "--tp", "parallel.gpus_per_node": "--tp x --dp", "grid": "--optimizer / --baseline / --lrs",
           "training.global_batch_size": "--dp", "training.micro_batch_size": "--dp", "data.vocab_multiple": "--tp",
           "training.lr_warmup_iters": "--steps"}


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("demo", help="the main job: spectra-adamw vs AdamW over an lr sweep, table and plot",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="output folder (the sweeps' folder)")
    p.add_argument("--config", default=None, help="YAML file with any of these flags (command line wins)")
    p.add_argument("--steps", type=int, help="iterations per run (configs/demo.yaml: 100)")
    p.add_argument("--optimizer", help="the clipped optimizer (spectra-adamw|spectra-signum|spectra-ademamix)")
    p.add_argument("--baseline", help="the unclipped optimizer (Megatron's adam = AdamW)")
    p.add_argument("--lrs", type=float, nargs="+", help="the lr sweep's learning rates (1e-3 3e-3 1e-2 3e-2 1e-1)")
    p.add_argument("--lr", type=float, help="the learning rate of the TP x DP pair (1e-3; 0: no pair)")
    p.add_argument("--tp", type=int, help="the pair's tensor-parallel size (2)")
    p.add_argument("--dp", type=int, help="the pair's data-parallel size (2)")
    p.add_argument("--torchrun", action="store_true", help="one torchrun per run instead of one world of processes per sweep")
    p.add_argument("--trainer-args", nargs=argparse.REMAINDER, default=None, help="more trainer flags for every run, passed on as they are (last)")
    p.add_argument("--timeout", type=float, default=3600.0, help="give up on a world after this many seconds")
    p.set_defaults(run=run)


def apply_config(args: argparse.Namespace) -> None:
    """Values from --config for the flags the command line left out."""
    values = read_yaml(args.config)
    unknown = sorted(set(values) - set(vars(args)) - {"config", "out", "run"})
    if unknown:
        raise ConfigError(", ".join(unknown), "unknown key(s): give flags by their long name (steps, lrs, ...)", args.config)
    for key, value in values.items():
        if getattr(args, key) in (None, False):
            setattr(args, key, value)


def demo_sweeps(args: argparse.Namespace, gpus: bool) -> list:
    """The lr sweep, then the TP x DP pair (none with --lr 0): the sweep files' specs with the
    flags on their keys, every run validated."""
    from ..launch.sweep import expand_sweep

    out = Path(args.out).absolute()
    sweeps = []
    for path in (LR_SWEEP, PAIR):
        if not path.is_file():
            raise ConfigError("configs", f"no {path}: spectra demo runs from a checkout (pip install -e .)")
        spec = read_yaml(path)
        spec["name"] = out.name  # the sweeps' folder is output.root/name = --out
        grid = dict(spec["grid"])
        names = list(grid["optimizer.name"])
        grid["optimizer.name"] = [args.optimizer or names[0], args.baseline or names[1]]
        keys = overrides(args, out, gpus)
        if path == PAIR:
            if args.lr == 0:
                continue
            grid["training.lr"] = grid["training.lr"] if args.lr is None else [args.lr]
            tp, dp = pair_layout(args, spec)
            grid["parallel.tensor_parallel"] = [tp]
            keys.update(pair_keys(tp, dp, read_yaml(CONFIGS / "demo.yaml")["training"]["global_batch_size"]))
        elif args.lrs is not None:
            grid["training.lr"] = list(args.lrs) if isinstance(args.lrs, (list, tuple)) else [args.lrs]
        spec["grid"] = grid
        sweeps.append(expand_sweep(spec, path, keys))
    return sweeps


def pair_layout(args: argparse.Namespace, spec: dict) -> tuple[int, int]:
    """(TP, DP) of the pair: the flags', else the pair file's."""
    tp = spec["grid"]["parallel.tensor_parallel"][0] if args.tp is None else args.tp
    _positive("--tp", tp)
    dp = spec["set"]["parallel.gpus_per_node"] // tp if args.dp is None else args.dp
    _positive("--dp", dp)
    return tp, dp


def _positive(flag: str, value) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ConfigError(flag, f"must be an integer >= 1, got {value!r}")


def pair_keys(tp: int, dp: int, global_batch: int) -> dict:
    """The pair's processes; its micro-batch the global batch over DP (one micro-batch per
    iteration, as in the lr sweep), and the same padded vocabulary as at TP=1 where TP divides it."""
    if global_batch % dp:
        raise ConfigError("training.global_batch_size", f"{global_batch} is not divisible by DP {dp}")
    return {"parallel.gpus_per_node": tp * dp, "training.micro_batch_size": global_batch // dp,
            "data.vocab_multiple": 128 if 128 % tp == 0 else 64 * tp}


def overrides(args: argparse.Namespace, out: Path, gpus: bool) -> dict:
    keys = {
        "output.root": str(out.parent),
        "trainer.cpu": not gpus,
        "optimizer.spectra.ns_fp32": not gpus,  # CPUs without native bf16 matmuls run the bf16 paper mode ~100x slower
    }
    steps = args.steps
    if steps is not None:
        keys["training.train_iters"] = steps
    if isinstance(steps, int) and steps > 0:  # else validation names training.train_iters
        keys.update({
            # The demo's lengths: 10% warm-up, WSD decay over steps // 5, an evaluation every quarter.
            "training.lr_warmup_iters": max(1, steps // 10),
            "training.wsd_decay_fraction": max(1, steps // 5) / steps,
            "training.eval_interval": max(5, steps // 4),
        })
    if args.trainer_args is not None:
        keys["trainer.extra_args"] = list(args.trainer_args)
    return keys


def check_trainer_flags(sweeps: list) -> str | None:
    """The builtin trainer's parser and checks on every run's flags (--trainer-args too), here
    and now rather than in every process after the world has started: the first problem."""
    from .launch import trainer_problem

    return next((f"run {run.name}: {p}" for s in sweeps for run in s.runs if (p := trainer_problem(run.config))), None)


def gpus_for(size: int) -> bool:
    """GPUs under NCCL when there are enough of them, else CPU and gloo."""
    import torch

    return torch.cuda.is_available() and torch.cuda.device_count() >= size


def plan(args: argparse.Namespace) -> list:
    """The validated sweeps. Checked first on the CPU settings without importing torch (so a
    bad flag is refused in well under 2 s), then built for the devices there are."""
    if args.config:
        apply_config(args)
    sweeps = demo_sweeps(args, gpus=False)
    size = max(s.runs[0].config["parallel"]["gpus_per_node"] for s in sweeps)
    return demo_sweeps(args, gpus=True) if gpus_for(size) else sweeps


def run(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    try:
        sweeps = plan(args)
    except (ConfigError, FileNotFoundError) as e:
        flag = FLAG_OF.get(getattr(e, "key", ""), "")
        print(f"error: {flag + ': ' if flag else ''}{e}", file=sys.stderr)
        return 2
    problem = check_trainer_flags(sweeps)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    gpus = not sweeps[0].runs[0].config["trainer"]["cpu"]
    for s in sweeps:
        first = s.runs[0].config
        tp, size = first["parallel"]["tensor_parallel"], first["parallel"]["gpus_per_node"]
        print(f"spectra demo: {len(s.runs)} runs of {first['training']['train_iters']} iterations on {size} "
              f"process{'es' if size > 1 else ''} (TP={tp} x DP={size // tp}, {'GPUs, NCCL' if gpus else 'CPU, gloo'})", flush=True)
    print(f"output in {sweeps[0].dir}", flush=True)
    codes = {}
    for s in sweeps:
        codes.update(start(s, args))
    return finish(sweeps, codes, started, gpus)


def start(sweep, args) -> dict:
    """Run a sweep's runs; in one world, a failed run (a diverged loss) stops the world, so the
    runs after it start again in a fresh one."""
    from ..launch import runner

    runner.write_listing(sweep)
    if args.torchrun:
        return runner.run_sweep_local(sweep, list(range(len(sweep.runs))))
    from ..launch.one_world import run_in_one_world

    codes, todo = {}, [r.config for r in sweep.runs]
    while todo:
        codes.update(run_in_one_world(todo, timeout=args.timeout))
        done = [c for c in todo if codes[c.name] is not None]
        if not done:
            break
        todo = [c for c in todo if codes[c.name] is None]
    return codes


def finish(sweeps: list, codes: dict, started: float, gpus: bool) -> int:
    from ..launch.demo_report import write_demo

    runs = [r.config.run_dir for s in sweeps for r in s.runs]
    (sweeps[0].dir / "runs.txt").write_text("".join(f"{Path(d).name}\n" for d in runs))
    wall = time.perf_counter() - started
    text, notes = write_demo(sweeps[0].dir, runs, n_sweep=len(sweeps[0].runs), wall=wall, backend="nccl" if gpus else "gloo")
    for note in notes:
        print(f"note: {note}", file=sys.stderr)
    print("\n" + text + f"\nwall time {wall:.0f} s; results.md, results.csv, demo.png, summary.json and per run logs in "
          f"{sweeps[0].dir}", flush=True)
    from ..launch.collect import DIVERGED, state_of

    dirs = {Path(d).name: Path(d) for d in runs}
    failed = {name: rc for name, rc in codes.items() if rc != 0 and state_of(dirs[name.split("/")[-1]], None) != DIVERGED}
    for name, rc in failed.items():
        print(f"error: {name}: {'not started' if rc is None else f'exit code {rc}'}", file=sys.stderr)
    return 1 if failed else 0
