"""`spectra bench megatron`: spectra-adamw's step time against Megatron's Adam, same model and layout.

    spectra bench megatron [--models 160m,820m] [--scale 8] [--layers 12] [--steps 10]

A LLaMA-style GPT of the paper's 160M and 820M shapes (SwiGLU, RoPE, RMSNorm, untied
embeddings), built and optimized by the built-in trainer's pieces (`train.model`,
`train.loop`: its flags, DDP wrapper and optimizer factory) in real megatron-core, on random
tokens: TP=2 x DP=2 on 4 local CPU processes (gloo), DDP with the
distributed optimizer (ZeRO-1), fp32. On CPU the widths are divided by `--scale` (hidden,
ffn and vocabulary; heads, depth and every shape ratio kept), and the output says so.

For each optimizer it times, after warm-up steps, the optimizer step (Megatron's
`optimizer.step()`: grad-norm clipping, the inner step, the ZeRO-1 param all-gather) and the
whole train step (zero grads, forward/backward with the DP grad reduce-scatter, optimizer
step), each as the slowest rank's time of a step, median over steps, and reports the ratios
to Megatron's Adam:

- adam: megatron-core's own optimizer (torch AdamW without TE/apex);
- spectra-adamw paper / accurate: our optimizer, each full matrix clipped once by the engine;
- redundant (paper): the official code's way, every rank rebuilds and clips every full
  matrix (here: one all-reduce per matrix to rebuild it from the TP x ZeRO pieces);
- `-fp32`: the paper's 10 steps in fp32 (the default on CPU, whose bf16 matmuls are emulated);
- `-hidden`: apply_to="hidden", the matrices Muon orthogonalizes (the embedding and output
  layer go to the plain base direction): the like-for-like row against dist-muon, where
  the default apply_to="all" (the official code) also clips the two vocabulary matrices.

The anchor is the official code on 4x H100 (DDP, redundant clipping): +18.7% step time at
160M and +2.1% at 820M over AdamW. CPU timings on shared cores are noisy and the compute /
communication balance is not a GPU's: read the ratios, not the milliseconds.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from dataclasses import asdict, replace

from . import publish
from .redundant import make_redundant
from .simulated import MODELS

TP, DP = 2, 2
ANCHORS = {"160m": "+18.7%", "820m": "+2.1%"}  # official code, 4x H100, redundant clipping (rebuttal Table 1)
OPTIMIZERS = ("adam", "dist-muon", "spectra-paper", "spectra-paper-fp32", "spectra-accurate", "spectra-paper-hidden",
              "spectra-paper-fp32-hidden", "spectra-accurate-hidden", "redundant-paper", "redundant-paper-fp32")
# CPUs without bf16 matmul units run the paper's bf16 Newton-Schulz ~100x slower than fp32,
# which would time the CPU's bf16 emulation, not the optimizer: there the paper's 10 steps
# run in fp32 (its own --fp32 option), the same matmuls a GPU runs in bf16.
CPU_DEFAULT = ("adam", "dist-muon", "spectra-paper-fp32", "spectra-accurate", "spectra-paper-fp32-hidden",
               "spectra-accurate-hidden", "redundant-paper-fp32")


# ----------------------------------------------------------------------------- one process


def _args(cfg: dict, name: str):
    """The built-in trainer's flags for the model (LLaMA-style, Megatron-LM names) and optimizer."""
    from ..train.args import parse_args

    m = cfg["model"]
    flags = (
        f"--num-layers {m['layers']} --hidden-size {m['hidden']} --ffn-hidden-size {m['ffn']} "
        f"--num-attention-heads {m['heads']} --seq-length {cfg['seq']} --swiglu --normalization RMSNorm "
        "--position-embedding-type rope --untie-embeddings-and-output-weights --disable-bias-linear "
        f"--hidden-dropout 0 --attention-dropout 0 --tensor-model-parallel-size {TP} "
        f"--micro-batch-size {cfg['micro_batch']} --global-batch-size {cfg['global_batch']} "
        "--lr 1e-3 --weight-decay 0.1 --clip-grad 1.0"
    ).split()
    if name == "dist-muon":  # Megatron-LM refuses Muon with the distributed optimizer
        return parse_args(flags + ["--optimizer", "adam"], TP * DP)
    flags.append("--use-distributed-optimizer")
    if name == "adam":
        return parse_args(flags + ["--optimizer", "adam"], TP * DP)
    variant = name.split("-")  # redundant|spectra, mode, then fp32 / hidden
    spectra = ["--optimizer", "spectra-adamw", "--spectra-mode", variant[1], "--spectra-clip-threshold",
               str(cfg["threshold"]), "--spectra-clip-schedule", "constant"]
    spectra += ["--spectra-ns-fp32"] if "fp32" in variant else []
    spectra += ["--spectra-apply-to", "hidden"] if "hidden" in variant else []
    return parse_args(flags + spectra, TP * DP)


def _slowest(seconds: float) -> float:
    import torch
    import torch.distributed as dist

    t = torch.tensor([seconds], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.item()


def _batches(cfg: dict, steps: int) -> list[torch.Tensor]:
    """Random token batches (global batch, seq + 1), the same on every rank and for every optimizer."""
    g = torch.Generator().manual_seed(0)
    return [torch.randint(0, cfg["model"]["vocab"], (cfg["global_batch"], cfg["seq"] + 1), generator=g) for _ in range(steps)]


def _micro_batches(tokens: torch.Tensor, micro: int) -> list[dict]:
    """The trainer's forward_step input: GPTDataset's sample layout, every token counted."""
    inputs, labels = tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()
    positions = torch.arange(inputs.shape[1]).unsqueeze(0).expand_as(inputs)
    batch = {"tokens": inputs, "labels": labels, "loss_mask": torch.ones_like(labels, dtype=torch.float), "position_ids": positions}
    return [dict(zip(batch, parts)) for parts in zip(*(t.split(micro) for t in batch.values()))]


class _Run:
    """One optimizer's model, optimizer and timings, stepped in rounds with the others."""

    def __init__(self, name: str, cfg: dict):
        from ..train.loop import build_optimizer, optimizer_config, set_seed, wrap_ddp
        from ..train.model import build_model

        args = _args(cfg, name)
        set_seed(args.seed)  # the same initial weights for every optimizer
        self.name, self.cfg = name, cfg
        self.model = wrap_ddp(build_model(args, cfg["model"]["vocab"]), args)
        if name == "dist-muon":
            from dataclasses import replace as with_fields

            from .muon import build_dist_muon

            # Megatron-LM's `--optimizer dist_muon` defaults (its --muon-momentum is 0.9).
            self.optimizer = build_dist_muon([self.model], with_fields(optimizer_config(args), muon_momentum=0.9))
        else:
            self.optimizer = build_optimizer(args, self.model)
        if name.startswith("redundant"):
            make_redundant(self.optimizer)
        self.losses, self.step_times, self.train_times, self.peak_extra = [], [], [], 0

    def step(self, batch: torch.Tensor, timed: bool) -> None:
        import torch.distributed as dist
        from megatron.core import parallel_state
        from megatron.core.pipeline_parallel import get_forward_backward_func

        from ..train.loop import global_loss
        from ..train.model import forward_step

        cfg, micro = self.cfg, self.cfg["micro_batch"]
        dp_rank, per_rank = parallel_state.get_data_parallel_rank(), cfg["global_batch"] // DP
        mine = _micro_batches(batch[dp_rank * per_rank : (dp_rank + 1) * per_rank], micro)
        dist.barrier()
        start = time.perf_counter()
        self.model.zero_grad_buffer()
        self.optimizer.zero_grad()
        reduced = get_forward_backward_func()(
            forward_step_func=forward_step, data_iterator=iter(mine), model=[self.model],
            num_microbatches=len(mine), seq_length=cfg["seq"], micro_batch_size=micro, forward_only=False,
        )
        with _peak_memory() as peak:
            before_step = time.perf_counter()
            self.optimizer.step()
            end = time.perf_counter()
        self.peak_extra = max(self.peak_extra, peak.extra)
        self.losses.append(global_loss(reduced))
        if timed:
            self.step_times.append(_slowest(end - before_step))
            self.train_times.append(_slowest(end - start))

    def result(self) -> dict:
        return {
            "optimizer_step_ms": 1e3 * statistics.median(self.step_times),
            "train_step_ms": 1e3 * statistics.median(self.train_times),
            "step_ms_all": [1e3 * t for t in self.step_times],
            "first_loss": self.losses[0],
            "last_loss": self.losses[-1],
            "state_mb": _per_rank(_state_bytes(self.optimizer) / 1e6),
            "step_peak_mb": _per_rank(self.peak_extra / 1e6),
        }


def _state_bytes(optimizer) -> int:
    """Bytes this rank's optimizer keeps between steps: its state tensors (moments, momentum)
    and any main-param copies, each storage counted once."""
    seen, total = set(), 0

    def add(t):
        nonlocal total
        if isinstance(t, torch.Tensor) and t.numel():
            key = (t.data_ptr(), t.numel(), t.dtype)
            if key not in seen:
                seen.add(key)
                total += t.numel() * t.element_size()

    for part in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = getattr(part, "optimizer", part)
        for state in getattr(inner, "state", {}).values():
            for v in (state.values() if isinstance(state, dict) else [state]):
                add(v)
        for name in ("shard_fp32_from_float16_groups", "fp32_from_float16_groups"):  # (fp32 shards: views)
            for group in getattr(part, name, None) or []:
                for t in group:
                    add(t)
    return total


class _peak_memory:
    """Peak memory the step allocates above what was allocated before it: CUDA's allocator
    statistics on a GPU; on CPU the rise of the process's peak RSS (0 once an earlier step
    reached higher: a lower bound, read it with state_mb)."""

    def __enter__(self):
        self.cuda = torch.cuda.is_available()
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            self.base = _max_rss()
        return self

    def __exit__(self, *exc):
        self.extra = (torch.cuda.max_memory_allocated() if self.cuda else _max_rss()) - self.base
        return False


def _max_rss() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def _per_rank(value: float) -> list[float]:
    import torch.distributed as dist

    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, value)
    return out


def _worker(rank: int, world: int, cfg: dict) -> dict:
    """Every optimizer in one megatron-core world on CPU (TP x DP), stepped in interleaved
    rounds (one step of each per round) so that load from elsewhere hits them alike."""
    import warnings

    from megatron.core import parallel_state
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    from ..megatron.cpu import megatron_on_cpu

    warnings.filterwarnings("ignore")  # megatron warns about apex/TE and deprecations on every rank
    with megatron_on_cpu():
        parallel_state.initialize_model_parallel(tensor_model_parallel_size=TP)
        try:
            runs = [_Run(name, cfg) for name in cfg["optimizers"]]
            for step, batch in enumerate(_batches(cfg, cfg["warmup"] + cfg["steps"])):
                for run in runs:
                    run.step(batch, timed=step >= cfg["warmup"])
            out = {run.name: run.result() for run in runs}
            out["_peak_rss_mb"] = _per_rank(_max_rss() / 1e6)
            return out
        finally:
            get_cuda_rng_tracker().reset()
            parallel_state.destroy_model_parallel()


# ----------------------------------------------------------------------------- driver


def benchmark(models: list[str], scale: int, layers: int | None, optimizers: list[str], steps: int = 10,
              warmup: int = 3, seq: int = 128, micro_batch: int = 2, global_batch: int = 8,
              threshold: float = 10.0, timeout: float = 1800.0, log=print) -> dict:
    import os

    from ..launch.spawn import run_distributed

    notes = []
    if "dist-muon" in optimizers:
        from .muon import INSTALL, muon_available

        ok, why = muon_available()
        if not ok:
            optimizers = [o for o in optimizers if o != "dist-muon"]
            notes.append(f"dist-muon skipped: megatron-core's Muon needs emerging-optimizers ({why}); {INSTALL}")
            log(notes[-1], flush=True)
    results = []
    for name in models:
        model = MODELS[name].scaled(scale)
        if layers is not None:
            model = replace(model, layers=layers)
        cfg = dict(model=asdict(model), optimizers=optimizers, steps=steps, warmup=warmup, seq=seq,
                   micro_batch=micro_batch, global_batch=global_batch, threshold=threshold)
        log(f"{name}: {model} at TP={TP} x DP={DP} ...", flush=True)
        load = os.getloadavg()[0]
        per_rank = run_distributed(_worker, TP * DP, args=(cfg,), timeout=timeout)
        timings = dict(per_rank[0])
        rss = timings.pop("_peak_rss_mb")
        results.append({"model": name, "shape": asdict(model), "timings": timings, "peak_rss_mb": rss,
                        "load": [load, os.getloadavg()[0]]})
        for optimizer, t in timings.items():  # as it comes: a long run shows its numbers early
            log(f"  {optimizer}: optimizer step {t['optimizer_step_ms']:.1f} ms, train step {t['train_step_ms']:.1f} ms", flush=True)
    config = dict(scale=scale, layers=layers, steps=steps, warmup=warmup, seq=seq, micro_batch=micro_batch,
                  global_batch=global_batch, threshold=threshold, tp=TP, dp=DP, device="cpu (gloo)",
                  cpu_cores=os.cpu_count(), notes=notes)
    return {"config": config, "results": results}


def format_report(report: dict) -> str:
    cfg = report["config"]
    lines = [
        f"Optimizer step vs Megatron's Adam: TP={cfg['tp']} x DP={cfg['dp']}, fp32, {cfg['device']}, every optimizer "
        f"in one world, one step of each per round, median of {cfg['steps']} rounds after {cfg['warmup']}, "
        f"seq {cfg['seq']}, global batch {cfg['global_batch']}, c = {cfg['threshold']}.",
        f"Widths (hidden, ffn, vocab) divided by {cfg['scale']} with the paper's shape ratios kept"
        + (f"; {cfg['layers']} layers" if cfg["layers"] else "") + ": CPU numbers, read the ratios.",
        "adam and spectra-*: DDP with the distributed optimizer (ZeRO-1); dist-muon: megatron-core's "
        "TensorParallelMuon (blockwise, 5 quintic steps) in its LayerWiseDistributedOptimizer, plain DDP, "
        "as Megatron-LM's --optimizer dist_muon.",
        *cfg.get("notes", []),
        "",
        "| model | shape (L x d / ffn / V) | optimizer | opt step ms | x Adam | x dist-muon | x dist-muon per round "
        "| train step ms | x Adam | state MB/rank | extra over Adam MB | step peak MB | official (4x H100) |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in report["results"]:
        s, t = r["shape"], r["timings"]
        adam, muon = t.get("adam"), t.get("dist-muon")
        for name, v in t.items():
            ratio = lambda key, base: f"{v[key] / base[key]:.2f}" if base else "-"  # noqa: E731
            state = max(v["state_mb"])
            extra = f"{state - max(adam['state_mb']):+.2f}" if adam else "-"
            anchor = ANCHORS.get(r["model"], "") if name.startswith("redundant-paper") else ""
            lines.append(
                f"| {r['model']} | {s['layers']} x {s['hidden']} / {s['ffn']} / {s['vocab']} | {name} "
                f"| {v['optimizer_step_ms']:.1f} | {ratio('optimizer_step_ms', adam)} | {ratio('optimizer_step_ms', muon)} "
                f"| {_paired(v, muon)} | {v['train_step_ms']:.1f} | {ratio('train_step_ms', adam)} | {state:.2f} | {extra} "
                f"| {max(v['step_peak_mb']):.2f} | {anchor} |"
            )
    lines.append("")
    lines.append("x dist-muon per round: the optimizer's step over dist-muon's in the same round (both stepped one "
                 "after the other, so load drift cancels), median and quartiles over rounds.")
    lines.append("official: the official code's train-step overhead over AdamW (DDP, every rank clips every matrix).")
    lines.append("state MB/rank: what the optimizer keeps between steps (moments, momentum, main copies), max over "
                 "ranks; step peak: memory the step allocates above what it started with (CUDA allocator; on CPU "
                 "the rise of peak RSS, a lower bound).")
    for r in report["results"]:
        rss = ", ".join(f"{m:.0f}" for m in r["peak_rss_mb"])
        lines.append(f"{r['model']}: peak RSS per rank (MB, whole run) {rss}; load average {r['load'][0]:.2f} -> "
                     f"{r['load'][1]:.2f} on {cfg.get('cpu_cores')} cores.")
    return "\n".join(lines)


def _paired(v: dict, base: dict | None) -> str:
    """Median [q1-q3] of the per-round ratios v/base of the optimizer step."""
    if not base:
        return "-"
    ratios = [a / b for a, b in zip(v["step_ms_all"], base["step_ms_all"])]
    if len(ratios) < 4:
        return f"{statistics.median(ratios):.2f}"
    q1, _, q3 = statistics.quantiles(ratios, n=4)
    return f"{statistics.median(ratios):.2f} [{q1:.2f}-{q3:.2f}]"


# ----------------------------------------------------------------------------- command line


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "megatron",
        help="spectra-adamw vs Megatron's Adam: optimizer and train step time in megatron-core (TP=2 x DP=2, CPU)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--models", default="160m,820m", help="comma-separated, from: " + ", ".join(MODELS))
    p.add_argument("--scale", type=int, default=8, help="divide hidden, ffn and vocab by this (default 8)")
    p.add_argument("--layers", type=int, default=None, help="override the depth (default: the model's, 12)")
    p.add_argument("--optimizers", default=None,
                   help=f"from: {', '.join(OPTIMIZERS)} (default on CPU: {', '.join(CPU_DEFAULT)}; with CUDA: the bf16 ones)")
    p.add_argument("--steps", type=int, default=10, help="timed steps (default 10)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (default 3)")
    p.add_argument("--seq", type=int, default=128, help="sequence length (default 128)")
    p.add_argument("--global-batch", type=int, default=8, help="sequences per step (default 8; micro-batch 2)")
    p.add_argument("--threshold", type=float, default=10.0, help="clipping threshold c (default 10)")
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds per model before giving up")
    p.add_argument("--json", default=None, metavar="PATH", help="also write every number here")
    p.set_defaults(run=run)
    return p


def run(args) -> int:
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    default = CPU_DEFAULT if not torch.cuda.is_available() else [o for o in OPTIMIZERS if "fp32" not in o]
    optimizers = [o.strip() for o in args.optimizers.split(",") if o.strip()] if args.optimizers else list(default)
    bad = [m for m in models if m not in MODELS] + [o for o in optimizers if o not in OPTIMIZERS]
    if bad:
        raise SystemExit(f"spectra bench megatron: unknown {bad}; models {list(MODELS)}, optimizers {list(OPTIMIZERS)}")
    if args.global_batch % (2 * DP):
        raise SystemExit(f"spectra bench megatron: --global-batch must be a multiple of {2 * DP}")
    started = time.perf_counter()
    report = benchmark(models, args.scale, args.layers, optimizers, args.steps, args.warmup, args.seq,
                       2, args.global_batch, args.threshold, args.timeout)
    report["config"]["total_seconds"] = time.perf_counter() - started
    return publish(format_report(report), report, started, args.json)
