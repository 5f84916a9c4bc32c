"""`spectra bench fsdp`: the optimizer step of Spectra-AdamW on an FSDP2 model.

    spectra bench fsdp [--world 4] [--layout fsdp] [--dim 256 --layers 4 --ffn 704 --vocab 2048]
                       [--mode paper] [--strategy auto] [--device cpu]

A LLaMA-style model (RMSNorm, SwiGLU, RoPE, untied embedding and output layer) is sharded
with FSDP2 (`--layout hsdp` or `fsdp_tp` for HSDP 2 x W/2 or FSDP W/2 x TP 2) on W local
processes (gloo on CPU; NCCL with `--device cuda`, one GPU per process). After one
forward/backward, every optimizer's `step()` is timed with the same gradients (a barrier
before and after each step, so the time is the slowest rank's):

- `torch.optim.AdamW` (its default foreach implementation): the floor;
- Spectra-AdamW (`megatron_spectra.fsdp.Spectra`): each full matrix clipped once through the
  distributed engine;
- Spectra-AdamW the way a naive port does it: every update all-gathered to every rank
  (`full_tensor()`), every full matrix clipped on every rank, the local piece kept.

Bytes per step and rank, sent + received: the engine's own count (`ClipStats`: all-to-all
bytes sent and received, plus the Gram / norm all-reduce payload counted once), against the
all-gather's 2 x (numel - local numel) x 4 for every clipped tensor (each rank receives what
it lacks and, in a ring, sends as much). Updates are fp32. With owners, the engine moves
about 4(W-1)/W^2 of the matrix bytes per rank, the all-gather 2(W-1)/W: half at W = 4.

On CPU, `--mode paper` (the optimizer's default: bf16 Newton-Schulz) measures mostly the
CPU's slow bf16 matmuls; `--mode accurate` (fp32) is the representative CPU number.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from . import publish
from torch.distributed.tensor import DTensor

from ..fsdp import FSDPSpectra
from ..fsdp.optimizer import DTensorClipper, local, shard_like
from ..optim.clipper import clip_update
from .models import LlamaConfig, TinyLlama, batch, loss_fn, param_groups, parallelize

OPTIMIZERS = ("torch AdamW", "Spectra-AdamW (engine)", "Spectra-AdamW (all-gather)")


class AllGatherClipper(DTensorClipper):
    """The naive port: all-gather every full update, clip it on every rank, keep the local piece."""

    bytes_moved = 0

    def clip(self, items, c, stage="update", also_check=()):
        outs, moved = [], 0
        for item in items:
            u = item.tensor
            if not isinstance(u, DTensor):
                outs.append(clip_update(u, c, item.kind, self.numerics))
                continue
            full = u.full_tensor()
            moved += 2 * 4 * (full.numel() - local(u).numel())  # received, and sent in a ring
            placement = self.placement(item.param, item.kind)
            clipped = clip_update(full, c, item.kind, self.numerics)
            outs.append(shard_like(u, placement.piece_of(clipped).view_as(local(u))))
        self.bytes_moved = moved
        return outs


class AllGatherSpectra(FSDPSpectra):
    """FSDPSpectra with the naive port's clip."""

    def _use_engine(self) -> None:
        super()._use_engine()
        self.clipper = AllGatherClipper(self.group, self._clip_group, self._placements, self.numerics)


def _build(name: str, model, cfg: dict):
    groups = param_groups(model)
    if name == OPTIMIZERS[0]:
        return torch.optim.AdamW(groups, lr=1e-3)
    options = dict(lr=1e-3, clip_threshold=cfg["threshold"], mode=cfg["mode"])
    if name == OPTIMIZERS[1]:
        return FSDPSpectra(groups, strategy=cfg["strategy"], **options)
    return AllGatherSpectra(groups, **options)


def _worker(rank: int, world: int, cfg: dict) -> dict:
    device = torch.device(cfg["device"], rank) if cfg["device"] == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    model_cfg = LlamaConfig(**cfg["model"])
    out = {}
    for name in OPTIMIZERS:
        model = TinyLlama(model_cfg).to(device)
        dp_rank, dp_size = parallelize(model, cfg["layout"], world, device.type)
        x, y = batch(0, model_cfg, cfg["batch"])
        loss_fn(model, x.chunk(dp_size)[dp_rank].to(device), y.chunk(dp_size)[dp_rank].to(device)).backward()
        opt = _build(name, model, cfg)
        seconds = _timed(opt.step, cfg["repeats"], device)
        out[name] = {"seconds": seconds, "bytes": _bytes(name, opt)}
        del opt, model
    out["numel"] = sum(p.numel() for p in TinyLlama(model_cfg).parameters())
    return out


def _bytes(name: str, opt) -> int:
    if name == OPTIMIZERS[1]:
        s = opt.clipper.stats
        return s.bytes_sent + s.bytes_received + s.allreduce_bytes
    if name == OPTIMIZERS[2]:
        return opt.clipper.bytes_moved
    return 0


def _timed(step, repeats: int, device) -> list[float]:
    """Seconds of `repeats` steps after a warm-up one, each between two barriers."""
    import torch.distributed as dist

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        dist.barrier()

    step()
    seconds = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        step()
        sync()
        seconds.append(time.perf_counter() - start)
    return seconds


def benchmark(cfg: dict, timeout: float = 1800.0) -> dict:
    from ..launch.spawn import run_distributed

    backend = "nccl" if cfg["device"] == "cuda" else "gloo"
    ranks = run_distributed(_worker, cfg["world"], args=(cfg,), timeout=timeout, backend=backend, threads=cfg["threads"])
    return summarize(cfg, ranks)


def summarize(cfg: dict, ranks: list[dict]) -> dict:
    """The slowest rank's median step and the busiest rank's bytes, per optimizer."""
    rows = []
    for name in OPTIMIZERS:
        step = statistics.median(max(r[name]["seconds"][i] for r in ranks) for i in range(cfg["repeats"]))
        rows.append({"optimizer": name, "step_ms": 1e3 * step, "bytes_per_rank": max(r[name]["bytes"] for r in ranks)})
    return {"config": cfg, "numel": ranks[0]["numel"], "rows": rows, "ranks": ranks}


def format_report(report: dict) -> str:
    cfg, rows = report["config"], report["rows"]
    base_ms, gather_bytes = rows[0]["step_ms"], rows[2]["bytes_per_rank"]
    lines = [
        f"{cfg['layout']} at {cfg['world']} processes ({cfg['device']}), model {cfg['model']} "
        f"({report['numel'] / 1e6:.2f}M params), mode {cfg['mode']}, strategy {cfg['strategy']}",
        "",
        "| optimizer | step (ms, median) | x torch AdamW | bytes/step/rank (max) | x all-gather |",
        "|---|---|---|---|---|",
    ]
    for row in rows:
        ratio = f"{row['bytes_per_rank'] / gather_bytes:.2f}" if gather_bytes and row["bytes_per_rank"] else "-"
        mib = f"{row['bytes_per_rank'] / 2**20:.2f} MiB" if row["bytes_per_rank"] else "0"
        lines.append(f"| {row['optimizer']} | {row['step_ms']:.1f} | {row['step_ms'] / base_ms:.2f} | {mib} | {ratio} |")
    return "\n".join(lines)


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "fsdp",
        help="Spectra-AdamW vs torch AdamW step time and bytes on an FSDP2 model (CPU gloo, or CUDA)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--world", type=int, default=4, help="processes (default 4; with --device cuda, one GPU each)")
    p.add_argument("--layout", choices=("fsdp", "hsdp", "fsdp_tp"), default="fsdp")
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--ffn", type=int, default=704, help="SwiGLU hidden size (default 704, ~8/3 x dim)")
    p.add_argument("--vocab", type=int, default=2048)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--batch", type=int, default=8, help="global batch (sequences)")
    p.add_argument("--mode", choices=("paper", "accurate"), default="paper", help="SSC numerics (default paper, the optimizer's)")
    p.add_argument("--strategy", choices=("auto", "owner", "gram"), default="auto")
    p.add_argument("--threshold", type=float, default=10.0, help="clipping threshold c (default 10)")
    p.add_argument("--repeats", type=int, default=5, help="timed steps after a warm-up (default 5)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per process (default 1)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--timeout", type=float, default=1800.0)
    p.add_argument("--json", default=None, metavar="PATH", help="also write every number (per rank) here")
    p.set_defaults(run=run)
    return p


def run(args) -> int:
    model = dict(dim=args.dim, n_layers=args.layers, n_heads=args.heads, ffn_dim=args.ffn, vocab=args.vocab, seq=args.seq)
    cfg = dict(
        world=args.world, layout=args.layout, model=model, batch=args.batch, mode=args.mode, strategy=args.strategy,
        threshold=args.threshold, repeats=args.repeats, threads=args.threads, device=args.device,
    )
    if args.layout != "fsdp" and args.world % 2:
        raise SystemExit(f"spectra bench fsdp: --layout {args.layout} needs an even --world")
    started = time.perf_counter()
    report = benchmark(cfg, timeout=args.timeout)
    return publish(format_report(report), report, started, args.json)
