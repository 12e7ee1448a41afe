"""Rho-1 selective language modelling demo, offline, end to end (in-process, ~5 minutes on 2 CPU cores).

    .venv/bin/python scripts/slm_demo.py [--out DIR] [--steps 200] [--ref-steps 300] [--threads N] [--arms baseline,rho,filtered]

1. ``reference``: the demo model trained on a small clean subset (3 plays, no corruption) of the noisy corpus;
   its BPE tokenizer is the one every later arm uses.
2. ``python -m mom.score`` equivalent: per-token reference losses of the noisy corpus (train and validation).
3. The same model, same steps, same seed, on the noisy corpus (``data=noisy_shakespeare``, ~1/3 of the lines
   corrupted): ``baseline`` (plain LM), ``rho`` (``slm=rho``: top 60% of tokens by excess loss) and
   ``filtered`` (``data.filter``: documents whose mean reference loss is in the lowest 60%).
4. A markdown table: arm, steps, tokens seen, tokens in the loss, wall time, clean validation bits per byte
   (the five clean held-out plays, 20 x 32 windows of 128 tokens).

Extra ``key=value`` arguments go to every arm's config (e.g. ``trainer.max_time=null``).
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

QUIET = ["trainer.enable_progress_bar=false", "trainer.enable_model_summary=false", "callbacks.rich_progress_bar=null"]
CLEAN_SUBSET = ["data.source.plays=3", "data.source.doc_frac=0.0", "data.source.background=0.0"]


def _last(run_dir: Path, key: str) -> float | None:
    path = run_dir / "metrics.csv"
    if not path.is_file():
        return None
    vals = []
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            if row.get(key):
                vals.append(float(row[key]))
    return sum(vals) / len(vals) if vals else None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(REPO / "outputs" / "slm_demo"), help="folder for the runs")
    ap.add_argument("--steps", type=int, default=None, help="steps per noisy-corpus arm (default: the experiment's)")
    ap.add_argument("--ref-steps", type=int, default=300, help="reference training steps")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's; 1 on a busy machine)")
    ap.add_argument("--arms", default="baseline,rho,filtered")
    ap.add_argument("--token-ratio", type=float, default=0.6)
    ap.add_argument("--keep-quantile", type=float, default=0.6, help="filtered arm: data.filter.max_quantile")
    ap.add_argument("overrides", nargs="*", help="extra key=value overrides for every arm")
    args = ap.parse_args(argv)

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from mom.config import compose, to_plain
    from mom.score import score
    from mom.train import train

    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    base = ["experiment=slm_demo", *QUIET, *args.overrides]
    steps = [f"trainer.max_steps={args.steps}", f"trainer.val_check_interval={args.steps}",
             f"callbacks.model_checkpoint.every_n_train_steps={args.steps}"] if args.steps else []
    rows: list[dict] = []

    def run(arm: str, overrides: list[str], note: str = "") -> Path:
        run_dir = out / arm
        cfg = compose("train", base + overrides + [f"paths.run_dir={run_dir}"])
        t0 = time.perf_counter()
        metrics = train(cfg)
        wall = time.perf_counter() - t0
        n = int(metrics["step"])
        seen = n * cfg.data.batch_size * cfg.data.seq_len
        frac = 1.0
        if cfg.slm.name == "rho":  # the logged share of kept tokens (= token_ratio up to rounding)
            frac = _last(run_dir, "train/slm_selected_frac") or float(cfg.slm.token_ratio)
        rows.append({"arm": arm, "steps": n, "tokens": seen, "in_loss": int(seen * (frac or 1.0)), "wall": wall,
                     "bpb": metrics.get("val/bpb", float("nan")), "note": note})
        print(f"[slm_demo] {arm}: {n} steps, {wall:.0f} s, clean val bpb {rows[-1]['bpb']:.4f}", flush=True)
        return run_dir

    t_all = time.perf_counter()
    ref_dir = run("reference", CLEAN_SUBSET + [f"trainer.max_steps={args.ref_steps}",
                                               f"trainer.val_check_interval={args.ref_steps}",
                                               f"callbacks.model_checkpoint.every_n_train_steps={args.ref_steps}"],
                  "3 clean plays")
    tok = [f"data.tokenizer.path={ref_dir / 'model' / 'tokenizer.json'}"]

    t0 = time.perf_counter()
    demo = compose("train", base + tok + ["paths.run_dir=/tmp/unused"])
    # = python -m mom.score ref_run=<reference> with the arms' exact data config (noise, seq_len, tokenizer)
    res = score({"ref_run": str(ref_dir), "data": to_plain(demo.data), "splits": ["train"], "batch_size": 64},
                out=sys.stdout)
    t_score = time.perf_counter() - t0
    print(f"[slm_demo] scored {res['train']['n_targets']:,} train tokens in {t_score:.0f} s", flush=True)

    arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    if "baseline" in arms:
        run("baseline", tok + steps, "plain LM")
    if "rho" in arms:
        run("rho", tok + steps + ["slm=rho", f"slm.ref_run={ref_dir}", f"slm.token_ratio={args.token_ratio}"],
            f"slm=rho, token_ratio {args.token_ratio}")
    if "filtered" in arms:
        run("filtered", tok + steps + [f"data.filter={{ref_run: '{ref_dir}', min_quantile: 0.0, "
                                       f"max_quantile: {args.keep_quantile}}}"],
            f"data.filter max_quantile {args.keep_quantile}")

    print()
    print("| arm | data | steps | tokens seen | tokens in loss | wall time | clean val bpb |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['arm']} | {r['note']} | {r['steps']} | {r['tokens']:,} | {r['in_loss']:,} | {r['wall']:.0f} s "
              f"| {r['bpb']:.4f} |")
    print(f"\nreference scoring: {t_score:.0f} s; total {time.perf_counter() - t_all:.0f} s; runs in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
