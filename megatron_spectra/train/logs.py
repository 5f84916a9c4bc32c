"""What the trainer writes: Megatron-LM's log lines (stdout), a progress bar (stderr) and a
per-step record (metrics.jsonl), all from rank 0.

The line formats are Megatron-LM's `training_log` and `evaluate_and_print_results`, so one
collector reads logs from this trainer and from pretrain_gpt.py alike; spectra scalars are
appended as extra ` name: value |` fields.
"""

from __future__ import annotations

import json
import math
import sys
import time
from datetime import datetime

from ..known_warnings import KNOWN_NOISE, quiet_known_warnings  # noqa: F401  (the trainer's entry points call it)


def training_line(iteration: int, train_iters: int, consumed: int, ms_per_iter: float, lr: float,
                  global_batch: int, loss: float, grad_norm, skipped: int, nans: int, extra: dict) -> str:
    line = f" [{datetime.now().strftime('%Y-%m-%d %H:%M:%S')}]"
    line += " iteration {:8d}/{:8d} |".format(iteration, train_iters)
    line += " consumed samples: {:12d} |".format(consumed)
    line += " elapsed time per iteration (ms): {:.1f} |".format(ms_per_iter)
    line += " learning rate: {:.6E} |".format(lr)
    line += " global batch size: {:5d} |".format(global_batch)
    line += " lm loss: {:.6E} |".format(loss)
    line += " loss scale: {:.1f} |".format(1.0)
    if grad_norm is not None:
        line += " grad norm: {:.3f} |".format(grad_norm)
    line += " number of skipped iterations: {:3d} |".format(skipped)
    line += " number of nan iterations: {:3d} |".format(nans)
    for name, value in extra.items():
        line += f" {name}: {value:.6E} |" if isinstance(value, float) else f" {name}: {value} |"
    return line


def validation_lines(iteration: int, loss: float) -> list[str]:
    line = f" validation loss at iteration {iteration} | "
    line += "lm loss value: {:.6E} | ".format(loss)
    line += "lm loss PPL: {:.6E} | ".format(math.exp(min(20, loss)))
    rule = "-" * (len(line) + 1)
    return [rule, line, rule]


class ProgressBar:
    """A plain text bar on stderr: redrawn in place on a terminal, every 10% otherwise."""

    def __init__(self, total: int, label: str, stream=None, width: int = 30):
        self.total, self.label, self.width = total, label, width
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.start = time.perf_counter()
        self._last_decile = -1

    def update(self, done: int, loss: float | None) -> None:
        decile = done * 10 // max(self.total, 1)
        if not self.tty and decile == self._last_decile and done < self.total:
            return
        self._last_decile = decile
        filled = self.width * done // max(self.total, 1)
        elapsed = time.perf_counter() - self.start
        rate = done / elapsed if elapsed > 0 else 0.0
        eta = (self.total - done) / rate if rate > 0 else float("nan")
        loss_text = f" loss {loss:.3f}" if loss is not None and math.isfinite(loss) else f" loss {loss}"
        text = (f"{self.label} [{'#' * filled}{'.' * (self.width - filled)}] {done}/{self.total}"
                f"{loss_text} {rate:.2f} it/s eta {eta:.0f}s")
        self.stream.write(("\r" + text) if self.tty else (text + "\n"))
        if self.tty and done >= self.total:
            self.stream.write("\n")
        self.stream.flush()


class MetricsFile:
    """metrics.jsonl: one JSON object per line ("kind": "train" | "valid" | "summary")."""

    def __init__(self, path: str | None):
        self.file = open(path, "a", encoding="utf-8") if path else None

    def write(self, kind: str, **fields) -> None:
        if self.file is not None:
            self.file.write(json.dumps({"kind": kind, **fields}) + "\n")
            self.file.flush()

    def close(self) -> None:
        if self.file is not None:
            self.file.close()


def read_metrics(path: str) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]
