"""Spectra under megatron-core 0.16.1's interleaved pipeline schedule (virtual pipeline): two
model chunks per rank at TP=1 x PP=2 x VPP=2 x DP=2 with ZeRO, and the same with MoE at EP=2,
in megatron-core's own loop on CPU processes under gloo, against the single-process reference.
"""

import pytest

pytest.importorskip("megatron.core")

from megatron_spectra.launch.spawn import run_distributed  # noqa: E402
from tests.support.core_loop import CORE_MOE, CoreRun, core_config, core_optimizer_config, core_reference  # noqa: E402
from tests.support.megatron import megatron_world  # noqa: E402

STEPS, LAYERS, PP, VPP = 3, 4, 2, 2  # one layer per model chunk
pytestmark = pytest.mark.timeout(1500)


def _run(ep, model, zero=True):
    with megatron_world(pp=PP, virtual_pipeline_model_parallel_size=VPP, expert_model_parallel_size=ep):
        config = core_config(pp=PP, vpp=VPP, ep=ep, num_layers=LAYERS, **model)
        run = CoreRun(config, core_optimizer_config(use_distributed_optimizer=zero))
        chunks = sorted({e.name.split(".", 1)[0] for part in run.optimizer.chained_optimizers for e in part.spectra_entries})
        return {"losses": [run.step() for _ in range(STEPS)], "chunks": chunks, "models": len(run.models)}


def _four(rank, world):
    import warnings

    warnings.filterwarnings("ignore")
    return {"dense": _run(1, {}), "moe": _run(2, CORE_MOE), "dense-fp32": _run(1, {}, zero=False)}


def _single(rank, world):
    import warnings

    warnings.filterwarnings("ignore")
    return {"dense": core_reference(STEPS, num_layers=LAYERS), "moe": core_reference(STEPS, num_layers=LAYERS, **CORE_MOE)}


@pytest.fixture(scope="module")
def runs():
    return {"single": run_distributed(_single, 1, timeout=600)[0], "four": run_distributed(_four, 4, timeout=1400)}


@pytest.mark.parametrize("name", ["dense", "moe", "dense-fp32"])
def test_interleaved_schedule_matches_the_reference(runs, name):
    want = runs["single"][name.removesuffix("-fp32")]
    for result in runs["four"]:
        got = result[name]
        assert got["models"] == VPP and got["chunks"] == ["chunk0", "chunk1"]  # two chunks, both clipped
        errors = [abs(a - b) / abs(b) for a, b in zip(got["losses"], want)]
        assert len(errors) == STEPS and max(errors) <= 1e-4, errors
