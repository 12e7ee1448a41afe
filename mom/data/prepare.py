"""Tokenise a document stream into token shards: several worker processes, bounded memory, resumable.

One pass over a corpus's labelled stream ``(split, text)`` writes, per split, a sequence of shards under
``<cache_dir>/tokens/<prep key>/``::

    train-00000.bin        raw token ids (uint16 when the vocabulary fits, else uint32), EOS between documents
    train-00000.docs.npy   int64 start offset of each document in the shard
    validation-00000.bin   ...
    progress.json          while building: documents consumed and shards finished (deleted when complete)

Work is cut into *segments* of about ``shard_bytes`` characters of text: every segment closes one shard per
split, renames it into place and then records the documents consumed in ``progress.json`` (written
atomically). An interrupted preparation (a kill, an error, a lost node) restarts after its last finished
segment: it skips the documents already consumed (they are read again, not tokenised) and overwrites any
half-written shard. Segment boundaries depend only on the stream, and the workers' results are written in
the order the documents were read, so the shards are byte-identical for any number of workers, with or
without an interruption.

Memory: the reader holds one task (``task_bytes`` of text) per split being filled plus at most
``2 * num_proc`` tasks in flight; tokens go to disk as each task comes back. Nothing grows with the corpus but
the per-shard document offsets (8 bytes per document of the current shard).

Workers: ``num_proc = 0`` encodes in this process (``encode_batch``, which the tokenizers library spreads
over its own threads); ``num_proc >= 1`` starts that many *spawned* processes, each encoding single-threaded
(so N processes use N cores); the reader and writer stay in this process. This module imports only numpy,
tokenizers and ``mom.files``, so a spawned worker starts quickly.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import Tokenizer

from mom.files import atomic_write, publish

FORMAT_VERSION = 2


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


# ------------------------------------------------------------------------------------------ workers
_WORKER_TOKENIZER: Tokenizer | None = None


def _init_worker(tokenizer_json: str) -> None:
    global _WORKER_TOKENIZER
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one core per worker process
    _WORKER_TOKENIZER = Tokenizer.from_str(tokenizer_json)


def encode_task(texts: list[str], eos_id: int, dtype: str, tokenizer: Tokenizer | None = None,
                group_chars: int = 32 << 10) -> tuple[np.ndarray, np.ndarray, int]:
    """Encode documents as one array ``[EOS, doc0..., EOS, doc1..., ...]`` (EOS before every document),
    the length of each document's part (EOS included) and the UTF-8 bytes of the texts.

    Documents are encoded in groups of about ``group_chars`` characters, each group's ids copied into numpy
    at once: the tokenizer's ``Encoding`` objects take ~100 bytes per token, far more than the ids."""
    tok = tokenizer or _WORKER_TOKENIZER
    arrays, lens = [], []
    i = 0
    while i < len(texts):
        j, size = i, 0
        while j < len(texts) and (j == i or size + len(texts[j]) <= group_chars):
            size += len(texts[j])
            j += 1
        for enc in tok.encode_batch_fast(texts[i:j], add_special_tokens=False):
            ids = np.empty(len(enc.ids) + 1, dtype=dtype)
            ids[0] = eos_id
            ids[1:] = enc.ids
            arrays.append(ids)
            lens.append(len(ids))
        i = j
    out = np.concatenate(arrays) if arrays else np.zeros(0, dtype=dtype)
    return out, np.asarray(lens, dtype=np.int64), sum(len(t.encode("utf-8")) for t in texts)


class _Done:
    """A finished in-process task (the interface of a Future)."""

    def __init__(self, value):
        self.value = value

    def result(self):
        return self.value


# ------------------------------------------------------------------------------------------ writing
def _write_json(path: Path, obj: Any) -> None:
    atomic_write(path, lambda f: f.write(json.dumps(obj, indent=1, default=str)), mode="w")


class _SplitWriter:
    """The shards of one split: appends encoded tasks to the current shard, closes it at a segment end."""

    def __init__(self, folder: Path, split: str, eos_id: int, state: dict[str, Any] | None):
        self.folder, self.split, self.eos_id = folder, split, eos_id
        state = state or {"shards": [], "n_tokens": 0, "n_docs": 0, "n_bytes": 0}
        self.shards: list[dict[str, Any]] = list(state["shards"])
        self.n_tokens, self.n_docs, self.n_bytes = int(state["n_tokens"]), int(state["n_docs"]), int(state["n_bytes"])
        self._f = None

    def state(self) -> dict[str, Any]:
        return {"shards": self.shards, "n_tokens": self.n_tokens, "n_docs": self.n_docs, "n_bytes": self.n_bytes}

    def _open(self, segment: int) -> None:
        self.name = f"{self.split}-{segment:05d}"
        self.tmp = self.folder / f".{self.name}.bin.tmp"
        self._f = open(self.tmp, "wb")
        self._shard_tokens, self._shard_bytes, self._offsets = 0, 0, []

    def write(self, segment: int, ids: np.ndarray, lens: np.ndarray, n_bytes: int) -> None:
        if self._f is None:
            self._open(segment)
        starts = np.concatenate([[0], np.cumsum(lens)[:-1]]) + 1  # after each leading EOS
        if self.n_docs == 0:  # the split's first document has no EOS before it
            ids, starts = ids[1:], starts - 1
        self._offsets.append(starts + self._shard_tokens)
        self._f.write(ids.tobytes())
        self._shard_tokens += len(ids)
        self._shard_bytes += n_bytes
        self.n_tokens += len(ids)
        self.n_docs += len(lens)
        self.n_bytes += n_bytes

    def close_shard(self) -> None:
        if self._f is None:
            return
        self._f.flush()
        os.fsync(self._f.fileno())
        self._f.close()
        self._f = None
        offsets = np.concatenate(self._offsets).astype(np.int64)
        atomic_write(self.folder / f"{self.name}.docs.npy", lambda f: np.save(f, offsets))
        publish(self.tmp, self.folder / f"{self.name}.bin")  # written and fsynced as it grew
        self.shards.append({"file": f"{self.name}.bin", "n_tokens": self._shard_tokens,
                            "n_docs": len(offsets), "n_bytes": self._shard_bytes})

    def abort(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None


def prepare_shards(
    stream: Callable[[], Iterable[tuple[str, str]]],
    tokenizer: Tokenizer,
    folder: str | os.PathLike,
    *,
    eos_id: int,
    splits: tuple[str, ...] = ("train", "validation"),
    num_proc: int = 0,
    shard_bytes: int = 64 << 20,
    task_bytes: int = 256 << 10,
    log: Callable[[str], None] | None = None,
) -> dict[str, dict[str, Any]]:
    """Tokenise ``stream()`` into shards under ``folder`` (see the module doc); resume from its
    ``progress.json`` when there is one for the same settings. Returns {split: {shards, n_tokens, n_docs,
    n_bytes, dtype, ...}} (every split in ``splits``, even an empty one)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab = tokenizer.get_vocab_size(with_added_tokens=True)
    dtype = token_dtype(vocab)
    settings = {"format": FORMAT_VERSION, "eos_id": eos_id, "dtype": dtype.name, "splits": list(splits),
                "shard_bytes": int(shard_bytes), "task_bytes": int(task_bytes)}
    progress_path = folder / "progress.json"
    progress = None
    if progress_path.is_file():
        try:
            progress = json.loads(progress_path.read_text())
        except (OSError, json.JSONDecodeError):
            progress = None
        if progress is not None and progress.get("settings") != settings:
            progress = None
    consumed = int(progress["consumed"]) if progress else 0
    segment = int(progress["segments"]) if progress else 0
    writers = {s: _SplitWriter(folder, s, eos_id, (progress or {}).get("splits", {}).get(s)) for s in splits}
    if log and progress:
        log(f"resuming the tokenisation after {consumed:,} documents ({segment} segments)")

    pool = None
    if num_proc > 0:  # a process pool that raises (BrokenProcessPool) if a worker dies, rather than hanging
        pool = ProcessPoolExecutor(num_proc, mp_context=mp.get_context("spawn"), initializer=_init_worker,
                                   initargs=(tokenizer.to_str(),))
    in_flight: deque = deque()
    max_in_flight = max(1, 2 * num_proc)
    batches: dict[str, list[str]] = {s: [] for s in splits}
    batch_chars = dict.fromkeys(splits, 0)
    seg_chars = 0
    t0 = time.perf_counter()

    def submit(split: str) -> None:
        texts = batches[split]
        if not texts:
            return
        batches[split], batch_chars[split] = [], 0
        if pool is None:
            in_flight.append((split, _Done(encode_task(texts, eos_id, dtype.name, tokenizer))))
        else:
            in_flight.append((split, pool.submit(encode_task, texts, eos_id, dtype.name)))
        while len(in_flight) > max_in_flight:
            drain_one()

    def drain_one() -> None:
        split, res = in_flight.popleft()
        writers[split].write(segment, *res.result())

    def end_segment() -> None:
        nonlocal segment, seg_chars
        for s in splits:
            submit(s)
        while in_flight:
            drain_one()
        for w in writers.values():
            w.close_shard()
        segment += 1
        seg_chars = 0
        _write_json(progress_path, {"settings": settings, "consumed": consumed, "segments": segment,
                                    "splits": {s: w.state() for s, w in writers.items()}})
        if log:
            n_tok = sum(w.n_tokens for w in writers.values())
            log(f"tokenised {consumed:,} documents, {n_tok:,} tokens, {time.perf_counter() - t0:.0f} s")

    try:
        for split, text in islice(iter(stream()), consumed, None):
            consumed += 1
            if split not in batches:
                continue
            batches[split].append(text)
            batch_chars[split] += len(text)
            seg_chars += len(text)
            if batch_chars[split] >= task_bytes:
                submit(split)
            if seg_chars >= shard_bytes:
                end_segment()
        if seg_chars or any(batches.values()) or in_flight:
            end_segment()
    finally:
        for w in writers.values():
            w.abort()
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
    return {s: {**w.state(), "dtype": dtype.name, "eos_id": eos_id, "vocab_size": vocab,
                "folder": folder.name} for s, w in writers.items()}


def iter_shard_docs(folder: Path, shard: dict[str, Any], dtype: str) -> Iterator[np.ndarray]:
    """The documents of one shard as token arrays (EOS separators dropped): for tests and tools."""
    toks = np.fromfile(folder / shard["file"], dtype=dtype)
    offs = np.load(folder / shard["file"].replace(".bin", ".docs.npy"))
    ends = np.append(offs[1:] - 1, len(toks))
    for s, e in zip(offs, ends, strict=True):
        yield toks[s:e]
