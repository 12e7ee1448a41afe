"""Parameter accounting of the model presets: ``python -m mom.summary [MODEL ...] [--precision PRESET]``.

Prints :func:`mom.model.summary.format_summary` for each ``conf/model/<MODEL>.yaml`` (default: tiny, momv4,
momv5) composed with a precision preset, on the meta device (nothing is allocated). The accounting itself is
plain PyTorch in :mod:`mom.model.summary`; this entry point only composes the configs.
"""

from __future__ import annotations

import argparse

from mom.config import compose, model_config
from mom.model.summary import format_summary, summary


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("models", nargs="*", default=["tiny", "momv4", "momv5"])
    ap.add_argument("--precision", default="attn_bf16")
    args = ap.parse_args(argv)
    for name in args.models:
        cfg = compose("train", [f"model={name}", f"precision={args.precision}"])
        print(f"\n#### {name} (precision {args.precision})\n")
        print(format_summary(summary(model_config(cfg.model, cfg.precision))))


if __name__ == "__main__":
    main()
