"""Hugging Face Hub datasets as a document source (``hub``), streamed through ``datasets``.

Network on first use; the token caches (keyed on the name, config, revision and split settings) make later
runs offline. Pin ``revision`` to a commit for reproducible caches: with ``None`` ("main") an upstream change
is not detected.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from mom.data.corpus import DataError, Source

VAL_SPLIT_NAMES = ("validation", "valid", "val", "dev")


@dataclass
class HubDataset(Source):
    """Source ``hub``.

    ``val_split: auto`` uses the first of validation/valid/val/dev the dataset has (never "test"), else holds
    out ``val_fraction`` of the train documents; ``null`` always holds out; any other string is a split name.
    ``val_max_documents`` / ``val_max_bytes`` bound that validation split. ``streaming: true`` reads the
    records as they download (nothing is materialised); ``false`` downloads the split into the ``datasets``
    cache first.
    """

    name: str | None = None
    config_name: str | None = None
    revision: str | None = None
    split: str = "train"
    val_split: str | None = "auto"
    text_field: str = "text"
    streaming: bool = True
    val_max_documents: int | None = None
    val_max_bytes: int | None = None

    def __post_init__(self):
        if not self.name:
            raise DataError("data source 'hub' needs a dataset 'name'")

    def identity(self) -> dict[str, Any]:
        return {"source": "hub", "name": self.name, "config_name": self.config_name,
                "revision": self.revision or "main", "split": self.split, "val_split": self.val_split,
                "text_field": self.text_field, "val_max_documents": self.val_max_documents,
                "val_max_bytes": self.val_max_bytes}

    def describe(self) -> str:
        return f"Hub dataset {self.name!r}"

    def _rows(self, split: str) -> Iterator[str]:
        import datasets

        datasets.disable_progress_bars()
        try:
            ds = datasets.load_dataset(self.name, self.config_name, split=split, streaming=self.streaming,
                                       revision=self.revision)
        except Exception as e:
            msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
            raise DataError(
                f"cannot load Hub dataset {self.name!r} split {split!r}: {e.__class__.__name__}: {msg}"
            ) from e
        columns = getattr(ds, "column_names", None)
        if columns is not None and self.text_field not in columns:
            raise DataError(f"Hub dataset {self.name!r} has no field {self.text_field!r} "
                            f"(has {', '.join(columns)})")
        for row in ds:
            yield row[self.text_field]

    def _val_split(self) -> str | None:
        if self.val_split != "auto":
            return self.val_split
        import datasets

        try:
            names = datasets.get_dataset_split_names(self.name, self.config_name, revision=self.revision)
        except Exception as e:
            raise DataError(f"cannot list the splits of Hub dataset {self.name!r}: {e.__class__.__name__}") from e
        return next((s for s in VAL_SPLIT_NAMES if s in names), None)

    def stream(self) -> Iterator[tuple[str | None, str]]:
        self._resolved_val = self._val_split()
        label = "train" if self._resolved_val else None
        for text in self._rows(self.split):
            yield label, text

    def validation(self) -> Iterator[str]:
        vs = getattr(self, "_resolved_val", None)
        if not vs:
            return
        n = size = 0
        for text in self._rows(vs):
            if (self.val_max_documents is not None and n >= self.val_max_documents) or (
                self.val_max_bytes is not None and size >= self.val_max_bytes
            ):
                return
            n += 1
            size += len(text.encode("utf-8"))
            yield text
