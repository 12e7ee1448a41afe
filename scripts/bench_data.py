"""Data pipeline at scale: tokenisation throughput (1 and 2 worker processes), peak memory at two corpus sizes,
loader throughput against the training step's need.

    python scripts/bench_data.py                 # 200 MB synthetic corpus (and 50 MB for the memory check)
    python scripts/bench_data.py --size-mb 2000  # a few GB: the same table, longer

The corpus is made on the fly from the embedded plays (mom.data.plays.synthetic_corpus: runs of speeches of
random plays, shuffled and repeated, as JSON lines in 10 files). Every preparation runs in its own subprocess
(fresh cache, peak RSS of that process and of its worker processes from getrusage), side by side, so the
ratios compare like with like on a noisy machine. The tokenizer (byte-level BPE 4096, as data=shakespeare) is
trained once on a 20 MB sample.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _watch_workers(peak: list[float], stop) -> None:
    """Largest VmHWM (peak RSS since exec) of this process's worker processes, polled (getrusage's figure for
    children counts the parent's pages they held between fork and exec)."""
    import multiprocessing as mp

    while not stop.is_set():
        for child in mp.active_children():
            try:
                with open(f"/proc/{child.pid}/status") as f:
                    hwm = next(int(line.split()[1]) for line in f if line.startswith("VmHWM"))
                peak[0] = max(peak[0], hwm / 1024)
            except (OSError, StopIteration):
                pass
        stop.wait(0.2)


def child_prepare(corpus: str, cache: str, num_proc: int) -> dict:
    """One cold preparation (tokenise both splits) through the DataModule, in this fresh process."""
    import threading

    from mom.data.datamodule import MoMDataModule

    peak, stop = [0.0], threading.Event()
    watcher = threading.Thread(target=_watch_workers, args=(peak, stop), daemon=True)
    watcher.start()
    t0 = time.perf_counter()
    dm = MoMDataModule(source={"type": "jsonl", "paths": corpus}, val_fraction=0.01, num_proc=num_proc,
                       tokenizer={"path": str(Path(cache).parent / "tokenizer.json")}, cache_dir=cache)
    dm.prepare_data()
    seconds = time.perf_counter() - t0
    stop.set()
    watcher.join()
    tokens = dm.caches["train"].n_tokens + dm.caches["validation"].n_tokens
    text = dm.caches["train"].n_bytes + dm.caches["validation"].n_bytes
    return {"seconds": seconds, "tokens": tokens, "text_bytes": text,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "worker_peak_rss_mb": peak[0]}


def run_child(*args: str) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, __file__, "--child", *args], env=env, capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(out.stderr[-3000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def loader_vs_step(corpus: str, cache: str, batches: int) -> dict:
    """Tokens/s of the train DataLoader (0 workers, as on CPU) and of the tiny experiment's training step."""
    import torch

    from mom.config import compose, model_config
    from mom.data.datamodule import MoMDataModule
    from mom.model import MoMForCausalLM

    cfg = compose("train", ["experiment=tiny"])
    T, B = int(cfg.data.seq_len), int(cfg.data.batch_size)
    dm = MoMDataModule(source={"type": "jsonl", "paths": corpus}, val_fraction=0.01, seq_len=T, batch_size=B,
                       tokenizer={"path": str(Path(cache).parent / "tokenizer.json")}, cache_dir=cache)
    dm.setup()
    it = iter(dm.train_dataloader())
    next(it)
    t0 = time.perf_counter()
    for _ in range(batches):
        next(it)
    loader_tps = batches * B * T / (time.perf_counter() - t0)

    torch.manual_seed(0)
    model = MoMForCausalLM(model_config(cfg.model, cfg.precision, vocab_size=dm.vocab_size))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    batch = next(iter(dm.train_dataloader()))
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        out = model(batch["input_ids"], labels=batch["labels"])
        out.loss.backward()
        opt.step()
        opt.zero_grad()
        times.append(time.perf_counter() - t0)
    step_tps = B * T / min(times[1:])
    return {"loader_tokens_per_s": loader_tps, "step_tokens_per_s": step_tps, "seq_len": T, "batch_size": B}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-mb", type=float, default=200.0, help="corpus size for the throughput runs")
    ap.add_argument("--small-mb", type=float, default=None, help="second size for the memory check (size/4)")
    ap.add_argument("--work-dir", default=None, help="where corpora and caches go (default: a temp folder)")
    ap.add_argument("--loader-batches", type=int, default=200)
    ap.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child_prepare(args.child[0], args.child[1], int(args.child[2]))))
        return

    from mom.data.corpus import shuffled
    from mom.data.plays import synthetic_corpus
    from mom.data.sources import build_corpus
    from mom.data.tokenizer import train_bpe

    work = Path(args.work_dir or tempfile.mkdtemp(prefix="mom-bench-data-"))
    big_mb = args.size_mb
    small_mb = args.small_mb or big_mb / 4
    corpora = {}
    for mb in (small_mb, big_mb):
        d = work / f"corpus-{mb:g}MB"
        if not d.is_dir():
            synthetic_corpus(d, int(mb * 1e6), n_files=10, seed=0)
        corpora[mb] = str(d)
    tok_path = work / "tokenizer.json"
    if not tok_path.is_file():
        docs = build_corpus({"type": "jsonl", "paths": corpora[small_mb]}).documents("train")
        train_bpe(shuffled(docs, 0), 4096, max_bytes=20_000_000).save(str(tok_path))

    rows = {}
    for name, mb, n_proc in (("in-process", big_mb, 0), ("1 worker", big_mb, 1), ("2 workers", big_mb, 2),
                             ("in-process, small", small_mb, 0), ("2 workers, small", small_mb, 2)):
        cache = work / f"cache-{name.replace(' ', '').replace(',', '-').replace('-', '')}"
        if cache.exists():
            import shutil

            shutil.rmtree(cache)
        rows[name] = r = run_child(corpora[mb], str(cache), str(n_proc))
        print(f"{name:>20}: {r['text_bytes'] / 1e6:8.1f} MB text, {r['tokens'] / 1e6:7.2f} M tokens in "
              f"{r['seconds']:7.1f} s = {r['tokens'] / r['seconds']:>9,.0f} tokens/s; peak RSS {r['peak_rss_mb']:.0f} MB"
              f" (+ workers {r['worker_peak_rss_mb']:.0f} MB each)", flush=True)

    lv = loader_vs_step(corpora[big_mb], str(work / "cache-inprocess"), args.loader_batches)
    one, two = rows["1 worker"], rows["2 workers"]
    tps = {k: r["tokens"] / r["seconds"] for k, r in rows.items()}
    print()
    print(f"| corpus {big_mb:g} MB (memory check also at {small_mb:g} MB) | value |")
    print("|---|---|")
    print(f"| tokenise, in this process (tokenizers' own threads) | {tps['in-process']:,.0f} tokens/s |")
    print(f"| tokenise, 1 worker process | {tps['1 worker']:,.0f} tokens/s |")
    print(f"| tokenise, 2 worker processes | {tps['2 workers']:,.0f} tokens/s ({tps['2 workers'] / tps['1 worker']:.2f}x 1 worker) |")
    print(f"| peak RSS, in-process, {small_mb:g} MB -> {big_mb:g} MB corpus | {rows['in-process, small']['peak_rss_mb']:.0f} -> "
          f"{rows['in-process']['peak_rss_mb']:.0f} MB |")
    print(f"| peak RSS, 2 workers: main, {small_mb:g} MB -> {big_mb:g} MB | {rows['2 workers, small']['peak_rss_mb']:.0f} -> "
          f"{two['peak_rss_mb']:.0f} MB |")
    print(f"| peak RSS, 2 workers: each worker, {small_mb:g} MB -> {big_mb:g} MB | "
          f"{rows['2 workers, small']['worker_peak_rss_mb']:.0f} -> {two['worker_peak_rss_mb']:.0f} MB |")
    print(f"| loader (0 workers, {lv['batch_size']} x {lv['seq_len']}) | {lv['loader_tokens_per_s']:,.0f} tokens/s |")
    print(f"| training step, experiment=tiny, same batch | {lv['step_tokens_per_s']:,.0f} tokens/s "
          f"(loader = {lv['loader_tokens_per_s'] / lv['step_tokens_per_s']:.0f}x the need) |")
    print(f"\n(text bytes: {one['text_bytes']:,}; work dir {work})")


if __name__ == "__main__":
    main()
