"""`spectra sweep SWEEP.yaml`: run a grid of configs; `spectra sweep --collect DIR`: tabulate.

    spectra sweep configs/sweeps/160m-adamw-lr-threshold.yaml --dry-run   # the runs, and the array script
    spectra sweep configs/sweeps/160m-adamw-lr-threshold.yaml             # SLURM array (or --local: one by one)
    spectra sweep --collect runs/160m-adamw-lr-threshold                  # results.csv / .md / .png

Runs that completed are skipped when a sweep is submitted again; the others start again
(Megatron resumes from their last checkpoint).
"""

from __future__ import annotations

import argparse
import sys

from ..launch.config import ConfigError
from .launch import add_common_arguments, format_command, parse_overrides


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("sweep", help="run a grid of configs, or collect their results", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("sweep", nargs="?", help="sweep file (YAML)")
    p.add_argument("--collect", metavar="DIR", help="read the runs under DIR into results.csv, results.md, results.png")
    p.add_argument("--commands", action="store_true", help="with --dry-run: print every run's command too")
    add_common_arguments(p)
    p.set_defaults(run=run)


def run(args) -> int:
    if args.collect:
        return collect(args.collect)
    if not args.sweep:
        print("error: give a sweep file, or --collect DIR", file=sys.stderr)
        return 2
    from ..launch.sweep import load_sweep

    try:
        overrides = parse_overrides(args.set, args.launcher)
        sweep = load_sweep(args.sweep, overrides=overrides)
    except (ConfigError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return dry_run(sweep, args.commands) if args.dry_run else start(sweep)


def dry_run(sweep, commands: bool) -> int:
    from ..launch.command import describe, to_command
    from ..launch.runner import pending_runs, run_state
    from ..launch.slurm import render_array

    todo = pending_runs(sweep)
    print(f"# sweep {sweep.name}: {len(sweep.runs)} runs in {sweep.dir}, {len(todo)} to start")
    for i, r in enumerate(sweep.runs):
        state = run_state(r.config.run_dir, r.config["training"]["train_iters"])
        varied = " ".join(f"{k}={v}" for k, v in r.overrides.items())
        print(f"{i:3d}  {r.name:40s}  [{state}{'' if i in todo else ', skipped'}]  {varied}")
        if commands:
            print(f"     # {describe(r.config)}\n{format_command(to_command(r.config, r.config['launcher']))}\n")
    where = {r.config["launcher"] for r in sweep.runs}
    if where == {"slurm"} and todo:
        print(f"\n# ---- {sweep.dir}/array.sbatch ----")
        print(render_array([r.config for r in sweep.runs], sweep.dir, todo, f"spectra-{sweep.name}"), end="")
    return 0


def start(sweep) -> int:
    from ..launch import runner
    from ..launch.config import check_paths

    todo = runner.pending_runs(sweep)
    skipped = len(sweep.runs) - len(todo)
    if not todo:
        print(f"sweep {sweep.name}: all {len(sweep.runs)} runs completed; nothing to do")
        return 0
    errors = [e for i in todo for e in check_paths(sweep.runs[i].config)]
    if errors:
        for e in dict.fromkeys(str(e) for e in errors):
            print(f"error: {e}", file=sys.stderr)
        return 2
    where = {sweep.runs[i].config["launcher"] for i in todo}
    if where == {"local"}:
        codes = runner.run_sweep_local(sweep, todo)
        for name, rc in codes.items():
            print(f"{name}: exit code {rc}")
        return 0 if not any(codes.values()) else 1
    if where != {"slurm"}:
        print("error: launcher: the runs of one sweep must all be local or all slurm", file=sys.stderr)
        return 2
    try:
        job = runner.submit_sweep(sweep, todo)
    except (RuntimeError, ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"sweep {sweep.name}: submitted array job {job} with {len(todo)} runs ({skipped} completed, skipped)")
    return 0


def collect(folder: str) -> int:
    from ..launch.collect import collect as collect_runs
    from ..launch.collect import to_markdown, write_outputs

    try:
        results, notes = collect_runs(folder)
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for note in notes:
        print(f"note: {note}", file=sys.stderr)
    if not results:
        return 1
    paths = write_outputs(folder, results)
    print(to_markdown(results), end="")
    print("\n" + "  ".join(f"{k}: {v}" for k, v in paths.items()))
    return 0
