"""What the FSDP tests run inside spawned gloo processes: one launch per world size.

Process start-up (a torch import per process, on a 2-core machine) costs more than any of
these tiny cases, so every 4-rank case runs in one set of processes (`four_rank_suite`) and
every 2-rank case in another (`two_rank_suite`); the tests read their parts of the results.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from tests.support.fsdp import Run, train

# ----------------------------------------------------------------------------- placements


def _numbered(*shape) -> nn.Parameter:
    return nn.Parameter(torch.arange(torch.Size(shape).numel(), dtype=torch.float32).reshape(shape))


def _layouts(world: int) -> dict:
    """name -> DTensor parameter, for every layout torch 2.13 gives FSDP2 / HSDP / TP."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    def linears(*shapes):
        model = nn.Sequential(*(nn.Linear(i, o) for o, i in shapes))
        for layer in model:
            layer.weight, layer.bias = _numbered(*layer.weight.shape), _numbered(*layer.bias.shape)
        return model

    params = {}
    flat = init_device_mesh("cpu", (world,))
    fsdp = linears((3, 8), (5, 3), (16, 5), (2, 16))  # 1 row per rank, uneven, even, empty shards
    fully_shard(fsdp, mesh=flat)
    params.update({f"fsdp.{n}": p for n, p in fsdp.named_parameters()})
    mesh = init_device_mesh("cpu", (2, world // 2), mesh_dim_names=("dp", "tp"))
    hsdp = linears((5, 8))
    fully_shard(hsdp, mesh=mesh)
    params.update({f"hsdp.{n}": p for n, p in hsdp.named_parameters()})
    tp = linears((6, 8), (8, 6), (2, 8), (3, 8))  # colwise, rowwise, colwise with an empty shard, no TP
    parallelize_module(tp, mesh["tp"], {"0": ColwiseParallel(), "1": RowwiseParallel(), "2": ColwiseParallel()})
    fully_shard(tp, mesh=mesh["dp"])
    params.update({f"fsdp_tp.{n}": p for n, p in tp.named_parameters()})
    for name, shape, mesh_, placements in [
        ("rowwise_only", (6, 8), flat, [Shard(1)]),
        ("replicated", (4, 6), flat, [Replicate()]),
        ("rows_twice", (7, 3), mesh, [Shard(0), Shard(0)]),
        ("rows_and_cols", (5, 4), mesh, [Shard(0), Shard(1)]),
        ("conv", (5, 2, 3), flat, [Shard(0)]),
    ]:
        params[name] = distribute_tensor(_numbered(*shape).detach(), mesh_, placements)
    return params


def check_layouts(rank, world) -> dict:
    """Every layout's engine placement cuts exactly the local shard out of full_tensor()."""
    from megatron_spectra.fsdp import engine_placement

    report = {}
    for name, t in _layouts(world).items():
        full = t.full_tensor()
        kinds = ["matrix"] + (["vector"] if not any(getattr(p, "dim", 0) == 1 for p in t.placements) else [])
        for kind in kinds:
            p = engine_placement(t, name, kind)
            got, want = t.to_local().reshape(-1), p.piece_of(full)
            assert torch.equal(got, want), f"{name} ({kind}) on rank {rank}: {p}"
        report[name] = (str(t.placements), tuple(t.to_local().shape))
    return report


def unsupported(rank, world) -> dict:
    """Each unsupported layout: the message every rank raises (after agreeing: none hangs)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Partial, Shard, distribute_tensor

    from megatron_spectra.fsdp import FSDPSpectra, UnsupportedPlacement

    mesh = init_device_mesh("cpu", (world,))
    good = nn.Parameter(distribute_tensor(torch.randn(4, 4), mesh, [Shard(0)]))
    cases = {
        "uneven_columns": lambda: distribute_tensor(torch.randn(4, 3), mesh, [Shard(1)]),
        "partial": lambda: DTensor.from_local(torch.randn(4, 4), mesh, [Partial()]),
        "dim2": lambda: distribute_tensor(torch.randn(2, 2, 4), mesh, [Shard(2)]),
    }
    messages = {}
    for case, make in cases.items():
        try:
            FSDPSpectra([("layers.0.good", good), ("layers.0.bad", nn.Parameter(make()))])
        except UnsupportedPlacement as e:
            messages[case] = str(e)
    return messages


# ----------------------------------------------------------------------------- uneven and empty shards

UNEVEN_STEPS = 4
UNEVEN_OPTIONS = dict(lr=3e-2, clip_threshold=0.5, track_update_norms=True, weight_decay=0.1)


def uneven_model():
    torch.manual_seed(3)
    # rows per rank at 4 ranks: 3 -> 1,1,1,0; 5 -> 2,2,1,0; 2 -> 1,1,0,0 (and under TP: 1 row per block)
    return nn.Sequential(nn.Linear(8, 3), nn.Linear(3, 5), nn.Linear(5, 2), nn.Linear(2, 8))


def _uneven_data(step):
    gen = torch.Generator().manual_seed(step)
    return torch.randn(8, 8, generator=gen), torch.randn(8, 8, generator=gen)


def uneven(rank, world, layout: str, options: tuple = ()):
    """4 steps of the uneven model; returns the full params, update norms and clip-group size."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    from megatron_spectra.fsdp import FSDPSpectra

    model = uneven_model()
    if layout == "fsdp":
        mesh, dp_rank, dp_size = init_device_mesh("cpu", (world,)), rank, world
    elif layout == "fsdp_tp":
        full = init_device_mesh("cpu", (world // 2, 2), mesh_dim_names=("dp", "tp"))
        parallelize_module(model, full["tp"], {"2": ColwiseParallel(), "3": RowwiseParallel()})
        mesh, dp_rank, dp_size = full["dp"], full["dp"].get_local_rank(), world // 2
    else:  # plain tensors, gradients averaged by hand (DDP): replicated over the world
        mesh, dp_rank, dp_size = None, rank, world
    if mesh is not None:
        for layer in model:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
    opt = FSDPSpectra(model.named_parameters(), **UNEVEN_OPTIONS, **dict(options))
    for step in range(UNEVEN_STEPS):
        x, y = _uneven_data(step)
        loss = (model(x.chunk(dp_size)[dp_rank]) - y.chunk(dp_size)[dp_rank]).square().mean()
        loss.backward()
        if mesh is None:
            for p in model.parameters():
                dist.all_reduce(p.grad, op=dist.ReduceOp.AVG)
        opt.step()
        opt.zero_grad()
    # numpy: torch tensors would travel back as shared memory that dies with this process
    params = {n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().numpy() for n, p in model.named_parameters()}
    return params, opt.last_update_norms, dist.get_world_size(opt._clip_group)


def uneven_reference(options: tuple = ()):
    from tests.support.fsdp import FSDP_ONLY
    from megatron_spectra.optim import Spectra

    model = uneven_model()
    opt = Spectra(model.named_parameters(), **UNEVEN_OPTIONS, **{k: v for k, v in options if k not in FSDP_ONLY})
    for step in range(UNEVEN_STEPS):
        x, y = _uneven_data(step)
        (model(x) - y).square().mean().backward()
        opt.step()
        opt.zero_grad()
    return {n: p.detach() for n, p in model.named_parameters()}, opt.last_update_norms


# paper mode rounds the Gram in bf16, so a Gram summed from shards differs from the whole
# matrix's at bf16 precision: the Gram case compares in accurate (fp32) mode
UNEVEN_CASES = {
    "fsdp": ("fsdp", ()),
    "fsdp-gram-accurate": ("fsdp", (("strategy", "gram"), ("mode", "accurate"))),
    "fsdp_tp": ("fsdp_tp", ()),
    "plain": ("plain", ()),
}

# ----------------------------------------------------------------------------- the suites


def four_rank_runs(checkpoints: str) -> dict[str, Run]:
    """The 4-rank training runs; two of them save a DCP checkpoint after step 5."""
    return {
        "fsdp4-adamw": Run("fsdp", "adamw", save_at=5, path=f"{checkpoints}/fsdp4"),
        "hsdp2x2-adamw": Run("hsdp", "adamw"),
        "fsdp2xtp2-adamw": Run("fsdp_tp", "adamw", save_at=5, path=f"{checkpoints}/fsdp2xtp2"),
        "fsdp2xtp2-signum-gram": Run("fsdp_tp", "signum", options=(("strategy", "gram"),)),
        "hsdp2x2-ademamix-preclip": Run("hsdp", "ademamix", options=(("pre_clip", True),)),
        # the official options (issue 11): a decay type with a final scale and a pre-clip ramp; normalize
        "fsdp2xtp2-adamw-official-options": Run("fsdp_tp", "adamw", options=(
            ("clip_schedule", "wsd-cosine"), ("clip_final_scale", 0.2), ("decay_fraction", 0.5), ("total_steps", 10),
            ("pre_clip", True), ("pre_clip_schedule", "linear"), ("pre_clip_threshold_end", 0.05))),
        "fsdp4-adamw-normalize": Run("fsdp", "adamw", options=(("post_process", "normalize"), ("ns_fp32", True), ("strategy", "owner"))),
        "fsdp4-nan-skip": Run("fsdp", "adamw", stop=6, nan_at=3, options=(("nonfinite", "skip"),)),
    }


def two_rank_runs(checkpoints: str) -> dict[str, Run]:
    """The 2-rank runs: FSDP2 from scratch, and both 4-rank checkpoints resumed at 2 ranks."""
    return {
        "fsdp2-adamw": Run("fsdp", "adamw"),
        "resume-fsdp4-as-fsdp2": Run("fsdp", "adamw", start=5, path=f"{checkpoints}/fsdp4"),
        "resume-fsdp2xtp2-as-fsdp2": Run("fsdp", "adamw", start=5, path=f"{checkpoints}/fsdp2xtp2"),
    }


def four_rank_suite(rank, world, checkpoints: str) -> dict:
    out = {"layouts": check_layouts(rank, world), "unsupported": unsupported(rank, world)}
    out["uneven"] = {name: uneven(rank, world, *case) for name, case in UNEVEN_CASES.items()}
    out["runs"] = {name: train(rank, world, run) for name, run in four_rank_runs(checkpoints).items()}
    out["bench"] = bench_worker(rank, world, TINY_BENCH)
    return out


TINY_BENCH = dict(
    world=4, layout="fsdp", model=dict(dim=32, n_layers=1, n_heads=4, ffn_dim=64, vocab=64, seq=16), batch=8,
    mode="paper", strategy="auto", threshold=10.0, repeats=1, threads=1, device="cpu",
)


def bench_worker(rank, world, cfg):
    from megatron_spectra.bench.fsdp import _worker

    return _worker(rank, world, cfg)


def two_rank_suite(rank, world, checkpoints: str) -> dict:
    out = {"runs": {name: train(rank, world, run) for name, run in two_rank_runs(checkpoints).items()}}
    if torchtitan_available():
        from tests.support.torchtitan_workers import torchtitan_suite

        out["torchtitan"] = torchtitan_suite(rank, world, f"{checkpoints}/torchtitan")
    return out


def torchtitan_available() -> bool:
    try:
        import torchtitan.components.optimizer  # noqa: F401
    except ImportError:
        return False
    return True
