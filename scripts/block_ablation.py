"""What each block of a trained model contributes: its whole-split bits per byte with one block (or only its
mixer, or only its feed-forward) removed, as ``python -m mom.eval`` scores it.

    python scripts/block_ablation.py runs/tiny                      # every block, mixer and feed-forward
    python scripts/block_ablation.py runs/tiny --parts block --layers 1,3

A removed block passes its input through unchanged; a removed mixer (Mamba or attention) or feed-forward adds
nothing to the residual stream, the rest of its block runs as trained (under Mixture of Depths, the router
still decides which tokens the block updates). The table's last column is the bpb the model loses without
that part: what ~0 means is that the part was not used by the trained model (docs/ablations.md, seventh
session: the routed attention blocks of a 10-minute `make train`).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mom.cli import one_line_errors  # noqa: E402
from mom.eval import evaluate  # noqa: E402

PARTS = ("block", "mixer", "ffn")


def _no_update(x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    return torch.zeros_like(x)


def remove(block: torch.nn.Module, part: str) -> None:
    """Remove ``part`` of one :class:`mom.model.model.MoMBlock` (in place, on this instance only)."""
    if part == "block":
        block.forward = lambda x, token_mask=None, state=None: (x, {}, {})
    elif part == "mixer":
        block._mix = _no_update
    elif part == "ffn":
        block._ffn = _no_update
    else:
        raise ValueError(f"unknown part {part!r}: choose from {', '.join(PARTS)}")


def block_kind(block: torch.nn.Module) -> str:
    kind = "attention" if block.is_attention else "mamba"
    ffn = type(block.feed_forward).__name__
    routed = ", MoD" if block.mod_router is not None else ""
    return f"{kind} + {ffn}{routed}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run_dir", help="a training run folder (or give --model-dir)")
    ap.add_argument("--model-dir", default=None)
    ap.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated, from {', '.join(PARTS)}")
    ap.add_argument("--layers", default=None, help="comma-separated layer indices (default: all)")
    ap.add_argument("--batch-size", type=int, default=16)
    args = ap.parse_args(argv)
    parts = [p for p in args.parts.split(",") if p]
    bad = [p for p in parts if p not in PARTS]
    if bad:
        ap.error(f"unknown part(s) {', '.join(bad)}: choose from {', '.join(PARTS)}")
    cfg = {"run_dir": args.run_dir, "model_dir": args.model_dir, "batch_size": args.batch_size}

    kinds: list[str] = []
    full = evaluate(cfg, progress=False, prepare=lambda m: kinds.extend(block_kind(b) for b in m.model.layers))
    layers = [int(i) for i in args.layers.split(",")] if args.layers else list(range(len(kinds)))
    if any(not 0 <= i < len(kinds) for i in layers):
        ap.error(f"--layers: the model has layers 0..{len(kinds) - 1}")
    print(f"model: {full['model_dir']} ({full['tokens']:,} tokens scored)\n")
    print("| removed | layer | bpb | bpb lost without it |")
    print("|---|---|---:|---:|")
    print(f"| nothing | | {full['bpb']:.4f} | |")
    for i in layers:
        for part in parts:
            m = evaluate(cfg, progress=False, prepare=lambda model: remove(model.model.layers[i], part))
            print(f"| {part} | {i} ({kinds[i]}) | {m['bpb']:.4f} | {m['bpb'] - full['bpb']:+.4f} |", flush=True)
    return 0


if __name__ == "__main__":
    with one_line_errors():  # a missing run folder or model: one line, not a stack trace
        sys.exit(main())
