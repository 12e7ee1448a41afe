"""Summarise a sweep: ``python -m mom.report SWEEP_DIR``.

Finds every run under SWEEP_DIR (a folder holding ``metrics.csv``, e.g. ``multirun/<date>/<time>/<job>``),
draws every run's train loss (smoothed) and validation loss and bits per byte against steps and against
tokens into ``SWEEP_DIR/report.png`` (matplotlib, Agg backend; one colour per run, integer axes and markers
so a sweep of a few steps reads right) and prints a markdown table: the run, its Hydra overrides (``.hydra/overrides.yaml``; those
shared by every run are listed once above the table), and the final val loss, perplexity and bpb. The table
is also written to ``SWEEP_DIR/report.md``.
"""

from __future__ import annotations

import argparse
import csv
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Run:
    path: Path
    overrides: list[str] = field(default_factory=list)
    curves: dict[str, list[tuple[int, float]]] = field(default_factory=dict)  # metric -> [(step, value)]

    def final(self, key: str) -> float:
        pts = self.curves.get(key) or []
        return pts[-1][1] if pts else math.nan


def _overrides(run_dir: Path) -> list[str]:
    f = run_dir / ".hydra" / "overrides.yaml"
    if not f.is_file():
        return []
    try:
        from omegaconf import OmegaConf

        return [str(o) for o in OmegaConf.load(f)]
    except Exception:  # noqa: BLE001 - a broken file only loses the labels
        return []


def read_run(run_dir: Path, keys: tuple[str, ...] = ("val/loss", "val/ppl", "val/bpb", "train/loss", "train/tokens")
             ) -> Run:
    run = Run(run_dir, _overrides(run_dir))
    with open(run_dir / "metrics.csv", newline="") as f:
        for row in csv.DictReader(f):
            for key in keys:
                v = row.get(key)
                if v not in (None, ""):
                    step = int(float(row.get("step") or 0))
                    run.curves.setdefault(key, []).append((step, float(v)))
    for pts in run.curves.values():
        pts.sort(key=lambda p: p[0])  # stable: a final validation at the last step stays last
    return run


def find_runs(sweep_dir: Path) -> list[Run]:
    dirs = sorted({p.parent for p in sweep_dir.rglob("metrics.csv")},
                  key=lambda p: [int(s) if s.isdigit() else s for s in p.relative_to(sweep_dir).parts])
    return [read_run(d) for d in dirs]


def _label(run: Run, sweep_dir: Path, varying: list[str]) -> str:
    name = str(run.path.relative_to(sweep_dir)) if run.path != sweep_dir else run.path.name
    return f"{name}: {' '.join(varying)}" if varying else name


def _split_overrides(runs: list[Run]) -> tuple[list[str], list[list[str]]]:
    common = set.intersection(*(set(r.overrides) for r in runs)) if runs else set()
    shared = [o for o in runs[0].overrides if o in common] if runs else []
    return shared, [[o for o in r.overrides if o not in common] for r in runs]


def smooth(values: list[float], window: int | None = None) -> list[float]:
    """Trailing moving average (window ~ a tenth of the points, 1..25): the trend of a noisy train loss."""
    n = len(values)
    w = window or max(1, min(25, n // 10))
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v
        if i >= w:
            acc -= values[i - w]
        out.append(acc / min(i + 1, w))
    return out


def tokens_at(run: Run, steps: list[int]) -> list[float] | None:
    """Tokens seen at each step: interpolated from the logged ``train/tokens``, else steps x tokens per step
    of the run's config (batch_size x seq_len x accumulate_grad_batches); None when neither is known."""
    import numpy as np

    known = run.curves.get("train/tokens") or []
    if known:
        xs = np.array([p[0] for p in known], dtype=float)
        ys = np.array([p[1] for p in known], dtype=float)
        per_step = ys[-1] / (xs[-1] + 1)  # train/tokens logged at step s counts s + 1 batches
        return [float(np.interp(s, xs, ys)) if s <= xs[-1] else float(ys[-1] + (s - xs[-1]) * per_step)
                for s in steps]
    per_step = _tokens_per_step(run.path)
    return [float((s + 1) * per_step) for s in steps] if per_step else None


def _tokens_per_step(run_dir: Path) -> int | None:
    f = run_dir / ".hydra" / "config.yaml"
    if not f.is_file():
        return None
    try:
        from omegaconf import OmegaConf

        cfg = OmegaConf.load(f)
        return int(cfg.data.batch_size) * int(cfg.data.seq_len) * int(cfg.trainer.get("accumulate_grad_batches") or 1)
    except Exception:  # noqa: BLE001 - an unreadable config only loses the tokens axis
        return None


# the panels: (metric of the y axis, title); the x axes are steps and tokens
_PANELS = (("loss", "loss (nats/token): train (smoothed line), validation (points)"),
           ("val/bpb", "validation bits per byte"))


def figure(runs: list[Run], sweep_dir: Path):
    """The report's matplotlib figure: loss and validation bpb against steps (left) and tokens (right),
    one colour per run (its train loss smoothed as a line, its validation points as markers)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    _, varying = _split_overrides(runs)
    fig, axes = plt.subplots(2, 2, figsize=(13, 8.5), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (run, var) in enumerate(zip(runs, varying, strict=True)):
        color = colors[i % len(colors)]
        label = _label(run, sweep_dir, var)
        train = run.curves.get("train/loss") or []
        for row, (key, _) in enumerate(_PANELS):
            series = []  # (points, is_train)
            if key == "loss":
                if train:
                    series.append(([(s, v) for (s, _), v in zip(train, smooth([p[1] for p in train]), strict=True)],
                                   True))
                series.append((run.curves.get("val/loss") or [], False))
            else:
                series.append((run.curves.get(key) or [], False))
            for pts, is_train in series:
                if not pts:
                    continue
                steps, values = [p[0] for p in pts], [p[1] for p in pts]
                tokens = tokens_at(run, steps)
                style = (dict(lw=1.5, marker="." if len(pts) <= 30 else None, ms=4) if is_train
                         else dict(ls="--" if key == "loss" else "-", lw=0.8, marker="o", ms=5))
                first = is_train or not train or key != "loss"
                axes[row][0].plot(steps, values, color=color, label=label if (first and row == 0) else None,
                                  **style)
                if tokens is not None:
                    axes[row][1].plot(tokens, values, color=color, **style)
    for row, (_, title) in enumerate(_PANELS):
        for col, xlabel in enumerate(("step", "tokens")):
            ax = axes[row][col]
            ax.set_title(title, fontsize=9)
            ax.set_xlabel(xlabel)
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # short sweeps: no fractional steps
            ax.grid(alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="lower center", ncol=min(3, len(labels)), fontsize=8)
        fig.subplots_adjust(bottom=0.08 + 0.03 * math.ceil(len(labels) / 3), hspace=0.35)
    fig.suptitle(str(sweep_dir))
    return fig


def plot(runs: list[Run], sweep_dir: Path, out: Path) -> Path:
    """:func:`figure` written to ``out`` (PNG)."""
    import matplotlib.pyplot as plt

    fig = figure(runs, sweep_dir)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def table(runs: list[Run], sweep_dir: Path) -> str:
    shared, varying = _split_overrides(runs)
    lines = []
    if shared:
        lines += [f"Shared overrides: `{' '.join(shared)}`", ""]
    lines += ["| run | overrides | steps | val loss | val ppl | val bpb |", "|---|---|---:|---:|---:|---:|"]

    def fmt(x: float) -> str:
        return "n/a" if math.isnan(x) else f"{x:.4f}"

    for run, var in zip(runs, varying, strict=True):
        pts = run.curves.get("val/loss") or run.curves.get("train/loss") or []
        steps = pts[-1][0] if pts else 0
        name = str(run.path.relative_to(sweep_dir)) if run.path != sweep_dir else run.path.name
        lines.append(f"| {name} | {' '.join(var) or '-'} | {steps} | {fmt(run.final('val/loss'))} | "
                     f"{fmt(run.final('val/ppl'))} | {fmt(run.final('val/bpb'))} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m mom.report", description=__doc__.splitlines()[0])
    ap.add_argument("sweep_dir", type=Path, help="a multirun folder (or a single run folder)")
    ap.add_argument("--out", type=Path, default=None, help="PNG path (default SWEEP_DIR/report.png)")
    args = ap.parse_args(argv)
    sweep = args.sweep_dir.resolve()
    if not sweep.is_dir():
        print(f"mom.report: {sweep}: no such folder", file=sys.stderr)
        return 2
    runs = find_runs(sweep)
    if not runs:
        print(f"mom.report: no metrics.csv under {sweep}", file=sys.stderr)
        return 1
    png = plot(runs, sweep, args.out or sweep / "report.png")
    md = table(runs, sweep)
    (sweep / "report.md").write_text(md + "\n")
    print(md)
    print(f"\ncurves: {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
