"""Summarise a sweep or an ablation study: ``python -m mom.report SWEEP_DIR [--no-score]``.

Finds every run under SWEEP_DIR (a folder holding ``metrics.csv``, e.g. ``multirun/ablate_precision/<arm>``)
and groups them into arms: runs whose Hydra overrides (``.hydra/overrides.yaml``) differ only in ``seed`` are one
arm, and the overrides shared by every run are listed once above the table. Each run's final model
(``<run>/model``) is scored on the whole validation split, as ``python -m mom.eval run_dir=<run>`` does; the
score is cached in ``<run>/eval.json`` (``--no-score``: the last periodic validation instead). Then:

- ``SWEEP_DIR/report.md`` (also printed): one markdown row per arm: seeds, steps, tokens, tokens/s, val bpb on
  the whole split (mean ± sample standard deviation over seeds), val bpb at equal tokens (the periodic
  validation curve at the fewest tokens any run reached), total and active parameters, inference weight bytes
  (ternary weights at 2 bits), optimizer state (counted from the shapes), peak resident memory of the training
  process. Arms are ordered as the sweep ran them.
- ``SWEEP_DIR/report.png`` (matplotlib, Agg): train loss (smoothed line) and validation (points) against steps,
  training wall-clock (``train/time_s``, validation excluded) and tokens; one colour per arm, one line per run.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import re
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Run:
    path: Path
    overrides: list[str] = field(default_factory=list)
    curves: dict[str, list[tuple[int, float]]] = field(default_factory=dict)  # metric -> [(step, value)]
    summary: dict[str, float] = field(default_factory=dict)  # run_summary.json (mom.train's end of run)
    params: dict[str, float] = field(default_factory=dict)  # param_summary.json
    score: dict[str, float] | None = None  # the whole validation split (score_run)

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


def _json(path: Path) -> dict:
    try:
        return json.loads(path.read_text()) if path.is_file() else {}
    except (OSError, ValueError):
        return {}  # a half-written or foreign file only loses its columns


def read_run(run_dir: Path, keys: tuple[str, ...] = ("val/loss", "val/ppl", "val/bpb", "train/loss", "train/tokens",
                                                     "train/time_s")) -> Run:
    run = Run(run_dir, _overrides(run_dir), summary=_json(run_dir / "run_summary.json"),
              params=_json(run_dir / "param_summary.json"))
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


_SEED = re.compile(r"^\+*seed=")


def _split_overrides(runs: list[Run]) -> tuple[list[str], list[list[str]]]:
    common = set.intersection(*(set(r.overrides) for r in runs)) if runs else set()
    shared = [o for o in runs[0].overrides if o in common] if runs else []
    return shared, [[o for o in r.overrides if o not in common] for r in runs]


@dataclass
class Arm:
    """The runs of one configuration: overrides that differ only in ``seed``."""

    label: str
    runs: list[Run]

    def values(self, get) -> list[float]:
        out = [get(r) for r in self.runs]
        return [float(v) for v in out if v is not None and not math.isnan(float(v))]


def _started(run: Run) -> float:
    """When the run was (last) launched: Hydra writes its composed config first, at every launch."""
    for f in (run.path / ".hydra" / "config.yaml", run.path / "metrics.csv"):
        if f.is_file():
            return f.stat().st_mtime
    return math.inf


def group_arms(runs: list[Run]) -> tuple[list[str], list[Arm]]:
    """(overrides shared by every run, the arms in the order the sweep started them)."""
    shared, varying = _split_overrides(runs)
    groups: dict[str, list[Run]] = {}
    for run, var in zip(runs, varying, strict=True):
        groups.setdefault(" ".join(o for o in var if not _SEED.match(o)) or "-", []).append(run)
    order = sorted(groups.items(), key=lambda kv: min(_started(r) for r in kv[1]))
    return shared, [Arm(label, members) for label, members in order]


def score_run(run: Run, batch_size: int = 16) -> dict | None:
    """The run's final model (``<run>/model``) on the whole validation split (:func:`mom.eval.evaluate`),
    cached in ``<run>/eval.json`` until the model changes; None for a run without a saved model."""
    weights = run.path / "model" / "model.safetensors"
    if not weights.is_file():
        return None
    cache = run.path / "eval.json"
    if cache.is_file() and cache.stat().st_mtime >= weights.stat().st_mtime:
        cached = _json(cache)
        if "bpb" in cached:
            return cached
    from mom.eval import evaluate
    from mom.files import atomic_write

    metrics = evaluate({"run_dir": str(run.path), "batch_size": batch_size}, progress=False)
    text = json.dumps(metrics, indent=2)
    atomic_write(cache, lambda f: f.write(text), mode="w")
    return metrics


def optimizer_state_mib(run: Run) -> float | None:
    """The run's optimizer state once every parameter has stepped, counted from its config's shapes
    (:func:`mom.optim.expected_state_bytes` on the meta device: exact, unlike a process's resident memory)."""
    f = run.path / ".hydra" / "config.yaml"
    if not f.is_file():
        return None
    try:
        from omegaconf import OmegaConf

        from mom.optim import config_state_bytes

        return config_state_bytes(OmegaConf.load(f))[1] / 2**20
    except Exception:  # noqa: BLE001 - a config from another version only loses the column
        return None


def final_bpb(run: Run) -> float:
    """The whole-split score when there is one, else the run's last (periodic or final) validation."""
    return float(run.score["bpb"]) if run.score and "bpb" in run.score else run.final("val/bpb")


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


def time_at(run: Run, steps: list[int]) -> list[float] | None:
    """Seconds of training (validation excluded) at each step, interpolated from the logged ``train/time_s``;
    None for a run that did not log it."""
    import numpy as np

    known = run.curves.get("train/time_s") or []
    if len(known) < 2:
        return None
    xs = np.array([p[0] for p in known], dtype=float)
    ys = np.array([p[1] for p in known], dtype=float)
    return [float(v) for v in np.interp(steps, xs, ys)]


def bpb_at_tokens(run: Run, tokens: float) -> float:
    """The run's validation bpb curve read at ``tokens`` (linear between validations; NaN without one)."""
    import numpy as np

    pts = run.curves.get("val/bpb") or []
    xs = tokens_at(run, [p[0] for p in pts]) if pts else None
    if not xs:
        return math.nan
    return float(np.interp(tokens, xs, [p[1] for p in pts]))


# the panels: (metric of the y axis, title) by rows; the x axes (columns) are steps, wall-clock, tokens
_PANELS = (("loss", "loss (nats/token): train (smoothed line), validation (points)"),
           ("val/bpb", "validation bits per byte"))
_AXES = (("step", "step"), ("time", "training wall-clock (s)"), ("tokens", "tokens"))


def figure(runs: list[Run], sweep_dir: Path):
    """The report's matplotlib figure: loss (top) and validation bpb (bottom) against steps, training
    wall-clock and tokens; one colour per arm (seeds share it), one line per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import EngFormatter, MaxNLocator

    _, arms = group_arms(runs)
    fig, axes = plt.subplots(2, 3, figsize=(16, 8.5), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for a, arm in enumerate(arms):
        color = colors[a % len(colors)]
        for i, run in enumerate(arm.runs):
            label = arm.label if i == 0 else None
            train = run.curves.get("train/loss") or []
            for row, (key, _) in enumerate(_PANELS):
                series = []  # (points, is_train)
                if key == "loss":
                    if train:
                        series.append(([(s, v) for (s, _), v in zip(train, smooth([p[1] for p in train]),
                                                                       strict=True)], True))
                    series.append((run.curves.get("val/loss") or [], False))
                else:
                    series.append((run.curves.get(key) or [], False))
                for pts, is_train in series:
                    if not pts:
                        continue
                    steps, values = [p[0] for p in pts], [p[1] for p in pts]
                    xs = {"step": steps, "time": time_at(run, steps), "tokens": tokens_at(run, steps)}
                    style = (dict(lw=1.5, marker="." if len(pts) <= 30 else None, ms=4) if is_train
                             else dict(ls="--" if key == "loss" else "-", lw=0.8, marker="o", ms=5))
                    first = is_train or not train or key != "loss"
                    for col, (axis, _) in enumerate(_AXES):
                        if xs[axis] is not None:
                            axes[row][col].plot(xs[axis], values, color=color,
                                                label=label if (first and row == 0 and col == 0) else None, **style)
    for row, (_, title) in enumerate(_PANELS):
        for col, (axis, xlabel) in enumerate(_AXES):
            ax = axes[row][col]
            ax.set_title(title, fontsize=9)
            ax.set_xlabel(xlabel)
            if axis != "time":
                ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # short sweeps: no fractional steps
            if axis == "tokens":
                ax.xaxis.set_major_formatter(EngFormatter(sep=""))  # 200k, 1.5M: labels that do not overlap
            ax.grid(alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="lower center", ncol=min(4, len(labels)), fontsize=8)
        fig.subplots_adjust(bottom=0.08 + 0.03 * math.ceil(len(labels) / 4), hspace=0.35)
    fig.suptitle(sweep_dir.name)
    return fig


def plot(runs: list[Run], sweep_dir: Path, out: Path, dpi: int = 110) -> Path:
    """:func:`figure` written to ``out`` (PNG)."""
    import matplotlib.pyplot as plt

    fig = figure(runs, sweep_dir)
    fig.savefig(out, dpi=dpi)
    plt.close(fig)
    return out


def _mean_sd(values: list[float], digits: int = 4) -> str:
    if not values:
        return "n/a"
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.fmean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def _mean(values: list[float], fmt: str = ",.0f") -> str:
    return format(statistics.fmean(values), fmt) if values else "n/a"


def _last(run: Run, *keys: str) -> tuple[float, float]:
    """(step, value) of the last point of the first of ``keys`` the run logged; NaNs when none."""
    pts = next((run.curves[k] for k in keys if run.curves.get(k)), [(math.nan, math.nan)])
    return pts[-1]


def table(runs: list[Run], sweep_dir: Path) -> str:
    """One markdown row per arm (see the module doc)."""
    shared, arms = group_arms(runs)
    scored = all(r.score for r in runs)
    ends = [max(tokens_at(r, [p[0] for p in r.curves["val/bpb"]]) or [0.0]) for r in runs if r.curves.get("val/bpb")]
    equal = min(ends) if ends else math.nan
    lines = []
    if shared:
        lines += [f"Shared overrides: `{' '.join(shared)}`", ""]
    bpb_head = "val bpb, whole split" if scored else "val bpb, last validation"
    equal_head = f"val bpb @ {equal:,.0f} tokens" if not math.isnan(equal) else "val bpb @ equal tokens"
    lines += [f"| arm | seeds | steps | tokens | tokens/s | {bpb_head} | {equal_head} | params total / active | "
              "inference weight bytes | optimizer state MiB | peak RSS MiB |",
              "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for arm in arms:
        steps = arm.values(lambda r: r.summary.get("step", _last(r, "val/loss", "train/loss")[0]))
        tokens = arm.values(lambda r: r.summary.get("train/tokens", _last(r, "train/tokens")[1]))
        params = (f"{_mean(arm.values(lambda r: r.params.get('total_params')))} / "
                  f"{_mean(arm.values(lambda r: r.params.get('active_params')))}")
        lines.append(" | ".join([
            f"| {arm.label}", str(len(arm.runs)), _mean(steps), _mean(tokens),
            _mean(arm.values(lambda r: r.summary.get("run/tokens_per_s"))),
            _mean_sd(arm.values(final_bpb)),
            _mean_sd(arm.values(lambda r: bpb_at_tokens(r, equal))) if not math.isnan(equal) else "n/a",
            params, _mean(arm.values(lambda r: r.params.get("inference_weight_bytes"))),
            _mean(arm.values(optimizer_state_mib), ",.2f"),
            _mean(arm.values(lambda r: r.summary.get("run/peak_rss_mib"))) + " |"]))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m mom.report", description=__doc__.splitlines()[0])
    ap.add_argument("sweep_dir", type=Path, help="a multirun folder (or a single run folder)")
    ap.add_argument("--out", type=Path, default=None, help="PNG path (default SWEEP_DIR/report.png)")
    ap.add_argument("--no-score", action="store_true",
                    help="do not score the final models on the whole validation split (use the last validation)")
    ap.add_argument("--batch-size", type=int, default=16, help="batch size of the whole-split scoring")
    ap.add_argument("--dpi", type=int, default=110, help="resolution of the PNG (e.g. 60 for a small copy in docs)")
    args = ap.parse_args(argv)
    sweep = args.sweep_dir.resolve()
    if not sweep.is_dir():
        print(f"mom.report: {sweep}: no such folder", file=sys.stderr)
        return 2
    runs = find_runs(sweep)
    if not runs:
        print(f"mom.report: no metrics.csv under {sweep}", file=sys.stderr)
        return 1
    if not args.no_score:
        for run in runs:
            try:
                run.score = score_run(run, args.batch_size)
            except Exception as e:  # noqa: BLE001 - one unreadable run keeps its last validation, the rest go on
                print(f"mom.report: {run.path}: not scored ({e})", file=sys.stderr)
    png = plot(runs, sweep, args.out or sweep / "report.png", args.dpi)
    md = table(runs, sweep)
    (sweep / "report.md").write_text(md + "\n")
    print(md)
    print(f"\ncurves: {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
