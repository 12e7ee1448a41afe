"""mom.report: train loss (smoothed) and validation points against steps and tokens, one colour per run."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from mom.report import figure, find_runs, smooth, table


def _write_run(run: Path, n_steps: int, val_every: int, tokens_per_step: int, loss0: float) -> None:
    run.mkdir(parents=True)
    (run / ".hydra").mkdir()
    (run / ".hydra" / "overrides.yaml").write_text(f"- precision=p{loss0:g}\n- trainer.max_steps={n_steps}\n")
    keys = ["epoch", "step", "train/loss", "train/tokens", "val/bpb", "val/loss", "val/ppl"]
    with open(run / "metrics.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        for s in range(n_steps):  # as Lightning logs them: the step index of the batch, tokens after it
            w.writerow({"epoch": 0, "step": s, "train/loss": loss0 - 0.1 * s, "train/tokens": (s + 1) * tokens_per_step})
            if (s + 1) % val_every == 0:
                w.writerow({"epoch": 0, "step": s, "val/loss": loss0 - 0.1 * s + 0.05, "val/bpb": 2.0, "val/ppl": 9.0})


def test_smooth_is_a_trailing_mean():
    assert smooth([1.0, 3.0, 5.0, 7.0], window=2) == [1.0, 2.0, 4.0, 6.0]
    assert smooth([2.0] * 50) == pytest.approx([2.0] * 50)


def test_report_plots_train_and_validation_against_steps_and_tokens(tmp_path):
    _write_run(tmp_path / "0", n_steps=3, val_every=3, tokens_per_step=64, loss0=6.0)  # a 3-step sweep
    _write_run(tmp_path / "1", n_steps=3, val_every=3, tokens_per_step=64, loss0=5.0)
    runs = find_runs(tmp_path)
    fig = figure(runs, tmp_path)
    fig.canvas.draw()
    by_step, by_tokens = fig.axes[0], fig.axes[1]
    lines = by_step.get_lines()
    assert len(lines) == 4  # per run: its smoothed train loss (3 points) and its validation point
    train = [ln for ln in lines if len(ln.get_xdata()) == 3]
    val = [ln for ln in lines if len(ln.get_xdata()) == 1]
    assert len(train) == 2 and len(val) == 2
    assert {ln.get_color() for ln in train} == {ln.get_color() for ln in val}  # one colour per run
    assert all(ln.get_marker() not in (None, "None", "") for ln in lines)  # a short sweep shows its points
    assert list(train[0].get_xdata()) == [0, 1, 2]
    assert [list(ln.get_xdata()) for ln in by_tokens.get_lines() if len(ln.get_xdata()) == 3][0] == [64, 128, 192]
    for ax in (by_step, by_tokens):
        assert all(float(t).is_integer() for t in ax.get_xticks()), ax.get_xticks()
    legend = fig.legends[0]
    assert [t.get_text() for t in legend.get_texts()] == ["0: precision=p6", "1: precision=p5"]  # one line per run
    assert "| 0 | precision=p6 | 2 |" in table(runs, tmp_path)


def test_report_tokens_from_the_run_config_when_not_logged(tmp_path):
    from mom.report import tokens_at

    run = tmp_path / "r"
    _write_run(run, n_steps=2, val_every=2, tokens_per_step=8, loss0=4.0)
    (run / ".hydra" / "config.yaml").write_text("data: {batch_size: 4, seq_len: 16}\ntrainer: {accumulate_grad_batches: 2}\n")
    r = find_runs(tmp_path)[0]
    r.curves.pop("train/tokens")
    assert tokens_at(r, [0, 9]) == [128.0, 1280.0]
