"""The Python API's edge cases: each a correct behaviour or an early error naming the problem."""

import pytest
import torch

from megatron_spectra import NonFiniteError, Spectra
from megatron_spectra.launch.spawn import run_distributed


def zero_gradient_entries(p):
    """A gradient with a zero column: with eps = 0, AdamW's U there is 0/0."""
    p.grad = torch.ones_like(p)
    p.grad[:, 0] = 0


# --------------------------------------------------------------------------- non-finite directions


@pytest.mark.parametrize("mode", ["paper", "accurate"])
def test_a_nonfinite_direction_from_finite_gradients_is_skipped(mode):
    p = torch.nn.Parameter(torch.randn(4, 6))
    before = p.detach().clone()
    opt = Spectra([p], lr=0.1, eps=0.0, mode=mode, nonfinite="skip")
    zero_gradient_entries(p)
    opt.step()  # accurate mode used to raise the operator's ValueError here
    assert torch.equal(p.detach(), before)
    assert (opt.skipped_steps, opt.spectra_step) == (1, 0)


@pytest.mark.parametrize("mode", ["paper", "accurate"])
def test_a_nonfinite_direction_raises_naming_the_parameter_and_the_cause(mode):
    layer = torch.nn.Linear(6, 4, bias=False)
    before = layer.weight.detach().clone()
    opt = Spectra(layer.named_parameters(), lr=0.1, eps=0.0, mode=mode)
    zero_gradient_entries(layer.weight)
    with pytest.raises(NonFiniteError, match=r"non-finite direction in parameter\(s\) \['weight'\] from finite gradients: adamw with eps=0"):
        opt.step()
    assert torch.equal(layer.weight.detach(), before)


def test_fp16_eps_underflow_is_named_not_blamed_on_paper_mode():
    p = torch.nn.Parameter(torch.randn(3, 4).half())
    opt = Spectra([p], lr=0.1)
    zero_gradient_entries(p)
    with pytest.raises(NonFiniteError, match=r"direction .* eps=1e-08 is 0 in torch\.float16") as err:
        opt.step()
    assert "accurate" not in str(err.value)


def test_a_paper_mode_overflow_of_a_finite_direction_points_at_accurate_mode():
    # c = 1e-25: c² is 0 in bf16/fp32, so the official I + UUᵀ/c² is inf; accurate mode clips it.
    for mode in ("paper", "accurate"):
        p = torch.nn.Parameter(torch.randn(4, 6))
        opt = Spectra([p], lr=0.1, clip_threshold=1e-25, clip_schedule="constant", mode=mode)
        p.grad = torch.randn(4, 6)
        if mode == "paper":
            with pytest.raises(NonFiniteError, match=r"non-finite update .* from a finite direction: paper mode's one bf16 "
                                                     r"Newton-Schulz .*\(c_k = 1e-25; mode='accurate'"):
                opt.step()
        else:
            before = p.detach().clone()
            opt.step()
            torch.testing.assert_close(torch.linalg.matrix_norm(before - p.detach(), ord=2), torch.tensor(0.1 * 1e-25))


def _fsdp_direction_worker(rank, world):
    """FSDPSpectra (engine clips over 2 ranks) with eps = 0 and a zero gradient column, per
    mode and nonfinite setting: weights unchanged, counts and errors."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from megatron_spectra.fsdp.optimizer import FSDPSpectra

    out = {}
    for mode in ("paper", "accurate"):
        for nonfinite in ("skip", "raise"):
            torch.manual_seed(0)
            model = torch.nn.Linear(6, 8, bias=False)
            fully_shard(model, mesh=init_device_mesh("cpu", (world,)))
            opt = FSDPSpectra(model.named_parameters(), lr=0.1, eps=0.0, mode=mode, nonfinite=nonfinite)
            before = model.weight.full_tensor().clone()
            x = torch.randn(5, 6)
            x[:, 0] = 0  # weight column 0 gets a zero gradient on every rank: U = 0/0 there
            model(x).sum().backward()
            try:
                opt.step()
                error = None
            except NonFiniteError as e:
                error = str(e)
            unchanged = torch.equal(model.weight.full_tensor(), before)
            out[mode, nonfinite] = dict(error=error, unchanged=unchanged, counts=(opt.spectra_step, opt.skipped_steps))
    return out


def test_fsdp_a_nonfinite_direction_is_skipped_or_raised_on_every_rank():
    for result in run_distributed(_fsdp_direction_worker, 2, timeout=180):
        for mode in ("paper", "accurate"):
            skipped, raised = result[mode, "skip"], result[mode, "raise"]
            assert skipped["unchanged"] and skipped["counts"] == (0, 1) and skipped["error"] is None
            assert raised["unchanged"] and raised["counts"] == (0, 0)
            assert "non-finite direction in parameter(s) ['weight'] from finite gradients: adamw with eps=0" in raised["error"]


# --------------------------------------------------------------------------- shapes, layouts, state


def test_an_empty_parameter_is_left_alone():
    model = torch.nn.ModuleDict(dict(empty=torch.nn.Linear(5, 0, bias=False), tall=torch.nn.Linear(0, 5, bias=False),
                                     real=torch.nn.Linear(5, 3, bias=False)))
    twin = torch.nn.Linear(5, 3, bias=False)
    twin.weight.data.copy_(model["real"].weight)
    opt = Spectra(model.named_parameters(), lr=0.1, track_update_norms=True)
    alone = Spectra(twin.parameters(), lr=0.1)
    for _ in range(2):
        for p in model.parameters():
            p.grad = torch.ones_like(p)
        twin.weight.grad = torch.ones_like(twin.weight)
        opt.step()
        alone.step()
    assert model["empty"].weight.shape == (0, 5) and model["tall"].weight.shape == (5, 0)
    assert torch.equal(model["real"].weight, twin.weight)
    assert opt.last_update_norms["empty.weight"] == (0.0, 0.0)


def test_a_sparse_gradient_is_a_type_error_naming_the_parameter():
    emb = torch.nn.Embedding(5, 3, sparse=True)
    opt = Spectra(emb.named_parameters(), lr=0.1)
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(TypeError, match=r"parameter weight has a sparse gradient .*sparse=False"):
        opt.step()


def _stepped(base, **kwargs):
    layer = torch.nn.Linear(6, 4, bias=False)
    opt = Spectra(layer.parameters(), base=base, lr=0.1, **kwargs)
    layer.weight.grad = torch.randn(4, 6)
    opt.step()
    return layer, opt


@pytest.mark.parametrize("saved, loading", [("signum", "adamw"), ("adamw", "ademamix"), ("ademamix", "lion")])
def test_loading_another_base_is_refused_naming_both(saved, loading):
    _, written = _stepped(saved)
    assert all(g["spectra_base"] == saved for g in written.state_dict()["param_groups"])
    layer, opt = _stepped(loading)
    before = (layer.weight.detach().clone(), opt.state_dict())
    with pytest.raises(ValueError, match=f"written by SPECTRA over base '{saved}'.*base is '{loading}'"):
        opt.load_state_dict(written.state_dict())
    assert torch.equal(layer.weight, before[0]) and opt.state_dict()["param_groups"] == before[1]["param_groups"]
    opt.step()  # still usable


def test_an_old_state_dict_without_the_base_name_is_told_by_its_moments():
    _, signum = _stepped("signum")
    old = signum.state_dict()
    for g in old["param_groups"]:
        del g["spectra_base"]
    _, adamw = _stepped("adamw")
    with pytest.raises(ValueError, match=r"moments \['momentum_buffer'\] \(base 'signum' or 'sgd-momentum'\).*'adamw' keeps"):
        adamw.load_state_dict(old)
    _, same = _stepped("signum")
    same.load_state_dict(old)  # the same base: loads, and names its base from now on
    assert same.param_groups[0]["spectra_base"] == "signum" and same.spectra_step == 1
    same.step()
    layer = torch.nn.Linear(6, 4, bias=False)  # a plain torch AdamW's state: the same moments
    torch_adamw = torch.optim.AdamW(layer.parameters())
    layer.weight.grad = torch.randn(4, 6)
    torch_adamw.step()
    Spectra(layer.parameters(), lr=0.1).load_state_dict(torch_adamw.state_dict())


# --------------------------------------------------------------------------- lr 0 and the threshold warm-up


def test_lr_zero_with_a_threshold_warmup_is_refused_at_construction():
    w = torch.nn.Parameter(torch.randn(4, 6))
    with pytest.raises(ValueError, match=r"lr=0 with warmup_steps=5: .* c_k would be 0"):
        Spectra([w], lr=0.0, warmup_steps=5)
    Spectra([w], lr=0.0, warmup_steps=5, clip_schedule="constant")  # no warm-up rule: fine
    Spectra([w], lr=0.0)  # no warm-up: fine (a frozen optimizer)


def test_group_lr_max_comes_from_peak_lr_and_a_zero_one_is_named_when_it_moves():
    w, v = torch.nn.Parameter(torch.randn(4, 6)), torch.nn.Parameter(torch.randn(4, 6))
    opt = Spectra([dict(params=[w], lr=0.0, peak_lr=0.02), dict(params=[v], lr=0.0)], lr=0.0, warmup_steps=5,
                  threshold_base_lr="group", clip_threshold=1.0)
    w.grad, v.grad = torch.randn(4, 6), torch.randn(4, 6)
    opt.param_groups[0]["lr"] = 0.004
    opt.step()  # group 1 sits at lr 0: it does not move, and needs no lr_max
    assert opt.last_threshold == pytest.approx(1.0 * 0.02 / 0.004)
    opt.param_groups[1]["lr"] = 0.004
    with pytest.raises(ValueError, match=r"param group 1 moves \(lr=0.004\) in the threshold warm-up, but its lr_max is 0 \(its peak_lr\)"):
        opt.step()
