"""Summarise a sweep: ``python -m mom.report SWEEP_DIR``.

Finds every run under SWEEP_DIR (a folder holding ``metrics.csv``, e.g. ``multirun/<date>/<time>/<job>``),
draws the validation loss and bits-per-byte curves of all runs into ``SWEEP_DIR/report.png`` (matplotlib,
Agg backend) and prints a markdown table: the run, its Hydra overrides (``.hydra/overrides.yaml``; those
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


def read_run(run_dir: Path, keys: tuple[str, ...] = ("val/loss", "val/ppl", "val/bpb", "train/loss")) -> Run:
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


def plot(runs: list[Run], sweep_dir: Path, out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    _, varying = _split_overrides(runs)
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, key, title in ((axes[0], "val/loss", "validation loss (nats/token)"),
                           (axes[1], "val/bpb", "validation bits per byte")):
        for run, var in zip(runs, varying, strict=True):
            pts = run.curves.get(key) or []
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", ms=3,
                        label=_label(run, sweep_dir, var))
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="lower center", ncol=min(3, len(labels)), fontsize=8)
        fig.subplots_adjust(bottom=0.12 + 0.05 * math.ceil(len(labels) / 3))
    fig.suptitle(str(sweep_dir))
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
