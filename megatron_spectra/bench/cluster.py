"""`spectra bench cluster`: what spectra-adamw's clip would add to a step at the paper's scale.

    spectra bench cluster [--models 160m,780m,820m] [--bf16-tflops 600] [--ib-gbs 40] ...

No run here reaches the paper's layouts, so this is arithmetic, not a measurement. For each
paper run (configs/models/*.yaml: layers, widths, micro-batch, nodes x GPUs, TP x DP) it
places every parameter as Megatron's distributed optimizer does (TP blocks, 64-aligned ZeRO-1
ranges: `bench.simulated`), builds the engine's real clip plan over all ranks
(`engine.plan.build_plan`), and reads off each rank's clip work and traffic:

- FLOPs (`clip_cost.py`): per matrix k x n (k the short side), `line` products of 2·k²·n
  (the Gram and the final product) and `square` products of 2·k³ (Newton-Schulz), counted by
  running `soft_spectral_clip` on a small matrix: paper mode (bf16) at most the official 2
  and 30, 4·k²·n + 60·k³; accurate mode (fp32) at the stated s_max/c, on which its step
  count depends.
- matmul launches: an owner batches its same-shape matrices into one bmm per product; a
  Gram matrix's line products run on every holder, its root's products on its root rank.
- bytes: the plan's all-to-all moves (fp32) each way, split into NVLink (same node, 8 GPUs)
  and InfiniBand (other nodes); the Gram strategy's two k x k all-reduces (Gram, factor)
  where the plan uses it.

Projected overhead = forward all-to-all + the busiest rank's clip + backward all-to-all (no
overlap), each from the stated rates; the baseline step is 6·N·tokens at the stated MFU of
the bf16 peak. Next to it: the official code (every rank clips every matrix one by one,
DDP on 4 x H100) projected from the same rates, against its measured overhead, which checks
the rates; and which assumption moves the figure most (each rate x0.5 and x2).
"""

from __future__ import annotations

import argparse
import math
import time
from dataclasses import dataclass, fields, replace
from pathlib import Path

from . import publish
from .clip_cost import GPUS_PER_NODE, RankWork, clip_flops, gram_allreduce_bytes, products, rank_work
from .simulated import Layout, Model, model_params, rank_placements

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
VOCAB = 50304  # GPT-2's 50257 tokens padded to a multiple of 128 (configs/paper.yaml)
BF16_PEAK_TFLOPS = 989.0  # H100 SXM, dense
# AdamW -> official Spectra-AdamW step ms on 4 x H100 DDP (official code, every rank clips everything)
OFFICIAL = {"160m": (200.7, 238.3), "820m": (4412.0, 4504.0), "780m": (6550.0, 6654.0)}
CONFIG_NAMES = {"160m": "160m", "780m": "780m-deep", "820m": "820m-wide"}
OFFICIAL_PRODUCTS = (2, 30)  # the official clip_sigvals: Gram, product, 10 steps x 3 k x k products
TARGETS = {"160m": 5.0, "820m": 0.5}  # issue 13's targets on the projected overhead, %


@dataclass(frozen=True)
class Rates:
    """What one H100 SXM is assumed to do; every field is a `spectra bench cluster` flag."""

    bf16_tflops: float = 600.0  # achieved dense bf16 matmul (peak 989): paper mode's Newton-Schulz
    fp32_tflops: float = 50.0  # achieved fp32 matmul without TF32 (peak 67): accurate mode
    nvlink_gbs: float = 360.0  # per GPU and direction inside a node (NVLink 4: 450 peak)
    ib_gbs: float = 40.0  # per GPU and direction between nodes (one 400 Gb/s NIC per GPU: 50 peak)
    launch_us: float = 10.0  # per matmul: its launch and the ~3 elementwise kernels around it
    mfu: float = 0.40  # of the bf16 peak, for the baseline step's 6·N·tokens

    @staticmethod
    def help(name: str) -> str:
        return {
            "bf16_tflops": "achieved bf16 matmul TFLOP/s (paper mode; H100 SXM peak 989)",
            "fp32_tflops": "achieved fp32 matmul TFLOP/s without TF32 (accurate mode; peak 67)",
            "nvlink_gbs": "GB/s per GPU and direction inside a node (NVLink 4 peak 450)",
            "ib_gbs": "GB/s per GPU and direction between nodes (400 Gb/s NIC per GPU: peak 50)",
            "launch_us": "microseconds per matmul: its launch and the elementwise kernels around it",
            "mfu": "model FLOP utilisation of the baseline step (6·N·tokens over the bf16 peak)",
        }[name]

    def matmul_tflops(self, mode: str) -> float:
        return self.bf16_tflops if mode == "paper" else self.fp32_tflops


@dataclass(frozen=True)
class Run:
    name: str
    model: Model
    seq: int
    global_batch: int
    micro_batch: int
    nodes: int
    tp: int
    dp: int

    @property
    def tokens(self) -> int:
        return self.global_batch * self.seq

    @property
    def params(self) -> int:
        return sum(p.numel for p in model_params(self.model))


def paper_run(name: str) -> Run:
    """The run as configs/models/<name>.yaml lays it out."""
    from ..launch.config import resolve_bases

    path = CONFIGS / "models" / f"{CONFIG_NAMES[name]}.yaml"
    if not path.is_file():
        raise SystemExit(f"spectra bench cluster: no {path}: it reads the paper's layouts from a checkout's configs/")
    cfg = resolve_bases(path)
    m, t, par = cfg["model"], cfg["training"], cfg["parallel"]
    world = par["nodes"] * par["gpus_per_node"]
    tp = par.get("tensor_parallel", 1)
    model = Model(name, m["num_layers"], m["hidden_size"], m["num_attention_heads"], m["ffn_hidden_size"], VOCAB)
    return Run(name, model, m["seq_length"], t["global_batch_size"], t["micro_batch_size"], par["nodes"], tp, world // tp)


def plan_for(run: Run, mode: str, square_products: float):
    from ..engine.plan import build_plan

    layout = Layout(run.tp, run.dp)
    params = model_params(run.model)
    placements = [rank_placements(params, layout, r, "auto") for r in range(layout.world)]
    return build_plan(placements, paper=mode == "paper", products=square_products)


# ----------------------------------------------------------------------------- projection


def comm_seconds(w: RankWork, rates: Rates) -> float:
    """One rank's share of both all-to-alls: the slower of its sending and its receiving."""
    return max(nv / (rates.nvlink_gbs * 1e9) + ib / (rates.ib_gbs * 1e9) for nv, ib in zip(w.nvlink_bytes, w.ib_bytes))


def compute_seconds(w: RankWork, mode: str, rates: Rates) -> float:
    return w.flops / (rates.matmul_tflops(mode) * 1e12) + w.matmuls * rates.launch_us * 1e-6


def baseline_seconds(run: Run, world: int, rates: Rates) -> float:
    return 6.0 * run.params * run.tokens / (world * BF16_PEAK_TFLOPS * 1e12 * rates.mfu)


def project(run: Run, work: list[RankWork], gram_bytes: int, mode: str, rates: Rates) -> dict:
    """Overhead of one step: all-to-all, the busiest rank's clip, all-to-all back (no overlap)."""
    comm = max(comm_seconds(w, rates) for w in work)
    link = rates.ib_gbs if run.nodes > 1 else rates.nvlink_gbs
    gram = gram_bytes / (link * 1e9)
    compute = max(compute_seconds(w, mode, rates) for w in work)
    overhead = comm + gram + compute
    base = baseline_seconds(run, run.tp * run.dp, rates)
    out = {"comm_ms": 1e3 * (comm + gram), "compute_ms": 1e3 * compute, "overhead_ms": 1e3 * overhead,
           "baseline_ms": 1e3 * base, "overhead_pct": 100.0 * overhead / base}
    if run.name in OFFICIAL:  # the same +ms over a baseline at the MFU the official AdamW run reached
        official_base = baseline_seconds(run, run.tp * run.dp, replace(rates, mfu=official_mfu(run)))
        out["overhead_pct_official_mfu"] = 100.0 * overhead / official_base
    return out


def official_mfu(run: Run, gpus: int = 4) -> float:
    """6·N·tokens over the official AdamW step time on 4 x H100, as a fraction of the bf16 peak."""
    return 6.0 * run.params * run.tokens / (gpus * OFFICIAL[run.name][0] * 1e-3 * BF16_PEAK_TFLOPS * 1e12)


def official_matrices(model: Model) -> list[tuple[int, int]]:
    """(k, n) of every matrix the official code clips (apply_to=all): its Llama has separate
    w1 and w2 where Megatron fuses fc1, and a fused c_attn as Megatron's QKV."""
    d, f, v = model.hidden, model.ffn, model.vocab
    per_layer = [(d, 3 * d), (d, d), (d, f), (d, f), (d, f)]
    return [(d, v), (d, v)] + per_layer * model.layers


def project_official(run: Run, rates: Rates, mode_products: tuple[int, int] = OFFICIAL_PRODUCTS, gpus: int = 4) -> dict:
    """The official code on 4 x H100 DDP: every rank clips every matrix, one call each, in bf16."""
    mats = official_matrices(run.model)
    flops = sum(clip_flops(k, n, mode_products) for k, n in mats)
    seconds = flops / (rates.bf16_tflops * 1e12) + len(mats) * sum(mode_products) * rates.launch_us * 1e-6
    base = baseline_seconds(run, gpus, rates)
    return {"overhead_ms": 1e3 * seconds, "baseline_ms": 1e3 * base, "overhead_pct": 100.0 * seconds / base}


SENSITIVE = ("bf16_tflops", "fp32_tflops", "nvlink_gbs", "ib_gbs", "launch_us", "mfu")


def sensitivity(run: Run, work, gram_bytes: int, mode: str, rates: Rates) -> list[tuple[str, float, float]]:
    """(rate, overhead % with it halved, with it doubled), largest swing first."""
    out = []
    for name in SENSITIVE:
        v = getattr(rates, name)
        lo, hi = (project(run, work, gram_bytes, mode, replace(rates, **{name: v * f}))["overhead_pct"] for f in (0.5, 2.0))
        out.append((name, lo, hi))
    return sorted(out, key=lambda t: -abs(math.log(max(t[1], 1e-12) / max(t[2], 1e-12))))


def benchmark(models: list[str], modes: list[str], rates: Rates, ratio: float = 30.0) -> dict:
    rows = []
    for name in models:
        run = paper_run(name)
        for mode in modes:
            mp = products(mode, ratio)
            plan = plan_for(run, mode, mp[1])
            work = rank_work(plan, mp)
            gram_bytes = gram_allreduce_bytes(plan)
            flops = [w.flops for w in work]
            sent = [w.nvlink_bytes[0] + w.ib_bytes[0] for w in work]
            rows.append({
                "model": name, "mode": mode, "run": _describe(run), "products": mp,
                "params": run.params, "tokens": run.tokens,
                "gflop_max": max(flops) / 1e9, "gflop_mean": sum(flops) / len(flops) / 1e9,
                "matmuls_max": max(w.matmuls for w in work),
                "mb_sent_max": max(sent) / 1e6, "ib_mb_max": max(w.ib_bytes[0] for w in work) / 1e6,
                "gram_mb": gram_bytes / 1e6,
                "strategies": dict(sorted({s: sum(t.strategy == s and not t.placement.is_vector for t in plan.tensors)
                                           for s in ("owner", "gram")}.items())),
                **project(run, work, gram_bytes, mode, rates),
                "official": project_official(run, rates) if mode == "paper" else None,
                "sensitivity": sensitivity(run, work, gram_bytes, mode, rates),
            })
    return {"rates": {f.name: getattr(rates, f.name) for f in fields(Rates)}, "ratio": ratio, "rows": rows}


def _describe(run: Run) -> str:
    m = run.model
    return (f"{m.layers} x {m.hidden} / ffn {m.ffn}; {run.nodes} x {GPUS_PER_NODE} GPUs, TP{run.tp} x DP{run.dp}, "
            f"micro {run.micro_batch}, {run.global_batch} x {run.seq} tokens")


def format_report(report: dict) -> str:
    r = report["rates"]
    lines = [
        "Projected clip overhead of spectra-adamw at the paper's layouts (arithmetic over the engine's real plan, not a run).",
        f"Assumed per H100: bf16 matmul {r['bf16_tflops']:g} TFLOP/s, fp32 {r['fp32_tflops']:g} TFLOP/s, "
        f"NVLink {r['nvlink_gbs']:g} GB/s, InfiniBand {r['ib_gbs']:g} GB/s per GPU, {r['launch_us']:g} us per matmul launch; "
        f"baseline step 6·N·tokens at MFU {r['mfu']:g} of {BF16_PEAK_TFLOPS:g} TFLOP/s. "
        f"Accurate mode at s_max/c = {report['ratio']:g}. No overlap of clip and communication.",
        "",
        "| model | layout | mode | clip GFLOP/rank max (mean) | matmuls/rank | MB sent/rank (IB) | comm ms | clip ms "
        "| +ms | base step ms | overhead | at official MFU | target |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for x in report["rows"]:
        target = TARGETS.get(x["model"])
        verdict = "" if target is None else f"<= {target:g}%: {'met' if x['overhead_pct'] <= target else 'missed'}"
        at_official = x.get("overhead_pct_official_mfu")
        lines.append(
            f"| {x['model']} | {x['run']} | {x['mode']} | {x['gflop_max']:.1f} ({x['gflop_mean']:.1f}) | {x['matmuls_max']} "
            f"| {x['mb_sent_max']:.0f} ({x['ib_mb_max']:.1f}) | {x['comm_ms']:.2f} | {x['compute_ms']:.2f} "
            f"| {x['overhead_ms']:.2f} | {x['baseline_ms']:.0f} | {x['overhead_pct']:+.2f}% "
            f"| {'-' if at_official is None else f'{at_official:+.2f}%'} | {verdict} |"
        )
    counted = {x["mode"]: x["products"] for x in report["rows"]}
    lines += ["", "Products per matrix counted from ops.soft_clip (line 2·k²·n + square 2·k³): "
              + ", ".join(f"{m} {a} + {b}" for m, (a, b) in counted.items()) + f"; the official code: {OFFICIAL_PRODUCTS[0]} + {OFFICIAL_PRODUCTS[1]}."]
    lines += ["", "The official code on 4 x H100 DDP (every rank clips every matrix, one call each, bf16), same rates:", "",
              "| model | clip GFLOP/rank | projected +ms | projected overhead | measured AdamW -> Spectra-AdamW | measured overhead | implied MFU |",
              "|---|---:|---:|---:|---|---:|---:|"]
    for x in report["rows"]:
        o = x["official"]
        if o is None or x["model"] not in OFFICIAL:
            continue
        adam, spectra = OFFICIAL[x["model"]]
        run = paper_run(x["model"])
        gflop = sum(clip_flops(k, n, OFFICIAL_PRODUCTS) for k, n in official_matrices(run.model)) / 1e9
        implied = official_mfu(run)
        lines.append(
            f"| {x['model']} | {gflop:.0f} | {o['overhead_ms']:.1f} | {o['overhead_pct']:+.1f}% | {adam:g} -> {spectra:g} ms "
            f"(+{spectra - adam:.1f}) | {100 * (spectra - adam) / adam:+.1f}% | {implied:.2f} |"
        )
    lines += ["", "Sensitivity: the overhead with each assumption halved / doubled (most sensitive first):", "",
              "| model | mode | " + " | ".join(["assumption: x0.5 / x2"] * 3) + " |", "|---|---|---|---|---|"]
    for x in report["rows"]:
        top = [f"{n} {lo:+.2f}% / {hi:+.2f}%" for n, lo, hi in x["sensitivity"][:3]]
        lines.append(f"| {x['model']} | {x['mode']} | " + " | ".join(top) + " |")
    most = {x["sensitivity"][0][0] for x in report["rows"]}
    clip_rates = {next(n for n, *_ in x["sensitivity"] if n != "mfu") for x in report["rows"]}
    lines += ["", f"Most sensitive assumption: {', '.join(sorted(most))} (the largest swing of the projected overhead "
              f"under x0.5 / x2, per row above); of the rates behind the +ms: {', '.join(sorted(clip_rates))}."]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- command line


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("cluster", help="projected clip overhead at the paper's H100 layouts (arithmetic)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="160m,780m,820m", help="comma-separated, from: " + ", ".join(CONFIG_NAMES))
    p.add_argument("--modes", default="paper,accurate", help="comma-separated: paper, accurate")
    p.add_argument("--ratio", type=float, default=30.0, help="s_max/c for accurate mode's step count (default 30)")
    for f in fields(Rates):
        p.add_argument("--" + f.name.replace("_", "-"), type=float, default=f.default, help=f"{Rates.help(f.name)} (default {f.default:g})")
    p.add_argument("--json", default=None, metavar="PATH", help="also write every number here")
    p.set_defaults(run=run)
    return p


def run(args) -> int:
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    bad = [m for m in models if m not in CONFIG_NAMES] + [m for m in modes if m not in ("paper", "accurate")]
    if bad:
        raise SystemExit(f"spectra bench cluster: unknown {bad}; models {list(CONFIG_NAMES)}, modes paper, accurate")
    rates = Rates(**{f.name: getattr(args, f.name) for f in fields(Rates)})
    if min(getattr(rates, f.name) for f in fields(Rates)) <= 0 or rates.mfu > 1:
        raise SystemExit("spectra bench cluster: every rate must be > 0, and --mfu at most 1")
    if args.ratio < 1:
        raise SystemExit("spectra bench cluster: --ratio (s_max/c) must be >= 1")
    started = time.perf_counter()
    report = benchmark(models, modes, rates, args.ratio)
    return publish(format_report(report), report, started, args.json)
