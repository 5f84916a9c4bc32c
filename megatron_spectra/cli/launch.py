"""`spectra launch CONFIG.yaml`: validate a launch config and start the run.

    spectra launch configs/780m-deep/spectra-adamw.yaml --dry-run   # the command and sbatch script
    spectra launch configs/tiny-cpu.yaml --local                   # torchrun on this machine
    spectra launch configs/820m-wide/spectra-signum.yaml --set training.lr=2e-4

The config's `launcher` (local | slurm) decides where it runs; --local / --slurm override it.
Missing inputs (an unset ${VAR}, the dataset, vocabulary files, the Megatron-LM checkout):
a dry run prints each as a warning, a real launch refuses and lists them all.
"""

from __future__ import annotations

import argparse
import sys

from ..launch.command import describe, shell_join, to_command
from ..launch.config import load_config, load_yaml, missing_inputs
from ..launch.errors import ConfigError


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("launch", help="start a training run from a YAML config", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", help="launch config (YAML)")
    add_common_arguments(p)
    p.set_defaults(run=run)


def add_common_arguments(p) -> None:
    where = p.add_mutually_exclusive_group()
    where.add_argument("--local", dest="launcher", action="store_const", const="local", help="run here with torchrun")
    where.add_argument("--slurm", dest="launcher", action="store_const", const="slurm", help="submit with sbatch")
    p.add_argument("--dry-run", action="store_true", help="print what would run; start nothing")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a dotted key (YAML value)")


def parse_overrides(pairs: list[str], launcher: str | None) -> dict:
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ConfigError(pair, "--set takes KEY=VALUE, e.g. training.lr=2e-3")
        out[key] = load_yaml(value, f"--set {key}")
    if launcher:
        out["launcher"] = launcher
    return out


def run(args) -> int:
    try:
        config = load_config(args.config, parse_overrides(args.set, args.launcher), allow_unset=True)
    except (ConfigError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    where = config.data["launcher"]
    missing = missing_inputs(config)
    if args.dry_run:
        print(f"# {describe(config)}")
        print(f"# run folder: {config.run_dir}")
        print_warnings(missing)
        print(format_command(to_command(config, where)))
        if where == "slurm":
            from ..launch.slurm import render_sbatch

            print(f"\n# ---- {config.run_dir}/launch.sbatch ----")
            print(render_sbatch(config), end="")
        return 0
    if missing:
        return refuse(missing)
    problem = trainer_problem(config)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    from ..launch import runner

    if where == "local":
        rc = runner.run_local(config)
        print(f"{config.name}: exit code {rc}; logs in {config.run_dir / 'logs'}", file=sys.stderr)
        return rc
    try:
        job = runner.submit(config)
    except RuntimeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"{config.name}: submitted job {job}; logs in {config.run_dir / 'logs'}")
    return 0


def trainer_problem(config) -> str | None:
    """The builtin trainer's own parser and checks on the command line the config makes, here
    and once: in the ranks, a bad flag is one traceback per process plus torchrun's.
    (Megatron-LM's flags are checked by Megatron-LM, after the start.)"""
    if config.data["entry"] != "builtin":
        return None
    try:
        from ..launch.command import trainer_args
        from ..train.args import build_parser, derive
    except ImportError:  # a login node without torch: the job's processes will say it
        return None

    class Refused(Exception):
        pass

    def refuse(message):
        raise Refused(message)

    parser = build_parser()
    parser.error = refuse  # argparse's own: the usage text and exit(2)
    world = config.data["parallel"]["nodes"] * config.data["parallel"]["gpus_per_node"]
    try:
        derive(parser.parse_args(trainer_args(config)), world)
    except (Refused, ValueError) as e:
        extra = " (trainer.extra_args)" if config.data["trainer"]["extra_args"] else ""
        return f"{config.source}: the builtin trainer refuses its command line{extra}: {e}"
    return None


def print_warnings(missing: list[ConfigError]) -> None:
    for e in dict.fromkeys(str(e) for e in missing):
        print(f"# warning (a real launch stops here): {e}")


def refuse(missing: list[ConfigError]) -> int:
    """A real launch with missing inputs: every one of them, then nothing starts."""
    messages = list(dict.fromkeys(str(e) for e in missing))
    for message in messages:
        print(f"error: {message}", file=sys.stderr)
    print(f"error: {len(messages)} missing input(s); nothing was started", file=sys.stderr)
    return 2


def format_command(words: list[str]) -> str:
    """One flag per line, so a long Megatron command stays readable (and still runs)."""
    text = shell_join(words)
    return text.replace(" --", " \\\n    --")
