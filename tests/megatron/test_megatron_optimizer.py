"""Spectra optimizers inside real megatron-core (0.16.1) on CPU processes under gloo."""

import math

import pytest
import torch

pytest.importorskip("megatron.core")

from megatron_spectra.launch.spawn import run_distributed  # noqa: E402

STEPS, GLOBAL_BATCH, MICRO_BATCH, LR, C = 10, 8, 2, 1e-3, 0.5


def _spectra_config(base, distributed, **overrides):
    from megatron_spectra.megatron.config import SpectraOptimizerConfig

    kwargs = dict(
        optimizer=f"spectra-{base}", lr=LR, weight_decay=0.1, clip_grad=1.0, use_distributed_optimizer=distributed,
        spectra_mode="accurate", spectra_clip_threshold=C, spectra_clip_schedule="constant",
    )
    return SpectraOptimizerConfig(**{**kwargs, **overrides})


def _megatron(rank, world, base, tp, pp, distributed, overrides=None, hook=None):
    import warnings

    warnings.filterwarnings("ignore")
    from megatron_spectra.megatron.cpu import megatron_on_cpu
    from megatron_spectra.megatron.testing import TinyGPT
    from megatron_spectra.megatron.train_loop import megatron_run

    with megatron_on_cpu():
        out = megatron_run(_spectra_config(base, distributed, **(overrides or {})), TinyGPT(), tp, pp, STEPS,
                           GLOBAL_BATCH, MICRO_BATCH, distributed, hook=hook)
        return {"losses": out["losses"], "successes": out["successes"], "record": getattr(hook, "record", None)}


def _reference(rank, world, base):
    import warnings

    warnings.filterwarnings("ignore")
    from megatron_spectra.megatron.cpu import megatron_on_cpu
    from megatron_spectra.megatron.testing import TinyGPT
    from megatron_spectra.megatron.train_loop import reference_run

    kwargs = dict(base=base, lr=LR, weight_decay=0.1, clip_threshold=C, clip_schedule="constant", mode="accurate")
    with megatron_on_cpu():
        return reference_run(TinyGPT(), STEPS, GLOBAL_BATCH, kwargs, clip_grad=1.0, weight_decay=0.1)


_REFERENCE = {}


def reference(base):
    if base not in _REFERENCE:
        _REFERENCE[base] = run_distributed(_reference, 1, args=(base,), timeout=300)[0]
    return _REFERENCE[base]


def assert_same_losses(got, want, tol=1e-4):
    assert len(got) == len(want)
    errors = [abs(a - b) / abs(b) for a, b in zip(got, want)]
    assert max(errors) <= tol, [f"{e:.1e}" for e in errors]


@pytest.mark.parametrize(
    "tp, pp, dp, distributed",
    [(1, 1, 1, True), (2, 1, 2, True), (1, 1, 4, True), (2, 2, 1, True), (2, 1, 2, False), (2, 2, 1, False)],
    ids=lambda v: str(v),
)
def test_spectra_adamw_matches_the_reference_at_every_layout(tp, pp, dp, distributed):
    results = run_distributed(_megatron, tp * pp * dp, args=("adamw", tp, pp, distributed), timeout=600)
    for result in results:
        assert all(result["successes"])
        assert_same_losses(result["losses"], reference("adamw"))


@pytest.mark.parametrize("base", ["signum", "ademamix"])
def test_other_bases_match_the_reference(base):
    results = run_distributed(_megatron, 4, args=(base, 2, 1, True), timeout=600)
    assert_same_losses(results[0]["losses"], reference(base))


class _BoundCheck:
    """Before each step, remember the weights; after it, measure each applied matrix step."""

    def __init__(self):
        self.before, self.record = None, []

    def __call__(self, step, model, optimizer):
        from megatron.core import parallel_state

        params = dict(model.module.named_parameters())
        if self.before is not None:
            tp = parallel_state.get_tensor_model_parallel_world_size()
            group = parallel_state.get_tensor_model_parallel_group()
            for name, old in self.before.items():
                p = params[name]
                step_ = (1 - LR * (0.1 if p.ndim == 2 else 0.0)) * old - p.detach()
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


def test_every_applied_matrix_step_is_within_lr_alpha_c():
    results = run_distributed(_megatron, 4, args=("adamw", 2, 1, True, {"clip_grad": 0.0}, _BoundCheck()), timeout=600)
    bounds = [b for r in results for b in r["record"]]
    assert bounds and max(bounds) <= 1 + 1e-4, max(bounds)
    assert max(bounds) > 0.5  # the clip is active in this run, so the check means something


@pytest.mark.parametrize("policy", ["skip", "raise"])
def test_a_nan_gradient_on_one_rank_skips_everywhere_or_raises(policy):
    from megatron_spectra.launch.spawn import DistributedFailure

    args = ("adamw", 2, 1, True, {"spectra_nonfinite": policy, "clip_grad": 0.0}, _NaNAtStep3())
    if policy == "raise":
        with pytest.raises(DistributedFailure, match="non-finite gradient"):
            run_distributed(_megatron, 4, args=args, timeout=600)
        return
    results = run_distributed(_megatron, 4, args=args, timeout=600)
    for r in results:
        assert r["successes"] == [True] * 3 + [False] + [True] * (STEPS - 4)
        assert all(math.isfinite(x) for x in r["losses"])
        weights_before_step3, weights_after_step3, weights_after_step4 = r["record"]
        assert weights_after_step3 == weights_before_step3  # the skipped step changed nothing
        assert weights_after_step4 != weights_after_step3  # and training went on


class _NaNAtStep3:
    """At step 3, rank 1's first weight gets a NaN gradient during the backward; every rank
    records a fingerprint of its weights before steps 3, 4 and 5."""

    def __init__(self):
        self.record = []

    def __call__(self, step, model, optimizer):
        if step in (3, 4, 5):
            self.record.append([p.detach().double().sum().item() for p in model.module.parameters()])
        if step != 3 or torch.distributed.get_rank() != 1:
            return
        weight = next(p for p in model.module.parameters() if p.ndim == 2)
        handle = None

        def poison(grad):
            handle.remove()
            grad = grad.clone()
            grad.view(-1)[0] = float("nan")
            return grad

        handle = weight.register_hook(poison)
