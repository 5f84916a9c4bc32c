"""The one-call GPU check: `scripts/gpu_check.sh` (python -m megatron_spectra.bench.gpu_check).

On one H100/H200 it runs in a few minutes and prints ONE table:

- tests: `pytest -m gpu` over tests/ (the GPU-marked tests);
- clip: the soft clip on the device, input in bf16 and fp32, paper (bf16 Newton-Schulz),
  paper-fp32 and accurate, against the exact SVD clip: ms (median) at s_max/c = 100, and the
  max relative singular-value error at s_max/c = 10 and 100 (as `spectra bench clip`);
- the paper's 160M and 820M models at full width on the one GPU (world size 1, TP=1 DP=1,
  megatron-core, bf16, seq 1024, the configs' micro-batch or, where that runs out of memory,
  the largest half of it that fits), for Megatron's Adam, spectra-adamw paper and accurate, and
  megatron-core's Muon where importable: optimizer step and train step ms (median), peak
  memory, and the host reads (.item(), .tolist(), bool(), float(), .cpu(), ...) one optimizer
  step makes, each a device-to-host sync on a GPU, with where they come from.

Without CUDA (or with --tiny) the same code runs at tiny sizes on CPU (fp32, 2 layers, widths
/16, seq 32), so the test suite keeps it from rotting (tests/test_gpu_check.py).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import os
import statistics
import subprocess
import sys
import time
import traceback
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.overrides import TorchFunctionMode

ROOT = Path(__file__).resolve().parents[2]
OPTIMIZERS = ("adam", "spectra-paper", "spectra-accurate", "dist-muon")
HOST_READS = {"item", "tolist", "__bool__", "__float__", "__int__", "__index__", "cpu", "numpy"}


@dataclass
class Row:
    section: str
    case: str
    ms: str = "-"
    detail: str = "-"
    peak: str = "-"
    note: str = ""


# ----------------------------------------------------------------------------- tests


def gpu_tests(paths: list[str], timeout: float) -> Row:
    """`pytest -m gpu` in a child process; its summary line."""
    cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider", *paths]
    start = time.perf_counter()
    try:
        done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return Row("tests", "pytest -m gpu " + " ".join(paths), detail=f"timed out after {timeout:.0f} s", note="FAIL")
    lines = [line for line in done.stdout.strip().splitlines() if line.strip()]
    summary = lines[-1].strip("= ") if lines else done.stderr.strip()[-200:]
    ok = done.returncode in (0, 5)  # 5: nothing selected
    return Row("tests", "pytest -m gpu " + " ".join(paths), f"{1e3 * (time.perf_counter() - start):.0f}", summary,
               note="" if ok else f"FAIL (rc {done.returncode})")


# ----------------------------------------------------------------------------- clip


def clip_rows(device: torch.device, size: int, repeats: int) -> list[Row]:
    from ..ops import soft_spectral_clip, soft_spectral_clip_svd
    from .clip import _seconds, make_matrix, singular_value_error

    c, rows = 10.0, []
    methods = {
        "paper": lambda x: soft_spectral_clip(x, c, mode="paper"),
        "paper-fp32": lambda x: soft_spectral_clip(x, c, mode="paper", fp32=True),
        "accurate": lambda x: soft_spectral_clip(x, c, mode="accurate"),
    }
    for dtype in (torch.bfloat16, torch.float32):
        inputs = {r: make_matrix(4 * size, size, r * c, device).to(dtype) for r in (10.0, 100.0)}
        exact = {r: torch.linalg.svdvals(x.double()) for r, x in inputs.items()}  # of the rounded input
        name = "bf16" if dtype == torch.bfloat16 else "fp32"
        for method, fn in methods.items():
            errors = {r: singular_value_error(fn(x), exact[r], c) for r, x in inputs.items()}
            ms = 1e3 * statistics.median(_seconds(lambda: fn(inputs[100.0]), repeats, device))
            rows.append(Row("clip", f"{method}, {name} in, {4 * size}x{size}", f"{ms:.2f}",
                            f"err {errors[10.0]:.1e} @10, {errors[100.0]:.1e} @100"))
        if dtype == torch.float32:
            svd = lambda: soft_spectral_clip_svd(inputs[100.0], c)  # noqa: E731 - a float64 SVD: slow, 2 calls
            svd_ms = 1e3 * statistics.median(_seconds(svd, 2, device))
            rows.append(Row("clip", f"svd (reference), fp32 in, {4 * size}x{size}", f"{svd_ms:.2f}", "exact"))
    return rows


# ----------------------------------------------------------------------------- host reads


class HostReads(TorchFunctionMode):
    """Counts the reads of device tensors to the host (each a sync on a GPU) and the code
    lines they come from. `cpu_too`: count reads of CPU tensors as well (on a CPU-only run,
    where they stand for the device tensors a GPU run would read)."""

    def __init__(self, cpu_too: bool):
        super().__init__()
        self.cpu_too, self.sites = cpu_too, Counter()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if args and isinstance(args[0], torch.Tensor) and (name in HOST_READS or name == "to" and _to_host(args, kwargs)):
            if self.cpu_too or args[0].device.type != "cpu":
                self.sites[(_caller(), name)] += 1
        return func(*args, **(kwargs or {}))

    @property
    def count(self) -> int:
        return sum(self.sites.values())


def _to_host(args, kwargs) -> bool:
    """Is this `Tensor.to(...)` a copy to the CPU?"""
    targets = list(args[1:]) + [v for k, v in (kwargs or {}).items() if k == "device"]
    return any(str(t) == "cpu" or isinstance(t, torch.device) and t.type == "cpu" for t in targets)


def _caller() -> str:
    """The innermost frame outside torch and this file (megatron-core's, ours, ...), as
    package/.../file.py:line; torch's own where there is none."""
    frames = [f for f in traceback.extract_stack()[:-2] if Path(f.filename).resolve() != Path(__file__).resolve()]
    outside = [f for f in frames if "torch" not in Path(f.filename).parts]
    f = (outside or frames)[-1]
    parts = Path(f.filename).parts
    for key in ("megatron_spectra", "megatron", "emerging_optimizers", "torch"):
        if key in parts:
            return "/".join(parts[parts.index(key):]) + f":{f.lineno}"
    return f"{f.filename}:{f.lineno}"


# ----------------------------------------------------------------------------- model steps


def model_shapes(name: str, tiny: bool) -> dict:
    """The paper's model (configs/models) at full width, or 2 layers at 1/16 width when tiny."""
    from .cluster import paper_run

    run = paper_run(name)
    m = run.model
    shape = dict(layers=m.layers, hidden=m.hidden, heads=m.heads, ffn=m.ffn, vocab=m.vocab, seq=1024, micro=run.micro_batch)
    if tiny:
        shape.update(layers=2, hidden=m.hidden // 16, ffn=m.ffn // 16, vocab=m.vocab // 16, seq=32, micro=2)
    return shape


def _args(shape: dict, optimizer: str, micro: int, bf16: bool):
    from ..train.args import parse_args

    flags = (
        f"--num-layers {shape['layers']} --hidden-size {shape['hidden']} --ffn-hidden-size {shape['ffn']} "
        f"--num-attention-heads {shape['heads']} --seq-length {shape['seq']} --max-position-embeddings {shape['seq']} "
        "--swiglu --normalization RMSNorm --position-embedding-type rope --untie-embeddings-and-output-weights "
        "--disable-bias-linear --hidden-dropout 0 --attention-dropout 0 "
        f"--micro-batch-size {micro} --global-batch-size {micro} --lr 1e-3 --weight-decay 0.1 --clip-grad 1.0"
    ).split() + (["--bf16"] if bf16 else [])
    if optimizer != "dist-muon":
        flags.append("--use-distributed-optimizer")
    if optimizer.startswith("spectra-"):
        flags += ["--optimizer", "spectra-adamw", "--spectra-mode", optimizer.split("-")[1],
                  "--spectra-clip-threshold", "10", "--spectra-clip-schedule", "constant"]
    else:
        flags += ["--optimizer", "adam"]
    return parse_args(flags, 1)


@dataclass
class StepTimes:
    opt_ms: list = field(default_factory=list)
    train_ms: list = field(default_factory=list)
    losses: list = field(default_factory=list)
    reads: HostReads | None = None


def time_steps(shape: dict, optimizer: str, micro: int, steps: int, warmup: int, device: torch.device) -> StepTimes:
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from ..train.loop import build_optimizer, global_loss, optimizer_config, set_seed, wrap_ddp
    from ..train.model import build_model, forward_step

    cuda = device.type == "cuda"
    args = _args(shape, optimizer, micro, bf16=cuda)
    set_seed(args.seed)
    model = wrap_ddp(build_model(args, shape["vocab"]).to(device), args)
    if optimizer == "dist-muon":
        from dataclasses import replace

        from .muon import build_dist_muon

        opt = build_dist_muon([model], replace(optimizer_config(args), muon_momentum=0.9))
    else:
        opt = build_optimizer(args, model)
    g = torch.Generator().manual_seed(0)
    out = StepTimes()
    for step in range(warmup + steps):
        tokens = torch.randint(0, shape["vocab"], (micro, shape["seq"] + 1), generator=g).to(device)
        batch = {"tokens": tokens[:, :-1], "labels": tokens[:, 1:], "loss_mask": torch.ones_like(tokens[:, 1:], dtype=torch.float),
                 "position_ids": torch.arange(shape["seq"], device=device).unsqueeze(0).expand(micro, -1)}
        _sync(cuda)
        start = time.perf_counter()
        model.zero_grad_buffer()
        opt.zero_grad()
        reduced = get_forward_backward_func()(forward_step_func=forward_step, data_iterator=iter([batch]), model=[model],
                                              num_microbatches=1, seq_length=shape["seq"], micro_batch_size=micro,
                                              forward_only=False)
        _sync(cuda)
        before = time.perf_counter()
        if step == warmup - 1:  # the last warm-up step, not timed: count its host reads
            out.reads = HostReads(cpu_too=not cuda)
            with out.reads:
                opt.step()
        else:
            opt.step()
        _sync(cuda)
        end = time.perf_counter()
        out.losses.append(global_loss(reduced))
        if step >= warmup:
            out.opt_ms.append(1e3 * (end - before))
            out.train_ms.append(1e3 * (end - start))
    return out


def _sync(cuda: bool) -> None:
    if cuda:
        torch.cuda.synchronize()


def model_rows(names: list[str], optimizers: list[str], device: torch.device, tiny: bool, steps: int, warmup: int,
               deadline: float, sites: dict) -> list[Row]:
    from .muon import muon_available

    rows, cuda = [], device.type == "cuda"
    muon_ok, muon_why = muon_available()
    for name in names:
        shape = model_shapes(name, tiny)
        where = f"{name} {shape['layers']}x{shape['hidden']}/{shape['ffn']}, seq {shape['seq']}"
        micro = shape["micro"]
        for optimizer in optimizers:
            case = f"{where}: {optimizer}"
            if optimizer == "dist-muon" and not muon_ok:
                rows.append(Row("model", case, note=f"Muon: not importable ({muon_why})"))
                continue
            if time.perf_counter() > deadline:
                rows.append(Row("model", case, note="skipped: over the time budget"))
                continue
            failure = None
            try:
                t, micro = _fitting_run(shape, optimizer, micro, steps, warmup, device)
            except Exception as e:  # noqa: BLE001 - one broken row must not cost the rest of a GPU session
                failure = f"FAIL: {type(e).__name__}: {' '.join(str(e).split())[:160]}"
            if failure:
                rows.append(Row("model", case, note=failure))
                _free(cuda)
                continue
            if t is None:
                rows.append(Row("model", case, note="out of memory at micro-batch 1"))
                continue
            peak = f"{torch.cuda.max_memory_allocated() / 2**30:.1f} GiB" if cuda else "-"
            mine = sum(n for (site, _), n in t.reads.sites.items() if site.startswith("megatron_spectra"))
            sites[case] = t.reads.sites
            rows.append(Row(
                "model", f"{case} (micro {micro})",
                f"{statistics.median(t.opt_ms):.1f} / {statistics.median(t.train_ms):.1f}",
                f"host reads/step {t.reads.count} ({mine} ours); loss {t.losses[0]:.3f} -> {t.losses[-1]:.3f}", peak))
            _free(cuda)
    return rows


def _fitting_run(shape, optimizer, micro, steps, warmup, device):
    """time_steps at `micro`, halving it on out-of-memory; (None, 1) if even 1 does not fit."""
    cuda = device.type == "cuda"
    while True:
        oom = False
        try:
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            return time_steps(shape, optimizer, micro, steps, warmup, device), micro
        except torch.OutOfMemoryError:
            oom = True  # freed below, once the traceback (and the tensors it holds) is gone
        if oom:
            _free(cuda)
            if micro == 1:
                return None, 1
            micro //= 2


def _free(cuda: bool) -> None:
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()


@contextlib.contextmanager
def one_process_world(cuda: bool):
    """World size 1 (gloo on CPU with megatron-core's CPU shims, NCCL on a GPU), TP=1 DP=1."""
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    from ..train.main import _megatron_device, _process_group

    with _process_group(not cuda), _megatron_device(not cuda, force=not cuda):  # --tiny on a GPU machine: CPU too
        ps.initialize_model_parallel(tensor_model_parallel_size=1)
        try:
            yield
        finally:
            get_cuda_rng_tracker().reset()
            ps.destroy_model_parallel()


# ----------------------------------------------------------------------------- driver


def format_table(rows: list[Row], header: str) -> str:
    lines = [header, "", "| section | case | ms (opt / train) | result | peak memory | note |", "|---|---|---:|---|---:|---|"]
    lines += [f"| {r.section} | {r.case} | {r.ms} | {r.detail} | {r.peak} | {r.note} |" for r in rows]
    return "\n".join(lines)


def format_sites(sites: dict, cuda: bool, top: int = 6) -> str:
    """Per optimizer, the sites of its first model row's host reads, most frequent first."""
    what = "of CUDA tensors" if cuda else "of any tensor: a CPU run, where some are host tensors that sync nothing on a GPU"
    lines, seen = [f"Host reads in one optimizer step ({what}), by site:"], set()
    for case, counter in sites.items():
        optimizer = case.rsplit(": ", 1)[-1]
        if optimizer in seen:
            continue
        seen.add(optimizer)
        lines.append(f"  {case}: {sum(counter.values())}" + ("" if counter else " (none)"))
        lines += [f"    {n:4d}  {kind:9s} {site}" for (site, kind), n in counter.most_common(top)]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="gpu_check", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="tiny sizes on CPU (automatic without CUDA)")
    p.add_argument("--models", default="160m,820m")
    p.add_argument("--optimizers", default=",".join(OPTIMIZERS), help="from: " + ", ".join(OPTIMIZERS))
    p.add_argument("--steps", type=int, default=None, help="timed steps per optimizer (default 5; tiny 2)")
    p.add_argument("--clip-size", type=int, default=None, help="clip matrices are 4d x d (default 1024; tiny 32)")
    p.add_argument("--tests", default="tests", help="paths for `pytest -m gpu` (comma-separated; 'none' to skip)")
    p.add_argument("--budget", type=float, default=360.0, help="seconds after which model rows are skipped (default 360)")
    args = p.parse_args(argv)
    cuda = torch.cuda.is_available() and not args.tiny
    tiny = not cuda
    device = torch.device("cuda", 0) if cuda else torch.device("cpu")
    optimizers = [o.strip() for o in args.optimizers.split(",") if o.strip()]
    bad = [o for o in optimizers if o not in OPTIMIZERS]
    if bad:
        raise SystemExit(f"gpu_check: unknown optimizers {bad}; from {list(OPTIMIZERS)}")
    started = time.perf_counter()
    rows = []
    if args.tests != "none":
        rows.append(gpu_tests(args.tests.split(","), timeout=max(60.0, args.budget / 3)))
    rows += clip_rows(device, args.clip_size or (32 if tiny else 1024), repeats=3 if tiny else 5)
    sites: dict = {}
    with one_process_world(cuda):
        rows += model_rows([m.strip() for m in args.models.split(",") if m.strip()], optimizers, device, tiny,
                           args.steps or (2 if tiny else 5), 2, started + args.budget, sites)
    what = torch.cuda.get_device_name(0) if cuda else "CPU (tiny sizes: fp32, 2 layers, widths / 16, seq 32)"
    print(format_table(rows, f"GPU check on {what}, torch {torch.__version__}"))
    print()
    print(format_sites(sites, cuda))
    print(f"\nTotal time: {time.perf_counter() - started:.1f} s")
    return 1 if any(r.note.startswith("FAIL") for r in rows) else 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONWARNINGS", "ignore")
    from ..known_warnings import quiet_known_warnings

    quiet_known_warnings()
    raise SystemExit(main())
