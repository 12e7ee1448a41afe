"""Local files as document sources: ``text``, ``jsonl`` and ``parquet``, streamed one document at a time.

``paths`` (and the optional ``val_paths``, an explicit validation set) are files, folders (searched
recursively by suffix) or glob patterns. Text files give one document per file (``split_by: file``) or per
blank-line-separated block (``split_by: blank_line``, read line by line, so a huge file is never in memory
whole); JSON-lines and parquet give one document per row, the text in ``text_field`` (parquet is read in
record batches of one column).
"""

from __future__ import annotations

import glob
import json
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mom.data.corpus import TEXT_VERSION, DataError, Source, file_sha256

SUFFIXES = {"text": (".txt", ".md", ".text"), "jsonl": (".jsonl", ".json"), "parquet": (".parquet",)}


def resolve_paths(paths: str | os.PathLike | Sequence[str | os.PathLike] | None, source: str) -> list[Path]:
    """Files named by ``paths``: files, directories (searched recursively by suffix) or glob patterns.

    Sorted within each entry, entries kept in the order given. Raises DataError naming what is missing.
    """
    if paths is None or (not isinstance(paths, (str, os.PathLike)) and len(paths) == 0):
        raise DataError(f"data source {source!r} needs 'paths' (files, folders or glob patterns)")
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    files: list[Path] = []
    for entry in paths:
        entry = os.path.expanduser(str(entry))
        if glob.has_magic(entry):
            hits = sorted(p for p in glob.glob(entry, recursive=True) if os.path.isfile(p))
            if not hits:
                raise DataError(f"no files match {entry}")
            files.extend(Path(h) for h in hits)
        elif os.path.isdir(entry):
            hits = sorted(
                Path(dp) / f for dp, _, fs in os.walk(entry) for f in fs if f.endswith(SUFFIXES[source])
            )
            if not hits:
                raise DataError(f"no {'/'.join(SUFFIXES[source])} files under {entry}")
            files.extend(hits)
        elif os.path.isfile(entry):
            files.append(Path(entry))
        else:
            raise DataError(f"data file not found: {entry}")
    return files


def _open_utf8(path: Path):
    return open(path, encoding="utf-8", newline=None)  # universal newlines: \r\n -> \n


def _decode_error(path: Path, e: UnicodeDecodeError) -> DataError:
    return DataError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start})")


def read_text_docs(files: Iterable[Path], split_by: str = "file") -> Iterator[str]:
    if split_by not in ("file", "blank_line"):
        raise DataError(f"split_by must be 'file' or 'blank_line', got {split_by!r}")
    for f in files:
        try:
            with _open_utf8(f) as fh:
                if split_by == "file":
                    text = fh.read()
                    if text.strip():
                        yield text
                    continue
                block: list[str] = []
                for line in fh:
                    if line.strip():
                        block.append(line)
                    elif block:
                        yield "".join(block).strip("\n")
                        block = []
                if block:
                    yield "".join(block).strip("\n")
        except UnicodeDecodeError as e:
            raise _decode_error(f, e) from None


def read_jsonl_docs(files: Iterable[Path], text_field: str) -> Iterator[str]:
    for f in files:
        try:
            with _open_utf8(f) as fh:
                for lineno, line in enumerate(fh, 1):
                    if not line.strip():
                        continue
                    try:
                        row = json.loads(line)
                    except json.JSONDecodeError as e:
                        raise DataError(f"{f}:{lineno}: not JSON ({e.msg})") from None
                    if not isinstance(row, dict) or text_field not in row:
                        raise DataError(f"{f}:{lineno}: no field {text_field!r}")
                    text = row[text_field]
                    if isinstance(text, str):
                        yield text
        except UnicodeDecodeError as e:
            raise _decode_error(f, e) from None


def read_parquet_docs(files: Iterable[Path], text_field: str, batch_rows: int = 1024) -> Iterator[str]:
    import pyarrow.parquet as pq

    for f in files:
        try:
            pf = pq.ParquetFile(f)
        except Exception as e:  # pyarrow raises several kinds for a bad file
            raise DataError(f"{f}: not a parquet file ({e.__class__.__name__})") from None
        names = pf.schema_arrow.names
        if text_field not in names:
            raise DataError(f"{f}: no column {text_field!r} (has {', '.join(names)})")
        for batch in pf.iter_batches(batch_size=batch_rows, columns=[text_field]):
            yield from (t for t in batch.column(0).to_pylist() if isinstance(t, str))


def _fingerprints(files: list[Path]) -> list[dict[str, str]]:
    return [{"path": str(f), "sha256": file_sha256(f)} for f in files]


@dataclass
class LocalFiles(Source):
    """Shared by the three local sources: ``paths``, ``val_paths`` (optional explicit validation files)."""

    paths: Any = None
    val_paths: Any = None

    kind = ""

    def __post_init__(self):
        self.files = resolve_paths(self.paths, self.kind)
        self.val_files = resolve_paths(self.val_paths, self.kind) if self.val_paths else []

    def options(self) -> dict[str, Any]:
        return {}

    def identity(self) -> dict[str, Any]:
        return {"source": self.kind, "text_version": TEXT_VERSION, "files": _fingerprints(self.files),
                "val_files": _fingerprints(self.val_files), **self.options()}

    def describe(self) -> str:
        shown = ", ".join(map(str, self.files[:3]))
        return shown + (" ..." if len(self.files) > 3 else "")

    def holds_out(self) -> bool:
        return not self.val_files

    def size_hint(self) -> int:
        return sum(f.stat().st_size for f in self.files + self.val_files)

    def read(self, files: list[Path]) -> Iterator[str]:
        raise NotImplementedError

    def stream(self) -> Iterator[tuple[str | None, str]]:
        split = "train" if self.val_files else None
        for text in self.read(self.files):
            yield split, text

    def validation(self) -> Iterator[str]:
        return self.read(self.val_files)


@dataclass
class TextFiles(LocalFiles):
    """Source ``text``: ``split_by`` ``file`` (one document per file) or ``blank_line`` (one per block)."""

    split_by: str = "file"
    kind = "text"

    def options(self):
        return {"split_by": self.split_by}

    def read(self, files):
        return read_text_docs(files, self.split_by)


@dataclass
class JsonlFiles(LocalFiles):
    """Source ``jsonl``: one JSON object per line, the text in ``text_field``."""

    text_field: str = "text"
    kind = "jsonl"

    def options(self):
        return {"text_field": self.text_field}

    def read(self, files):
        return read_jsonl_docs(files, self.text_field)


@dataclass
class ParquetFiles(LocalFiles):
    """Source ``parquet``: one row per document, the text in column ``text_field``."""

    text_field: str = "text"
    kind = "parquet"

    def options(self):
        return {"text_field": self.text_field}

    def read(self, files):
        return read_parquet_docs(files, self.text_field)
