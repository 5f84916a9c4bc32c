"""Spectra optimizers inside real megatron-core (0.16.1) on CPU processes under gloo, driven by
the built-in trainer (`megatron_spectra.train`) with a tiny GPT, against the single-process
reference `Spectra` on the same data.

Two launches serve every test (process start-up dominates a tiny run): one process runs the
TP=1 x DP=1 case and the references, four processes run every other case one after another.
"""

import math

import pytest
import torch

pytest.importorskip("megatron.core")

from megatron_spectra.launch.spawn import run_distributed  # noqa: E402
from tests.support.megatron import NamedWeights, NaNGradient, Record, reference, tiny_gpt, train  # noqa: E402

STEPS, GLOBAL_BATCH, MICRO_BATCH, LR, C = 10, 8, 2, 1e-3, 0.5
BASES = ("adamw", "signum", "ademamix")
LAYOUTS = [(1, 1, 1, True), (2, 1, 2, True), (1, 1, 4, True), (2, 2, 1, True), (2, 1, 2, False), (2, 2, 1, False)]

# Thirteen short trainings in two launches; on 2 busy cores they outlast the default timeout.
pytestmark = pytest.mark.timeout(1500)


def _flags(base, distributed, clip_grad=1.0, nonfinite="skip"):
    flags = (f"--optimizer spectra-{base} --lr {LR} --weight-decay 0.1 --clip-grad {clip_grad} --spectra-mode accurate "
             f"--spectra-clip-threshold {C} --spectra-clip-schedule constant --spectra-nonfinite {nonfinite}").split()
    return flags + (["--use-distributed-optimizer"] if distributed else [])


# The official options through TP2 x ZeRO-2: a cosine decay to 0.2·c over the last half, and
# pre-clipping (issue 11); against the reference with the same settings.
FIDELITY = ("--spectra-clip-schedule wsd-cosine --spectra-clip-final-scale 0.2 --spectra-decay-fraction 0.5 "
            "--spectra-pre-clip --spectra-pre-clip-threshold 0.05").split()
FIDELITY_KWARGS = dict(clip_schedule="wsd-cosine", clip_final_scale=0.2, decay_fraction=0.5, total_steps=STEPS,
                       pre_clip=True, pre_clip_threshold=0.05)


def _layout_name(tp, pp, dp, distributed):
    return f"tp{tp}-pp{pp}-dp{dp}" + ("" if distributed else "-ddp")


def _cases(world: int) -> dict:
    """name -> (argv, the on_step hook's extra check or None)."""
    cases = {}
    for tp, pp, dp, distributed in LAYOUTS:
        if tp * pp * dp == world:
            cases[f"adamw-{_layout_name(tp, pp, dp, distributed)}"] = (tp, pp, _flags("adamw", distributed), None)
    if world == 4:
        for base in ("signum", "ademamix"):
            cases[f"{base}-tp2-pp1-dp2"] = (2, 1, _flags(base, True), None)
        cases["fidelity-tp2-pp1-dp2"] = (2, 1, _flags("adamw", True) + FIDELITY, None)
        cases["bound"] = (2, 1, _flags("adamw", True, clip_grad=0.0), _BoundCheck)
        cases["nan-skip"] = (2, 1, _flags("adamw", True, clip_grad=0.0), NaNGradient)
        cases["nan-raise"] = (2, 1, _flags("adamw", True, clip_grad=0.0, nonfinite="raise"), NaNGradient)  # last: it fails
    return cases


def _trainings(rank, world, workdir):
    out = {}
    if world == 1:
        kwargs = dict(clip_threshold=C, clip_schedule="constant", mode="accurate")  # lr, decay: from the flags
        for base in BASES:
            argv = tiny_gpt(workdir, f"reference-{base}", steps=STEPS, global_batch=GLOBAL_BATCH, micro_batch=MICRO_BATCH)
            out[f"reference-{base}"] = reference(argv + _flags(base, True), dict(kwargs, base=base))
        argv = tiny_gpt(workdir, "reference-fidelity", steps=STEPS, global_batch=GLOBAL_BATCH, micro_batch=MICRO_BATCH)
        out["reference-fidelity"] = reference(argv + _flags("adamw", True) + FIDELITY, dict(kwargs, **FIDELITY_KWARGS))
    for name, (tp, pp, flags, check) in _cases(world).items():
        argv = tiny_gpt(workdir, name, tp=tp, pp=pp, steps=STEPS, global_batch=GLOBAL_BATCH, micro_batch=MICRO_BATCH)
        extra = check() if check is not None else None
        record = Record(also=extra)
        try:
            train(argv + flags, init_model=NamedWeights(), on_step=record)
        except Exception as error:  # noqa: BLE001 -- the raise policy's error is the result
            out[name] = {"error": f"{type(error).__name__}: {error}"}
            continue
        out[name] = {**record.result(), "checked": getattr(extra, "record", getattr(extra, "weights", None))}
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("trainer"))
    single = run_distributed(_trainings, 1, args=(workdir,), timeout=900)
    four = run_distributed(_trainings, 4, args=(workdir,), timeout=1200)
    return {"single": single, "four": four}


def _results(runs, name):
    return runs["single"] if name in runs["single"][0] else runs["four"]


def assert_same_losses(got, want, tol=1e-4):
    assert len(got) == len(want)
    errors = [abs(a - b) / abs(b) for a, b in zip(got, want)]
    assert max(errors) <= tol, [f"{e:.1e}" for e in errors]


@pytest.mark.parametrize("tp, pp, dp, distributed", LAYOUTS, ids=lambda v: str(v))
def test_spectra_adamw_matches_the_reference_at_every_layout(runs, tp, pp, dp, distributed):
    name = f"adamw-{_layout_name(tp, pp, dp, distributed)}"
    want = runs["single"][0]["reference-adamw"]
    for result in _results(runs, name):
        assert all(result[name]["successes"])
        assert_same_losses(result[name]["losses"], want)


@pytest.mark.parametrize("base", ["signum", "ademamix"])
def test_other_bases_match_the_reference(runs, base):
    assert_same_losses(runs["four"][0][f"{base}-tp2-pp1-dp2"]["losses"], runs["single"][0][f"reference-{base}"])


def test_the_official_options_match_the_reference_through_tp_and_zero(runs):
    want = runs["single"][0]["reference-fidelity"]
    assert_same_losses(runs["four"][0]["fidelity-tp2-pp1-dp2"]["losses"], want)
    assert tuple(want) != tuple(runs["single"][0]["reference-adamw"])  # the options change the run


def test_the_bases_train_differently(runs):
    """Guards the two tests above: equal losses mean the right base, not that it does not matter."""
    references = [tuple(runs["single"][0][f"reference-{base}"]) for base in BASES]
    assert len(set(references)) == len(BASES)


class _BoundCheck:
    """After each step (and at the start), remember the weights; measure each applied matrix step."""

    def __init__(self):
        self.before, self.record = None, []

    def __call__(self, trainer, _record):
        from megatron.core import parallel_state

        params = dict(trainer.model.module.named_parameters())
        if self.before is not None:
            tp = parallel_state.get_tensor_model_parallel_world_size()
            group = parallel_state.get_tensor_model_parallel_group()
            for name, old in self.before.items():
                p = params[name]
                decayed = p.ndim == 2 and not getattr(p, "is_embedding_or_output_parameter", False)  # the paper's placement
                step_ = (1 - LR * (0.1 if decayed else 0.0)) * old - p.detach()
                full = _gather_tp(step_, p, tp, group)
                if p.ndim == 2:
                    shape = full.shape
                    alpha = math.sqrt(max(1.0, shape[0] / shape[1]))
                    self.record.append(torch.linalg.matrix_norm(full.double(), ord=2).item() / (LR * alpha * C))
        self.before = {n: p.detach().clone() for n, p in params.items()}


def _gather_tp(t, p, tp, group):
    if tp == 1 or not getattr(p, "tensor_model_parallel", False):
        return t
    pieces = [torch.empty_like(t) for _ in range(tp)]
    torch.distributed.all_gather(pieces, t.contiguous(), group=group)
    return torch.cat(pieces, dim=p.partition_dim)


def test_every_applied_matrix_step_is_within_lr_alpha_c(runs):
    bounds = [b for r in runs["four"] for b in r["bound"]["checked"]]
    assert len(bounds) == 4 * STEPS * 10  # per rank: 10 matrices (TP blocks joined) after every step
    assert max(bounds) <= 1 + 1e-4, max(bounds)
    assert max(bounds) > 0.5  # the clip is active in this run, so the check means something


def test_a_nan_gradient_on_one_rank_skips_everywhere(runs):
    for r in runs["four"]:
        result = r["nan-skip"]
        assert result["successes"] == [True] * 3 + [False] + [True] * (STEPS - 4)
        assert all(math.isfinite(x) for x in result["losses"])
        weights_before_step3, weights_after_step3, weights_after_step4 = result["checked"]
        assert weights_after_step3 == weights_before_step3  # the skipped step changed nothing
        assert weights_after_step4 != weights_after_step3  # and training went on


def test_a_nan_gradient_on_one_rank_raises_everywhere_with_the_raise_policy(runs):
    for r in runs["four"]:
        assert "non-finite gradient" in r["nan-raise"]["error"]
