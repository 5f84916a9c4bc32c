"""`spectra`: the console command.

Every command lives in its own module exposing `add_parser(subparsers)`, which adds its
subparser and sets `run` as its default, and `run(args) -> int`. Adding one is one line:
a benchmark to BENCHMARKS (modules of `megatron_spectra.bench`, under `spectra bench`), any
other command to COMMANDS, each with the one-line help that `spectra --help` lists.

Only the module of the command asked for is imported (a benchmark pulls in torch and
megatron-core, a dry run must not): the others are listed by their help line alone.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from ..known_warnings import quiet_known_warnings

BENCHMARKS = {  # megatron_spectra.bench.<name>: `spectra bench <name>`
    "clip": "Newton-Schulz soft clip (accurate, paper) vs the SVD clip: time, matmuls, accuracy",
    "engine": "distributed clip engine vs redundant clipping at simulated Megatron TP x DP layouts (CPU, gloo)",
    "fsdp": "Spectra-AdamW vs torch AdamW step time and bytes on an FSDP2 model (CPU gloo, or CUDA)",
    "megatron": "spectra-adamw vs Megatron's Adam: optimizer and train step time in megatron-core (TP=2 x DP=2, CPU)",
    "cluster": "projected clip overhead at the paper's H100 layouts: per-rank FLOPs, bytes, step time (arithmetic)",
}
COMMANDS = {  # `spectra <name>`: (module, help line)
    "launch": ("megatron_spectra.cli.launch", "start a training run from a YAML config"),
    "sweep": ("megatron_spectra.cli.sweep", "run a grid of configs, or collect their results"),
    "demo": ("megatron_spectra.cli.demo", "the main job: spectra-adamw vs AdamW pretraining, table and plot"),
}


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The parser: given argv, with the full subparser of the command it names only (the
    others by name and help line); without, every command's (imports every module)."""
    words = None if argv is None else [w for w in argv if not w.startswith("-")]
    parser = argparse.ArgumentParser(prog="spectra", description="SPECTRA spectral clipping for Megatron-core and FSDP.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    bench = commands.add_parser("bench", help="benchmarks", description="Benchmarks; each prints a markdown table.")
    benchmarks = bench.add_subparsers(dest="benchmark", required=True, metavar="BENCHMARK")
    for name, help_line in BENCHMARKS.items():
        _add(benchmarks, name, f"megatron_spectra.bench.{name}", help_line, words is None or words[:2] == ["bench", name])
    for name, (module, help_line) in COMMANDS.items():
        _add(commands, name, module, help_line, words is None or words[:1] == [name])
    return parser


def _add(subparsers, name: str, module: str, help_line: str, full: bool) -> None:
    if full:
        importlib.import_module(module).add_parser(subparsers)
    else:
        subparsers.add_parser(name, help=help_line)


def main(argv: list[str] | None = None) -> int:
    quiet_known_warnings()  # before any command imports megatron-core
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser(argv).parse_args(argv)
    from ..launch.runner import Interrupted

    try:
        return args.run(args)
    except Interrupted as e:  # a local run stopped by SIGTERM / SIGINT: its processes and exit_code are seen to
        print(f"spectra {args.command}: {e}", file=sys.stderr)
        return e.code
    except KeyboardInterrupt:  # Ctrl-C before or after any run
        print(f"spectra {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `spectra ... | head`: the reader has gone
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
