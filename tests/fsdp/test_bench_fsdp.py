"""`spectra bench fsdp` at a tiny size, from the 4-rank test launch: the table and the bytes."""

import argparse

import pytest

from tests.support.fsdp_workers import TINY_BENCH
from megatron_spectra.bench import fsdp as bench

pytestmark = pytest.mark.slow


def test_the_engine_moves_about_half_the_all_gathers_bytes_at_four_ranks(four_ranks):
    report = bench.summarize(TINY_BENCH, [r["bench"] for r in four_ranks])
    rows = {row["optimizer"]: row for row in report["rows"]}
    engine, gather = rows["Spectra-AdamW (engine)"]["bytes_per_rank"], rows["Spectra-AdamW (all-gather)"]["bytes_per_rank"]
    assert rows["torch AdamW"]["bytes_per_rank"] == 0 and 0 < engine <= 0.6 * gather
    assert all(row["step_ms"] > 0 for row in report["rows"])
    table = bench.format_report(report)
    assert "| Spectra-AdamW (engine) |" in table and "x all-gather" in table


def test_the_command_line():
    parser = argparse.ArgumentParser()
    bench.add_parser(parser.add_subparsers())
    args = parser.parse_args(["fsdp", "--world", "2", "--layout", "fsdp_tp", "--mode", "accurate"])
    assert (args.world, args.layout, args.mode, args.strategy) == (2, "fsdp_tp", "accurate", "auto")
