"""Where a native decode step's time goes: linear layers (quantiser + 2-bit/fp32 kernels), attention, SSM
update, the rest (norms, routing, expert gathers, conv, thread hand-offs), timed inside the C++ step.

    .venv/bin/python scripts/profile_engine.py [--sizes small,big] [--threads 2] [--tokens 200]

Same random Jamba weights as ``scripts/bench_vs_llamacpp.py`` (its cache folder; no llama.cpp needed), fp32
and the ``ternary`` preset packed to 2 bits, batch 1, positions 16 to 16 + tokens. Prints one markdown table.
"""

from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path

import bench_vs_llamacpp as bench
import torch


def profile(model, tokens: int, label: str, name: str) -> list:
    from mom.infer.engine import Engine

    eng = Engine(model)
    if eng.native is None:
        raise SystemExit(f"the native step is not in use: {eng.native_why}")
    prog = eng.native.program
    cache = eng.get_cache(1, 16 + tokens + 8)
    prompt = torch.randint(3, model.config.vocab_size, (1, 16), generator=torch.Generator().manual_seed(0))
    eng.prefill(prompt, None, cache)
    tok = torch.tensor([5])
    for _ in range(4):  # warm-up
        eng.step(tok, cache)
    prog.time_spent()
    t0 = time.perf_counter()
    for _ in range(tokens - 4):
        eng.step(tok, cache)
    wall = (time.perf_counter() - t0) / (tokens - 4)
    total, lin, attn, ssm, regions = (v / (tokens - 4) for v in prog.time_spent())
    other = total - lin - attn - ssm
    ms = [x / 1e6 for x in (total, lin, attn, ssm, other)]
    return [name, label, f"{1 / wall:,.0f}", f"{wall * 1e3:.3f}", f"{(wall - total / 1e9) * 1e3:.3f}",
            *(f"{m:.3f} ({100 * m / ms[0]:.0f}%)" for m in ms[1:]), f"{regions:.0f}",
            f"{prog.weight_bytes_read() / 2**20:.1f}"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="small,big")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=200)
    ap.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "mom" / "llamacpp")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from mom.convert import from_hf_jamba
    from mom.model import PRECISION_PRESETS
    from mom.model.model import apply_precision
    from mom.model.packed import pack_model

    rows = []
    for size in args.sizes.split(","):
        model = from_hf_jamba(bench.make_jamba(size, args.cache / "models" / f"jamba-{size}")).eval()
        name = f"{size} ({model.num_parameters() / 1e6:.1f}M)"
        rows.append(profile(model, args.tokens, "fp32", name))
        packed = pack_model(apply_precision(copy.deepcopy(model), PRECISION_PRESETS["ternary"]))
        rows.append(profile(packed, args.tokens, "ternary packed", name))
    print(f"\n### Native decode step, batch 1, {args.threads} threads, {args.tokens} tokens (ms per token)\n")
    print(bench.table(["model", "weights", "tok/s", "step", "Python", "linear layers", "attention", "SSM update",
                       "rest", "linear calls", "weights read (MiB)"], rows))


if __name__ == "__main__":
    main()
