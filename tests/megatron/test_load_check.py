"""The Megatron-LM path's refusal of a checkpoint the live Spectra optimizer cannot take:
the hook wraps `dist_checkpointing.load` (what Megatron-LM's load_checkpoint calls) with
`checkpoint.checking_load`. Here on a real plain-Adam checkpoint of the built-in trainer
(Megatron-LM's default format), one process."""

import types

import pytest

pytest.importorskip("megatron.core")
pytest.importorskip("psutil", reason="megatron-core's torch_dist checkpoint writer needs psutil")

from megatron_spectra.launch.spawn import run_distributed  # noqa: E402


def _write_adam_checkpoint(rank, world, workdir):
    from megatron_spectra.train.checkpoint import iteration_dir
    from tests.support.megatron import NamedWeights, tiny_gpt, train

    root = f"{workdir}/adam"
    flags = ["--optimizer", "adam", "--use-distributed-optimizer", "--save", root, "--save-interval", "1"]
    train(tiny_gpt(workdir, "adam", steps=1) + flags, init_model=NamedWeights())
    return iteration_dir(root, 1)


@pytest.fixture(scope="module")
def adam_checkpoint(tmp_path_factory):
    return run_distributed(_write_adam_checkpoint, 1, args=(str(tmp_path_factory.mktemp("ckpt")),), timeout=300)[0]


def live(base):
    """What the hook keeps of the built optimizer: a ChainedOptimizer of Spectra parts."""
    part = types.SimpleNamespace(spectra_config=types.SimpleNamespace(base=base))
    return [types.SimpleNamespace(chained_optimizers=[part])]


def test_a_plain_adam_checkpoint_is_refused_by_name_before_loading(adam_checkpoint):
    from megatron_spectra.megatron.checkpoint import CheckpointMismatch, checking_load

    calls = []
    load = checking_load(lambda *a, **k: calls.append(a) or "loaded", lambda: live("signum"))
    with pytest.raises(CheckpointMismatch, match=r"plain Adam optimizer state.*spectra-signum keeps \('momentum_buffer',\)"):
        load({"model": {}, "optimizer": {}}, adam_checkpoint, "strategy", strict="assume_ok_unexpected")
    with pytest.raises(CheckpointMismatch, match="--no-load-optim"):
        load(sharded_state_dict={"optimizer": {}}, checkpoint_dir=adam_checkpoint)
    assert calls == []  # dist_checkpointing was never asked


def test_what_can_be_loaded_goes_through(adam_checkpoint):
    from megatron_spectra.megatron.checkpoint import checking_load

    calls = []
    original = lambda *a, **k: calls.append((a, k)) or "loaded"  # noqa: E731
    assert checking_load(original, lambda: live("adamw"))({"optimizer": {}}, adam_checkpoint) == "loaded"
    assert checking_load(original, lambda: live("signum"))({"model": {}}, adam_checkpoint) == "loaded"  # --no-load-optim
    assert checking_load(original, lambda: [])({"optimizer": {}}, adam_checkpoint) == "loaded"  # Megatron's own optimizer
    assert len(calls) == 3
