"""Stored per-token reference losses of a token cache (Rho-1 selection, the data filter).

Written by ``python -m mom.score`` (:func:`write_ref_losses`), read by the Rho-1 objective (:mod:`mom.slm`)
and by ``data.filter`` (:mod:`mom.data.filter`)::

    <data cache_dir>/ref_losses/<windows key>.<ref id>.bin        float16/32, n_tokens - 1 values
    <data cache_dir>/ref_losses/<windows key>.<ref id>.docs.npy   float64 mean loss per document
    <data cache_dir>/ref_losses/<windows key>.<ref id>.json       metadata, written last

``windows key`` is :attr:`mom.data.cache.PackedSequences.key` (token cache key + seq_len: the context the
losses were scored in) and ``ref id`` is :func:`mom.run_folder.model_identity` of the reference model folder
(hash of its config and weights). Value ``j`` is the reference NLL of cache token ``j + 1`` given the tokens
before it in its window (window ``w`` = tokens ``[w (T-1), w (T-1) + T)``, the windows training reads), so the
targets of window ``w`` are values ``[w (T-1), w (T-1) + T - 1)``: a batch's ``index`` finds its reference
losses by slicing. The tail after the last full window is scored in one shorter window, so every target has a
value. Every file is written atomically (:func:`mom.files.atomic_write`); the JSON comes last, so a store is
complete or absent.

They live in the data package because they are keyed to (and sliced like) the token cache.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mom.data.corpus import DataError
from mom.files import atomic_write

STORE_VERSION = 1


def store_stem(cache_dir: str | os.PathLike, windows_key: str, ref_id: str) -> Path:
    return Path(cache_dir).expanduser() / "ref_losses" / f"{windows_key}.{ref_id}"


@dataclass
class RefLosses:
    """Stored per-token reference losses of one (token cache, seq_len, reference model)."""

    stem: Path
    meta: dict[str, Any]

    @property
    def n_targets(self) -> int:
        return int(self.meta["n_targets"])

    @property
    def seq_len(self) -> int:
        return int(self.meta["seq_len"])

    @property
    def losses(self) -> np.ndarray:
        """(n_tokens - 1,) memory-mapped read-only: value j = reference NLL of cache token j + 1."""
        if getattr(self, "_losses", None) is None:
            from mom.data.cache import open_array

            self._losses = open_array(f"{self.stem}.bin", self.meta["dtype"], self.n_targets)
        return self._losses

    @property
    def doc_losses(self) -> np.ndarray:
        """(n_docs,) mean reference NLL of each document's target tokens (NaN for a document without any)."""
        return np.load(f"{self.stem}.docs.npy")

    def window_losses(self, index: torch.Tensor | np.ndarray, seq_len: int) -> torch.Tensor:
        """(B, seq_len - 1) float32 reference losses of the windows ``index`` (a batch's ``index``)."""
        idx = np.asarray(index.cpu() if torch.is_tensor(index) else index, dtype=np.int64).reshape(-1)
        stride = seq_len - 1
        pos = idx[:, None] * stride + np.arange(stride)[None, :]
        if pos.size and int(pos.max()) >= self.n_targets:
            raise DataError(f"window {int(idx.max())} is past the {self.n_targets} stored reference losses "
                            f"({self.stem}): not the token cache they were scored on")
        return torch.from_numpy(np.asarray(self.losses[pos], dtype=np.float32))

    def __getstate__(self):  # picklable (DataLoader workers, DDP spawn): reopen the memmap there
        state = self.__dict__.copy()
        state.pop("_losses", None)
        return state


def load_ref_losses(cache_dir: str | os.PathLike, windows_key: str, ref_id: str) -> RefLosses | None:
    """The stored losses for the key if complete, else None."""
    stem = store_stem(cache_dir, windows_key, ref_id)
    meta_path = Path(f"{stem}.json")
    if not meta_path.is_file():
        return None
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    store = RefLosses(stem, meta)
    size = store.n_targets * np.dtype(meta["dtype"]).itemsize
    binp = Path(f"{stem}.bin")
    if not binp.is_file() or binp.stat().st_size != size or not Path(f"{stem}.docs.npy").is_file():
        return None
    return store


def document_losses(losses: np.ndarray, doc_offsets: np.ndarray) -> np.ndarray:
    """Mean of ``losses`` (value j = target token j + 1) per document (doc d owns tokens from its offset up to
    and including the EOS before the next document); NaN for a document with no target token."""
    n_docs = len(doc_offsets)
    if n_docs == 0:
        return np.zeros(0)
    doc_of = np.searchsorted(doc_offsets, np.arange(1, len(losses) + 1), side="right") - 1
    vals = np.asarray(losses, dtype=np.float64)
    sums = np.bincount(doc_of, weights=vals, minlength=n_docs)
    counts = np.bincount(doc_of, minlength=n_docs)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)


def write_ref_losses(cache_dir: str | os.PathLike, windows_key: str, ref_id: str, losses: np.ndarray,
                     doc_offsets: np.ndarray, meta: dict[str, Any], dtype: str = "float16") -> RefLosses:
    stem = store_stem(cache_dir, windows_key, ref_id)
    dt = np.dtype(dtype)
    if dt not in (np.dtype(np.float16), np.dtype(np.float32)):
        raise DataError(f"reference losses are stored as float16 or float32, not {dtype}")
    arr = np.asarray(losses, dtype=dt)
    atomic_write(Path(f"{stem}.bin"), lambda f: f.write(arr.tobytes()))
    docs = document_losses(np.asarray(losses, dtype=np.float64), doc_offsets)
    atomic_write(Path(f"{stem}.docs.npy"), lambda f: np.save(f, docs))
    full = {"version": STORE_VERSION, "n_targets": int(arr.size), "dtype": dt.name, "windows_key": windows_key,
            "ref_id": ref_id, "mean_loss": float(np.mean(losses)) if len(losses) else None, **meta}
    atomic_write(Path(f"{stem}.json"), lambda f: f.write(json.dumps(full, indent=1, default=str).encode()))
    return RefLosses(stem, full)


__all__ = ["RefLosses", "document_losses", "load_ref_losses", "store_stem", "write_ref_losses"]
