"""scripts/gpu_check.sh: its tiny CPU run (so the GPU check keeps working between GPU sessions),
its host-read counter, and the GPU-marked tests it runs first where there is a GPU."""

import os
import subprocess
from pathlib import Path

import pytest
import torch

from megatron_spectra.bench.gpu_check import HostReads

ROOT = Path(__file__).resolve().parents[1]
cuda_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_tiny_run_prints_one_table():
    # The test section runs `pytest -m gpu` on this file: its GPU tests, skipped here.
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    done = subprocess.run(["bash", "scripts/gpu_check.sh", "--tiny", "--tests", "tests/test_gpu_check.py"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    out = done.stdout
    table = [line for line in out.splitlines() if line.startswith("| ")]
    assert table[0].startswith("| section | case |") and len(table) == 1 + 1 + 7 + 8  # header, tests, clip, models
    assert "| tests | pytest -m gpu tests/test_gpu_check.py |" in out and "skipped" in table[1]
    for method in ("paper, bf16 in", "paper-fp32, fp32 in", "accurate, fp32 in", "svd (reference)"):
        assert f"| clip | {method}" in out
    accurate = next(line for line in table if "| clip | accurate, fp32 in" in line)
    assert float(accurate.split("err ")[1].split(" @10, ")[1].split(" @100")[0]) < 1e-3  # the accurate mode's promise
    for model in ("160m 2x48/128", "820m 2x128/352"):
        for optimizer in ("adam", "spectra-paper", "spectra-accurate"):
            row = next(line for line in table if f"{model}, seq 32: {optimizer} (micro 2)" in line)
            assert "host reads/step" in row and "loss" in row
        muon = next(line for line in table if f"{model}, seq 32: dist-muon" in line)
        assert "host reads/step" in muon or "Muon: not importable" in muon
    assert "Host reads in one optimizer step" in out and "Total time:" in out


def test_host_reads_counts_device_reads_and_their_sites():
    x = torch.arange(4.0)
    with HostReads(cpu_too=True) as reads:
        x.sum().item(), x.tolist(), bool(x.any()), float(x[0]), x.to("cpu")
        x + 1, x.to(torch.float64)  # not reads
    kinds = sorted(kind for _, kind in reads.sites)
    assert kinds == ["__bool__", "__float__", "item", "to", "tolist"] and reads.count == 5
    assert all(site.startswith(str(ROOT / "tests" / "test_gpu_check.py")) for site, _ in reads.sites)
    with HostReads(cpu_too=False) as reads:
        x.sum().item()
    assert reads.count == 0  # a CPU tensor's read is no device sync


# ----------------------------------------------------------------------------- GPU-marked


@pytest.mark.gpu
@cuda_only
def test_accurate_clip_on_cuda_matches_svd():
    from megatron_spectra.bench.clip import make_matrix, singular_value_error
    from megatron_spectra.ops import soft_spectral_clip

    for ratio in (10.0, 100.0, 1000.0):
        x = make_matrix(4096, 1024, ratio * 10.0, torch.device("cuda"))
        out = soft_spectral_clip(x, 10.0, mode="accurate")
        assert singular_value_error(out, torch.linalg.svdvals(x.double()), 10.0) < 1e-3


@pytest.mark.gpu
@cuda_only
def test_spectra_step_host_reads_do_not_grow_with_depth():
    """No per-matrix sync: the spectra step's reads of CUDA tensors are the same at 2 and 4 layers."""
    from megatron_spectra.bench import gpu_check

    counts = {}
    with gpu_check.one_process_world(cuda=True):
        for layers in (2, 4):
            shape = dict(gpu_check.model_shapes("160m", tiny=True), layers=layers)
            for optimizer in ("spectra-paper", "spectra-accurate"):
                t = gpu_check.time_steps(shape, optimizer, micro=2, steps=1, warmup=2, device=torch.device("cuda"))
                counts[optimizer, layers] = t.reads.count
    assert counts["spectra-paper", 2] == counts["spectra-paper", 4], counts
    assert counts["spectra-accurate", 2] == counts["spectra-accurate", 4], counts
