"""demo.png: the main job's figure (demo_report.py computes what it shows).

(a) final validation loss against lr for both optimizers (the paper's lr-sensitivity figure),
    each one's best marked and its "within X of best" level dotted;
(b) train loss of each optimizer at its best lr (solid) and at the largest lr (dashed), a
    5-iteration running mean over the per-iteration loss (faint), validation loss as dots;
(c) the largest update spectral norm over the weight matrices at each optimizer's best lr:
    before clipping (dotted) and as applied (solid), with the clipped run's threshold c_k,
    lifted during the warm-up (shaded) by the standard schedule.
Colours pair by optimizer (blues: the clipped one, oranges: the baseline), line styles by lr.
"""

from __future__ import annotations

import math
import textwrap
from pathlib import Path

PALETTE = (("#1f4e99", "#7fa7e0"), ("#c55a11", "#f2b07e"), ("#2e7d32", "#9ccc9c"))  # (best lr, largest lr) per optimizer
SMOOTH = 5


def plot_demo(arms: list, path: Path, title: str, within: float) -> bool:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not any(r.log.train_loss for a in arms for r in a.runs.values()):
        return False
    fig, (ax_lr, ax_loss, ax_norm) = plt.subplots(1, 3, figsize=(17, 5.6))
    _val_vs_lr(ax_lr, arms, within)
    _loss_curves(ax_loss, arms)
    _norms(ax_norm, arms)
    fig.suptitle("\n".join(textwrap.wrap(title, 150)), fontsize=10.5)
    fig.tight_layout(rect=(0, 0, 1, 0.93))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _legend_below(ax, ncol: int = 2) -> None:
    ax.legend(fontsize=7.5, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=ncol, frameon=False)


def _val_vs_lr(ax, arms: list, within: float) -> None:
    finite = [a.val(lr) for a in arms for lr in a.runs if math.isfinite(a.val(lr))]
    top = max(finite) + 0.15 if finite else 1.0
    for i, a in enumerate(arms):
        colour = PALETTE[i % len(PALETTE)][0]
        lrs = sorted(a.runs)
        ax.plot(lrs, [min(a.val(lr), top) for lr in lrs], "o-", color=colour, lw=1.5, ms=5, label=a.name)
        for lr in lrs:
            if not math.isfinite(a.val(lr)):
                ax.plot([lr], [top], "x", color=colour, ms=9, mew=2)
                ax.annotate("diverged", (lr, top), textcoords="offset points", xytext=(0, -12), fontsize=7, color=colour, ha="center")
        best = a.val(a.best_lr)
        if math.isfinite(best):
            ax.plot([a.best_lr], [best], "*", color=colour, ms=15, mec="black", mew=0.6, label=f"{a.name} best: lr {a.best_lr:g}")
            ax.axhline(best + within, color=colour, lw=0.8, ls=":", label=f"{a.name} best + {within:g}")
    ax.set_xscale("log")
    ax.set(xlabel="peak learning rate", ylabel="final validation loss (nats)", title="(a) final validation loss against lr")
    ax.grid(alpha=0.3, which="both")
    _legend_below(ax)


def _running_mean(points: list, k: int = SMOOTH) -> tuple[list, list]:
    its = [it for it, _ in points]
    vals = [v if math.isfinite(v) else math.nan for _, v in points]
    out = [sum(vals[max(0, j - k + 1): j + 1]) / len(vals[max(0, j - k + 1): j + 1]) for j in range(len(vals))]
    return its, out


def _loss_curves(ax, arms: list) -> None:
    lows, firsts, peaks = [], [], []
    for i, a in enumerate(arms):
        shown = [(a.best_lr, "-", 0)] + ([(max(a.runs), "--", 1)] if max(a.runs) != a.best_lr else [])
        for lr, style, shade in shown:
            r, colour = a.runs[lr], PALETTE[i % len(PALETTE)][shade]
            points = sorted(r.log.train_loss.items())
            if not points:
                continue
            its, smooth = _running_mean(points)
            ax.plot(its, [v for _, v in points], style, color=colour, lw=0.6, alpha=0.35)
            which = "best" if lr == a.best_lr else "largest"
            ax.plot(its, smooth, style, color=colour, lw=1.8, label=f"{a.name}, lr {lr:g} ({which})")
            val = sorted(r.log.val_loss.items())
            ax.plot([it for it, _ in val], [v for _, v in val], "o", color=colour, ms=5, mec="black", mew=0.5)
            lows += [v for v in smooth + [v for _, v in val] if math.isfinite(v)]
            firsts += [v for _, v in points[:1] if math.isfinite(v)]
            peak = max(points, key=lambda p: p[1] if math.isfinite(p[1]) else math.inf, default=None)
            if peak:
                peaks.append((peak, colour))
    if lows:
        bottom, top = min(lows) - 0.15, max(firsts or lows) + 0.3
        ax.set_ylim(bottom, top)
        for (it, v), colour in peaks:  # a spike above the axis is named, not hidden
            if v > top:
                ax.annotate(f"peak {v:.2f}" if math.isfinite(v) else "non-finite", (it, top), xytext=(it + 4, top - 0.35),
                            fontsize=7.5, color=colour, arrowprops={"arrowstyle": "->", "color": colour, "lw": 0.8})
    ax.set(xlabel="iteration", ylabel=f"train loss ({SMOOTH}-iteration mean; faint: per iteration)",
           title="(b) loss at each optimizer's best lr and at the largest lr\n(dots: validation loss)")
    ax.grid(alpha=0.3)
    _legend_below(ax)


def _norms(ax, arms: list) -> None:
    warmup, drawn = 0, False
    for i, a in enumerate(arms):
        r, colour = a.best, PALETTE[i % len(PALETTE)][0]
        steps = sorted(r.log.update_norm_after)
        if not steps:
            continue
        drawn = True
        warmup = max(warmup, r.log.last_iteration // 10)
        clipped = r.row["clip_threshold"] is not None
        if clipped:
            ax.plot(steps, [r.log.update_norm_before[s] for s in steps], ":", color=colour, lw=1.6, label=f"{a.name}: before clipping")
        ax.plot(steps, [r.log.update_norm_after[s] for s in steps], "-", color=colour, lw=1.6,
                label=f"{a.name}: {'after clipping' if clipped else 'not clipped'} (lr {a.best_lr:g})")
        if clipped:
            thresholds = _thresholds(r)
            if thresholds:
                ax.step([it for it, _ in thresholds], [c for _, c in thresholds], where="post", color="gray", lw=1,
                        label=f"threshold c_k (c = {r.row['clip_threshold']:g})")
    if not drawn:
        ax.set_axis_off()
        return
    if warmup:
        ax.axvspan(0, warmup, color="gray", alpha=0.12, label="warm-up: c_k = c·lr_max/lr_k")
    ax.set_yscale("log")
    ax.set(xlabel="iteration", ylabel=r"largest $\|U\|_2$ over weight matrices",
           title="(c) update spectral norm at each best lr\n(U: the base direction, before lr·alpha and weight decay)")
    ax.grid(alpha=0.3, which="both")
    _legend_below(ax)


def _thresholds(r) -> list:
    # The first iteration's lr is 0, so its lifted threshold is c·lr_max/1e-10: left out.
    c = r.row["clip_threshold"]
    return [(it, ck) for it, ck in sorted(r.log.clip_threshold.items()) if ck and ck <= 100 * c]
