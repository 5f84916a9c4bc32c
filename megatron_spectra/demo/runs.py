"""The main job's runs: which trainer command lines, on how many processes, and running them.

Every run is `megatron_spectra.train` with Megatron-LM flags. All runs share one world of
TP x DP processes (spawned once, so megatron-core is imported once rather than per run) and
one corpus, built before they start. With enough GPUs the world runs on them under NCCL;
otherwise megatron-core runs on CPU under gloo.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass

import torch

# The paper's recipe (124M/160M rows of Table F.1, SPEC.md section 2), scaled down to a model
# that trains in minutes on 2 CPU cores: LLaMA-style, WSD with sqrt decay over the last 20%,
# AdamW betas (0.8, 0.999), grad clip 0.5, wd 0.1, c = 10 with the standard schedule.
MODEL_FLAGS = [
    "--num-layers", "4", "--hidden-size", "128", "--ffn-hidden-size", "384", "--num-attention-heads", "4",
    "--seq-length", "128", "--max-position-embeddings", "128",
    "--swiglu", "--normalization", "RMSNorm", "--norm-epsilon", "1e-5", "--position-embedding-type", "rope",
    "--untie-embeddings-and-output-weights", "--disable-bias-linear", "--hidden-dropout", "0", "--attention-dropout", "0",
    "--make-vocab-size-divisible-by", "64", "--tokenizer-type", "ByteLevelTokenizer",
]
RECIPE_FLAGS = [
    "--micro-batch-size", "4", "--global-batch-size", "16", "--lr-decay-style", "WSD", "--lr-wsd-decay-style", "minus_sqrt",
    "--min-lr", "0", "--weight-decay", "0.1", "--clip-grad", "0.5", "--adam-beta1", "0.8", "--adam-beta2", "0.999",
    "--adam-eps", "1e-8", "--use-distributed-optimizer", "--seed", "1234", "--split", "95,5,0",
    "--spectra-clip-threshold", "10", "--spectra-clip-schedule", "standard", "--spectra-mode", "paper",
]
# CPUs without native bf16 matmuls run the official bf16 Newton-Schulz ~100x slower than fp32.
CPU_FLAGS = ["--trainer-cpu", "--spectra-ns-fp32"]


@dataclass(frozen=True)
class Run:
    name: str
    optimizer: str
    lr: float

    @property
    def slug(self) -> str:
        return f"{self.optimizer}_lr{self.lr:g}"


def plan_runs(optimizer: str, baseline: str, lr: float, high_lr: float | None) -> list[Run]:
    lrs = [lr] + ([high_lr] if high_lr else [])
    return [Run(f"{name} lr={rate:g}", name, rate) for rate in lrs for name in (optimizer, baseline)]


def world(tp: int, dp: int) -> tuple[int, str]:
    """(processes, backend): GPUs under NCCL when there are enough of them, else CPU and gloo."""
    size = tp * dp
    if torch.cuda.is_available() and torch.cuda.device_count() >= size:
        return size, "nccl"
    return size, "gloo"


def trainer_argv(run: Run, out: str, data_prefix: str, steps: int, tp: int, backend: str, extra: list[str]) -> list[str]:
    warmup = max(1, steps // 10)
    argv = [
        *MODEL_FLAGS, *RECIPE_FLAGS,
        "--tensor-model-parallel-size", str(tp), "--optimizer", run.optimizer, "--lr", str(run.lr),
        "--train-iters", str(steps), "--lr-warmup-iters", str(warmup), "--lr-wsd-decay-iters", str(max(1, steps // 5)),
        "--log-interval", "5", "--eval-interval", str(max(5, steps // 4)), "--eval-iters", "4",
        "--data-path", data_prefix, "--data-cache-path", os.path.join(out, "data", "cache"),
        "--trainer-out", os.path.join(out, "runs", run.slug), "--trainer-name", run.name,
        "--trainer-progress", "--trainer-update-norms",
    ]
    if backend == "gloo":
        argv += CPU_FLAGS
    return argv + list(extra)


def build_corpus(out: str) -> str:
    """The tokenized corpus (megatron-core indexed dataset) under out/data, built once."""
    from ..train.args import build_parser
    from ..train.data import CORPUS_NAME, build_tokenizer, write_indexed_dataset, corpus_documents

    prefix = os.path.join(out, "data", f"{CORPUS_NAME}_text_document")
    if not os.path.exists(prefix + ".idx"):
        tokenizer = build_tokenizer(build_parser().parse_args([]))
        write_indexed_dataset(corpus_documents(), tokenizer, prefix)
    return prefix


def run_all(argvs: list[list[str]], logs: list[str], size: int, backend: str, timeout: float) -> list[dict]:
    """Every run in turn on one world of `size` spawned processes; the summaries, in order."""
    from ..launch.spawn import run_distributed

    return run_distributed(_worker, size, args=(argvs, logs, backend), timeout=timeout, backend=backend)[0]


def _worker(rank: int, world_size: int, argvs: list[list[str]], logs: list[str], backend: str) -> list[dict]:
    from ..train.logs import quiet_known_warnings

    quiet_known_warnings()  # before megatron's imports, which warn
    from ..train.main import train

    if backend == "nccl":
        torch.cuda.set_device(rank % torch.cuda.device_count())
    summaries = []
    for argv, log in zip(argvs, logs):
        with _tee_stdout(log if rank == 0 else None):
            summaries.append(train(argv))
    return summaries


class _tee_stdout:
    """stdout also into a file (the run's log lines), for the duration of a run."""

    def __init__(self, path: str | None):
        self.path = path

    def __enter__(self):
        if self.path:
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
            self.file, self.stdout = open(self.path, "w", encoding="utf-8"), sys.stdout
            sys.stdout = self
        return self

    def write(self, text: str) -> int:
        self.file.write(text)
        return self.stdout.write(text)

    def flush(self) -> None:
        self.file.flush()
        self.stdout.flush()

    def __exit__(self, *exc):
        if self.path:
            sys.stdout = self.stdout
            self.file.close()
        return False
