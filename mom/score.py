"""Reference losses for selective language modelling (Rho-1):
``python -m mom.score ref_run=DIR [data=...] [splits=[train]] [seq_len=...] [batch_size=16]``.

Runs the reference model (``DIR/model``, in eval mode, so Mixture of Depths makes its causal decisions) over
the token cache of each split of the data config (default ``data: shakespeare``; a data config that points at
the reference's tokenizer, ``data.tokenizer.path=DIR/model/tokenizer.json``, for a corpus whose own tokenizer
would be trained) and stores one loss per target token of the cache, plus the mean loss per document (what
``data.filter`` keeps documents by); layout and alignment in :mod:`mom.slm`. A reference whose tokenizer is
not the data's is refused with one line. Already stored losses are reused (``overwrite=true`` rescores).

stdout gets one line per split and, last, one JSON object {split: {path, n_targets, mean_loss, ...}}.
:func:`score` is the whole job as a plain function (tests call it in-process).
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

import hydra
import numpy as np
import torch
from omegaconf import DictConfig

from mom.cli import one_line_errors
from mom.config import CONF_DIR, ScoreConfig, plain_options, register_configs
from mom.run_folder import setup_stderr_logging

log = logging.getLogger("mom.score")
register_configs()


def score(cfg: Any, out=None) -> dict[str, dict[str, Any]]:
    """Score the splits of ``cfg.data`` with ``cfg.ref_run``; returns {split: info} (info["store"]: RefLosses)."""
    from mom.data.corpus import DataError
    from mom.data.datamodule import build_datamodule
    from mom.data.ref_losses import load_ref_losses, write_ref_losses
    from mom.data.tokenizer import tokenizer_hash
    from mom.run_folder import model_identity, resolve_ref_model_dir
    from mom.slm import SlmError, check_same_tokenizer, load_reference, score_tokens

    c = plain_options(cfg, ScoreConfig)
    model_dir = resolve_ref_model_dir(c.get("ref_run"), error=SlmError)
    data_cfg = {k: v for k, v in dict(c.get("data") or {}).items() if k not in ("_target_", "tokenizer_dir")}
    if not data_cfg:
        raise SlmError("no data config: give data=<data config>")
    device = c["device"]
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    ref, ref_tok = load_reference(model_dir, device)
    ref_id = model_identity(model_dir)
    seq_len = int(c.get("seq_len") or data_cfg.get("seq_len") or 256)
    try:
        dm = build_datamodule(data_cfg, tokenizer_dir=None, seq_len=seq_len, num_workers=0)
        tok = dm._get_tokenizer()
    except DataError as e:
        raise SlmError(str(e)) from None
    check_same_tokenizer(ref_tok, tok, model_dir)
    if ref.config.vocab_size < tok.get_vocab_size(with_added_tokens=True):
        raise SlmError(f"the reference's vocab_size {ref.config.vocab_size} is smaller than its tokenizer's")
    if seq_len > ref.config.max_position_embeddings:
        log.warning("seq_len %d > the reference's max_position_embeddings %d", seq_len,
                    ref.config.max_position_embeddings)

    results: dict[str, dict[str, Any]] = {}
    for split in c["splits"]:
        split = {"val": "validation"}.get(split, split)
        if split not in ("train", "validation"):
            raise SlmError(f"unknown split {split!r} (train, validation)")
        try:
            cache = dm._get_cache(split)
        except DataError as e:
            raise SlmError(str(e)) from None
        windows_key = f"{cache.key}-T{seq_len}"
        store = None if c.get("overwrite") else load_ref_losses(dm.cache_dir, windows_key, ref_id)
        t0 = time.perf_counter()
        reused = store is not None
        if store is None:
            last = [0.0]

            def progress(done, total, elapsed, split=split, last=last):
                if elapsed - last[0] > 10:
                    last[0] = elapsed
                    log.info("%s: %d/%d windows, %.0f s", split, done, total, elapsed)

            losses = score_tokens(ref, cache.tokens, seq_len, int(c["batch_size"]), device, progress)
            meta = {"seq_len": seq_len, "split": split, "cache_key": cache.key, "ref_model_dir": str(model_dir),
                    "tokenizer_sha256": tokenizer_hash(tok), "n_docs": cache.n_docs,
                    "score_s": round(time.perf_counter() - t0, 3)}
            store = write_ref_losses(dm.cache_dir, windows_key, ref_id, losses, cache.doc_offsets, meta,
                                     dtype=c["dtype"])
        doc = store.doc_losses
        info = {"path": f"{store.stem}.bin", "n_targets": store.n_targets, "mean_loss": store.meta.get("mean_loss"),
                "n_docs": int(len(doc)), "doc_loss_median": float(np.nanmedian(doc)) if len(doc) else None,
                "seq_len": seq_len, "ref_id": ref_id, "reused": reused,
                "seconds": round(time.perf_counter() - t0, 3), "store": store}
        results[split] = info
        if out is not None:
            out.write(f"[mom.score] {split}: {info['n_targets']:,} token losses (mean {info['mean_loss']:.4f} nats), "
                      f"{info['n_docs']} documents, {'reused' if reused else 'scored'} in {info['seconds']:.1f} s "
                      f"-> {info['path']}\n")
    if out is not None:
        out.write(json.dumps({s: {k: v for k, v in i.items() if k != "store"} for s, i in results.items()}) + "\n")
        out.flush()
    return results


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="score")
def main(cfg: DictConfig) -> None:
    setup_stderr_logging()
    with one_line_errors():
        score(cfg, out=sys.stdout)


if __name__ == "__main__":
    from mom.cli import run_cli

    run_cli(main, "score")  # a config that does not compose: one line too


__all__ = ["score", "main"]
