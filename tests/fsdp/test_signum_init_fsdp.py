"""Signum's buffer start (signum_init) under FSDP2 and FSDP x TP (DTensor params: each rank's
buffer starts from its shard of the weight), 2 ranks with uneven shards, against the
single-process reference Spectra; and the two choices end in different weights."""

import pytest
import torch

from megatron_spectra.launch.spawn import run_distributed
from tests.support.fsdp_workers import uneven, uneven_reference

INITS = ("weight", "zero")


def _runs(rank, world):
    return {(layout, init): uneven(rank, world, layout, (("base", "signum"), ("signum_init", init)))[0]
            for layout in ("fsdp", "fsdp_tp") for init in INITS}


@pytest.fixture(scope="module")
def two_ranks():
    return run_distributed(_runs, 2, timeout=300)


@pytest.mark.parametrize("layout", ["fsdp", "fsdp_tp"])
@pytest.mark.parametrize("init", INITS)
def test_fsdp_signum_matches_the_reference(two_ranks, layout, init):
    want, _ = uneven_reference((("base", "signum"), ("signum_init", init)))
    for result in two_ranks:
        for name, p in result[(layout, init)].items():
            torch.testing.assert_close(torch.from_numpy(p), want[name], rtol=1e-5, atol=1e-5, msg=lambda m: f"{name}: {m}")


def test_the_buffer_start_matters():
    weight, _ = uneven_reference((("base", "signum"), ("signum_init", "weight")))
    zero, _ = uneven_reference((("base", "signum"), ("signum_init", "zero")))
    assert max((weight[n] - zero[n]).abs().max().item() for n in weight) > 1e-3
