"""Spectra's scalars through Megatron's writer interface, from real optimizers after real steps
(megatron-core on CPU; Megatron-LM's own writers are checked in test_megatron_lm.py)."""

import math

import pytest

pytest.importorskip("megatron.core")

from megatron_spectra.launch.spawn import run_distributed  # noqa: E402

STEPS, C = 3, 0.5


class FakeTensorBoard:
    """What Megatron-LM's training_log uses of torch's SummaryWriter."""

    def __init__(self):
        self.calls = []

    def add_scalar(self, tag, value, step):
        self.calls.append((tag, float(value), step))


class FakeWandb:
    def __init__(self):
        self.calls = []

    def log(self, values, step):
        self.calls.append((dict(values), step))


def _train_and_log(rank, world, workdir, tp, log_norms=(True,)):
    """One result per entry of `log_norms` (several runs in one process save its start-up)."""
    from megatron_spectra.megatron.scalars import write_spectra_scalars
    from tests.support.megatron import NamedWeights, Record, tiny_gpt, train

    def scalars(trainer):
        tensorboard, wandb = FakeTensorBoard(), FakeWandb()
        written = write_spectra_scalars(trainer.optimizer, STEPS, tensorboard, wandb)
        return {"written": written, "tensorboard": tensorboard.calls, "wandb": wandb.calls}

    results = []
    for flag in log_norms:
        flags = ("--optimizer spectra-adamw --lr 1e-3 --weight-decay 0.1 --clip-grad 0 --use-distributed-optimizer "
                 f"--spectra-mode accurate --spectra-clip-threshold {C} --spectra-clip-schedule constant").split()
        argv = tiny_gpt(workdir, f"log-tp{tp}-{flag}", tp=tp, steps=STEPS, global_batch=8, micro_batch=4)
        record = Record(finish=scalars)
        train(argv + flags + (["--spectra-log-update-norms"] if flag else []), init_model=NamedWeights(), on_step=record)
        results.append(record.final)
    return results


@pytest.fixture(scope="module")
def logged(tmp_path_factory):
    """The scalars after the same 3 steps at TP=2 x DP=2 (ZeRO-1) and in one process (there
    also without update norms), from the built-in trainer."""
    workdir = str(tmp_path_factory.mktemp("trainer"))
    single, without_norms = run_distributed(_train_and_log, 1, args=(workdir, 1, (True, False)), timeout=300)[0]
    return {
        "tp2dp2": [r[0] for r in run_distributed(_train_and_log, 4, args=(workdir, 2), timeout=300)],
        "single": single,
        "without_norms": without_norms,
    }


def test_the_writers_get_every_scalar_at_the_iteration(logged):
    for result in logged["tp2dp2"]:
        written = result["written"]
        assert written["spectra/clip-threshold"] == C
        assert result["tensorboard"] == [(k, float(v), STEPS) for k, v in written.items()]
        assert result["wandb"] == [(written, STEPS)]
        assert written["spectra/bytes-sent"] > 0  # four processes exchanged pieces to clip


def test_update_norms_name_every_matrix_and_agree_on_every_rank(logged):
    ranks = [r["written"] for r in logged["tp2dp2"]]
    before = {k for k in ranks[0] if k.startswith("spectra/update-norm-before/")}
    after = {k.replace("-after/", "-before/") for k in ranks[0] if k.startswith("spectra/update-norm-after/")}
    # 2 layers x (qkv, proj, fc1, fc2) + embedding + output layer
    assert len(before) == 10 and before == after
    assert any(k.endswith("decoder.layers.1.mlp.linear_fc1.weight") for k in before)
    norms = [{k: v for k, v in r.items() if "update-norm" in k} for r in ranks]
    assert all(n == norms[0] for n in norms)


def test_update_norms_under_tp_and_zero_equal_the_single_process_ones(logged):
    """The distributed run rebuilds each matrix from TP blocks cut into ZeRO ranges: its
    norms must be those of the whole matrices of the one-process run."""
    distributed, single = logged["tp2dp2"][0]["written"], logged["single"]["written"]
    keys = [k for k in single if "update-norm" in k]
    assert keys and set(keys) == {k for k in distributed if "update-norm" in k}
    for k in keys:
        assert distributed[k] == pytest.approx(single[k], rel=1e-3), k


def test_after_is_the_soft_clip_of_before(logged):
    """Accurate mode: the top singular value s maps to s / sqrt(1 + s^2/c^2)."""
    written = logged["tp2dp2"][0]["written"]
    for key, s in written.items():
        if key.startswith("spectra/update-norm-before/"):
            clipped = written[key.replace("-before/", "-after/")]
            assert s > C  # every matrix is clipped hard here, so the check has teeth
            assert clipped == pytest.approx(s / math.sqrt(1 + (s / C) ** 2), rel=2e-3), key
    assert written["spectra/update-norm-after-max"] <= C


def test_no_update_norms_unless_asked(logged):
    written = logged["without_norms"]["written"]
    assert "spectra/clip-threshold" in written
    assert not any("update-norm" in k for k in written)
