"""The main job's report: an lr sweep of a clipped optimizer and its baseline, compared each at
its own best lr, with the range of lr over which each trains well (`spectra demo`).

    text, notes = write_demo(folder, run_dirs, n_sweep)   # results.md/.csv, demo.png, summary.json

The runs are collected by the sweep collector (collect.py); the first n_sweep are the lr
sweep (one layout), the rest (the TP x DP pair) are compared with the sweep's run at the same
optimizer and lr. Every number is defined in HOW, which results.md repeats.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from .collect import RunResult, collect, to_csv, to_markdown
from .demo_plot import plot_demo

NAMES = {"adam": "AdamW"}  # Megatron's adam is AdamW (decoupled weight decay)
WITHIN = 0.1  # nats: an lr "trains well" when its final validation loss is within this of the optimizer's best

HOW = f"""\
- **final val loss**: the validation lm loss (mean cross-entropy per token, nats) after the last
  iteration, over `--eval-iters` global batches of the held-out 5% of the corpus; every run is
  evaluated on the same batches at the same iteration. A run that stopped on a non-finite loss
  counts as diverged (infinite).
- **best lr**: the sweep's lr with the lowest final val loss, per optimizer (one seed each).
- **lrs within {WITHIN} of best**: the sweep's lrs whose final val loss is at most the
  optimizer's best + {WITHIN} nats (~{100 * (math.exp(WITHIN) - 1):.0f}% perplexity); written as the lowest..highest such lr
  and how many of the sweep's lrs that is.
- **largest loss rise**: after the first 10% of iterations (the warm-up), the largest amount by
  which one iteration's train loss (one global batch) exceeds the lowest train loss before it.
- **batch noise**: the standard deviation of the change of the train loss from one iteration
  to the next after the warm-up, over sqrt(2): the spread of one batch's loss around the trend
  if the batches' errors are independent. A loss rise of a few times this is batch noise, not a
  spike (with independent errors, a rise of ~4-5x the noise turns up by chance over 100 iterations).
- **largest ‖U‖₂ before / after clipping**: U is the base optimizer's update direction for a
  weight matrix (AdamW's m/(sqrt(v)+eps), before lr, alpha and weight decay); the value is the
  largest spectral norm over all weight matrices, measured every `--log-interval` iterations
  after the warm-up, before and after the soft clip H_c (AdamW: not clipped, both are its U).
  The standard threshold schedule lifts c to c·lr_max/lr_k during the warm-up, so "after"
  exceeds c there by design; the table starts after the warm-up.
- **final train loss**: the mean train loss over the last 10 iterations.
- **tokens/s**: tokens of all processes per second of wall time (global batch x sequence
  length / the median iteration time), for the whole run; **optimizer step share**: the
  optimizer step's share of the iteration time.
- summary.json holds every run's row and curves (per iteration: lr, train loss, clip threshold;
  every `--log-interval`: the update spectral norms; per evaluation: val loss), so any number
  here can be recomputed.
"""


@dataclass
class Arm:
    """One optimizer over the lr sweep."""

    optimizer: str
    runs: dict = field(default_factory=dict)  # lr -> RunResult

    @property
    def name(self) -> str:
        return NAMES.get(self.optimizer, self.optimizer)

    def val(self, lr: float) -> float:
        """Final val loss; inf for a run that diverged, failed or never finished."""
        r = self.runs[lr]
        loss = r.row["final_val_loss"]
        ok = r.row["state"] == "completed" and loss is not None and math.isfinite(loss)
        return loss if ok else math.inf

    @property
    def best_lr(self) -> float:
        return min(sorted(self.runs), key=self.val)

    @property
    def best(self) -> RunResult:
        return self.runs[self.best_lr]

    @property
    def largest(self) -> RunResult:
        return self.runs[max(self.runs)]

    def within(self, x: float = WITHIN) -> list[float]:
        best = self.val(self.best_lr)
        return [lr for lr in sorted(self.runs) if math.isfinite(best) and self.val(lr) <= best + x]


def arms_of(sweep: list[RunResult]) -> list[Arm]:
    """The sweep's runs by optimizer, in the order they first appear."""
    arms: dict[str, Arm] = {}
    for r in sweep:
        arms.setdefault(r.row["optimizer"], Arm(r.row["optimizer"])).runs[r.row["lr"]] = r
    return list(arms.values())


def noise(r: RunResult) -> float | None:
    """Batch-to-batch noise of the train loss after the warm-up (see HOW)."""
    return r.row["loss_noise"]


def lr_range(lrs: list[float], n: int) -> str:
    if not lrs:
        return "none"
    return f"{lrs[0]:g}..{lrs[-1]:g} ({len(lrs)} of {n})" if len(lrs) > 1 else f"{lrs[0]:g} only (1 of {n})"


def _num(value, fmt: str = ".3f") -> str:
    if value is None:
        return "n/a"
    return "diverged" if value == math.inf else format(value, fmt)


def finding(arms: list[Arm]) -> str:
    """The result in one sentence, whichever way it went."""
    if len(arms) != 2 or any(not math.isfinite(a.val(a.best_lr)) for a in arms):
        return "The sweep did not give a best lr for both optimizers (see the table)."
    c, b = arms
    vc, vb = c.val(c.best_lr), b.val(b.best_lr)
    verdict = "the same" if abs(vc - vb) < 0.0005 else f"{abs(vc - vb):.3f} nats {'lower' if vc < vb else 'higher'}"
    n, top = len(c.runs), max(c.runs)
    return (f"At its own best lr {c.name} ends {verdict} than {b.name} at its best "
            f"({vc:.3f} at lr {c.best_lr:g} against {vb:.3f} at lr {b.best_lr:g}; one seed); each trains within {WITHIN} "
            f"of its best over {len(c.within())} and {len(b.within())} of the {n} lrs ({lr_range(c.within(), n).split(' (')[0]} "
            f"and {lr_range(b.within(), n).split(' (')[0]}); at lr {top:g} the largest loss rise is {_rise(c.largest)} for "
            f"{c.name} and {_rise(b.largest)} for {b.name}.")


def _rise(r: RunResult) -> str:
    """A loss rise with its size in batch-noise units."""
    rise, sigma = r.row["largest_loss_rise"], noise(r)
    if rise is None or not math.isfinite(rise):
        return "a divergence" if rise == math.inf else "n/a"
    return f"{rise:.2f} ({rise / sigma:.0f}x its batch noise)" if sigma else f"{rise:.2f}"


def best_vs_best(arms: list[Arm]) -> str:
    n = len(arms[0].runs) if arms else 0
    rows = [
        ("best lr", lambda a: f"{a.best_lr:g}"),
        ("final val loss at best lr", lambda a: _num(a.val(a.best_lr))),
        (f"lrs within {WITHIN} of best", lambda a: lr_range(a.within(), n)),
        ("largest loss rise at best lr", lambda a: _num(a.best.row["largest_loss_rise"])),
        ("batch noise at best lr", lambda a: _num(noise(a.best))),
        (f"final val loss at the largest lr ({max(arms[0].runs):g})" if arms else "", lambda a: _num(a.val(max(a.runs)))),
        ("largest loss rise at the largest lr", lambda a: _num(a.largest.row["largest_loss_rise"])),
        ("batch noise at the largest lr", lambda a: _num(noise(a.largest))),
        ("largest ‖U‖₂ before clipping, best lr", lambda a: _num(a.best.row["max_update_norm_before"], ".3g")),
        ("largest ‖U‖₂ after clipping, best lr", lambda a: _num(a.best.row["max_update_norm"], ".3g")),
        ("tokens/s at best lr", lambda a: _num(a.best.row["tokens_per_s"], ".0f")),
    ]
    lines = ["| | " + " | ".join(a.name for a in arms) + " |", "|---|" + "---|" * len(arms)]
    lines += [f"| {name} | " + " | ".join(cell(a) for a in arms) + " |" for name, cell in rows]
    return "\n".join(lines) + "\n"


def by_lr(arms: list[Arm]) -> str:
    lrs = sorted({lr for a in arms for lr in a.runs})
    head = "| lr | " + " | ".join(f"{a.name} val loss | rise | noise" for a in arms) + " |"
    lines = [head, "|---|" + "---|---|---|" * len(arms)]
    for lr in lrs:
        cells = []
        for a in arms:
            r = a.runs.get(lr)
            mark = "**" if lr == a.best_lr else ""
            cells += [f"{mark}{_num(a.val(lr))}{mark}" if r else "", _num(r.row["largest_loss_rise"]) if r else "",
                      _num(noise(r)) if r else ""]
        lines.append(f"| {lr:g} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def pair_table(pair: list[RunResult], sweep: list[RunResult]) -> str:
    """The TP x DP runs next to the sweep's run with the same optimizer and lr."""
    same = {(r.row["optimizer"], r.row["lr"]): r for r in sweep}
    lines = ["| run | processes | final val loss | one process, same lr | difference | batch noise |", "|---|---|---|---|---|---|"]
    for r in pair:
        other = same.get((r.row["optimizer"], r.row["lr"]))
        a, b = r.row["final_val_loss"], other.row["final_val_loss"] if other else None
        diff = f"{a - b:+.1e}" if a is not None and b is not None else "n/a"
        par = r.config.get("parallel", {})
        tp = par.get("tensor_parallel", 1)
        lines.append(f"| {r.row['run']} | TP={tp} x DP={par.get('gpus_per_node', tp) // tp} | {_num(a, '.4f')} | {_num(b, '.4f')} | {diff} | {_num(noise(r))} |")
    return "\n".join(lines) + "\n"


def curves(r: RunResult) -> dict:
    """Every per-iteration series of a run (metrics.jsonl), for summary.json."""
    series = ("train_loss", "val_loss", "update_norm_before", "update_norm_after", "lr", "clip_threshold")
    return {name: sorted(getattr(r.log, name).items()) for name in series}


def write_demo(root: Path, run_dirs: list, n_sweep: int, wall: float | None = None, backend: str = "gloo") -> tuple[str, list]:
    """results.md/.csv, demo.png and summary.json in root; returns the text to print and notes."""
    root = Path(root)
    results, notes = collect(root, runs=run_dirs)
    sweep, pair = results[:n_sweep], results[n_sweep:]
    arms = arms_of(sweep)
    sentence = finding(arms)
    plotted = plot_demo(arms, root / "demo.png", sentence, WITHIN)
    text = (f"**Finding.** {sentence}\n\n## Each optimizer at its own best lr\n\n{best_vs_best(arms)}"
            f"\n## Final validation loss at each lr (bold: best)\n\n{by_lr(arms)}")
    if pair:
        text += f"\n## The TP x DP pair against the one-process sweep\n\n{pair_table(pair, sweep)}"
    full = (f"# spectra demo\n\n{text}\n## Every run\n\n{to_markdown(results)}\n## How each number is computed\n\n{HOW}"
            + (f"\nWall time of the whole demo: {wall:.0f} s ({backend}).\n" if wall is not None else ""))
    (root / "results.md").write_text(full)
    (root / "results.csv").write_text(to_csv(results))
    summary = {"finding": sentence, "within": WITHIN, "wall_seconds": wall, "backend": backend,
               "steps": sweep[0].row["train_iters"] if sweep else None,
               "arms": {a.optimizer: {"best_lr": a.best_lr, "best_val_loss": a.val(a.best_lr), "lrs_within": a.within(),
                                      "val_loss_by_lr": {f"{lr:g}": a.val(lr) for lr in sorted(a.runs)}} for a in arms},
               "rows": [r.row for r in results], "curves": {r.row["run"]: curves(r) for r in results},
               "sweep_runs": [r.row["run"] for r in sweep], "pair_runs": [r.row["run"] for r in pair]}
    (root / "summary.json").write_text(json.dumps(_strict(summary), indent=1, default=str))
    if not plotted:
        notes.append("no run logged a loss: demo.png was not drawn")
    return text, notes


def _strict(value):
    """JSON without Infinity/NaN (which strict readers refuse): a non-finite number is null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _strict(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_strict(v) for v in value]
    return value
