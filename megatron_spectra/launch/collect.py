"""`spectra sweep --collect DIR`: every run under DIR into one CSV, a markdown table and a plot.

A run is a folder with a config.yaml (written at launch) or named in DIR/runs.txt (written
when a sweep is submitted, so runs that never started are listed too). Metrics come from the
builtin trainer's metrics.jsonl, else the run's logs (Megatron-LM log lines), else its
TensorBoard events (needs the tensorboard package; without it that reader is skipped with a
message). `spectra demo` is collected the same way.
"""

from __future__ import annotations

import csv
import io
import math
from dataclasses import dataclass
from pathlib import Path

import yaml

from .logs import RunLog, parse_logs, parse_metrics, parse_tensorboard, perplexity, tensorboard_available
from .runner import run_state

TAIL = 10  # final train loss: the mean over the last TAIL iterations (one batch is noisy)


def _ratio(value: float) -> str:
    return f"{100 * value:.0f}%"


# (key: the CSV's column, header: the markdown's, format of a number in the markdown)
COLUMNS = (
    ("run", "run", None),
    ("state", "state", None),
    ("optimizer", "optimizer", None),
    ("lr", "lr", "g"),
    ("clip_threshold", "c", "g"),
    ("clip_schedule", "c schedule", None),
    ("iteration", "iteration", None),
    ("train_iters", "of", None),
    ("final_train_loss", "final train loss", ".3f"),
    ("final_val_loss", "final val loss", ".3f"),
    ("val_ppl", "val ppl", ".4g"),
    ("largest_loss_rise", "largest loss rise", ".3f"),
    ("loss_noise", "batch noise", ".3f"),
    ("max_update_norm_before", "largest ‖U‖₂ before clipping", ".3g"),
    ("max_update_norm", "largest ‖U‖₂ after clipping", ".3g"),
    ("tokens_per_s", "tokens/s", ".0f"),
    ("optimizer_share", "optimizer step share", _ratio),
)
KEYS = tuple(key for key, _, _ in COLUMNS)


@dataclass
class RunResult:
    row: dict
    log: RunLog
    config: dict
    run_dir: Path | None = None


def find_runs(root: Path) -> list[Path]:
    """A sweep's runs in its order (runs.txt), then any other run folders, sorted."""
    root = Path(root)
    listing = root / "runs.txt"
    listed = [root / line.split()[0] for line in listing.read_text().splitlines() if line.strip()] if listing.is_file() else []
    found = {p.parent for p in root.rglob("config.yaml")} - set(listed)
    return listed + sorted(found)


def read_run(run_dir: Path, notes: list) -> RunLog:
    if (run_dir / "metrics.jsonl").is_file():
        return parse_metrics(run_dir / "metrics.jsonl")
    logs = sorted((run_dir / "logs").glob("*.log")) if (run_dir / "logs").is_dir() else []
    log = parse_logs(logs) if logs else RunLog()
    if not log.train_loss and (run_dir / "tensorboard").is_dir():
        log = _from_tensorboard(run_dir / "tensorboard", notes) or log
    return log


def collect_run(run_dir: Path, root: Path, notes: list) -> RunResult:
    config = yaml.safe_load((run_dir / "config.yaml").read_text()) if (run_dir / "config.yaml").is_file() else {}
    train, opt = config.get("training", {}), config.get("optimizer", {})
    log = read_run(run_dir, notes)
    loss = log.last_val_loss
    # The spectra section of a baseline's config holds defaults its run never used.
    spectra = (opt.get("spectra") or {}) if str(opt.get("name")).startswith("spectra-") else {}
    tps = log.summary.get("tokens_per_s") or (log.tokens_per_second(config.get("model", {}).get("seq_length", 0)) if config else None)
    row = {
        "run": str(run_dir.relative_to(root)) if run_dir != root else run_dir.name,
        "state": state_of(run_dir, train.get("train_iters")),
        "optimizer": opt.get("name"),
        "lr": train.get("lr"),
        "clip_threshold": spectra.get("clip_threshold"),
        "clip_schedule": spectra.get("clip_schedule"),
        "iteration": log.last_iteration or None,
        "train_iters": train.get("train_iters") or log.train_iters,
        "final_train_loss": final_train_loss(log),
        "final_val_loss": loss,
        "val_ppl": perplexity(loss),
        "largest_loss_rise": largest_loss_rise(log),
        "loss_noise": loss_noise(log),
        "max_update_norm_before": max_update_norm(log, before=True),
        "max_update_norm": max_update_norm(log),
        "tokens_per_s": tps,
        "optimizer_share": log.summary.get("optimizer_share"),
    }
    return RunResult(row, log, config, run_dir)


DIVERGED = "diverged"


def state_of(run_dir: Path, train_iters) -> str:
    """The runner's state, with a failed run that the trainer stopped on a non-finite loss or
    gradient (its NonFiniteError in the log) told apart as diverged: a result, not an error."""
    state = run_state(run_dir, train_iters)
    if state == "failed":
        logs = sorted((run_dir / "logs").glob("*.log")) if (run_dir / "logs").is_dir() else []
        if any("NonFiniteError" in p.read_text(errors="replace") for p in logs):
            return DIVERGED
    return state


def final_train_loss(log: RunLog) -> float | None:
    """Mean of the train loss logged over the last TAIL iterations (Megatron-LM's logged
    values are themselves means over their log interval)."""
    tail = [loss for it, loss in log.train_loss.items() if it > log.last_iteration - TAIL]
    return sum(tail) / len(tail) if tail else None


def _after_warmup(log: RunLog, series: dict) -> list[float]:
    """Values after the first 10% of iterations (the warm-up)."""
    return [v for it, v in sorted(series.items()) if it > log.last_iteration // 10]


def largest_loss_rise(log: RunLog) -> float | None:
    """The largest rise of the train loss above its best value so far, after the warm-up: a
    spike or a divergence shows here; inf when the loss went non-finite."""
    if not log.train_loss:
        return None
    best, rise = math.inf, 0.0
    for it, loss in sorted(log.train_loss.items()):
        if not math.isfinite(loss):
            return math.inf
        if it > log.last_iteration // 10 and math.isfinite(best):
            rise = max(rise, loss - best)
        best = min(best, loss)
    return rise


def loss_noise(log: RunLog) -> float | None:
    """Batch-to-batch noise of the train loss after the warm-up: the standard deviation of its
    change from one iteration to the next, over sqrt(2) (one batch's spread around the trend,
    if the batches' errors are independent); None with fewer than 4 such iterations."""
    losses = _after_warmup(log, log.train_loss)
    steps = [b - a for a, b in zip(losses, losses[1:]) if math.isfinite(a) and math.isfinite(b)]
    if len(steps) < 3:
        return None
    mean = sum(steps) / len(steps)
    return math.sqrt(sum((s - mean) ** 2 for s in steps) / (len(steps) - 1) / 2)


def max_update_norm(log: RunLog, before: bool = False) -> float | None:
    """The largest update spectral norm over the weight matrices after the warm-up, as applied
    (after clipping) or before: the standard schedule lifts the threshold to c·lr_max/lr while
    the lr ramps up."""
    values = _after_warmup(log, log.update_norm_before if before else log.update_norm_after)
    return max(values) if values else None


def _from_tensorboard(folder: Path, notes: list) -> RunLog | None:
    if not tensorboard_available():
        note = "tensorboard is not installed: TensorBoard events were not read (pip install tensorboard)"
        if note not in notes:
            notes.append(note)
        return None
    return parse_tensorboard(folder)


def collect(root: Path, runs: list[Path] | None = None) -> tuple[list[RunResult], list[str]]:
    """Every run under root, or just `runs` (folders under root)."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"no such folder {root}")
    notes: list[str] = []
    results = [collect_run(Path(run), root, notes) for run in (find_runs(root) if runs is None else runs)]
    if not results:
        notes.append(f"no runs under {root} (a run folder has a config.yaml; a sweep folder a runs.txt)")
    return results, notes


def _cell(value, fmt) -> str:
    if value is None:
        return ""
    if isinstance(value, float) and not math.isfinite(value):
        return "diverged" if value == math.inf else "n/a"
    if fmt is None or not isinstance(value, (int, float)) or isinstance(value, bool):
        return str(value)
    return fmt(value) if callable(fmt) else format(value, fmt)


def to_csv(results: list[RunResult]) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=KEYS)
    writer.writeheader()
    for r in results:
        writer.writerow({k: "" if r.row[k] is None else r.row[k] for k in KEYS})
    return out.getvalue()


def to_markdown(results: list[RunResult]) -> str:
    """Columns that no run has a value for are left out (the CSV has them all)."""
    shown = [(k, head, fmt) for k, head, fmt in COLUMNS if any(r.row[k] is not None for r in results)]
    lines = ["| " + " | ".join(head for _, head, _ in shown) + " |", "|" + "---|" * len(shown)]
    for r in results:
        lines.append("| " + " | ".join(_cell(r.row[k], fmt) for k, _, fmt in shown) + " |")
    return "\n".join(lines) + "\n"


def plot(results: list[RunResult], path: Path) -> bool:
    """Left: train loss (lines) and validation loss (dots) against iteration. Right, where runs
    measured them: the largest update spectral norm, before clipping (dashed) and as applied
    (solid), with each clipped run's threshold c."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    drawn = [r for r in results if r.log.train_loss or r.log.val_loss]
    if not drawn:
        return False
    norms = any(r.log.update_norm_after for r in drawn)
    fig, axes = plt.subplots(1, 2 if norms else 1, figsize=(13 if norms else 8, 4.8), squeeze=False)
    left = axes[0][0]
    for i, r in enumerate(drawn):
        label = r.row["run"] + ("" if r.row["state"] == "completed" else f" ({r.row['state']})")
        train, val = sorted(r.log.train_loss.items()), sorted(r.log.val_loss.items())
        left.plot([it for it, _ in train], [v if math.isfinite(v) else math.nan for _, v in train], color=f"C{i}", lw=1, label=label)
        left.plot([it for it, _ in val], [v for _, v in val], "o", color=f"C{i}", ms=4)
    left.set(xlabel="iteration", ylabel="lm loss (dots: validation)", title="loss")
    left.legend(fontsize=8)
    if norms:
        _plot_norms(axes[0][1], drawn)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def _plot_norms(ax, results: list[RunResult]) -> None:
    for i, r in enumerate(results):
        steps = sorted(r.log.update_norm_after)
        if not steps:
            continue
        c = r.row["clip_threshold"]
        if c is not None:
            ax.plot(steps, [r.log.update_norm_before[s] for s in steps], "--", color=f"C{i}", lw=1, label=f"{r.row['run']}: before clipping")
        ax.plot(steps, [r.log.update_norm_after[s] for s in steps], "-", color=f"C{i}", lw=1.5,
                label=f"{r.row['run']}: {'after clipping' if c is not None else 'unclipped'}")
    for c in sorted({r.row["clip_threshold"] for r in results if r.row["clip_threshold"] is not None}):
        ax.axhline(c, color="gray", lw=0.8, ls=":", label=f"c = {c:g}")
    ax.set(xlabel="iteration", ylabel=r"max over matrices of $\|U\|_2$ (U before lr·alpha)", title="largest update spectral norm", yscale="log")
    ax.legend(fontsize=7)


def write_outputs(root: Path, results: list[RunResult], plot_name: str = "results.png") -> dict:
    root = Path(root)
    paths = {"csv": root / "results.csv", "markdown": root / "results.md", "plot": root / plot_name}
    paths["csv"].write_text(to_csv(results))
    paths["markdown"].write_text(to_markdown(results))
    if not plot(results, paths["plot"]):
        del paths["plot"]
    return paths
