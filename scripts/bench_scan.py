"""Benchmark the Mamba-1 selective scan on CPU: naive loops vs mom.model.scan (its fast path as torch ops and,
when the C++ kernels build, as C++ loops: what training on the CPU uses).

    .venv/bin/python scripts/bench_scan.py [--skip-index] [--b 8 --d 512 --L 256 --n 16] [--repeats 3]

All methods get the same inputs (u, delta, A, B, C, D, z, delta_bias, softplus) and compute the same thing;
backward is ``(y * gy).sum().backward()`` with grads for every input. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from mom.infer import kernels as cpu_kernels  # noqa: E402
from mom.model.scan import selective_scan, selective_scan_fast  # noqa: E402


def _prologue(u, delta, A, B, C, delta_bias):
    dt = F.softplus(delta + delta_bias[:, None])
    dA = torch.exp(A[None, :, None, :] * dt[:, :, :, None])  # (b, d, l, n)
    dBu = dt[:, :, :, None] * B.transpose(1, 2)[:, None, :, :] * u[:, :, :, None]
    return dA, dBu


def _epilogue(ys, u, D, z):
    y = torch.stack(ys, dim=-1) + u * D[None, :, None]
    return y * F.silu(z)


def index_loop(u, delta, A, B, C, D, z, delta_bias):
    """transformers' Jamba slow path: slices the (b, d, l, n) tensors with [:, :, i] every step."""
    dA, dBu = _prologue(u, delta, A, B, C, delta_bias)
    b, d, L, n = dA.shape
    h = torch.zeros(b, d, n)
    Ct = C.transpose(1, 2)  # (b, l, n)
    ys = []
    for i in range(L):
        h = dA[:, :, i, :] * h + dBu[:, :, i, :]
        ys.append(torch.matmul(h, Ct[:, i, :].unsqueeze(-1))[:, :, 0])
    return _epilogue(ys, u, D, z)


def unbind_loop(u, delta, A, B, C, D, z, delta_bias):
    """Same, but iterating over unbind() views (linear-time backward)."""
    dA, dBu = _prologue(u, delta, A, B, C, delta_bias)
    b, d, L, n = dA.shape
    h = torch.zeros(b, d, n)
    ys = []
    for a_i, bu_i, c_i in zip(dA.unbind(2), dBu.unbind(2), C.unbind(2), strict=True):
        h = a_i * h + bu_i
        ys.append(torch.matmul(h, c_i.unsqueeze(-1))[:, :, 0])
    return _epilogue(ys, u, D, z)


def ours(impl):
    def f(u, delta, A, B, C, D, z, delta_bias):
        return selective_scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus=True, impl=impl)

    return f


def fast(native):
    """The fast path with its per-step loops as torch ops (native=False) or in C++ (native=True)."""
    def f(u, delta, A, B, C, D, z, delta_bias):
        return selective_scan_fast(u, delta, A, B, C, D, z, delta_bias, delta_softplus=True, native=native)

    return f


def make_inputs(b, d, L, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(b, d, L, generator=g)
    delta = torch.randn(b, d, L, generator=g) * 0.5 - 1.0
    A = -torch.exp(torch.rand(d, n, generator=g) * 2.0)
    B = torch.randn(b, n, L, generator=g)
    C = torch.randn(b, n, L, generator=g)
    D = torch.randn(d, generator=g)
    z = torch.randn(b, d, L, generator=g)
    bias = torch.randn(d, generator=g) * 0.1
    gy = torch.randn(b, d, L, generator=g)
    return [t.requires_grad_() for t in (u, delta, A, B, C, D, z, bias)], gy


def run(fn, b, d, L, n, repeats):
    tf, tb = [], []
    y = grads = None
    for _ in range(repeats):
        ins, gy = make_inputs(b, d, L, n)
        t0 = time.perf_counter()
        y = fn(*ins)
        t1 = time.perf_counter()
        (y * gy).sum().backward()
        t2 = time.perf_counter()
        tf.append(t1 - t0)
        tb.append(t2 - t1)
        grads = [t.grad for t in ins]
    return statistics.median(tf), statistics.median(tb), y.detach(), grads


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--b", type=int, default=8)
    p.add_argument("--d", type=int, default=512)
    p.add_argument("--L", "--l", dest="L", type=int, default=256)
    p.add_argument("--n", type=int, default=16)
    p.add_argument("--repeats", type=int, default=3, help="timed repeats (median) after one warm-up")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--skip-index", action="store_true", help="skip the index loop (its backward takes ~25 s)")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    shape = (a.b, a.d, a.L, a.n)

    methods = []
    if not a.skip_index:
        methods.append(("index loop (transformers slow path)", index_loop, 1))
    methods += [
        ("unbind loop", unbind_loop, a.repeats),
        ("mom reference", ours("reference"), a.repeats),
        ("mom fast, torch ops", fast(False), a.repeats),
    ]
    if cpu_kernels.available():
        methods.append(("mom fast, C++ loops (csrc/scan.cpp)", fast(True), a.repeats))
    # warm-up (allocator, thread pool) on a small shape
    for _, fn, _ in methods:
        run(fn, 2, 16, 8, 4, 1)

    load0 = os.getloadavg()[0]
    rows = {}
    ref_y = ref_g = None
    for name, fn, reps in methods:
        tf, tb, y, g = run(fn, *shape, reps)
        if ref_y is None:
            ref_y, ref_g = y, g
            err = 0.0
        else:
            err = max([float((y - ref_y).abs().max() / ref_y.abs().max())]
                      + [float((x - r).abs().max() / r.abs().max()) for x, r in zip(g, ref_g, strict=True)])
        rows[name] = (tf, tb, reps, err)
        print(f"# {name}: fwd {tf:.3f}s bwd {tb:.3f}s (x{reps}) max rel err {err:.1e}", file=sys.stderr, flush=True)

    print(f"\nselective scan, b={a.b} d={a.d} L={a.L} n={a.n}, {a.threads} threads, torch {torch.__version__}, "
          f"fp32, grads for all inputs; load average before/after {load0:.1f}/{os.getloadavg()[0]:.1f}\n")
    base_i = rows.get("index loop (transformers slow path)")
    base_u = rows["unbind loop"]

    def ratio(x, y):
        r = x / y
        return f"{r:.1f}x" if r >= 1 else f"{r:.2f}x"

    hdr = "| method | fwd s | bwd s | fwd+bwd s |"
    sep = "|---|---:|---:|---:|"
    if base_i:
        hdr += " speed-up vs index (fwd / bwd / total) |"
        sep += "---:|"
    hdr += " speed-up vs unbind (fwd / bwd / total) | max rel err |"
    sep += "---:|---:|"
    print(hdr)
    print(sep)
    for name, (tf, tb, _reps, err) in rows.items():
        line = f"| {name} | {tf:.3f} | {tb:.3f} | {tf + tb:.3f} |"
        for base in ([base_i] if base_i else []) + [base_u]:
            line += f" {ratio(base[0], tf)} / {ratio(base[1], tb)} / {ratio(base[0] + base[1], tf + tb)} |"
        line += f" {err:.1e} |"
        print(line)


if __name__ == "__main__":
    main()
