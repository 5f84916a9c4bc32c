"""`spectra bench engine` at a tiny scale: the table, and issue 3's FLOP target on measured numbers."""

import argparse
import json

import pytest

from megatron_spectra.bench import engine as bench
from megatron_spectra.engine import Placement


def parse(argv):
    parser = argparse.ArgumentParser(prog="spectra bench")
    bench.add_parser(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(["engine", *argv])


def test_layout_is_megatrons_distributed_optimizer():
    model = bench.MODELS["160m"].scaled(32)
    params = bench.model_params(model)
    assert len(params) == 2 + 12 * 6 + 1 and sum(p.is_matrix for p in params) == 50
    layout = bench.Layout(tp=2, dp=2)
    starts, total = bench.buffer_layout(params, layout)
    assert all(s % bench.ALIGN == 0 for s in starts) and total % layout.dp == 0
    assert starts[-1] == 0 and starts[0] == max(starts)  # reverse order: the output layer first
    # Every element of every TP block is held by exactly one DP rank, in contiguous ranges.
    for t in range(layout.tp):
        ranks = [d * layout.tp + t for d in range(layout.dp)]
        per_rank = [bench.rank_placements(params, layout, r, "owner") for r in ranks]
        for i, p in enumerate(params):
            pieces = sorted(pl[i].range for pl in per_rank if pl[i].local_numel)
            assert pieces[0][0] == 0 and pieces[-1][1] == per_rank[0][i].block_numel
            assert all(a[1] == b[0] for a, b in zip(pieces, pieces[1:]))
            assert per_rank[0][i].tp_block == t or per_rank[0][i].tp_dim is None
    embedding, proj, norm = (bench.rank_placements(params, layout, 1, "owner")[i] for i in (0, 3, 1))
    assert (embedding.tp_dim, proj.tp_dim, norm.tp_dim) == (0, 1, None)
    assert isinstance(embedding, Placement) and embedding.strategy == "owner" and norm.strategy == "auto"


def test_default_layouts_and_scale():
    assert [(x.tp, x.dp) for x in bench.default_layouts([4, 8])] == [(1, 4), (2, 2), (1, 8), (2, 4), (4, 2)]
    assert bench.MODELS["820m"].ffn == 5440
    with pytest.raises(ValueError):
        bench.MODELS["820m"].scaled(128)


def test_bench_engine_tiny(tmp_path, capsys):
    out = tmp_path / "engine.json"
    args = parse(["--models", "160m", "--scale", "32", "--layouts", "2x2", "--repeats", "1", "--json", str(out)])
    assert args.run is bench.run
    assert bench.run(args) == 0
    table = capsys.readouterr().out
    rows = [line for line in table.splitlines() if line.startswith("| 4 | 2 | 2 |")]
    assert [row.split("|")[4].strip() for row in rows] == ["owner", "auto"]
    assert "### 160m at 1/32 scale" in table

    report = json.loads(out.read_text())
    (model,) = report["models"]
    assert model["redundant_flops"] > 0
    for row in model["rows"]:
        assert row["max_bytes"] > 0 and all(r["bytes"] > 0 for r in row["per_rank"])
        assert row["moonlight_bytes"] > 0 and row["zero1_bytes"] > 0
        assert row["busiest_flops"] > 0 and row["wall_s"] > 0 and row["redundant_wall_s"] > 0
        assert row["max_rel_diff_vs_redundant"] < 1e-4  # accurate mode: the engine clips what the official code clips
    owner = next(r for r in model["rows"] if r["strategy"] == "owner")
    # Issue 3: each full matrix clipped once, balanced: busiest rank <= 1.3/W of the redundant FLOPs.
    assert owner["busiest_flops"] <= bench.FLOP_TARGET * model["redundant_flops"] / owner["world"], owner["flops_vs_share"]
