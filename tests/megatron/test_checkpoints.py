"""Distributed checkpoints (torch_dist) of the Spectra optimizers in real megatron-core 0.16.1,
through the built-in trainer's --save / --load: save, load in new processes and continue; at
another TP x DP layout; from plain Adam.

Two launches of 4 gloo processes serve every test (CPU time is scarce): `_write` trains each
base uninterrupted at TP=2 x DP=2 with the distributed optimizer and saves a checkpoint on
the way (after SAVE_AT steps), and does the same for megatron-core's own Adam; `_resume`
loads every checkpoint in fresh processes and continues, at the same layout and at
TP=1 x DP=4. Both of Megatron's reshardable formats are used: fully_reshardable
(--dist-ckpt-optim-fully-reshardable: TP and DP may change) everywhere, and dp_reshardable
(Megatron-LM's default) for one base's same-layout resume.
"""

import logging
import os

import numpy as np
import pytest

pytest.importorskip("megatron.core")
pytest.importorskip("psutil", reason="megatron-core's torch_dist checkpoint writer needs psutil")

from megatron_spectra.launch.spawn import run_distributed  # noqa: E402
from tests.support.megatron import NamedWeights, Record, tiny_gpt, train  # noqa: E402

BASES = ("adamw", "signum", "ademamix")
STEPS, SAVE_AT, GLOBAL_BATCH, MICRO_BATCH, LR = 4, 2, 8, 2, 1e-2
WRITE_TP, RESHARD_TP = 2, 1  # 4 processes: DP=2, then DP=4
DP_FORMAT_BASE = "ademamix"  # resumes at the same layout from a dp_reshardable checkpoint
FULLY = ["--dist-ckpt-optim-fully-reshardable"]

# Two launches of 4 processes with 8 short trainings; on 2 busy cores they outlast the
# suite's default timeout (measured in the report: minutes under a load of 30+).
pytestmark = pytest.mark.timeout(1500)


def _flags(optimizer):
    common = f"--lr {LR} --weight-decay 0.1 --clip-grad 1.0 --use-distributed-optimizer --adam-eps 1e-6".split()
    if optimizer == "adam":
        return ["--optimizer", "adam", *common]
    # A warmup of AdEMAMix's alpha and beta3 makes its direction depend on the step count too.
    return [*common, "--optimizer", f"spectra-{optimizer}", "--spectra-mode", "accurate", "--spectra-clip-threshold",
            "0.5", "--spectra-clip-schedule", "constant", "--spectra-ademamix-warmup", "10"]


def _run(workdir, name, optimizer, tp, steps, extra=(), finish=None, also=None):
    argv = tiny_gpt(workdir, name, tp=tp, steps=steps, global_batch=GLOBAL_BATCH, micro_batch=MICRO_BATCH)
    record = Record(finish=finish, also=also)
    train(argv + _flags(optimizer) + list(extra), init_model=NamedWeights(), on_step=record)
    return record.result()


def _fingerprint(trainer):
    """Per state key, the sum of |x| over this rank's shards, and the step counts: equal at
    the same layout iff the moments went on as without the interruption."""
    states = trainer.optimizer.chained_optimizers[0].optimizer.state.values()
    keys = {k for s in states for k in s if k != "step"}
    sums = {k: sum(s[k].double().abs().sum().item() for s in states) for k in keys}
    return {**sums, "step": sorted({int(s["step"]) for s in states})}


def _also_dp_format(path):
    """After SAVE_AT steps, also a dp_reshardable checkpoint (Megatron-LM's default) at `path`."""
    def save(trainer, record):
        from megatron_spectra.train import checkpoint

        if trainer.iteration == SAVE_AT and record is not None:
            checkpoint.save(path, SAVE_AT, trainer.model, trainer.optimizer, trainer.scheduler)

    return save


def _moments(trainer):
    """This rank's shard of the main params and moments, by parameter name, and the step."""
    dopt = trainer.optimizer.chained_optimizers[0]
    names = {p: n for n, p in trainer.model.module.named_parameters()}
    # numpy, not tensors: torch sends tensors between processes by file descriptor, which is
    # gone once the child has exited.
    shards = {names[p]: {k: v.detach().numpy().copy() for k, v in dopt._get_main_param_and_optimizer_states(p).items() if k != "step"}
              for p in dopt.model_param_group_index_map}
    steps = {int(s["step"]) for s in dopt.optimizer.state.values()}
    return shards, steps


def _write(rank, world, root, workdir):
    runs = {}
    for b in BASES:
        save = ["--save", os.path.join(root, b), "--save-interval", str(SAVE_AT), *FULLY]
        also = _also_dp_format(os.path.join(root, b + "-dp")) if b == DP_FORMAT_BASE else None
        runs[b] = _run(workdir, f"write-{b}", b, WRITE_TP, STEPS, save, finish=_fingerprint, also=also)
    adam = _run(workdir, "write-adam", "adam", WRITE_TP, SAVE_AT, ["--save", os.path.join(root, "adam"), *FULLY],
                finish=_moments)  # megatron-core's own
    return {"losses": {b: r["losses"] for b, r in runs.items()}, "states": {b: r["final"] for b, r in runs.items()},
            "adam": adam["final"][0]}


class _Messages(logging.Handler):
    def __init__(self):
        super().__init__(logging.INFO)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def _resume(rank, world, root, workdir):
    from megatron_spectra.megatron.checkpoint import CheckpointMismatch, check_loadable
    from megatron_spectra.train.checkpoint import iteration_dir

    out = {"same": {}, "states": {}, "reshard": {}, "refused": {}}
    at_save = ["--ckpt-step", str(SAVE_AT)]
    for b in BASES:
        path = os.path.join(root, b)
        # At the same layout, one base resumes from Megatron-LM's default format instead.
        source = path + "-dp" if b == DP_FORMAT_BASE else path
        resumed = _run(workdir, f"resume-{b}", b, WRITE_TP, STEPS, ["--load", source, *at_save], finish=_fingerprint)
        out["same"][b], out["states"][b] = resumed["losses"], resumed["final"]
        out["reshard"][b] = _run(workdir, f"reshard-{b}", b, RESHARD_TP, STEPS, ["--load", path, *at_save])["losses"]
    handler = _Messages()
    logging.getLogger("megatron_spectra.megatron.checkpoint").addHandler(handler)
    loaded = _run(workdir, "from-adam", "adamw", WRITE_TP, SAVE_AT, ["--load", os.path.join(root, "adam")],
                  finish=_moments)  # load, no step
    out["from_adam"], out["from_adam_steps"] = loaded["final"]
    out["messages"] = handler.messages
    for b, source in (("signum", "adam"), ("ademamix", "adam"), ("signum", "adamw")):
        try:
            check_loadable(iteration_dir(os.path.join(root, source), SAVE_AT), b)
        except CheckpointMismatch as e:
            out["refused"][(b, source)] = str(e)
    try:  # the trainer's --load asks the same question before it loads anything
        _run(workdir, "signum-from-adam", "signum", WRITE_TP, SAVE_AT + 1, ["--load", os.path.join(root, "adam")])
    except CheckpointMismatch as e:
        out["trainer_refused"] = str(e)
    try:  # and megatron-core's own Adam too, of a Spectra checkpoint without Adam's moments
        _run(workdir, "adam-from-signum", "adam", WRITE_TP, SAVE_AT + 1, ["--load", os.path.join(root, "signum"), *at_save])
    except CheckpointMismatch as e:
        out["adam_refused"] = str(e)
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root, workdir = str(tmp_path_factory.mktemp("ckpt")), str(tmp_path_factory.mktemp("trainer"))
    written = run_distributed(_write, 4, args=(root, workdir), timeout=900)
    resumed = run_distributed(_resume, 4, args=(root, workdir), timeout=900)
    return written, resumed


def _relative_errors(got, want):
    assert len(got) == len(want)
    return [abs(a - b) / abs(b) for a, b in zip(got, want)]


@pytest.mark.parametrize("base", BASES)
def test_save_load_continue_gives_the_uninterrupted_losses(runs, base):
    written, resumed = runs
    want = written[0]["losses"][base][SAVE_AT:]
    for w, r in zip(written, resumed):
        assert max(_relative_errors(r["same"][base], want)) <= 1e-6, (r["same"][base], want)
        assert r["states"][base].keys() == w["states"][base].keys()
        assert r["states"][base]["step"] == w["states"][base]["step"] == [STEPS]
        for key, value in w["states"][base].items():
            if key != "step":
                assert abs(r["states"][base][key] - value) <= 1e-6 * value, (key, r["states"][base][key], value)


@pytest.mark.parametrize("base", BASES)
def test_a_checkpoint_loads_at_another_tp_and_dp_size(runs, base):
    written, resumed = runs
    want = written[0]["losses"][base][SAVE_AT:]
    for r in resumed:
        assert max(_relative_errors(r["reshard"][base], want)) <= 1e-4, (r["reshard"][base], want)


def test_the_losses_depend_on_the_restored_state(runs):
    """Guards the two tests above: the bases train differently, so equal losses after a load
    mean the right moments were restored, not that the optimizer does not matter."""
    losses = runs[0][0]["losses"]
    later = [tuple(losses[b][SAVE_AT:]) for b in BASES]
    assert len(set(later)) == len(BASES)


def test_plain_adam_checkpoint_loads_into_spectra_adamw_with_a_message(runs):
    written, resumed = runs
    for w, r in zip(written, resumed):  # same layout: rank i holds the same shards
        assert w["adam"].keys() == r["from_adam"].keys()
        for name, saved in w["adam"].items():
            assert set(saved) == {"param", "exp_avg", "exp_avg_sq"}
            for key, value in saved.items():
                assert np.array_equal(r["from_adam"][name][key], value), (name, key)
            # Non-zero moments, so the equality above has teeth; except maybe a word-embedding
            # shard: the upper half of the byte vocabulary (TP rank 1) is mostly bytes that two
            # batches of English text never use, whose rows get no gradient.
            assert np.abs(saved["exp_avg_sq"]).sum() > 0 or name.endswith("word_embeddings.weight"), name
        assert r["from_adam_steps"] == {SAVE_AT}
    messages = " ".join(resumed[0]["messages"])
    assert "plain Megatron Adam checkpoint into spectra-adamw" in messages
    assert "exp_avg, exp_avg_sq" in messages and "starting fresh" in messages


def test_other_bases_refuse_an_adam_checkpoint_clearly(runs):
    refused = runs[1][0]["refused"]
    for base in ("signum", "ademamix"):
        message = refused[(base, "adam")]
        assert "plain Adam optimizer state" in message and "--no-load-optim" in message
    assert "momentum_buffer" in refused[("signum", "adamw")]
    for r in runs[1]:
        assert r["trainer_refused"] == refused[("signum", "adam")]
        message = r["adam_refused"]
        assert "momentum_buffer" in message and "--optimizer adam needs ['exp_avg', 'exp_avg_sq']" in message
        assert "--no-load-optim" in message
