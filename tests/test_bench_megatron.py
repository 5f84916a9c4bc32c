"""`spectra bench megatron` at a tiny scale: the table prints, the numbers are real, and the
redundant baseline is the same optimizer as spectra-paper (only its cost differs)."""

import argparse
import json

import pytest

pytest.importorskip("megatron.core")

from megatron_spectra.bench import megatron as bench  # noqa: E402
from megatron_spectra.cli.main import build_parser  # noqa: E402


def test_bench_megatron_tiny(tmp_path, capsys):
    out = tmp_path / "megatron.json"
    args = build_parser().parse_args([
        "bench", "megatron", "--models", "160m", "--scale", "32", "--layers", "1", "--steps", "1",
        "--warmup", "1", "--seq", "16", "--optimizers", "adam,spectra-paper-fp32,redundant-paper-fp32", "--json", str(out),
    ])
    assert args.run is bench.run
    assert args.run(args) == 0
    table = capsys.readouterr().out
    assert "| 160m | 1 x 24 / 64 / 1572 | spectra-paper-fp32 |" in table
    assert "divided by 32" in table and "+18.7%" in table
    timings = json.loads(out.read_text())["results"][0]["timings"]
    assert list(timings) == ["adam", "spectra-paper-fp32", "redundant-paper-fp32"]
    for name, t in timings.items():
        assert t["optimizer_step_ms"] > 0 and t["train_step_ms"] > t["optimizer_step_ms"], name
    assert timings["adam"]["first_loss"] == pytest.approx(timings["spectra-paper-fp32"]["first_loss"], rel=1e-6)
    # After one step: the redundant clip and the engine's clip made the same update.
    paper, redundant = timings["spectra-paper-fp32"]["last_loss"], timings["redundant-paper-fp32"]["last_loss"]
    assert redundant == pytest.approx(paper, rel=1e-3)
    assert paper != pytest.approx(timings["adam"]["last_loss"], rel=1e-6)  # and it is not Adam's


def test_unknown_names_are_refused():
    parser = argparse.ArgumentParser()
    bench.add_parser(parser.add_subparsers(dest="command"))
    with pytest.raises(SystemExit, match="unknown"):
        bench.run(parser.parse_args(["megatron", "--optimizers", "adam,lion"]))
