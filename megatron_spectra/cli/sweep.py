"""`spectra sweep SWEEP.yaml`: run a grid of configs; `spectra sweep --collect DIR`: tabulate.

    spectra sweep configs/sweeps/160m-spectra-adamw-lr-threshold.yaml --dry-run   # the runs, and the array script
    spectra sweep configs/sweeps/160m-spectra-adamw-lr-threshold.yaml             # SLURM array (or --local: one by one)
    spectra sweep --collect runs/160m-spectra-adamw-lr-threshold                  # results.csv / .md / .png

Runs that completed are skipped when a sweep is submitted again; the others start again
(Megatron resumes from their last checkpoint). Missing inputs are warnings in a dry run and
stop a real one, as for `spectra launch`.
"""

from __future__ import annotations

import argparse
import sys

from ..launch.errors import ConfigError
from .launch import add_common_arguments, format_command, parse_overrides, print_warnings, refuse, trainer_problem


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("sweep", help="run a grid of configs, or collect their results", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("sweep", nargs="?", help="sweep file (YAML)")
    p.add_argument("--collect", metavar="DIR", help="read the runs under DIR into results.csv, results.md, results.png")
    p.add_argument("--commands", action="store_true", help="with --dry-run: print every run's command too")
    p.add_argument("--one-world", action="store_true",
                   help="local builtin-trainer runs: spawn the processes once and run every config in them "
                        "(torch and megatron-core imported once, not once per run)")
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
        sweep = load_sweep(args.sweep, overrides=overrides, allow_unset=True)
    except (ConfigError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return dry_run(sweep, args.commands) if args.dry_run else start(sweep, args.one_world)


def dry_run(sweep, commands: bool) -> int:
    from ..launch.command import describe, to_command
    from ..launch.config import missing_inputs
    from ..launch.runner import pending_runs, run_state
    from ..launch.slurm import render_array

    todo = pending_runs(sweep)
    print(f"# sweep {sweep.name}: {len(sweep.runs)} runs in {sweep.dir}, {len(todo)} to start")
    print_warnings([e for i in todo for e in missing_inputs(sweep.runs[i].config)])
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


def start(sweep, one_world: bool = False) -> int:
    from ..launch import runner
    from ..launch.config import missing_inputs

    todo = runner.pending_runs(sweep)
    skipped = len(sweep.runs) - len(todo)
    if not todo:
        print(f"sweep {sweep.name}: all {len(sweep.runs)} runs completed; nothing to do")
        return 0
    missing = [e for i in todo for e in missing_inputs(sweep.runs[i].config)]
    if missing:
        return refuse(missing)
    problems = [f"run {sweep.runs[i].name}: {p}" for i in todo if (p := trainer_problem(sweep.runs[i].config))]
    if problems:
        print(f"error: {problems[0]}" + (f" (and {len(problems) - 1} more runs)" if len(problems) > 1 else ""), file=sys.stderr)
        return 2
    where = {sweep.runs[i].config["launcher"] for i in todo}
    if where == {"local"}:
        try:
            codes = run_here(sweep, todo, one_world)
        except ConfigError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        for name, rc in codes.items():
            print(f"{name}: {'not started' if rc is None else f'exit code {rc}'}")
        return 0 if all(rc == 0 for rc in codes.values()) else 1
    if where != {"slurm"}:
        print("error: launcher: the runs of one sweep must all be local or all slurm", file=sys.stderr)
        return 2
    if one_world:
        print("error: --one-world runs on this machine: add --local", file=sys.stderr)
        return 2
    try:
        job = runner.submit_sweep(sweep, todo)
    except (RuntimeError, ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"sweep {sweep.name}: submitted array job {job} with {len(todo)} runs ({skipped} completed, skipped)")
    return 0


def run_here(sweep, todo: list[int], one_world: bool) -> dict:
    """Runs on this machine: one torchrun each, or all in one world. {name: exit code or None}."""
    from ..launch import runner

    if not one_world:
        return runner.run_sweep_local(sweep, todo)
    from ..launch.one_world import check_one_world, run_in_one_world

    check_one_world([sweep.runs[i].config for i in todo])  # before anything is written
    runner.write_listing(sweep)
    return run_in_one_world([sweep.runs[i].config for i in todo])


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
