"""The main job's outputs from the runs' metrics.jsonl: a markdown table and a PNG plot."""

from __future__ import annotations

import math

from ..train.logs import read_metrics

TAIL = 10  # final train loss: the mean of the last TAIL iterations (one batch is noisy)


def load(path: str) -> dict:
    records = read_metrics(path)
    return {
        "train": [r for r in records if r["kind"] == "train"],
        "valid": [r for r in records if r["kind"] == "valid"],
        "summary": next((r for r in reversed(records) if r["kind"] == "summary"), {}),
    }


def largest_rise(losses: list[float], skip: int) -> float:
    """The largest rise of the train loss above its best value so far, after `skip` iterations
    (warm-up): a spike or a divergence shows here; inf when the loss went non-finite."""
    best, rise = math.inf, 0.0
    for i, loss in enumerate(losses):
        if not math.isfinite(loss):
            return math.inf
        if i >= skip and math.isfinite(best):
            rise = max(rise, loss - best)
        best = min(best, loss)
    return rise


def row(name: str, metrics: dict) -> dict:
    losses = [r["lm_loss"] for r in metrics["train"]]
    tail = losses[-TAIL:]
    summary = metrics["summary"]
    # After warm-up: the standard schedule lifts the threshold to c·lr_max/lr while lr ramps up.
    warmup = len(losses) // 10
    afters = [r["update_norm_after"] for r in metrics["train"] if "update_norm_after" in r and r["iteration"] > warmup]
    return {
        "run": name,
        "final train loss": sum(tail) / len(tail) if tail else math.nan,
        "final val loss": summary.get("val_loss") if summary.get("val_loss") is not None else math.nan,
        "largest loss rise": largest_rise(losses, len(losses) // 10),
        "max update norm": max(afters) if afters else math.nan,
        "tokens/s": summary.get("tokens_per_s") or math.nan,
        "optimizer share": summary.get("optimizer_share") or math.nan,
    }


def table(rows: list[dict]) -> str:
    head = ["run", "final train loss", "final val loss", "largest loss rise", "max update norm after warm-up", "tokens/s",
            "optimizer step share"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        lines.append(
            f"| {r['run']} | {_num(r['final train loss'])} | {_num(r['final val loss'])} | {_num(r['largest loss rise'])} "
            f"| {_num(r['max update norm'], '.3g')} | {_num(r['tokens/s'], '.0f')} | {_num(100 * r['optimizer share'], '.0f')}% |"
        )
    return "\n".join(lines)


def _num(value, fmt: str = ".3f") -> str:
    return format(value, fmt) if math.isfinite(value) else ("diverged" if value == math.inf else "n/a")


def plot(runs: dict[str, dict], threshold: float, path: str) -> None:
    """Left: train loss (lines) and validation loss (dots) of every run. Right: the largest
    update spectral norm per log step, before clipping (dashed) and as applied (solid)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 4.8))
    for i, (name, m) in enumerate(runs.items()):
        color = f"C{i}"
        steps = [r["iteration"] for r in m["train"]]
        left.plot(steps, [_finite(r["lm_loss"]) for r in m["train"]], color=color, lw=1, label=name)
        left.plot([r["iteration"] for r in m["valid"]], [r["lm_loss"] for r in m["valid"]], "o", color=color, ms=4)
        measured = [r for r in m["train"] if "update_norm_before" in r]
        xs = [r["iteration"] for r in measured]
        clipped = m["summary"].get("optimizer", "").startswith("spectra-")
        if clipped:
            right.plot(xs, [r["update_norm_before"] for r in measured], "--", color=color, lw=1, label=f"{name}: before clipping")
        right.plot(xs, [r["update_norm_after"] for r in measured], "-", color=color, lw=1.5,
                   label=f"{name}: {'after clipping' if clipped else 'unclipped'}")
    right.axhline(threshold, color="gray", lw=0.8, ls=":", label=f"c = {threshold:g}")
    left.set(xlabel="iteration", ylabel="lm loss (dots: validation)", title="loss")
    left.set_yscale("log")
    right.set(xlabel="iteration", ylabel="max over matrices of ||U||_2", title="largest update spectral norm")
    right.set_yscale("log")
    left.legend(fontsize=8)
    right.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _finite(x: float) -> float:
    return x if math.isfinite(x) else math.nan
