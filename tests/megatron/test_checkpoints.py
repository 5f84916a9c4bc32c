"""Distributed checkpoints (torch_dist) of the Spectra optimizers in real megatron-core 0.16.1:
save, load in new processes and continue; at another TP x DP layout; from plain Adam.

Two launches of 4 gloo processes serve every test (CPU time is scarce): `_write` trains each
base uninterrupted at TP=2 x DP=2 with the distributed optimizer and saves a checkpoint on
the way (after SAVE_AT steps), and does the same for megatron-core's own Adam; `_resume`
loads every checkpoint in fresh processes and continues, at the same layout and at
TP=1 x DP=4. Both of Megatron's reshardable formats are used: fully_reshardable (TP and DP
may change) everywhere, and dp_reshardable (Megatron-LM's default) for one base's
same-layout resume.
"""

import logging
import os

import numpy as np
import pytest

pytest.importorskip("megatron.core")
pytest.importorskip("psutil", reason="megatron-core's torch_dist checkpoint writer needs psutil")

from megatron_spectra.launch.spawn import run_distributed  # noqa: E402

BASES = ("adamw", "signum", "ademamix")
STEPS, SAVE_AT, GLOBAL_BATCH, MICRO_BATCH, LR = 4, 2, 8, 2, 1e-2
WRITE_TP, RESHARD_TP = 2, 1  # 4 processes: DP=2, then DP=4
DP_FORMAT_BASE = "ademamix"  # resumes at the same layout from a dp_reshardable checkpoint

# Two launches of 4 processes with 8 short trainings; on 2 busy cores they outlast the
# suite's default timeout (measured in the report: minutes under a load of 30+).
pytestmark = pytest.mark.timeout(1500)


def _config(optimizer):
    from megatron.core.optimizer import OptimizerConfig

    from megatron_spectra.megatron.config import SpectraOptimizerConfig

    common = dict(lr=LR, weight_decay=0.1, clip_grad=1.0, use_distributed_optimizer=True, adam_eps=1e-6)
    if optimizer == "adam":
        return OptimizerConfig(optimizer="adam", **common)
    # A warmup of AdEMAMix's alpha and beta3 makes its direction depend on the step count too.
    return SpectraOptimizerConfig(optimizer=f"spectra-{optimizer}", spectra_mode="accurate", spectra_clip_threshold=0.5,
                                  spectra_clip_schedule="constant", spectra_ademamix_warmup=10, **common)


def _run(optimizer, tp, steps, first_step=0, load_dir=None, hook=None, save_dir=None, fmt="fully_reshardable"):
    from megatron_spectra.megatron.testing import TinyGPT
    from megatron_spectra.megatron.train_loop import megatron_run

    out = megatron_run(_config(optimizer), TinyGPT(), tp, 1, steps, GLOBAL_BATCH, MICRO_BATCH, True,
                        hook=hook, first_step=first_step, load_dir=load_dir, save_dir=save_dir,
                        checkpoint_format=fmt)
    return {**out, "state": _fingerprint(out["optimizer"])}


def _fingerprint(optimizer):
    """Per state key, the sum of |x| over this rank's shards, and the step counts: equal at
    the same layout iff the moments went on as without the interruption."""
    states = optimizer.chained_optimizers[0].optimizer.state.values()
    keys = {k for s in states for k in s if k != "step"}
    sums = {k: sum(s[k].double().abs().sum().item() for s in states) for k in keys}
    return {**sums, "step": sorted({int(s["step"]) for s in states})}


def _save_at(step_to_save, path, also_dp_format=False):
    """Before `step_to_save`, i.e. with the state after that many steps: a checkpoint at
    `path` (fully_reshardable) and, if asked, at `path`-dp (dp_reshardable, Megatron-LM's default)."""
    def hook(step, model, optimizer):
        from megatron_spectra.megatron.train_loop import save_checkpoint

        if step == step_to_save:
            save_checkpoint(model, optimizer, path)
            if also_dp_format:
                save_checkpoint(model, optimizer, path + "-dp", "dp_reshardable")

    return hook


def _moments(out):
    """This rank's shard of the main params and moments, by parameter name, and the step."""
    dopt = out["optimizer"].chained_optimizers[0]
    names = {p: n for n, p in out["model"].module.named_parameters()}
    # numpy, not tensors: torch sends tensors between processes by file descriptor, which is
    # gone once the child has exited.
    shards = {names[p]: {k: v.detach().numpy().copy() for k, v in dopt._get_main_param_and_optimizer_states(p).items() if k != "step"}
              for p in dopt.model_param_group_index_map}
    steps = {int(s["step"]) for s in dopt.optimizer.state.values()}
    return shards, steps


def _write(rank, world, root):
    import warnings

    warnings.filterwarnings("ignore")
    from megatron_spectra.megatron.cpu import megatron_on_cpu

    with megatron_on_cpu():
        runs = {b: _run(b, WRITE_TP, STEPS, hook=_save_at(SAVE_AT, os.path.join(root, b), b == DP_FORMAT_BASE)) for b in BASES}
        losses = {b: r["losses"] for b, r in runs.items()}
        states = {b: r["state"] for b, r in runs.items()}
        adam = _run("adam", WRITE_TP, SAVE_AT, save_dir=os.path.join(root, "adam"))  # megatron-core's own
        return {"losses": losses, "states": states, "adam": _moments(adam)[0]}


class _Messages(logging.Handler):
    def __init__(self):
        super().__init__(logging.INFO)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def _resume(rank, world, root):
    import warnings

    warnings.filterwarnings("ignore")
    from megatron_spectra.megatron.checkpoint import CheckpointMismatch, check_loadable
    from megatron_spectra.megatron.cpu import megatron_on_cpu

    out = {"same": {}, "states": {}, "reshard": {}, "refused": {}}
    with megatron_on_cpu():
        for b in BASES:
            path = os.path.join(root, b)
            # At the same layout, one base resumes from Megatron-LM's default format instead.
            same = dict(load_dir=path + "-dp", fmt="dp_reshardable") if b == DP_FORMAT_BASE else dict(load_dir=path)
            resumed = _run(b, WRITE_TP, STEPS, SAVE_AT, **same)
            out["same"][b], out["states"][b] = resumed["losses"], resumed["state"]
            out["reshard"][b] = _run(b, RESHARD_TP, STEPS, SAVE_AT, path)["losses"]
        handler = _Messages()
        logging.getLogger("megatron_spectra.megatron.checkpoint").addHandler(handler)
        loaded = _run("adamw", WRITE_TP, SAVE_AT, SAVE_AT, os.path.join(root, "adam"))  # load, no step
        out["from_adam"], out["from_adam_steps"] = _moments(loaded)
        out["messages"] = handler.messages
        for b, source in (("signum", "adam"), ("ademamix", "adam"), ("signum", "adamw")):
            try:
                check_loadable(os.path.join(root, source), b)
            except CheckpointMismatch as e:
                out["refused"][(b, source)] = str(e)
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("ckpt"))
    written = run_distributed(_write, 4, args=(root,), timeout=900)
    resumed = run_distributed(_resume, 4, args=(root,), timeout=900)
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
            assert np.abs(saved["exp_avg_sq"]).sum() > 0
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
