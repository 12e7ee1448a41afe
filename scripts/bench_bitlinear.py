"""Benchmark BitLinear (training) and PackedTernaryLinear (inference) on CPU; prints markdown tables.

    .venv/bin/python scripts/bench_bitlinear.py [--threads 2] [--repeats 15] [--quick]

A. forward+backward of BitLinear (RMSNorm + b1.58 quantisers + matmul, all included) vs nn.Linear on 2048
   tokens. B. one layer's inference forward (no_grad) at M = 1, 8, 256 tokens, K = N = 2048: plain fp32 and
   bf16 matmuls, BitLinear eval and PackedTernaryLinear with each kernel path, as time and speed-up vs fp32,
   with each path's max relative error vs BitLinear eval. Candidates are interleaved (each repeat runs all of
   them once, in rotating order) so machine noise hits all sides; the table shows medians over repeats.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from mom.model.bitlinear import BitLinear  # noqa: E402
from mom.model.packed import PackedTernaryLinear, onednn_available  # noqa: E402


def _calibrate(fn, target_s: float) -> int:
    """How many calls make one sample of about target_s."""
    fn()
    fn()
    t0 = time.perf_counter()
    fn()
    one = max(time.perf_counter() - t0, 1e-6)
    return max(1, min(2000, int(target_s / one)))


def interleaved(cands: dict, repeats: int, target_s: float = 0.01) -> dict[str, float]:
    """Median seconds per call for each candidate, samples interleaved across candidates."""
    inner = {k: _calibrate(f, target_s) for k, f in cands.items()}
    samples: dict[str, list[float]] = {k: [] for k in cands}
    names = list(cands)
    for r in range(repeats):
        order = names[r % len(names):] + names[: r % len(names)]
        for k in order:
            f, n = cands[k], inner[k]
            t0 = time.perf_counter()
            for _ in range(n):
                f()
            samples[k].append((time.perf_counter() - t0) / n)
    return {k: statistics.median(v) for k, v in samples.items()}


def bench_train(repeats: int, tokens: int) -> None:
    print(f"\n### A. forward+backward, {tokens} tokens, fp32 (BitLinear includes its RMSNorm and quantisers)\n")
    print("| in -> out | nn.Linear (ms) | BitLinear (ms) | BitLinear / nn.Linear |")
    print("|---|---|---|---|")
    for fin, fout in [(256, 1024), (1024, 1024), (1024, 4096)]:
        torch.manual_seed(0)
        lin = torch.nn.Linear(fin, fout, bias=False)
        bit = BitLinear(fin, fout, bias=False)
        x = torch.randn(tokens, fin, requires_grad=True)
        gy = torch.randn(tokens, fout)

        def step(m, x=x, gy=gy):
            def f():
                m.weight.grad = None
                x.grad = None
                m(x).backward(gy)
            return f

        t = interleaved({"lin": step(lin), "bit": step(bit)}, repeats, target_s=0.0)
        print(f"| {fin} -> {fout} | {t['lin'] * 1e3:.1f} | {t['bit'] * 1e3:.1f} | {t['bit'] / t['lin']:.2f}x |")


def bench_infer(repeats: int, ms: list[int], k: int = 2048, n: int = 2048) -> None:
    torch.manual_seed(0)
    bl = BitLinear(k, n, bias=False).eval()
    with torch.no_grad():
        bl.weight.normal_(0, 0.02)
    w32 = bl.weight.detach().clone()
    wbf = w32.bfloat16()
    kernels = ["onednn"] if onednn_available() else []
    kernels += ["dense", "int8pack", "int4pack"]
    packed = {kk: PackedTernaryLinear.from_bitlinear(bl, kernel=kk) for kk in kernels}
    print(f"\n### B. inference forward (no_grad), K = N = {k}; speed-up vs fp32 F.linear; "
          "error = max |y - y_BitLinear| / max |y_BitLinear|\n")
    print("BitLinear and PackedTernaryLinear rows are whole layers (RMSNorm + activation quantisation + matmul; "
          "BitLinear also re-quantises its latent weights every call); fp32/bf16 rows are the bare matmul.\n")
    header = "| path | " + " | ".join(f"M={m} ms | M={m} speed-up" for m in ms) + " | max rel err |"
    print(header)
    print("|---|" + "---|---|" * len(ms) + "---|")
    rows: dict[str, list[str]] = {}
    errs: dict[str, float] = {}
    for m in ms:
        x = torch.randn(m, k)
        xb = x.bfloat16()
        with torch.no_grad():
            ref = bl(x)
        cands = {
            "fp32 F.linear": lambda x=x: F.linear(x, w32),
            "bf16 F.linear": lambda xb=xb: F.linear(xb, wbf),
            "BitLinear eval": lambda x=x: bl(x),
        }
        for kk, p in packed.items():
            cands[f"Packed {kk}"] = (lambda p=p, x=x: p(x))
        with torch.no_grad():
            for kk, p in packed.items():
                y = p(x)
                e = float((y - ref).abs().max() / ref.abs().max())
                errs[f"Packed {kk}"] = max(errs.get(f"Packed {kk}", 0.0), e)
            t = interleaved(cands, repeats)
        base = t["fp32 F.linear"]
        for name, v in t.items():
            rows.setdefault(name, []).append(f"{v * 1e3:.3f} | {base / v:.2f}x")
    note = {"fp32 F.linear": "-", "bf16 F.linear": "-", "BitLinear eval": "(reference)"}
    for name, cells in rows.items():
        err = note.get(name, f"{errs.get(name, 0.0):.1e}")
        print(f"| {name} | " + " | ".join(cells) + f" | {err} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--quick", action="store_true", help="fewer repeats (a smoke run)")
    ap.add_argument("--only", choices=["train", "infer"], default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    repeats = 3 if args.quick else args.repeats
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"torch {torch.__version__}, {args.threads} threads, cpu capability "
          f"{torch.backends.cpu.get_cpu_capability()}, oneDNN int8 kernel: {onednn_available()}, "
          f"load average {load:.1f}, medians of {repeats} interleaved repeats")
    if args.only in (None, "train"):
        bench_train(repeats, args.tokens)
    if args.only in (None, "infer"):
        bench_infer(repeats, [1, 8, 256])


if __name__ == "__main__":
    main()
