"""A tiny LLaMA under FSDP2, HSDP and FSDP x TP against the single-process reference Spectra;
uneven and empty shards; DCP save at 4 ranks, load at 2."""

import functools
import math

import pytest
import torch

from tests.support.fsdp_workers import UNEVEN_CASES, four_rank_runs, uneven_reference
from tests.support.fsdp import Run, reference_losses

pytestmark = pytest.mark.slow

TOLERANCE = 1e-4  # relative, fp32 model; measured: a few 1e-6
MATCHING = ["fsdp4-adamw", "hsdp2x2-adamw", "fsdp2xtp2-adamw", "fsdp2xtp2-signum-gram", "hsdp2x2-ademamix-preclip",
            "fsdp2xtp2-adamw-official-options", "fsdp4-adamw-normalize"]


@functools.lru_cache(maxsize=None)
def _reference(run: Run) -> tuple:
    return tuple(reference_losses(run))


def _assert_close(got, want, what):
    assert len(got) == len(want) and got
    worst = max(abs(g - w) / abs(w) for g, w in zip(got, want))
    assert worst <= TOLERANCE, f"{what}: max relative loss difference {worst:.2e}\n got {got}\nwant {want}"


@pytest.mark.parametrize("name", MATCHING)
def test_four_ranks_match_the_reference(four_ranks, name):
    run = four_rank_runs("unused")[name]
    _assert_close(four_ranks[0]["runs"][name]["losses"], _reference(Run(run.layout, run.base, options=run.options)), name)


def test_fsdp_two_ranks_matches_the_reference(two_ranks):
    _assert_close(two_ranks[0]["runs"]["fsdp2-adamw"]["losses"], _reference(Run("fsdp", "adamw")), "fsdp2-adamw")


@pytest.mark.parametrize("saved", ["fsdp4", "fsdp2xtp2"])
def test_dcp_save_at_four_ranks_load_at_two_continues_the_same(four_ranks, two_ranks, saved):
    uninterrupted = four_ranks[0]["runs"][f"{saved}-adamw"]
    resumed = two_ranks[0]["runs"][f"resume-{saved}-as-fsdp2"]
    assert uninterrupted["saved"] == (5, 0) and resumed["loaded"] == (5, 0)  # the step counter drives c_k
    _assert_close(resumed["losses"], uninterrupted["losses"][5:], f"{saved} resumed at 2 ranks")


def test_a_nan_gradient_on_one_rank_is_skipped_on_every_rank(four_ranks):
    results = [r["runs"]["fsdp4-nan-skip"] for r in four_ranks]
    assert all(r["final"] == (5, 1) for r in results)  # 6 steps, the 4th skipped everywhere
    losses = results[0]["losses"]
    assert all(math.isfinite(x) for x in losses)
    _assert_close(losses[:4], _reference(Run("fsdp", "adamw"))[:4], "before the NaN")


@pytest.mark.parametrize("case", list(UNEVEN_CASES))
def test_uneven_and_empty_shards(four_ranks, case):
    want, want_norms = uneven_reference(UNEVEN_CASES[case][1])
    for result in four_ranks:
        params, norms, clip_world = result["uneven"][case]
        assert clip_world == 4  # one clip group over all ranks
        for name, p in params.items():
            torch.testing.assert_close(torch.from_numpy(p), want[name], rtol=1e-5, atol=1e-5, msg=lambda m: f"{case} {name}: {m}")
        assert sorted(norms) == sorted(want_norms)
        for name, (before, after) in norms.items():
            assert before == pytest.approx(want_norms[name][0], rel=1e-4) and after == pytest.approx(want_norms[name][1], rel=1e-4)
