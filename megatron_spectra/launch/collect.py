"""`spectra sweep --collect DIR`: every run under DIR into one CSV, a markdown table and a plot.

A run is a folder with a config.yaml (written at launch) or named in DIR/runs.txt (written
when a sweep is submitted, so runs that never started are listed too). Metrics come from the
run's logs (Megatron-LM log lines), or, when there are none, its TensorBoard events (needs
the tensorboard package; without it that reader is skipped with a message).
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from pathlib import Path

import yaml

from .logs import RunLog, parse_logs, parse_tensorboard, perplexity, tensorboard_available
from .runner import run_state

COLUMNS = ("run", "state", "optimizer", "lr", "clip_threshold", "clip_schedule", "iteration", "train_iters",
           "final_val_loss", "val_ppl", "final_train_loss", "tokens_per_s")


@dataclass
class RunResult:
    row: dict
    log: RunLog


def find_runs(root: Path) -> list[Path]:
    root = Path(root)
    found = {p.parent for p in root.rglob("config.yaml")}
    listing = root / "runs.txt"
    if listing.is_file():
        found |= {root / line.split()[0] for line in listing.read_text().splitlines() if line.strip()}
    if (root / "config.yaml").is_file():
        found.add(root)
    return sorted(found)


def collect_run(run_dir: Path, root: Path, notes: list) -> RunResult:
    config = yaml.safe_load((run_dir / "config.yaml").read_text()) if (run_dir / "config.yaml").is_file() else {}
    train, opt = config.get("training", {}), config.get("optimizer", {})
    logs = sorted((run_dir / "logs").glob("*.log")) if (run_dir / "logs").is_dir() else []
    log = parse_logs(logs) if logs else RunLog()
    if not log.train_loss and (run_dir / "tensorboard").is_dir():
        log = _from_tensorboard(run_dir / "tensorboard", notes) or log
    loss = log.last_val_loss
    tps = log.tokens_per_second(config.get("model", {}).get("seq_length", 0)) if config else None
    spectra = opt.get("spectra") or {}
    row = {
        "run": str(run_dir.relative_to(root)) if run_dir != root else run_dir.name,
        "state": run_state(run_dir, train.get("train_iters")),
        "optimizer": opt.get("name"),
        "lr": train.get("lr"),
        "clip_threshold": spectra.get("clip_threshold"),
        "clip_schedule": spectra.get("clip_schedule"),
        "iteration": log.last_iteration or None,
        "train_iters": train.get("train_iters") or log.train_iters,
        "final_val_loss": loss,
        "val_ppl": perplexity(loss),
        "final_train_loss": log.train_loss[max(log.train_loss)] if log.train_loss else None,
        "tokens_per_s": tps,
    }
    return RunResult(row, log)


def _from_tensorboard(folder: Path, notes: list) -> RunLog | None:
    if not tensorboard_available():
        note = "tensorboard is not installed: TensorBoard events were not read (pip install tensorboard)"
        if note not in notes:
            notes.append(note)
        return None
    return parse_tensorboard(folder)


def collect(root: Path) -> tuple[list[RunResult], list[str]]:
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"no such folder {root}")
    notes: list[str] = []
    results = [collect_run(run, root, notes) for run in find_runs(root)]
    if not results:
        notes.append(f"no runs under {root} (a run folder has a config.yaml; a sweep folder a runs.txt)")
    return results, notes


def _cell(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1e4 else f"{value:.0f}"
    return str(value)


def to_csv(results: list[RunResult]) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=COLUMNS)
    writer.writeheader()
    for r in results:
        writer.writerow({k: "" if r.row[k] is None else r.row[k] for k in COLUMNS})
    return out.getvalue()


def to_markdown(results: list[RunResult]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in results:
        lines.append("| " + " | ".join(_cell(r.row[k]) for k in COLUMNS) + " |")
    return "\n".join(lines) + "\n"


def plot(results: list[RunResult], path: Path) -> bool:
    """Validation loss (or training loss where a run has none) against iteration."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    drawn = 0
    for r in results:
        curve, kind = (r.log.val_loss, "val") if r.log.val_loss else (r.log.train_loss, "train")
        if curve:
            steps = sorted(curve)
            ax.plot(steps, [curve[s] for s in steps], label=f"{r.row['run']} ({kind}, {r.row['state']})")
            drawn += 1
    if not drawn:
        plt.close(fig)
        return False
    ax.set_xlabel("iteration")
    ax.set_ylabel("lm loss")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def write_outputs(root: Path, results: list[RunResult]) -> dict:
    root = Path(root)
    paths = {"csv": root / "results.csv", "markdown": root / "results.md", "plot": root / "results.png"}
    paths["csv"].write_text(to_csv(results))
    paths["markdown"].write_text(to_markdown(results))
    if not plot(results, paths["plot"]):
        del paths["plot"]
    return paths
