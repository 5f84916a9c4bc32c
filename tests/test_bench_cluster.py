"""`spectra bench cluster`: the FLOP / byte / time arithmetic against hand formulas, and the table."""

import json

import pytest
import torch

from megatron_spectra.bench import clip_cost, cluster
from megatron_spectra.bench.clip import MatmulCounter
from megatron_spectra.bench.simulated import Layout, Model, model_params, rank_placements
from megatron_spectra.cli.main import main
from megatron_spectra.ops import soft_spectral_clip


def ssc_flops(rows, cols):
    """The paper's SSC cost: 4·k²·n + 60·k³, k the short side."""
    k, n = min(rows, cols), max(rows, cols)
    return 4 * k * k * n + 60 * k**3


@pytest.mark.parametrize("shape", [(24, 40), (40, 24), (32, 32)])
def test_paper_products_are_what_soft_clip_runs(shape):
    x = torch.randn(*shape, dtype=torch.bfloat16)
    with MatmulCounter() as counter:
        soft_spectral_clip(x, 1.0, mode="paper")
    k, n = min(shape), max(shape)
    line, square = clip_cost.products("paper")
    # The official iteration: Gram + product, 10 steps of 3 k x k products (4k²n + 60k³); the
    # code may skip the first step's two products with I and the last unused Y (exact in bf16).
    assert line == 2 and square in (30, 27) and counter.matmuls == line + square
    assert counter.flops == clip_cost.clip_flops(k, n, (line, square)) == ssc_flops(*shape) - 2 * (30 - square) * k**3


def test_accurate_products_count_the_real_schedule():
    line, square = clip_cost.products("accurate", 30.0)
    assert line == 2 and 10 <= square < 30  # one stage: Gram and product, fewer k x k products than the paper's 30
    assert clip_cost.products("accurate", 300.0)[0] == 4  # beyond 32: two stages, each with its Gram and product


def small_run(tp=2, dp=2, nodes=1):
    model = Model("tiny", 2, 64, 4, 128, 256)
    return cluster.Run("tiny", model, seq=32, global_batch=8, micro_batch=2, nodes=nodes, tp=tp, dp=dp)


def test_rank_work_matches_hand_formulas():
    from megatron_spectra.engine.plan import build_plan

    run = small_run()
    params = model_params(run.model)
    layout = Layout(run.tp, run.dp)
    matrices = [i for i, p in enumerate(params) if p.is_matrix]
    placements = [[rank_placements(params, layout, r, "auto")[i] for i in matrices] for r in range(layout.world)]
    plan = build_plan(placements, paper=True, products=30)  # the official count in both
    work = clip_cost.rank_work(plan, (2, 30))
    # Every matrix clipped once, whole, by one owner (at this size), at 4k²n + 60k³.
    assert all(t.strategy == "owner" for t in plan.tensors)
    assert sum(w.flops for w in work) == sum(ssc_flops(*params[i].shape) for i in matrices)
    assert [w.flops for w in work] == pytest.approx(plan.loads)  # the plan's own cost model agrees
    # Bytes: the elements of a matrix its owner does not hold travel to it and back, fp32.
    moved = sum(params[i].numel - placements[t.units[0].rank][t.index].local_numel for t, i in zip(plan.tensors, matrices))
    assert sum(w.nvlink_bytes[0] for w in work) == sum(w.nvlink_bytes[1] for w in work) == 2 * 4 * moved
    assert all(w.ib_bytes == (0, 0) for w in work)  # one node: NVLink only
    # Launches: one batched product per shape group an owner holds, 32 products each.
    shapes = {}
    for t, i in zip(plan.tensors, matrices):
        shapes.setdefault(t.units[0].rank, set()).add(tuple(sorted(params[i].shape)))
    assert [w.matmuls for w in work] == [32 * len(shapes.get(r, ())) for r in range(layout.world)]
    # The whole model's plan (norms by the vector rule too) adds only the vectors' bytes.
    full = clip_cost.rank_work(cluster.plan_for(run, "paper", 30), (2, 30))
    assert [w.flops for w in full] == pytest.approx([w.flops for w in work])


def test_links_times_and_baseline():
    rates = cluster.Rates(bf16_tflops=500, fp32_tflops=50, nvlink_gbs=400, ib_gbs=50, launch_us=10, mfu=0.5)
    w = clip_cost.RankWork(flops=1e12, matmuls=64, nvlink_bytes=(4e8, 2e8), ib_bytes=(1e8, 3e8))
    assert cluster.comm_seconds(w, rates) == pytest.approx(max(4e8 / 400e9 + 1e8 / 50e9, 2e8 / 400e9 + 3e8 / 50e9))
    assert cluster.compute_seconds(w, "paper", rates) == pytest.approx(1e12 / 500e12 + 64 * 10e-6)
    assert cluster.compute_seconds(w, "accurate", rates) == pytest.approx(1e12 / 50e12 + 64 * 10e-6)
    run = cluster.paper_run("160m")
    d, f, v, layers = 768, 2048, 50304, 12
    assert run.params == 2 * v * d + layers * (4 * d * d + 3 * d * f + 2 * d) + d
    assert (run.tp, run.dp, run.nodes, run.micro_batch, run.tokens) == (1, 8, 1, 32, 256 * 512)
    assert cluster.baseline_seconds(run, 8, rates) == pytest.approx(6 * run.params * run.tokens / (8 * 989e12 * 0.5))
    # Across nodes: a two-node layout sends some of its bytes over InfiniBand.
    # Across nodes: the output layer, spread over DP ranks 0-7 and 8, reaches its owner partly over InfiniBand.
    wide_vocab = cluster.Run("tiny", Model("tiny", 1, 64, 4, 128, 6144), 32, 16, 1, nodes=2, tp=1, dp=16)
    work = clip_cost.rank_work(cluster.plan_for(wide_vocab, "paper", 30), (2, 30))
    ib = [w.ib_bytes for w in work]
    assert sum(s for s, _ in ib) == sum(r for _, r in ib) > 0


def test_official_projection_counts_every_matrix_once_per_rank():
    run = cluster.paper_run("820m")
    mats = cluster.official_matrices(run.model)
    assert len(mats) == 2 + 5 * 12
    rates = cluster.Rates()
    out = cluster.project_official(run, rates)
    flops = sum(ssc_flops(k, n) for k, n in mats)
    assert out["overhead_ms"] == pytest.approx(1e3 * (flops / 600e12 + len(mats) * 32 * 10e-6))


def test_cli_prints_the_table(capsys, tmp_path):
    path = tmp_path / "cluster.json"
    assert main(["bench", "cluster", "--models", "160m", "--modes", "paper", "--launch-us", "5", "--json", str(path)]) == 0
    out = capsys.readouterr().out
    row = json.loads(path.read_text())["rows"][0]
    assert row["overhead_ms"] == pytest.approx(row["comm_ms"] + row["compute_ms"])
    assert f"{row['overhead_pct']:+.2f}%" in out
    assert "| 160m | 12 x 768 / ffn 2048; 1 x 8 GPUs, TP1 x DP8, micro 32" in out
    assert "5 us per matmul launch" in out and "200.7 -> 238.3 ms" in out
    assert "Most sensitive assumption:" in out
    with pytest.raises(SystemExit, match="unknown"):
        main(["bench", "cluster", "--models", "999m"])
    with pytest.raises(SystemExit, match="--mfu"):
        main(["bench", "cluster", "--mfu", "1.5"])
