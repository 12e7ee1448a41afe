"""mom.report: runs grouped into arms over seeds, train loss (smoothed) and validation points against steps,
wall-clock and tokens (one colour per arm), one table row per arm."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from mom.report import figure, find_runs, smooth, table


def _write_run(run: Path, n_steps: int, val_every: int, tokens_per_step: int, loss0: float, seed: int | None = None,
               bpb0: float = 2.0, s_per_step: float | None = None) -> None:
    run.mkdir(parents=True)
    (run / ".hydra").mkdir()
    seed_line = f"- seed={seed}\n" if seed is not None else ""
    (run / ".hydra" / "overrides.yaml").write_text(f"- precision=p{loss0:g}\n{seed_line}- trainer.max_steps={n_steps}\n")
    keys = ["epoch", "step", "train/loss", "train/tokens", "train/time_s", "val/bpb", "val/loss", "val/ppl"]
    with open(run / "metrics.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        for s in range(n_steps):  # as Lightning logs them: the step index of the batch, tokens after it
            row = {"epoch": 0, "step": s, "train/loss": loss0 - 0.1 * s, "train/tokens": (s + 1) * tokens_per_step}
            if s_per_step is not None:
                row["train/time_s"] = s * s_per_step
            w.writerow(row)
            if (s + 1) % val_every == 0:  # bpb falls by 0.1 per validation
                w.writerow({"epoch": 0, "step": s, "val/loss": loss0 - 0.1 * s + 0.05,
                            "val/bpb": bpb0 - 0.1 * ((s + 1) // val_every - 1), "val/ppl": 9.0})


def test_smooth_is_a_trailing_mean():
    assert smooth([1.0, 3.0, 5.0, 7.0], window=2) == [1.0, 2.0, 4.0, 6.0]
    assert smooth([2.0] * 50) == pytest.approx([2.0] * 50)


def test_report_plots_train_and_validation_against_steps_and_tokens(tmp_path):
    _write_run(tmp_path / "0", n_steps=3, val_every=3, tokens_per_step=64, loss0=6.0)  # a 3-step sweep
    _write_run(tmp_path / "1", n_steps=3, val_every=3, tokens_per_step=64, loss0=5.0)
    runs = find_runs(tmp_path)
    fig = figure(runs, tmp_path)
    fig.canvas.draw()
    by_step, by_time, by_tokens = fig.axes[0], fig.axes[1], fig.axes[2]
    assert by_time.get_lines() == []  # no train/time_s logged: no wall-clock curve
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
    assert [t.get_text() for t in legend.get_texts()] == ["precision=p6", "precision=p5"]  # one entry per arm
    assert "| precision=p6 | 1 | 2 |" in table(runs, tmp_path)


def test_report_groups_seeds_into_arms_and_reads_equal_tokens(tmp_path):
    from mom.report import bpb_at_tokens, group_arms, time_at

    for seed, bpb0 in ((0, 2.0), (1, 2.2)):  # arm p6: 2 seeds, 4 validations each, final bpb 1.7 and 1.9
        _write_run(tmp_path / f"a{seed}", n_steps=8, val_every=2, tokens_per_step=10, loss0=6.0, seed=seed,
                   bpb0=bpb0, s_per_step=0.5)
    _write_run(tmp_path / "b0", n_steps=4, val_every=2, tokens_per_step=10, loss0=5.0, seed=0, bpb0=3.0)
    runs = find_runs(tmp_path)
    shared, arms = group_arms(runs)
    assert [a.label for a in arms] == ["precision=p6 trainer.max_steps=8", "precision=p5 trainer.max_steps=4"]
    assert [len(a.runs) for a in arms] == [2, 1] and shared == []
    a0 = next(r for r in runs if r.path.name == "a0")
    assert bpb_at_tokens(a0, 40.0) == pytest.approx(1.9)  # validations at 20, 40, 60, 80 tokens: 2.0, 1.9, ...
    assert bpb_at_tokens(a0, 30.0) == pytest.approx(1.95)
    assert time_at(a0, [2, 3]) == pytest.approx([1.0, 1.5])
    md = table(runs, tmp_path)
    # the fewest tokens any run validated at is b0's 40: arm p6 reads 1.9 and 2.1 there
    assert "val bpb @ 40 tokens" in md
    row = next(line for line in md.splitlines() if line.startswith("| precision=p6"))
    assert "| 2 |" in row and "1.8000 ± 0.1414" in row and "2.0000 ± 0.1414" in row, row
    fig = figure(runs, tmp_path)
    assert len(fig.axes[1].get_lines()) == 4  # wall-clock panel: train + validation of the two runs that logged time


def test_report_tokens_from_the_run_config_when_not_logged(tmp_path):
    from mom.report import tokens_at

    run = tmp_path / "r"
    _write_run(run, n_steps=2, val_every=2, tokens_per_step=8, loss0=4.0)
    (run / ".hydra" / "config.yaml").write_text("data: {batch_size: 4, seq_len: 16}\ntrainer: {accumulate_grad_batches: 2}\n")
    r = find_runs(tmp_path)[0]
    r.curves.pop("train/tokens")
    assert tokens_at(r, [0, 9]) == [128.0, 1280.0]
