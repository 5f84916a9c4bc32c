"""Signum's buffer start (signum_init) in the Megatron path: ZeRO-1 over 2 DP ranks (each
rank's buffer starts from its shard of the fp32 main weight) against the one-process
reference Spectra, for both choices; and the two choices train differently."""

import pytest

pytest.importorskip("megatron.core")

from megatron_spectra.launch.spawn import run_distributed  # noqa: E402
from tests.support.megatron import NamedWeights, Record, reference, tiny_gpt, train  # noqa: E402

STEPS, LR = 4, 3e-3
INITS = ("weight", "zero")
pytestmark = pytest.mark.timeout(900)


def _flags(init):
    return (f"--optimizer spectra-signum --lr {LR} --weight-decay 0.1 --clip-grad 0 --use-distributed-optimizer "
            f"--spectra-mode accurate --spectra-clip-threshold 0.5 --spectra-clip-schedule constant "
            f"--spectra-signum-init {init}").split()


def _runs(rank, world, workdir):
    out = {}
    for init in INITS:
        argv = tiny_gpt(workdir, f"signum-{init}-dp{world}", steps=STEPS) + _flags(init)
        if world == 1:
            out[init] = reference(argv, dict(base="signum", signum_init=init, weight_decay=0.1, clip_threshold=0.5,
                                             clip_schedule="constant", mode="accurate"))
        else:
            record = Record()
            train(argv, init_model=NamedWeights(), on_step=record)
            out[init] = record.losses
    return out


@pytest.fixture(scope="module")
def losses(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("signum"))
    return {"reference": run_distributed(_runs, 1, args=(workdir,), timeout=600)[0],
            "zero1": run_distributed(_runs, 2, args=(workdir,), timeout=600)[0]}


@pytest.mark.parametrize("init", INITS)
def test_zero1_signum_matches_the_reference(losses, init):
    got, want = losses["zero1"][init], losses["reference"][init]
    assert len(got) == STEPS
    assert max(abs(a - b) / b for a, b in zip(got, want)) <= 1e-4, (got, want)


def test_the_buffer_start_matters(losses):
    weight, zero = losses["reference"]["weight"], losses["reference"]["zero"]
    assert weight[0] == zero[0]  # the first loss is before any step
    # measured 9.6e-4 here: well beyond the 1e-4 the matches above allow, so they tell the two apart
    assert max(abs(a - b) / b for a, b in zip(weight[1:], zero[1:])) > 5e-4
