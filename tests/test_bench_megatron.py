"""`spectra bench megatron` at a tiny scale: the table prints, the numbers are real, and the
redundant baseline is the same optimizer as spectra-paper (only its cost differs)."""

import argparse
import importlib.util
import json

import pytest

pytest.importorskip("megatron.core")

from megatron_spectra.bench import megatron as bench  # noqa: E402
from megatron_spectra.cli.main import build_parser  # noqa: E402


def test_bench_megatron_tiny(tmp_path, capsys):
    from megatron_spectra.bench.muon import muon_available

    muon = muon_available()[0]
    names = ["adam"] + (["dist-muon"] if muon else []) + ["spectra-paper-fp32", "spectra-paper-fp32-hidden", "redundant-paper-fp32"]
    out = tmp_path / "megatron.json"
    args = build_parser().parse_args([
        "bench", "megatron", "--models", "160m", "--scale", "32", "--layers", "1", "--steps", "1",
        "--warmup", "1", "--seq", "16", "--optimizers", ",".join(names), "--json", str(out),
    ])
    assert args.run is bench.run
    assert args.run(args) == 0
    table = capsys.readouterr().out
    assert "| 160m | 1 x 24 / 64 / 1572 | spectra-paper-fp32 |" in table
    assert "divided by 32" in table and "+18.7%" in table and "peak RSS per rank" in table
    report = json.loads(out.read_text())["results"][0]
    timings = report["timings"]
    assert list(timings) == names
    assert len(report["peak_rss_mb"]) == 4 and all(m > 0 for m in report["peak_rss_mb"])
    # Adam's ZeRO-1 moments: 2 x 4 bytes x its DP half of the ~41 k TP-local params (0.17 MB)
    assert 0.15 < max(timings["adam"]["state_mb"]) < 0.2
    assert timings["spectra-paper-fp32"]["state_mb"] == timings["adam"]["state_mb"]  # the same two moments
    if muon:  # megatron-core's Muon ran, and moved the weights its own way
        assert "| dist-muon |" in table
        row = next(line for line in table.splitlines() if "| dist-muon |" in line)
        assert row.split("|")[6:8] == [" 1.00 ", " 1.00 "]  # against itself: ratio of medians, per round
        assert timings["dist-muon"]["first_loss"] == pytest.approx(timings["adam"]["first_loss"], rel=1e-6)
        assert timings["dist-muon"]["last_loss"] != pytest.approx(timings["adam"]["last_loss"], rel=1e-6)
    for name, t in timings.items():
        assert t["optimizer_step_ms"] > 0 and t["train_step_ms"] > t["optimizer_step_ms"], name
    assert timings["adam"]["first_loss"] == pytest.approx(timings["spectra-paper-fp32"]["first_loss"], rel=1e-6)
    # After one step: the redundant clip and the engine's clip made the same update.
    paper, redundant = timings["spectra-paper-fp32"]["last_loss"], timings["redundant-paper-fp32"]["last_loss"]
    assert redundant == pytest.approx(paper, rel=1e-3)
    assert paper != pytest.approx(timings["adam"]["last_loss"], rel=1e-6)  # and it is not Adam's
    # apply_to="hidden" leaves the embedding and output layer to Adam's direction: another update.
    hidden = timings["spectra-paper-fp32-hidden"]["last_loss"]
    assert hidden != pytest.approx(paper, rel=1e-6) and hidden != pytest.approx(timings["adam"]["last_loss"], rel=1e-6)


@pytest.mark.skipif(importlib.util.find_spec("emerging_optimizers") is None, reason="emerging-optimizers not installed")
def test_muon_is_available_wherever_emerging_optimizers_is_installed():
    """On every megatron-core release (0.16: its `muon` module; 0.18+: `emerging_optimizers`),
    so that the tiny bench above cannot pass by quietly leaving the dist-muon row out."""
    from megatron_spectra.bench.muon import muon_available

    ok, why = muon_available()
    assert ok, why


def test_dist_muon_is_skipped_with_a_note_without_emerging_optimizers(monkeypatch):
    from megatron_spectra.bench import muon

    monkeypatch.setattr(muon, "muon_available", lambda: (False, "ModuleNotFoundError: No module named 'emerging_optimizers'"))
    logged = []
    report = bench.benchmark([], 32, 1, ["adam", "dist-muon"], log=lambda *a, **k: logged.append(a[0]))
    assert "dist-muon skipped" in logged[0] and "emerging-optimizers==0.3.0" in logged[0]
    assert report["config"]["notes"] == logged
    assert "dist-muon skipped" in bench.format_report(report)


def test_unknown_names_are_refused():
    parser = argparse.ArgumentParser()
    bench.add_parser(parser.add_subparsers(dest="command"))
    with pytest.raises(SystemExit, match="unknown"):
        bench.run(parser.parse_args(["megatron", "--optimizers", "adam,lion"]))


def test_per_round_ratios_pair_each_round_with_the_baseline_s():
    # Load that doubles both in the same round cancels; quartiles over rounds.
    v = {"step_ms_all": [2.0, 8.0, 3.0, 12.0, 2.2]}
    base = {"step_ms_all": [1.0, 4.0, 1.5, 6.0, 1.0]}
    assert bench._paired(v, base) == "2.00 [2.00-2.10]"
    assert bench._paired(v, None) == "-" and bench._paired({"step_ms_all": [3.0]}, {"step_ms_all": [2.0]}) == "1.50"

