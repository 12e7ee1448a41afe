"""A run's metrics history, kept whole across resumes and crashes.

- :class:`CSVLogger` (``logger=csv``, and under ``logger=wandb``/``tensorboard``): Lightning's CSV logger
  that never deletes ``<run>/metrics.csv``. When fit starts, :class:`MetricsHistory` keeps the rows of
  the steps the run starts from (those a resumed checkpoint holds, none for a fresh start) and the new rows
  are appended, so a resumed run has one file with its whole curve and no step twice.
- :class:`MetricsHistory` (always on in ``mom.train``): that trimming, the "resuming from step N" line, and
  a flush of every logger to disk once the metrics of a checkpointed step are in them (Lightning logs a
  step's metrics after its checkpoint is written, so the flush comes at the next hook: the next batch, a
  validation, the end), so a SIGKILL loses no metric of a step that a checkpoint holds.
- :func:`previous_wandb_id`: the wandb run a resumed run continues (``mom.train`` passes it to
  ``WandbLogger(id=..., resume="allow")``). TensorBoard needs nothing: it writes to ``<run>/tensorboard``
  again and reads every events file there as one run.
"""

from __future__ import annotations

import csv
import logging
import os
from pathlib import Path
from typing import Any

import lightning as L
from lightning.fabric.loggers.logger import rank_zero_experiment
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import CSVLogger as _LightningCSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter as _LightningWriter

from mom.files import atomic_write

log = logging.getLogger("mom")


class _AppendingWriter(_LightningWriter):
    """Lightning's CSV writer, minus the deletion of an existing ``metrics.csv`` (its columns are kept)."""

    def _check_log_dir_exists(self) -> None:  # Lightning deletes metrics.csv here; the history stays
        if self._fs.isfile(self.metrics_file_path):
            with self._fs.open(self.metrics_file_path, "r", newline="") as f:
                self.metrics_keys = list(csv.DictReader(f).fieldnames or [])

    def keep_steps_before(self, step: int) -> int:
        """Drop the rows logged at ``step`` or later (and any not yet written); returns the rows kept."""
        self.metrics = []
        if not self._fs.isfile(self.metrics_file_path):
            return 0
        with self._fs.open(self.metrics_file_path, "r", newline="") as f:
            reader = csv.DictReader(f)
            keys = list(reader.fieldnames or [])
            rows = [r for r in reader if r.get("step") not in (None, "") and float(r["step"]) < step]
        if not rows:
            self._fs.rm_file(self.metrics_file_path)
            self.metrics_keys = []
            return 0
        def write(f: Any) -> None:
            writer = csv.DictWriter(f, fieldnames=keys)
            writer.writeheader()
            writer.writerows(rows)

        atomic_write(self.metrics_file_path, write, mode="w")  # a crash now leaves the old file whole
        self.metrics_keys = keys
        return len(rows)


class CSVLogger(_LightningCSVLogger):
    """Lightning's ``CSVLogger`` whose ``metrics.csv`` survives a resume (see the module doc)."""

    @property
    @rank_zero_experiment
    def experiment(self) -> _AppendingWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _AppendingWriter(log_dir=self.log_dir)
        return self._experiment


def previous_wandb_id(run_dir: str | os.PathLike) -> str | None:
    """The id of the newest wandb run in ``<run_dir>/wandb`` (``run-<time>-<id>`` / ``offline-run-<time>-<id>``)."""
    folder = Path(run_dir) / "wandb"
    runs = sorted((p for p in folder.glob("*run-*-*") if p.is_dir() and not p.is_symlink()),
                  key=lambda p: p.name.removeprefix("offline-"))
    return runs[-1].name.rsplit("-", 1)[-1] if runs else None


class MetricsHistory(Callback):
    """Trims the CSV history to the starting step, says where a resume starts, flushes after checkpoints."""

    def __init__(self) -> None:
        self._unflushed = False
        self._resumed_step: int | None = None

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        self._resumed_step = int(checkpoint.get("global_step", 0))  # trainer.global_step is restored later

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        step = self._resumed_step or 0
        if trainer.is_global_zero:
            for lg in trainer.loggers:
                if isinstance(lg, CSVLogger):
                    lg.experiment.keep_steps_before(step)
            if trainer.ckpt_path:
                log.info("resuming from step %d (%s)", step, trainer.ckpt_path)

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        self._unflushed = True

    def _flush(self, trainer: L.Trainer) -> None:
        if self._unflushed:
            for lg in trainer.loggers:
                lg.save()
            self._unflushed = False

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        self._flush(trainer)

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._flush(trainer)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._flush(trainer)


__all__ = ["CSVLogger", "MetricsHistory", "previous_wandb_id"]
