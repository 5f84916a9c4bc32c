"""Resubmitted runs and damaged checkpoints, through the built-in trainer (issue 14, "Runs and
checkpoints"): megatron-core's own Adam resumes exactly (dropout and validation included), the
RNG states and the evaluation round come back, --no-load-optim / --finetune, a missing --load
folder, a torn pointer, truncated and altered shards, a vocabulary that changed with TP, and
NaN losses that must neither continue nor be saved.

One launch of 2 gloo processes (TP=1 x DP=2, one at TP=2) runs every case in sequence.
"""

import contextlib
import io
import os
import shutil

import pytest

pytest.importorskip("megatron.core")
pytest.importorskip("psutil", reason="megatron-core's torch_dist checkpoint writer needs psutil")

from megatron_spectra.launch.spawn import run_distributed  # noqa: E402
from tests.support.megatron import NamedWeights, Record, tiny_gpt, train  # noqa: E402

STEPS, SAVE_AT = 4, 2
# megatron-core's own Adam (torch's AdamW without Apex/TE), dropout on, a validation every
# other iteration: all three depend on state that a resume must bring back.
ADAM = ("--optimizer adam --lr 1e-2 --use-distributed-optimizer --hidden-dropout 0.1 --attention-dropout 0.1 "
        "--eval-iters 1 --eval-interval 2").split()

pytestmark = pytest.mark.timeout(900)


def _weights(trainer):
    return sum(p.detach().double().abs().sum().item() for p in trainer.model.module.parameters())


def _run(workdir, name, steps, extra=(), flags=ADAM, tp=1):
    """(losses, final val loss, first iteration, weights at the start and end) of one run, or the
    error's type and message if it raised, and rank 0's stdout."""
    start = {}

    def first(trainer, record):
        if record is None:
            start["iteration"], start["weights"] = trainer.iteration, _weights(trainer)
        elif trainer.iteration == trainer.args.train_iters:
            start["end_weights"] = _weights(trainer)

    record, out = Record(also=first), io.StringIO()
    try:
        with contextlib.redirect_stdout(out):
            summary = train(tiny_gpt(workdir, name, tp=tp, steps=steps) + flags + list(extra),
                            init_model=NamedWeights(), on_step=record)
    except Exception as error:  # noqa: BLE001 - the test looks at which one
        return {"error": (type(error).__name__, str(error)), "stdout": out.getvalue()}
    return {"losses": record.losses, "val": summary["val_loss"], "start": start, "stdout": out.getvalue()}


def _damage(root, name, how):
    """A copy of root/full whose latest checkpoint has one shard file truncated or altered."""
    import torch.distributed as dist

    copy = os.path.join(root, name)
    if dist.get_rank() == 0:
        shutil.copytree(os.path.join(root, "full"), copy)
        folder = os.path.join(copy, f"iter_{STEPS:07d}")
        shard = os.path.join(folder, sorted(f for f in os.listdir(folder) if f.endswith(".distcp"))[0])
        size = os.path.getsize(shard)
        if how == "truncate":
            os.truncate(shard, size // 2)
        elif how == "flip":  # same size, a few bytes of tensor data inverted
            with open(shard, "r+b") as f:
                f.seek(size // 2)
                data = f.read(16)
                f.seek(size // 2)
                f.write(bytes(b ^ 0xFF for b in data))
        else:  # a pointer torn mid-write
            with open(os.path.join(copy, "latest_checkpointed_iteration.txt"), "w") as f:
                f.write("")
    dist.barrier()
    return copy


def _job(rank, world, root, workdir):
    full = os.path.join(root, "full")
    out = {"full": _run(workdir, "full", STEPS, ["--save", full, "--save-interval", str(SAVE_AT)])}
    at_save = ["--load", full, "--ckpt-step", str(SAVE_AT)]
    out["resumed"] = _run(workdir, "resumed", STEPS, at_save)
    out["no_rng"] = _run(workdir, "no-rng", STEPS, at_save + ["--no-load-rng"])
    out["other_optimizer"] = _run(workdir, "signum", STEPS, at_save, flags=ADAM + ["--optimizer", "spectra-signum"])
    out["no_load_optim"] = _run(workdir, "signum-weights", SAVE_AT + 1, at_save + ["--no-load-optim"],
                                flags=ADAM + ["--optimizer", "spectra-signum"])
    out["finetune"] = _run(workdir, "finetune", 1, ["--load", full, "--finetune"])
    out["missing"] = _run(workdir, "missing", 1, ["--load", os.path.join(root, "nowhere")])
    out["torn"] = _run(workdir, "torn", STEPS + 1, ["--load", _damage(root, "torn", "pointer")])
    out["truncated"] = _run(workdir, "truncated", STEPS + 1, ["--load", _damage(root, "truncated", "truncate")])
    out["flipped"] = _run(workdir, "flipped", STEPS + 1, ["--load", _damage(root, "flipped", "flip")])
    vocab = ["--make-vocab-size-divisible-by", "128"]  # 257 tokens: 384 at TP=1, 512 at TP=2
    _run(workdir, "vocab-128", 1, vocab + ["--save", os.path.join(root, "vocab")])
    out["other_tp"] = _run(workdir, "vocab-tp2", 2, vocab + ["--load", os.path.join(root, "vocab")], tp=2)
    blowup = ["--lr", "1e6", "--save", os.path.join(root, "nan"), "--save-interval", "1"]
    out["nan"] = _run(workdir, "nan", 8, blowup)
    out["nan_pointer"] = open(os.path.join(root, "nan", "latest_checkpointed_iteration.txt")).read()
    unchecked = ["--lr", "1e6", "--save", os.path.join(root, "nan-unchecked"), "--save-interval", "8",
                 "--no-check-for-nan-in-loss-and-grad"]
    out["nan_unchecked"] = _run(workdir, "nan-unchecked", 8, unchecked)
    unchecked_root = os.path.join(root, "nan-unchecked")
    out["nan_unchecked_saved"] = os.listdir(unchecked_root) if os.path.exists(unchecked_root) else []
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root, workdir = str(tmp_path_factory.mktemp("ckpt")), str(tmp_path_factory.mktemp("trainer"))
    return run_distributed(_job, 2, args=(root, workdir), timeout=840)


def _close(a, b, rel=1e-6):
    return len(a) == len(b) and all(abs(x - y) <= rel * abs(y) for x, y in zip(a, b))


def test_adam_resumes_as_if_uninterrupted_with_dropout_and_validation(runs):
    for r in runs:
        full, resumed = r["full"], r["resumed"]
        assert "error" not in resumed, resumed.get("error")
        assert resumed["start"]["iteration"] == SAVE_AT
        assert _close(resumed["losses"], full["losses"][SAVE_AT:]), (resumed["losses"], full["losses"])
        # The validation at STEPS is the second one: the same batches as without a resume.
        assert abs(resumed["val"] - full["val"]) <= 1e-6 * full["val"], (resumed["val"], full["val"])


def test_the_rng_states_matter_and_come_back(runs):
    """Guards the test above: without the RNG states the dropout masks differ."""
    no_rng, full = runs[0]["no_rng"], runs[0]["full"]
    assert no_rng["start"]["weights"] == runs[0]["resumed"]["start"]["weights"]  # the same weights ...
    assert abs(no_rng["losses"][0] - full["losses"][SAVE_AT]) > 1e-5  # ... other dropout masks


def test_another_optimizer_is_refused_unless_only_the_weights_are_loaded(runs):
    for r in runs:
        kind, message = r["other_optimizer"]["error"]
        assert kind == "CheckpointMismatch" and "--no-load-optim" in message and "spectra-signum" in message
        weights = r["no_load_optim"]
        assert "error" not in weights, weights.get("error")
        assert weights["start"]["iteration"] == SAVE_AT
        # Weights and RNG restored, the optimizer fresh: the first loss is the uninterrupted one.
        assert weights["losses"][0] == pytest.approx(r["full"]["losses"][SAVE_AT], rel=1e-6)


def test_finetune_loads_the_weights_and_starts_at_iteration_zero(runs):
    for r in runs:
        finetune = r["finetune"]
        assert "error" not in finetune, finetune.get("error")
        assert finetune["start"]["iteration"] == 0 and len(finetune["losses"]) == 1
        assert finetune["start"]["weights"] == pytest.approx(r["full"]["start"]["end_weights"], rel=1e-12)
        assert finetune["start"]["weights"] != pytest.approx(r["full"]["start"]["weights"], rel=1e-6)


def test_a_missing_load_folder_trains_from_scratch_with_a_warning(runs):
    missing = runs[0]["missing"]
    assert missing["start"]["iteration"] == 0
    assert "WARNING: --load" in missing["stdout"] and "nowhere: the folder does not exist" in missing["stdout"]
    assert "training from scratch" in missing["stdout"]
    assert "WARNING" not in runs[1]["missing"]["stdout"]  # rank 0 only


def test_a_torn_pointer_falls_back_to_the_newest_complete_checkpoint(runs):
    for r in runs:
        torn = r["torn"]
        assert "error" not in torn, torn.get("error")
        assert torn["start"]["iteration"] == STEPS
    assert "which is not a complete checkpoint" in runs[0]["torn"]["stdout"]
    assert f"iteration {STEPS}" in runs[0]["torn"]["stdout"]


@pytest.mark.parametrize("case, words", [("truncated", "truncated"), ("flipped", "CRC32")])
def test_a_damaged_shard_is_named_on_every_rank(runs, case, words):
    messages = set()
    for r in runs:
        kind, message = r[case]["error"]
        assert kind == "CheckpointError" and words in message and ".distcp" in message, message
        assert f"{case}/iter_{STEPS:07d}/" in message
        messages.add(message)
    assert len(messages) == 1


def test_a_vocabulary_padded_differently_at_another_tp_is_refused(runs):
    for r in runs:
        kind, message = r["other_tp"]["error"]
        assert kind == "CheckpointError", message
        assert "word_embeddings.weight" in message or "output_layer.weight" in message
        assert "(384, 32)" in message and "(512, 32)" in message and "--make-vocab-size-divisible-by" in message


def test_a_nan_loss_stops_the_run_naming_the_iteration_and_is_never_saved(runs):
    for r in runs:
        kind, message = r["nan"]["error"]
        assert kind == "NonFiniteError" and "--check-for-nan-in-loss-and-grad" in message
        iteration = int(message.split("iteration ")[1].split(":")[0])
        assert 1 < iteration <= 8
        # Saved every iteration up to the last finite one, never past it.
        assert int(r["nan_pointer"]) == iteration - 1
        kind, message = r["nan_unchecked"]["error"]
        assert kind == "NonFiniteError" and "not saved" in message and "iteration 8" in message
        assert r["nan_unchecked_saved"] == []
