"""Benchmarks behind `spectra bench`: each module has add_parser(subparsers) and run(args)."""
