"""One 4-process and one 2-process launch for all FSDP tests (see tests/support/fsdp_workers.py)."""

import pytest

from megatron_spectra.launch.spawn import run_distributed


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory):
    return str(tmp_path_factory.mktemp("fsdp_dcp"))


@pytest.fixture(scope="session")
def four_ranks(checkpoints):
    from tests.support.fsdp_workers import four_rank_suite

    return run_distributed(four_rank_suite, 4, (checkpoints,), timeout=600)


@pytest.fixture(scope="session")
def two_ranks(four_ranks, checkpoints):
    """Runs after the 4-rank suite: it resumes that suite's checkpoints at 2 ranks."""
    from tests.support.fsdp_workers import two_rank_suite

    return run_distributed(two_rank_suite, 2, (checkpoints,), timeout=400)
