#!/usr/bin/env bash
# The one-call GPU check: on one H100/H200 (a few minutes, under 8), ONE table of the
# GPU-marked tests, the soft clip on CUDA (bf16 and fp32 in; paper, paper-fp32 and accurate:
# ms and error vs the SVD clip), and the optimizer and train step of the paper's 160M and
# 820M models at full width on the one GPU (AdamW, spectra-adamw paper and accurate, Muon
# where importable; peak memory; host reads per optimizer step), then where those host reads
# come from. Without CUDA it runs the same code at tiny sizes on CPU (tests/test_gpu_check.py).
# Arguments go to `python -m megatron_spectra.bench.gpu_check` (--help lists them).
set -euo pipefail
cd "$(dirname "$0")/.."
exec "${PYTHON:-python3}" -m megatron_spectra.bench.gpu_check "$@"
