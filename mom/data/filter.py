"""``data.filter``: keep the train documents whose mean reference loss lies in a quantile range.

``{ref_run: DIR, min_quantile: 0.0, max_quantile: 0.8}`` keeps the documents whose mean per-token loss under
the reference model (``python -m mom.score``, stored per document next to the per-token losses) is between
the ``min_quantile`` and ``max_quantile`` quantiles of all train documents' (by document count), i.e. drops
the documents the reference finds least (max) or most (min) likely. The kept documents are tokenised into
their own cache, keyed by the unfiltered cache, the reference identity and the range, so a filtered dataset
is built once and shared like any token cache.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from mom.data.cache import TokenCache, get_token_cache
from mom.data.corpus import Corpus, DataError, stable_hash

log = logging.getLogger("mom")
FILTER_KEYS = ("ref_run", "min_quantile", "max_quantile")


def filter_options(cfg: Mapping[str, Any]) -> dict[str, Any]:
    unknown = set(cfg) - set(FILTER_KEYS)
    if unknown:
        raise DataError(f"unknown data.filter keys: {', '.join(sorted(unknown))} (known: {', '.join(FILTER_KEYS)})")
    lo, hi = float(cfg.get("min_quantile", 0.0) or 0.0), cfg.get("max_quantile", 1.0)
    hi = 1.0 if hi is None else float(hi)
    if not 0.0 <= lo < hi <= 1.0:
        raise DataError(f"data.filter needs 0 <= min_quantile < max_quantile <= 1, got {lo} and {hi}")
    if not cfg.get("ref_run"):
        raise DataError("data.filter needs ref_run=<the reference training run>")
    return {"ref_run": str(cfg["ref_run"]), "min_quantile": lo, "max_quantile": hi}


def keep_documents(doc_losses: np.ndarray, min_quantile: float, max_quantile: float) -> np.ndarray:
    """Indices of the documents with a (finite) mean loss in [quantile(min), quantile(max)]."""
    finite = np.isfinite(doc_losses)
    if not finite.any():
        return np.zeros(0, dtype=np.int64)
    lo, hi = np.quantile(doc_losses[finite], [min_quantile, max_quantile])
    return np.nonzero(finite & (doc_losses >= lo) & (doc_losses <= hi))[0]


def filtered_cache(base: TokenCache, corpus: Corpus, tokenizer, cache_dir: Path, seq_len: int,
                   cfg: Mapping[str, Any], *, eos_id: int) -> TokenCache:
    from mom.data.ref_losses import load_ref_losses
    from mom.run_folder import RunFolderError, model_identity, resolve_ref_model_dir

    opts = filter_options(cfg)
    try:
        model_dir = resolve_ref_model_dir(opts["ref_run"])
    except RunFolderError as e:
        raise DataError(f"data.filter: {e}") from None
    ref_id = model_identity(model_dir)
    windows_key = f"{base.key}-T{seq_len}"
    store = load_ref_losses(cache_dir, windows_key, ref_id)
    if store is None:
        raise DataError(f"data.filter: no reference losses of {model_dir} for this train split (seq_len {seq_len}); "
                        f"run: python -m mom.score ref_run={opts['ref_run']} with this data config minus data.filter")
    doc_losses = store.doc_losses
    if len(doc_losses) != base.n_docs:
        raise DataError(f"data.filter: {store.stem}.docs.npy has {len(doc_losses)} documents, the split {base.n_docs}")
    keep = keep_documents(doc_losses, opts["min_quantile"], opts["max_quantile"])
    if len(keep) == 0:
        raise DataError("data.filter keeps no document")
    key = stable_hash({"base": base.key, "ref_id": ref_id, "seq_len": seq_len,
                       "min_quantile": opts["min_quantile"], "max_quantile": opts["max_quantile"]})[:24]
    keep_list = keep.tolist()
    cache = get_token_cache(_KeptDocuments(corpus, keep_list), tokenizer, cache_dir, key, eos_id=eos_id,
                            info={"split": "train", "corpus": corpus.describe(), "filter_of": base.key,
                                  "filter": {**opts, "ref_id": ref_id}, "kept_docs": len(keep_list),
                                  "of_docs": base.n_docs})
    log.info("data.filter: kept %d of %d train documents (%s tokens of %s), mean reference loss in quantiles "
             "[%.2f, %.2f]", len(keep_list), base.n_docs, f"{cache.n_tokens:,}", f"{base.n_tokens:,}",
             opts["min_quantile"], opts["max_quantile"])
    return cache


class _KeptDocuments:
    """The train documents at the kept indices, streamed (a callable, so it can be re-read to resume)."""

    def __init__(self, corpus: Corpus, keep: list[int]):
        self.corpus, self.keep = corpus, set(keep)

    def __call__(self):
        return (t for i, t in enumerate(self.corpus.documents("train")) if i in self.keep)


__all__ = ["filter_options", "filtered_cache", "keep_documents"]
