"""What the CUDA paths ask of a GPU, counted on any machine: aten ops (~ kernel launches) and host syncs.

    .venv/bin/python scripts/bench_gpu_paths.py [--L 1024]

Table 1: MoM's selective scan (one Mamba layer, forward and backward) in its per-step form (CPU default) and
its log-depth form (default off the CPU), at sequence length L; plus the CPU time ratio of the two, measured
side by side (the log-depth form reads each chunk log2(chunk) times, so the CPU keeps the per-step form).
Table 2: host syncs and ops of a training forward/backward and an eval forward with conf/model/momv4.yaml's
layout at toy widths. Counts depend on the code and the torch version, not on the machine.

    python scripts/bench_gpu_paths.py --cuda [--L 2048]

On a CUDA device: the scan's forward+backward timed there instead (momv4's Mamba width, d=2048, n=16, b=4), per
step vs log-depth vs mamba-ssm's kernel when it is usable, with each one's largest difference from the per-step
form (``scripts/gpu_check.sh`` runs this).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch
from omegaconf import OmegaConf

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)
from mom.model import MoMConfig, MoMForCausalLM  # noqa: E402
from mom.model.opcount import OpCounter  # noqa: E402
from mom.model.scan import selective_scan_fast  # noqa: E402


def scan_inputs(b, d, L, n):
    g = torch.Generator().manual_seed(0)
    t = [torch.randn(b, d, L, generator=g), torch.randn(b, d, L, generator=g) * 0.5,
         -torch.exp(torch.randn(d, n, generator=g) * 0.5), torch.randn(b, n, L, generator=g),
         torch.randn(b, n, L, generator=g), torch.randn(d, generator=g), torch.randn(b, d, L, generator=g),
         torch.randn(d, generator=g) * 0.3]
    return [x.requires_grad_() for x in t]


def scan_step(t, parallel):
    y = selective_scan_fast(*t, delta_softplus=True, parallel=parallel)
    y.sum().backward()


def cuda_scan_table(L: int, repeats: int, b: int = 4, d: int = 2048, n: int = 16, device: str = "cuda") -> None:
    from mom.model import kernels
    from mom.model.scan import selective_scan

    dev = torch.device(device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    forms = {"per step": lambda t: selective_scan_fast(*t, delta_softplus=True, parallel=False),
             "log-depth per chunk (GPU default)": lambda t: selective_scan_fast(*t, delta_softplus=True,
                                                                                  parallel=True)}
    why = kernels.status(dev).get("selective_scan")
    if kernels.get("selective_scan", dev) is not None:
        forms["mamba-ssm selective_scan_fn"] = lambda t: selective_scan(*t, delta_softplus=True, impl="cuda")
    inputs = [x.detach().to(dev).requires_grad_() for x in scan_inputs(b, d, L, n)]
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else dev.type  # CPU: tests/test_gpu_check.py
    print(f"### Selective scan on {name}, fp32, b={b} d={d} L={L} n={n}, forward+backward (mamba-ssm: {why})\n")
    print(f"| form | ms (median of {repeats}) | vs per step | max abs diff of y vs per step |")
    print("|---|---:|---:|---:|")
    ref, rows = None, {}
    for name, fn in forms.items():
        times = []
        for i in range(repeats + 1):  # the first call warms up (allocator, Triton/CUDA modules)
            for x in inputs:
                x.grad = None
            sync()
            t0 = time.perf_counter()
            y = fn(inputs)
            y.sum().backward()
            sync()
            if i:
                times.append(time.perf_counter() - t0)
        y = y.detach()
        ref = y if ref is None else ref
        rows[name] = (sorted(times)[len(times) // 2], float((y - ref).abs().max()))
    base = rows["per step"][0]
    for name, (t, diff) in rows.items():
        print(f"| {name} | {t * 1e3:.1f} | {base / t:.2f}x | {diff:.1e} |")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--L", type=int, default=1024)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--cuda", action="store_true", help="time the scan on the CUDA device instead of counting")
    args = ap.parse_args()
    if args.cuda:
        if not torch.cuda.is_available():
            sys.exit("error: --cuda needs a CUDA device")
        cuda_scan_table(args.L, args.repeats)
        return
    torch.set_num_threads(2)

    print(f"### Selective scan, one layer, L={args.L}\n")
    print("| form | ops forward | ops backward | CPU time (b=2, d=256, n=16) |")
    print("|---|---:|---:|---:|")
    small, timed = scan_inputs(1, 4, args.L, 4), scan_inputs(2, 256, args.L, 16)
    times = {False: [], True: []}
    for _ in range(args.repeats):  # interleaved: both forms see the same machine load
        for parallel in (False, True):
            t0 = time.perf_counter()
            scan_step(timed, parallel)
            times[parallel].append(time.perf_counter() - t0)
    for parallel in (False, True):
        with OpCounter() as f:
            y = selective_scan_fast(*small, delta_softplus=True, parallel=parallel)
        with OpCounter() as b:
            y.sum().backward()
        name = "log-depth per chunk (GPU default)" if parallel else "per step (CPU default)"
        ratio = min(times[parallel]) / min(times[False])
        print(f"| {name} | {f.ops} | {b.ops} | {min(times[parallel]):.3f} s ({ratio:.2f}x) |")

    print("\n### momv4 layout (14 layers, toy widths), B=2, T=16\n")
    cfg = OmegaConf.to_container(OmegaConf.load(os.path.join(ROOT, "conf", "model", "momv4.yaml")))
    cfg.update(vocab_size=64, hidden_size=64, num_attention_heads=8, num_key_value_heads=2, moa_top_k=4,
               intermediate_size=32, mamba_dt_rank=4, mamba_d_state=4)
    torch.manual_seed(0)
    model = MoMForCausalLM(MoMConfig(**cfg)).train()
    ids = torch.randint(0, 64, (2, 16))
    print("| pass | ops | host syncs | by kind |")
    print("|---|---:|---:|---|")
    with OpCounter() as c:
        out = model(ids, labels=ids)
    print(f"| training forward | {c.ops} | {c.syncs} | {dict(c.sync_calls)} |")
    with OpCounter() as c:
        out.loss.backward()
    print(f"| training backward | {c.ops} | {c.syncs} | {dict(c.sync_calls)} |")
    model.eval()
    with torch.no_grad(), OpCounter() as c:
        model(ids)
    print(f"| eval forward | {c.ops} | {c.syncs} | {dict(c.sync_calls)} |")


if __name__ == "__main__":
    main()
