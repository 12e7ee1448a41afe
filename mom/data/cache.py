"""Token caches: the token shards of each split of a prepared corpus, and packed windows over them.

A corpus is tokenised once (:mod:`mom.data.prepare`: parallel, resumable, bounded memory) into
``<cache_dir>/tokens/<prep key>/<split>-NNNNN.bin`` shards; each split then gets ``<cache_dir>/tokens/<key>.json``
(the split's metadata and shard list), written last, so a split's cache is either complete or absent. The
split's tokens are read back as one stream (:class:`ShardedTokens`: the shards memory-mapped, concatenated).

The prep key hashes the corpus identity (file content hashes, or Hub name + revision, plus limits and split
settings), the tokenizer's JSON and the packing settings (EOS between documents, format version); a split's
key adds the split. Neither holds ``seq_len``: windows are views of the token stream, so one tokenisation
serves every sequence length. :attr:`PackedSequences.key` adds ``seq_len`` for things stored per window
(e.g. Rho-1 reference losses). Preparation settings that cannot change the tokens (workers, shard size) are
not in the key either.

Packing: documents joined with EOS between them (not after the last, as in the quality anchor). Window ``i``
is ``tokens[i*(T-1) : i*(T-1)+T]`` with ``T = seq_len``: consecutive windows share one boundary token. The
model shifts labels inside (labels = input_ids), so a window scores T-1 targets and with this stride every
token after the first is a target exactly once: validation over all windows is the whole split (non-
overlapping windows of T would leave every T-th token unscored). The last partial window is dropped.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tokenizers import Tokenizer

from mom.data.corpus import DataError, stable_hash
from mom.data.prepare import FORMAT_VERSION, prepare_shards, token_dtype
from mom.files import atomic_write

CACHE_VERSION = FORMAT_VERSION


def open_array(path: str | os.PathLike, dtype: Any, n: int) -> np.ndarray:
    """A stored 1-D array of ``n`` values, memory-mapped read-only (an empty array when ``n`` is 0: numpy
    cannot map an empty file)."""
    dtype = np.dtype(dtype)
    if n == 0:
        return np.zeros(0, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r", shape=(n,))


def cache_key(corpus_identity: dict, split: str, tok_hash: str, settings: dict | None = None) -> str:
    """The key of one split's tokens (see the module doc)."""
    return stable_hash({"prep": prep_key(corpus_identity, tok_hash, settings), "split": split})[:24]


def prep_key(corpus_identity: dict, tok_hash: str, settings: dict | None = None) -> str:
    return stable_hash({"version": CACHE_VERSION, "corpus": corpus_identity, "tokenizer": tok_hash,
                        "settings": settings or {}})[:24]


class ShardedTokens:
    """The token stream of a split: its shards memory-mapped and read as one 1-D array (``len``, integer and
    slice indexing, ``np.asarray``). Picklable for DataLoader workers: each process maps the files itself."""

    def __init__(self, paths: list[Path], counts: list[int], dtype: str):
        self.paths, self.counts, self.dtype = list(paths), [int(c) for c in counts], np.dtype(dtype)
        self.starts = np.concatenate([[0], np.cumsum(self.counts)]).astype(np.int64)
        self._maps: list[np.ndarray] | None = None

    def _arrays(self) -> list[np.ndarray]:
        if self._maps is None:
            self._maps = [open_array(p, self.dtype, n) for p, n in zip(self.paths, self.counts, strict=True)]
        return self._maps

    def __len__(self) -> int:
        return int(self.starts[-1])

    @property
    def shape(self) -> tuple[int]:
        return (len(self),)

    def __getitem__(self, key):
        n = len(self)
        if isinstance(key, slice):
            start, stop, step = key.indices(n)
            if step != 1:
                return self[start:stop][::step]
            return self.read(start, stop)
        i = int(key)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(key)
        return self.read(i, i + 1)[0]

    def read(self, start: int, stop: int) -> np.ndarray:
        """tokens[start:stop]: a view when it lies in one shard, else a copy across shards."""
        if stop <= start:
            return np.zeros(0, dtype=self.dtype)
        arrays = self._arrays()
        k = int(np.searchsorted(self.starts, start, side="right")) - 1
        s0 = int(self.starts[k])
        if stop <= self.starts[k + 1]:
            return arrays[k][start - s0 : stop - s0]
        parts = []
        while start < stop:
            s0, s1 = int(self.starts[k]), int(self.starts[k + 1])
            parts.append(arrays[k][start - s0 : min(stop, s1) - s0])
            start = min(stop, s1)
            k += 1
        return np.concatenate(parts)

    def __array__(self, dtype=None, copy=None):
        out = self.read(0, len(self))
        return np.array(out, dtype=dtype) if dtype is not None else np.array(out)

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_maps"] = None
        return state


@dataclass
class TokenCache:
    """One tokenised split on disk. ``built`` is True when this call tokenised it (False: reused)."""

    key: str
    dir: Path
    meta: dict[str, Any]
    built: bool = False
    _tokens: ShardedTokens | None = field(default=None, repr=False)

    @property
    def folder(self) -> Path:
        return self.dir / self.meta["folder"]

    @property
    def meta_path(self) -> Path:
        return self.dir / f"{self.key}.json"

    @property
    def shard_paths(self) -> list[Path]:
        return [self.folder / s["file"] for s in self.meta["shards"]]

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
    def tokens(self) -> ShardedTokens:
        """The token stream, memory-mapped read-only (opened on first use)."""
        if self._tokens is None:
            self._tokens = ShardedTokens(self.shard_paths, [s["n_tokens"] for s in self.meta["shards"]],
                                         self.meta["dtype"])
        return self._tokens

    @property
    def doc_offsets(self) -> np.ndarray:
        """int64 start of every document in the split's token stream."""
        parts, base = [], 0
        for s in self.meta["shards"]:
            parts.append(np.load(self.folder / s["file"].replace(".bin", ".docs.npy")) + base)
            base += int(s["n_tokens"])
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)

    def __getstate__(self):  # picklable for DataLoader workers: reopen the memmaps there
        state = self.__dict__.copy()
        state["_tokens"] = None
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
    itemsize = np.dtype(meta["dtype"]).itemsize
    for s, p in zip(meta.get("shards", []), cache.shard_paths, strict=True):
        if not p.is_file() or p.stat().st_size != int(s["n_tokens"]) * itemsize:
            return None
    return cache


def build_token_caches(
    stream: Callable[[], Iterable[tuple[str, str]]],
    tokenizer: Tokenizer,
    cache_dir: str | os.PathLike,
    keys: dict[str, str],
    folder: str,
    *,
    eos_id: int,
    info: dict | None = None,
    num_proc: int = 0,
    shard_bytes: int = 64 << 20,
    log: Callable[[str], None] | None = None,
) -> dict[str, TokenCache]:
    """Tokenise ``stream()`` (pairs of split, text) into the caches ``keys`` ({split: key}) at once."""
    d = Path(cache_dir) / "tokens"
    t0 = time.perf_counter()
    out = prepare_shards(stream, tokenizer, d / folder, eos_id=eos_id, splits=tuple(keys), num_proc=num_proc,
                         shard_bytes=shard_bytes, log=log)
    caches = {}
    for split, key in keys.items():
        meta = {"version": CACHE_VERSION, **out[split], "tokenize_s": round(time.perf_counter() - t0, 3),
                "split": split, **(info or {})}
        atomic_write(d / f"{key}.json", lambda f, meta=meta: f.write(json.dumps(meta, indent=1, default=str)),
                     mode="w")
        caches[split] = TokenCache(key, d, meta, built=True)
    (d / folder / "progress.json").unlink(missing_ok=True)
    return caches


def get_token_cache(
    texts_fn: Callable[[], Iterable[str]],
    tokenizer: Tokenizer,
    cache_dir: str | os.PathLike,
    key: str,
    *,
    eos_id: int,
    info: dict | None = None,
    num_proc: int = 0,
) -> TokenCache:
    """One split's cache ``key``, tokenised from ``texts_fn()`` only when it is not there yet."""
    cache = load_token_cache(cache_dir, key)
    if cache is not None:
        return cache
    return build_token_caches(lambda: (("train", t) for t in texts_fn()), tokenizer, cache_dir, {"train": key},
                              key, eos_id=eos_id, info=info, num_proc=num_proc)["train"]


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
        ids = torch.from_numpy(self.cache.tokens.read(s, s + self.seq_len).astype(np.int64))
        return {"input_ids": ids, "labels": ids.clone(), "index": torch.tensor(i, dtype=torch.long)}


__all__ = ["PackedSequences", "ShardedTokens", "TokenCache", "build_token_caches", "cache_key",
           "get_token_cache", "load_token_cache", "open_array", "prep_key", "token_dtype"]
