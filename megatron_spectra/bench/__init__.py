"""Benchmarks behind `spectra bench`: clip, engine, megatron, fsdp and cluster each have
add_parser(subparsers) and run(args); the other modules are their parts (simulated layouts,
model shapes, Megatron's Muon, the official-cost baseline, clip costs) and the GPU check."""

from __future__ import annotations

import json
import time


def publish(table: str, report: dict, started: float, json_path: str | None) -> int:
    """Every benchmark ends alike: the markdown table, the total time, and (if asked) every
    number as JSON for the closing notes and plots."""
    print()
    print(table)
    print(f"\nTotal time: {time.perf_counter() - started:.1f} s")
    if json_path:
        with open(json_path, "w") as f:
            json.dump(report, f, indent=1)
    return 0
