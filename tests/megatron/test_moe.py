"""Spectra on megatron-core 0.16.1's mixture-of-experts layers, on CPU processes under gloo.

The MoE GPT (local spec: SequentialMLP, 4 experts, top-2, the router a matrix too) trains in
megatron-core's own loop at EP=2 with expert TP and expert DP, with and without ZeRO, against
the single-process reference Spectra, where every expert is a separate Linear: each expert's
matrix clipped as its own, alpha from its own shape. Checkpoints are saved at EP=2 and resumed
at EP=2 and EP=4. GroupedMLP (all local experts in one tensor) needs the CUDA-only
grouped_gemm package and bf16, so its split is tested on the layout function and the engine
directly, against the SVD formula per expert.
"""

import math

import pytest
import torch

pytest.importorskip("megatron.core")

from megatron_spectra.launch.spawn import run_distributed  # noqa: E402
from tests.support.core_loop import (  # noqa: E402
    CORE_MOE, CORE_REFERENCE, CoreRun, core_config, core_optimizer_config, core_reference,
)
from tests.support.megatron import megatron_world  # noqa: E402

STEPS, SAVE_AT = 4, 2
# name -> (tp, ep, etp, ZeRO); 4 processes each: dense DP = 4 / tp, expert DP = 4 / (ep * etp)
LAYOUTS = {
    "ep2-tp1-edp2": (1, 2, 1, True),
    "ep2-tp2-etp2": (2, 2, 2, True),
    "ep2-tp2-etp1-edp2": (2, 2, 1, True),
    "ep2-tp1-edp2-fp32": (1, 2, 1, False),  # no ZeRO: experts replicated over expert DP
}
pytestmark = pytest.mark.timeout(1500)


def _world(tp, ep, etp):
    return megatron_world(tp=tp, expert_model_parallel_size=ep, expert_tensor_parallel_size=etp)


def _run(tp, ep, etp, zero, steps, save=None, load=None):
    from megatron_spectra.train import checkpoint

    with _world(tp, ep, etp):
        optimizer = core_optimizer_config(use_distributed_optimizer=zero, spectra_log_update_norms=True)
        run = CoreRun(core_config(tp=tp, ep=ep, etp=etp, **CORE_MOE), optimizer)
        expert_part = run.optimizer.chained_optimizers[-1]
        names = sorted({e.name for e in expert_part.spectra_entries})
        if load is not None:
            checkpoint.load(load, run.models[0], run.optimizer, run.scheduler, SAVE_AT)
            run.iteration = SAVE_AT
        losses = []
        while run.iteration < steps:
            losses.append(run.step())
            if save is not None and run.iteration == SAVE_AT:
                checkpoint.save(save, SAVE_AT, run.models[0], run.optimizer, run.scheduler, fully_reshardable=True)
        return {"losses": losses, "expert_names": names, "parts": [type(o).__name__ for o in run.optimizer.chained_optimizers],
                "norms": expert_part.spectra_update_norms}  # of the last step


def _four(rank, world, root):
    import warnings

    warnings.filterwarnings("ignore")
    out = {name: _run(*layout, STEPS, save=f"{root}/ckpt" if name == "ep2-tp1-edp2" else None)
           for name, layout in LAYOUTS.items()}
    out["resume-ep2"] = _run(1, 2, 1, True, STEPS, load=f"{root}/ckpt")
    out["resume-ep4"] = _run(1, 4, 1, True, STEPS, load=f"{root}/ckpt")  # one expert per rank
    return out


def _single(rank, world):
    import warnings

    warnings.filterwarnings("ignore")
    return {"reference": core_reference(STEPS, **CORE_MOE),
            "unclipped": core_reference(STEPS, spectra_kwargs=dict(CORE_REFERENCE, clip_threshold=1e3), **CORE_MOE)}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("moe"))
    return {"single": run_distributed(_single, 1, timeout=600)[0], "four": run_distributed(_four, 4, args=(root,), timeout=1400)}


def _close(got, want, tol=1e-4):
    errors = [abs(a - b) / abs(b) for a, b in zip(got, want)]
    assert len(got) == len(want) and max(errors) <= tol, [f"{e:.1e}" for e in errors]


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_moe_layouts_match_the_reference(runs, name):
    want = runs["single"]["reference"]
    for result in runs["four"]:
        _close(result[name]["losses"], want)


def test_the_clip_is_active_in_the_moe_run(runs):
    """Guards the test above: the clip changes this run, so matching the reference means each
    expert was clipped as the reference clips it (its own matrix, its own alpha)."""
    reference, unclipped = runs["single"]["reference"], runs["single"]["unclipped"]
    assert max(abs(a - b) for a, b in zip(reference, unclipped)) > 1e-3


def test_every_rank_lists_every_expert_of_the_stage(runs):
    for result in runs["four"]:
        names = result["ep2-tp1-edp2"]["expert_names"]
        for layer in range(2):
            for expert in range(CORE_MOE["num_moe_experts"]):
                assert f"decoder.layers.{layer}.mlp.experts.local_experts.{expert}.linear_fc1.weight" in names
        assert result["ep2-tp1-edp2"]["parts"] == ["SpectraDistributedOptimizer"] * 2  # dense and expert parts
        assert result["ep2-tp1-edp2-fp32"]["parts"] == ["SpectraFP32Optimizer"] * 2


def test_expert_update_norms_are_the_same_at_every_layout(runs):
    """Each expert's ||U||_2 and ||H_c(U)||_2, rebuilt from pieces split by expert TP, sharded
    by ZeRO or replicated over expert DP (where one copy must count), agree everywhere."""
    want = runs["four"][0]["ep2-tp1-edp2"]["norms"]
    assert len([k for k in want if "/decoder.layers." in k]) == 2 * 2 * 2 * CORE_MOE["num_moe_experts"]  # before/after, layers, fc1/fc2
    assert max(v for k, v in want.items() if "update-norm-after/" in k) < CORE_REFERENCE["clip_threshold"]
    for result in runs["four"]:
        for name in LAYOUTS:
            got = result[name]["norms"]
            assert got.keys() == want.keys()
            for key, value in want.items():
                assert got[key] == pytest.approx(value, rel=1e-3), (name, key)


@pytest.mark.parametrize("name", ["resume-ep2", "resume-ep4"])
def test_a_moe_checkpoint_resumes_as_if_uninterrupted(runs, name):
    for result in runs["four"]:
        _close(result[name]["losses"], result["ep2-tp1-edp2"]["losses"][SAVE_AT:], tol=1e-5)


# ----------------------------------------------------------------------------- GroupedMLP's split


def _grouped_param(local_shape, dim):
    p = torch.nn.Parameter(torch.zeros(local_shape))
    p.tensor_model_parallel, p.partition_dim, p.allreduce = True, dim, False
    return p


H, F, N = 6, 4, 3  # hidden, expert ffn, local experts


def test_grouped_experts_name_shape_alpha_and_pieces():
    from megatron_spectra.megatron.layouts import Experts, grouped_experts

    layout = Experts(grouped=True, local=N, ep_size=2, ep_rank=1, tp_size=2, tp_rank=1, ffn=F)
    w1 = _grouped_param((H, N * F // 2), 1)  # weight1: (h, E·F/t), used as view(E, h, F/t)
    main = torch.zeros(w1.numel() - 5)  # a ZeRO shard: [5, numel)
    entries = grouped_experts("decoder.layers.0.mlp.experts.weight1", w1, main, (5, w1.numel()), layout, 1,
                              apply_to="all", strategy="auto", split_fc1=False)
    assert [e.name for e in entries] == [f"decoder.layers.0.mlp.experts.{3 + k}.weight1" for k in range(N)]
    block = H * F // 2
    for k, e in enumerate(entries):
        assert e.placement.shape == (H, F) and e.placement.tp_dim == 1 and e.placement.tp_block == 1
        assert math.isclose(e.scale, math.sqrt(max(1.0, F / H)))  # the (out, in) = (F, h) Linear weight's alpha
        assert e.placement.range == ((5, block) if k == 0 else (0, block))
        assert e.span == ((0, block - 5) if k == 0 else (k * block - 5, (k + 1) * block - 5))
    other = grouped_experts("decoder.layers.0.mlp.experts.weight1", w1, None, None, layout, 0,
                            apply_to="all", strategy="auto", split_fc1=False)
    assert [e.main for e in other] == [None] * N and all(e.placement.local_numel == 0 for e in other)
    w2 = _grouped_param((N * F // 2, H), 0)  # weight2: (E·F/t, h), used as view(E, F/t, h)
    (e2, *_) = grouped_experts("x.weight2", w2, w2, None, layout, 1, apply_to="all", strategy="auto", split_fc1=False)
    assert e2.placement.shape == (F, H) and e2.placement.tp_dim == 0 and math.isclose(e2.scale, math.sqrt(H / F))


def test_grouped_fc1_split_is_refused_by_name():
    from megatron_spectra.megatron.layouts import Experts, grouped_experts

    layout = Experts(grouped=True, local=N, ep_size=1, ep_rank=0, tp_size=1, tp_rank=0, ffn=F)
    w1 = _grouped_param((H, N * 2 * F), 1)
    with pytest.raises(NotImplementedError, match="spectra_split_fc1"):
        grouped_experts("m.experts.weight1", w1, w1, None, layout, 0, apply_to="all", strategy="auto", split_fc1=True)


def _grouped_clip(rank, world, full):
    """ETP=2 x a ZeRO split of 2 that cuts experts mid-way: every process clips its pieces of
    the grouped tensor through EntryClipper; returns its piece of the result."""
    import torch.distributed as dist

    from megatron_spectra.megatron.layouts import Experts, grouped_experts
    from megatron_spectra.megatron.main_params import EntryClipper
    from megatron_spectra.ops.soft_clip import ClipNumerics
    from megatron_spectra.optim.clipper import Clip

    tp_rank, dp_rank = rank % 2, rank // 2
    layout = Experts(grouped=True, local=N, ep_size=1, ep_rank=0, tp_size=2, tp_rank=tp_rank, ffn=F)
    local = full[tp_rank]  # this TP rank's (h, E·F/2) tensor, flat
    cut = local.numel() * 2 // 5  # mid-expert
    start, end = (0, cut) if dp_rank == 0 else (cut, local.numel())
    w1 = _grouped_param((H, N * F // 2), 1)
    main = local[start:end].clone()
    entries = grouped_experts("m.experts.weight1", w1, main, (start, end), layout, 0, apply_to="all", strategy="auto",
                              split_fc1=False)
    clipper = EntryClipper(entries, dist.group.WORLD, ClipNumerics("accurate"))
    (out,) = clipper.clip([Clip(main, entries[0], main, "matrix")], 0.5)
    return (tp_rank, start, end, out.numpy().copy())


def test_grouped_experts_are_clipped_each_as_its_own_matrix():
    torch.manual_seed(0)
    full = [torch.randn(H * N * F // 2) for _ in range(2)]  # TP ranks' local weight1, flat
    results = run_distributed(_grouped_clip, 4, args=(full,), timeout=600)  # 4 imports of megatron-core
    from megatron_spectra.ops import soft_spectral_clip_svd

    got = [torch.zeros(H * N * F // 2) for _ in range(2)]
    for tp_rank, start, end, piece in results:
        got[tp_rank][start:end] = torch.from_numpy(piece)
    for k in range(N):  # expert k: its (h, F) matrix is the TP blocks side by side
        expert = torch.cat([full[t].view(N, H, F // 2)[k] for t in range(2)], dim=1)
        want = soft_spectral_clip_svd(expert, 0.5)
        clipped = torch.cat([got[t].view(N, H, F // 2)[k] for t in range(2)], dim=1)
        torch.testing.assert_close(clipped, want, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(got[0], full[0])  # the clip did something


def test_expert_names_are_global_in_every_layout():
    from megatron_spectra.megatron.layouts import Experts, expert_name

    sequential = Experts(grouped=False, local=2, ep_size=2, ep_rank=1, tp_size=1, tp_rank=0, ffn=F)
    grouped = Experts(grouped=True, local=2, ep_size=2, ep_rank=1, tp_size=1, tp_rank=0, ffn=F)
    assert expert_name("l.0.mlp.experts.local_experts.1.linear_fc1.weight", sequential, 1, 3) == \
        "l.0.mlp.experts.local_experts.3.linear_fc1.weight"
    assert expert_name("l.0.mlp.experts.linear_fc2.weight1", sequential, 1, 3) == "l.0.mlp.experts.linear_fc2.weight3"  # TEGroupedMLP
    assert expert_name("l.0.mlp.experts.weight2", grouped, None, 3) == "l.0.mlp.experts.3.weight2"  # megatron's checkpoint key
