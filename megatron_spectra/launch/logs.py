"""Reading a run's metrics back: the builtin trainer's metrics.jsonl, Megatron-LM's log lines,
or its TensorBoard events.

Megatron-LM (core_r0.16 - 0.19, `training.py`) prints, and the builtin trainer copies:

     [2026-11-23 10:00:00.123] iteration       10/     100 | consumed samples: 320 | elapsed time per iteration (ms): 123.4 | ... | lm loss: 5.123456E+00 | ...
     validation loss at iteration 100 | lm loss value: 4.5E+00 | lm loss PPL: 9.0E+01 |
     validation loss at iteration 100 on validation set | lm loss value: ...   (the final one)

The builtin trainer also writes metrics.jsonl: a record per iteration ("kind": "train", with
the update spectral norms at log steps under --trainer-update-norms), per evaluation
("valid") and one "summary" at the end (its own tokens/s and the optimizer step's share).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

_NUM = r"([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?|nan|inf)"
_ITER = re.compile(r"\biteration\s+(\d+)/\s*(\d+)\s*\|")
_FIELD = re.compile(r"\s*([a-zA-Z][^:|]*?):\s*" + _NUM + r"\s*(?=\|)")
_VALID = re.compile(r"\bvalidation(?:-\d+)? loss at iteration (\d+)( on validation set)?\s*\|\s*lm loss value:\s*" + _NUM
                    + r"\s*\|\s*lm loss PPL:\s*" + _NUM)


@dataclass
class RunLog:
    train_iters: int | None = None
    last_iteration: int = 0
    train_loss: dict = field(default_factory=dict)  # iteration -> lm loss
    val_loss: dict = field(default_factory=dict)  # iteration -> validation lm loss
    step_ms: dict = field(default_factory=dict)  # iteration -> elapsed time per iteration (ms)
    global_batch: int | None = None
    final_val_loss: float | None = None  # the "on validation set" evaluation after training
    update_norm_before: dict = field(default_factory=dict)  # iteration -> largest ||U||_2 before clipping
    update_norm_after: dict = field(default_factory=dict)  # iteration -> ... as applied
    lr: dict = field(default_factory=dict)  # iteration -> lr (metrics.jsonl only)
    clip_threshold: dict = field(default_factory=dict)  # iteration -> SPECTRA's lifted c_k (metrics.jsonl only)
    summary: dict = field(default_factory=dict)  # the builtin trainer's closing record

    @property
    def log_interval(self) -> int:
        """Iterations between the last two logged ones (1 with one or none): a run whose last
        logged iteration is within this of its target ran to the end."""
        its = sorted(self.train_loss)
        return its[-1] - its[-2] if len(its) > 1 else 1

    @property
    def last_val_loss(self) -> float | None:
        if self.final_val_loss is not None:
            return self.final_val_loss
        return self.val_loss[max(self.val_loss)] if self.val_loss else None

    def tokens_per_second(self, seq_length: int) -> float | None:
        """Median over logged intervals after the first (which includes start-up)."""
        times = [ms for it, ms in sorted(self.step_ms.items())][1:] or list(self.step_ms.values())
        if not times or not self.global_batch:
            return None
        ms = sorted(times)[len(times) // 2]
        return self.global_batch * seq_length / (ms / 1000.0) if ms > 0 else None


def parse_log_text(text: str, log: RunLog | None = None) -> RunLog:
    log = log or RunLog()
    for line in text.splitlines():
        m = _VALID.search(line)
        if m:
            it, final, loss = int(m.group(1)), m.group(2), float(m.group(3))
            if final:
                log.final_val_loss = loss
            else:
                log.val_loss[it] = loss
            continue
        m = _ITER.search(line)
        if m:
            _parse_iteration(line[m.end():], int(m.group(1)), int(m.group(2)), log)
    return log


def _parse_iteration(rest: str, it: int, total: int, log: RunLog) -> None:
    log.train_iters, log.last_iteration = total, max(log.last_iteration, it)
    fields = {k.strip(): v for k, v in _FIELD.findall(rest + "|")}
    if "lm loss" in fields:
        log.train_loss[it] = float(fields["lm loss"])
    if "elapsed time per iteration (ms)" in fields:
        log.step_ms[it] = float(fields["elapsed time per iteration (ms)"])
    if "global batch size" in fields:
        log.global_batch = int(float(fields["global batch size"]))


def parse_logs(paths) -> RunLog:
    """Several log files of one run (resubmissions append): read oldest first."""
    log = RunLog()
    for path in sorted(paths, key=lambda p: Path(p).stat().st_mtime):
        parse_log_text(Path(path).read_text(errors="replace"), log)
    return log


def parse_metrics(path: str | Path) -> RunLog:
    """The builtin trainer's metrics.jsonl. A restarted run appends: later records win."""
    log = RunLog()
    for line in Path(path).read_text(errors="replace").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut short by a run that was killed
        kind, it = record.get("kind"), record.get("iteration")
        if kind == "train":
            log.train_loss[it] = record["lm_loss"]
            log.last_iteration = max(log.last_iteration, it)
            if "update_norm_after" in record:
                log.update_norm_before[it], log.update_norm_after[it] = record["update_norm_before"], record["update_norm_after"]
            if "lr" in record:
                log.lr[it] = record["lr"]
            if "spectra/clip-threshold" in record:
                log.clip_threshold[it] = record["spectra/clip-threshold"]
        elif kind == "valid":
            log.val_loss[it] = record["lm_loss"]
        elif kind == "summary":
            log.summary = record
            log.final_val_loss = record.get("val_loss")
    return log


def tensorboard_available() -> bool:
    try:
        import tensorboard.backend.event_processing.event_accumulator  # noqa: F401
    except ImportError:
        return False
    return True


def parse_tensorboard(folder: Path) -> RunLog | None:
    """Megatron's scalars 'lm loss' and 'lm loss validation' (tensorboard package needed)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0})
    acc.Reload()
    tags = set(acc.Tags().get("scalars", []))
    if "lm loss" not in tags:
        return None
    log = RunLog()
    log.train_loss = {e.step: e.value for e in acc.Scalars("lm loss")}
    log.last_iteration = max(log.train_loss)
    if "lm loss validation" in tags:
        log.val_loss = {e.step: e.value for e in acc.Scalars("lm loss validation")}
    return log


def perplexity(loss: float | None) -> float | None:
    return None if loss is None else math.exp(min(20.0, loss))  # Megatron caps at exp(20) too
