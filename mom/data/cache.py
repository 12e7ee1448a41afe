"""Token caches and packed sequences.

A split is tokenised once into ``<cache_dir>/tokens/<key>.bin`` (raw uint16 when the vocabulary fits,
else uint32, read back as a ``numpy.memmap``), ``<key>.docs.npy`` (int64 start offset of each document)
and ``<key>.json`` (metadata: n_tokens, n_bytes of the text tokenised, n_docs, dtype, the key's inputs).
The JSON is written last and every file goes through :func:`mom.files.atomic_write`, so a cache is
either complete or absent; concurrent builders just both write the same bytes.

The key hashes the corpus identity (file content hashes, or Hub name + revision + limits), the split,
the tokenizer's JSON and the packing settings (EOS between documents, format version). It does **not**
hold ``seq_len``: windows are views of the token stream, so one tokenisation serves every sequence
length. :attr:`PackedSequences.key` adds ``seq_len`` for things stored per window (e.g. Rho-1
reference losses).

Packing: documents joined with EOS between them (not after the last, as in the quality.py anchor).
Window ``i`` is ``tokens[i*(T-1) : i*(T-1)+T]`` with ``T = seq_len``: consecutive windows share one
boundary token. The model shifts labels inside (labels = input_ids), so a window scores T-1 targets and
with this stride every token after the first is a target exactly once: validation over all windows is
the whole split, as in quality.py (non-overlapping windows of T would leave every T-th token unscored).
The last partial window is dropped.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tokenizers import Tokenizer

from mom.data.corpus import DataError, stable_hash
from mom.files import atomic_write


def open_array(path: str | os.PathLike, dtype: Any, n: int) -> np.ndarray:
    """A stored 1-D array of ``n`` values, memory-mapped read-only (an empty array when ``n`` is 0: numpy
    cannot map an empty file)."""
    dtype = np.dtype(dtype)
    if n == 0:
        return np.zeros(0, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r", shape=(n,))

CACHE_VERSION = 1


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


def cache_key(corpus_identity: dict, split: str, tok_hash: str, settings: dict | None = None) -> str:
    return stable_hash(
        {
            "version": CACHE_VERSION,
            "corpus": corpus_identity,
            "split": split,
            "tokenizer": tok_hash,
            "settings": settings or {},
        }
    )[:24]


@dataclass
class TokenCache:
    """One tokenised split on disk. ``built`` is True when this call tokenised it (False: reused)."""

    key: str
    dir: Path
    meta: dict[str, Any]
    built: bool = False

    @property
    def bin_path(self) -> Path:
        return self.dir / f"{self.key}.bin"

    @property
    def meta_path(self) -> Path:
        return self.dir / f"{self.key}.json"

    @property
    def docs_path(self) -> Path:
        return self.dir / f"{self.key}.docs.npy"

    @property
    def n_tokens(self) -> int:
        return int(self.meta["n_tokens"])

    @property
    def n_bytes(self) -> int:
        return int(self.meta["n_bytes"])

    @property
    def n_docs(self) -> int:
        return int(self.meta["n_docs"])

    @property
    def tokens(self) -> np.ndarray:
        """The token stream, memory-mapped read-only (opened on first use)."""
        if getattr(self, "_tokens", None) is None:
            self._tokens = open_array(self.bin_path, self.meta["dtype"], self.n_tokens)
        return self._tokens

    @property
    def doc_offsets(self) -> np.ndarray:
        return np.load(self.docs_path)

    def __getstate__(self):  # picklable for DataLoader workers: reopen the memmap there
        state = self.__dict__.copy()
        state.pop("_tokens", None)
        return state


def load_token_cache(cache_dir: str | os.PathLike, key: str) -> TokenCache | None:
    """The cache for ``key`` if it is complete, else None."""
    d = Path(cache_dir) / "tokens"
    meta_path = d / f"{key}.json"
    if not meta_path.is_file():
        return None
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    cache = TokenCache(key, d, meta)
    size = cache.n_tokens * np.dtype(meta["dtype"]).itemsize
    if not cache.bin_path.is_file() or cache.bin_path.stat().st_size != size or not cache.docs_path.is_file():
        return None
    return cache


def build_token_cache(
    texts: Iterable[str],
    tokenizer: Tokenizer,
    cache_dir: str | os.PathLike,
    key: str,
    *,
    eos_id: int,
    info: dict | None = None,
    chunk_docs: int = 256,
) -> TokenCache:
    """Tokenise ``texts`` (EOS between documents) into the cache ``key``, atomically."""
    d = Path(cache_dir) / "tokens"
    d.mkdir(parents=True, exist_ok=True)
    dtype = token_dtype(tokenizer.get_vocab_size(with_added_tokens=True))
    final_bin = d / f"{key}.bin"
    t0 = time.perf_counter()
    n_tokens = n_bytes = 0
    offsets: list[int] = []
    eos = np.array([eos_id], dtype=dtype)
    def write_tokens(f) -> None:
        chunk: list[str] = []

        def flush():
            nonlocal n_tokens, n_bytes
            for enc in tokenizer.encode_batch(chunk, add_special_tokens=False):
                if offsets:
                    f.write(eos.tobytes())
                    n_tokens += 1
                offsets.append(n_tokens)
                ids = np.asarray(enc.ids, dtype=np.int64)
                f.write(ids.astype(dtype).tobytes())
                n_tokens += len(ids)
            n_bytes += sum(len(t.encode("utf-8")) for t in chunk)
            chunk.clear()

        for text in texts:
            chunk.append(text)
            if len(chunk) >= chunk_docs:
                flush()
        if chunk:
            flush()

    atomic_write(final_bin, write_tokens)
    atomic_write(d / f"{key}.docs.npy", lambda f: np.save(f, np.asarray(offsets, dtype=np.int64)))
    meta = {
        "version": CACHE_VERSION,
        "n_tokens": n_tokens,
        "n_bytes": n_bytes,
        "n_docs": len(offsets),
        "dtype": dtype.name,
        "eos_id": eos_id,
        "vocab_size": tokenizer.get_vocab_size(with_added_tokens=True),
        "tokenize_s": round(time.perf_counter() - t0, 3),
        **(info or {}),
    }
    atomic_write(d / f"{key}.json", lambda f: f.write(json.dumps(meta, indent=1, default=str).encode()))
    return TokenCache(key, d, meta, built=True)


def get_token_cache(
    texts_fn,
    tokenizer: Tokenizer,
    cache_dir: str | os.PathLike,
    key: str,
    *,
    eos_id: int,
    info: dict | None = None,
) -> TokenCache:
    """The cache ``key``, built from ``texts_fn()`` only when it is not there yet."""
    cache = load_token_cache(cache_dir, key)
    if cache is not None:
        return cache
    return build_token_cache(texts_fn(), tokenizer, cache_dir, key, eos_id=eos_id, info=info)


class PackedSequences(torch.utils.data.Dataset):
    """Windows of ``seq_len`` tokens over a token cache (stride ``seq_len - 1``, see the module doc).

    Item ``i``: {"input_ids": (T,) long, "labels": (T,) long (equal to input_ids), "index": () long = i}.
    """

    def __init__(self, cache: TokenCache, seq_len: int, *, split: str = "", min_windows: int = 1):
        if seq_len < 2:
            raise DataError(f"seq_len must be at least 2, got {seq_len}")
        self.cache = cache
        self.seq_len = seq_len
        self.stride = seq_len - 1
        n = cache.n_tokens
        self.n_windows = (n - 1) // self.stride if n >= seq_len else 0
        if self.n_windows < min_windows:
            what = f"{min_windows} sequences" if min_windows > 1 else "one sequence"
            raise DataError(
                f"the {split or 'data'} split has {n:,} tokens: too few for {what} of seq_len {seq_len}"
                f" ({self.n_windows} windows)"
            )

    @property
    def key(self) -> str:
        """Identifies the windows (token cache + seq_len), e.g. for per-window stored losses."""
        return f"{self.cache.key}-T{self.seq_len}"

    @property
    def n_target_tokens(self) -> int:
        """Tokens scored over all windows (each window scores seq_len - 1)."""
        return self.n_windows * self.stride

    def __len__(self) -> int:
        return self.n_windows

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        if i < 0:
            i += self.n_windows
        if not 0 <= i < self.n_windows:
            raise IndexError(i)
        s = i * self.stride
        ids = torch.from_numpy(self.cache.tokens[s : s + self.seq_len].astype(np.int64))
        return {"input_ids": ids, "labels": ids.clone(), "index": torch.tensor(i, dtype=torch.long)}
