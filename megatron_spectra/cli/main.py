"""`spectra`: the console command.

Every command lives in its own module exposing `add_parser(subparsers)`, which adds its
subparser and sets `run` as its default, and `run(args) -> int`. Adding one is one line:
a benchmark to BENCHMARKS (modules of `megatron_spectra.bench`, under `spectra bench`), any
other command to COMMANDS. Modules are imported only when the parser is built.
"""

from __future__ import annotations

import argparse
import importlib

BENCHMARKS = ("clip", "engine", "fsdp", "megatron")  # megatron_spectra.bench.<name>: `spectra bench <name>`
COMMANDS: tuple[str, ...] = (  # full module paths of top-level commands, e.g. "megatron_spectra.cli.demo"
    "megatron_spectra.cli.launch",
    "megatron_spectra.cli.sweep",
    "megatron_spectra.demo.cli",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="spectra", description="SPECTRA spectral clipping for Megatron-core and FSDP.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    bench = commands.add_parser("bench", help="benchmarks", description="Benchmarks; each prints a markdown table.")
    benchmarks = bench.add_subparsers(dest="benchmark", required=True, metavar="BENCHMARK")
    for name in BENCHMARKS:
        importlib.import_module(f"megatron_spectra.bench.{name}").add_parser(benchmarks)
    for module in COMMANDS:
        importlib.import_module(module).add_parser(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    raise SystemExit(main())
