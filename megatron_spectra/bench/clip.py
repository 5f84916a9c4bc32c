"""`spectra bench clip`: the Newton-Schulz soft clip against the SVD clip, speed and accuracy.

    spectra bench clip [--sizes 256,512,1024,2048] [--repeats 3] [--device cuda] [--json PATH]

For square (d x d) and 4:1 tall (4d x d) matrices, X = U diag(s) Vᵀ with random orthogonal
U, V and s log-spaced over five decades up to s_max, and for s_max/c in {1, 10, 100, 1000}:

- time: median of `--repeats` calls after a warm-up, at s_max/c = `--time-ratio`;
- matmuls and their FLOPs, counted by intercepting aten.mm/bmm/addmm/baddbmm (they vary with
  s_max/c in accurate mode, which runs more Newton-Schulz steps, or stages, for larger ratios);
- error: max |s_i(out) - h_c(s_i)| / h_c(s_i) over s_i >= 1e-4 s_max, h_c(s) = s/sqrt(1+s²/c²),
  with s_i the exact singular values of the fp32 input (float64 SVD; the fp32 rounding of
  the designed spectrum alone would move the small s_i by ~1e-3).

Methods: `svd` (soft_spectral_clip_svd, float64 SVD: the exact reference), `accurate`,
`paper` (the official bf16 numerics) and `paper-fp32` (the same 10 steps in fp32). CPUs
without native bf16 matmuls run `paper` ~100x slower than fp32, so the CPU default leaves it out.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time

import torch

from . import publish
from torch.utils._python_dispatch import TorchDispatchMode

from ..ops import soft_spectral_clip, soft_spectral_clip_svd

RATIOS = (1.0, 10.0, 100.0, 1000.0)
METHODS = {
    "svd": lambda x, c: soft_spectral_clip_svd(x, c),
    "accurate": lambda x, c: soft_spectral_clip(x, c, mode="accurate"),
    "paper": lambda x, c: soft_spectral_clip(x, c, mode="paper"),
    "paper-fp32": lambda x, c: soft_spectral_clip(x, c, mode="paper", fp32=True),
}
CPU_SIZES, GPU_SIZES = (256, 512, 1024, 2048), (256, 512, 1024, 2048, 4096)
CPU_METHODS, GPU_METHODS = ("svd", "accurate", "paper-fp32"), tuple(METHODS)


class MatmulCounter(TorchDispatchMode):
    """Counts matrix products and their FLOPs (2·m·k·n each) as they reach the dispatcher, so
    the count is what the code really runs, not what we think it runs."""

    _MM = {torch.ops.aten.mm.default, torch.ops.aten.addmm.default}
    _BMM = {torch.ops.aten.bmm.default, torch.ops.aten.baddbmm.default}

    def __init__(self):
        super().__init__()
        self.matmuls, self.flops, self.svds = 0, 0, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in self._MM or func in self._BMM:
            a, b = args[-2], args[-1]  # addmm/baddbmm take (input, mat1, mat2)
            batch = a.shape[0] if func in self._BMM else 1
            self.matmuls += batch
            self.flops += 2 * batch * a.shape[-2] * a.shape[-1] * b.shape[-1]
        elif func is torch.ops.aten._linalg_svd.default:
            self.svds += 1
        return func(*args, **(kwargs or {}))


def make_matrix(m: int, n: int, s_max: float, device: torch.device, seed: int = 0) -> torch.Tensor:
    """fp32 U diag(s) Vᵀ, U and V random orthogonal, s log-spaced over [1e-5, 1]·s_max."""
    g = torch.Generator().manual_seed(seed)
    k = min(m, n)
    u, _ = torch.linalg.qr(torch.randn(m, k, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(n, k, generator=g, dtype=torch.float64))
    s = torch.logspace(0, -5, k, dtype=torch.float64) * s_max
    return ((u * s) @ v.T).float().to(device)


def singular_value_error(out: torch.Tensor, s: torch.Tensor, c: float) -> float:
    """max |s_i(out) - h_c(s_i)| / h_c(s_i) over s_i >= 1e-4 s_max (s sorted, descending)."""
    got = torch.linalg.svdvals(out.double())
    want = s / torch.sqrt(1 + (s / c) ** 2)
    keep = s >= 1e-4 * s[0]
    return ((got[keep] - want[keep]).abs() / want[keep]).max().item()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _seconds(fn, repeats: int, device: torch.device) -> list[float]:
    out = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        out.append(time.perf_counter() - start)
    return out


def benchmark(sizes, methods, repeats: int, device: torch.device, threshold: float = 10.0,
              time_ratio: float = 100.0, tall: int = 4, progress=None) -> list[dict]:
    """One row per (shape, method): time at `time_ratio`, and per ratio matmuls, FLOPs, error.
    progress(text), if given, hears of each shape as it finishes (large ones take minutes)."""
    ratios = sorted(set(RATIOS) | {time_ratio})
    shapes = [(m, n) for d in sizes for m, n in ((d, d), (tall * d, d))]
    rows = []
    started = time.perf_counter()
    for i, (m, n) in enumerate(shapes):
        inputs = {r: make_matrix(m, n, r * threshold, device) for r in ratios}
        exact = {r: torch.linalg.svdvals(x.double()) for r, x in inputs.items()}
        for name in methods:
            fn = METHODS[name]
            row = {"shape": [m, n], "method": name, "ratios": {}}
            for r, x in inputs.items():
                # The counted call is also the warm-up of the timed ones.
                with MatmulCounter() as count:
                    out = fn(x, threshold)
                _sync(device)
                row["ratios"][r] = {
                    "matmuls": count.matmuls,
                    "svds": count.svds,
                    "flops": count.flops,
                    "error": singular_value_error(out, exact[r], threshold),
                }
                if r == time_ratio:
                    row["seconds"] = _seconds(lambda: fn(x, threshold), repeats, device)
                    row["median_s"] = statistics.median(row["seconds"])
            rows.append(row)
        if progress:
            times = ", ".join(f"{r['method']} {1e3 * r['median_s']:.1f} ms" for r in rows[-len(methods):])
            progress(f"[{i + 1}/{len(shapes)}] {m}x{n}: {times} ({time.perf_counter() - started:.0f} s so far)")
    return rows


def format_table(rows: list[dict], time_ratio: float) -> str:
    ratios = RATIOS
    head = (
        f"| shape | method | ms at s_max/c={time_ratio:g} | speed-up vs SVD | GFLOP | matmuls at s_max/c = "
        + " / ".join(f"{r:g}" for r in ratios)
        + " | "
        + " | ".join(f"rel. err. {r:g}" for r in ratios)
        + " |"
    )
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    svd_s = {tuple(r["shape"]): r["median_s"] for r in rows if r["method"] == "svd"}
    for row in rows:
        at = row["ratios"]
        base = svd_s.get(tuple(row["shape"]))
        speedup = f"{base / row['median_s']:.2f}x" if base else "-"
        counts = " / ".join(
            f"{at[r]['matmuls']}" + (f"+{at[r]['svds']} SVD" if at[r]["svds"] else "") for r in ratios
        )
        lines.append(
            f"| {row['shape'][0]}x{row['shape'][1]} | {row['method']} | {1e3 * row['median_s']:.1f} | {speedup}"
            f" | {at[time_ratio]['flops'] / 1e9:.2f} | {counts} | "
            + " | ".join(f"{at[r]['error']:.1e}" for r in ratios)
            + " |"
        )
    return "\n".join(lines)


# ----------------------------------------------------------------------------- command line


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "clip",
        help="Newton-Schulz soft clip (accurate, paper) vs the SVD clip: time, matmuls, accuracy",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--sizes", default=None, help=f"comma-separated sides d (default {CPU_SIZES} on CPU, {GPU_SIZES} on GPU)")
    p.add_argument("--methods", default=None, help=f"comma-separated, from {', '.join(METHODS)} (default: all on GPU, {', '.join(CPU_METHODS)} on CPU)")
    p.add_argument("--repeats", type=int, default=3, help="timed calls after the warm-up (default 3)")
    p.add_argument("--device", default=None, help="cuda if available, else cpu")
    p.add_argument("--threshold", type=float, default=10.0, help="clipping threshold c (default 10)")
    p.add_argument("--time-ratio", type=float, default=100.0, help="s_max/c of the timed runs (default 100)")
    p.add_argument("--json", default=None, metavar="PATH", help="also write every number here")
    p.set_defaults(run=run)
    return p


def run(args) -> int:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    gpu = device.type == "cuda"
    sizes = _ints(args.sizes) if args.sizes else list(GPU_SIZES if gpu else CPU_SIZES)
    methods = [m.strip() for m in args.methods.split(",")] if args.methods else list(GPU_METHODS if gpu else CPU_METHODS)
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise SystemExit(f"spectra bench clip: unknown method(s) {unknown}; choose from {list(METHODS)}")
    if args.repeats < 1 or not math.isfinite(args.time_ratio) or args.time_ratio <= 0:
        raise SystemExit("spectra bench clip: --repeats must be >= 1 and --time-ratio > 0")
    started = time.perf_counter()
    rows = benchmark(sizes, methods, args.repeats, device, args.threshold, args.time_ratio,
                     progress=lambda text: print(text, file=sys.stderr, flush=True))
    device_name = torch.cuda.get_device_name(device) if gpu else f"cpu ({torch.get_num_threads()} threads)"
    config = {"device": device_name, "threshold": args.threshold, "time_ratio": args.time_ratio,
              "repeats": args.repeats, "sizes": sizes, "methods": methods}
    table = f"spectra bench clip on {device_name}, c = {args.threshold:g}, fp32 input\n\n" + format_table(rows, args.time_ratio)
    return publish(table, {"config": config, "rows": rows}, started, args.json)
