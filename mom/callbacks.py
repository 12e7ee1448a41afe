"""Lightning callbacks for exact resume and for non-finite losses.

- :class:`RNGState` (always on in ``mom.train``): the training steps draw from one RNG stream (torch CPU and
  CUDA, numpy, Python ``random``) that this callback owns: it is put in place before every training batch,
  taken back after it, and saved in / restored from checkpoints. Draws made outside the steps (validation,
  DataLoader iterator seeds) never shift it, so a resumed run's steps see the same random numbers (dropout)
  as the uninterrupted run's. Lightning itself saves no RNG state.
- :class:`ModelCheckpoint`: Lightning's ``ModelCheckpoint`` that also saves every ``every_n_train_steps`` steps *and*
  every ``train_time_interval`` (whichever comes first; Lightning's own class accepts only one of them), and
  the last step when training ends by ``max_steps`` or ``max_time``.
- :class:`StepProgressBar` (``callbacks.rich_progress_bar``): the rich progress bar counting the run's steps.
- :class:`ModelSummary` (``callbacks.model_summary``): Lightning's module table without its FLOPs (always 0).
- :class:`NonFiniteGuard` (``callbacks.nonfinite``): what a non-finite loss does: ``action: stop`` (raise
  :class:`mom.errors.NonFiniteLossError` naming the step and the term; no checkpoint is written, the last
  good one stays) or ``skip`` (the batch makes no update; stop after ``max_consecutive_skips`` in a row).
  ``MoMLitModule.training_step`` asks :func:`handle_nonfinite` before logging and returning the loss.
  ``stop`` costs no host synchronisation per step: the first non-finite step is recorded on the device and
  read every ``check_every_n_steps`` steps (default: the trainer's logging interval), before every
  checkpoint and at the end of training, so the run stops at most that many steps later and never saves
  what followed. ``skip`` must decide before each update: one sync per step.
"""

from __future__ import annotations

import logging
import random
import re
from datetime import timedelta
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback, RichProgressBar
from lightning.pytorch.callbacks import ModelCheckpoint as _LightningModelCheckpoint
from lightning.pytorch.callbacks import ModelSummary as _LightningModelSummary

from mom.errors import NonFiniteLossError

log = logging.getLogger("mom")


# ------------------------------------------------------------------------------------------------ RNG
def capture_rng() -> dict[str, Any]:
    """The global RNG states as tensors and plain containers (weights-only loadable)."""
    np_state = np.random.get_state()
    py_version, py_internal, py_gauss = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {"name": str(np_state[0]), "keys": torch.from_numpy(np.asarray(np_state[1], dtype=np.int64)),
                  "pos": int(np_state[2]), "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "python": {"version": int(py_version), "internal": list(py_internal), "gauss_next": py_gauss},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = list(torch.cuda.get_rng_state_all())
    return state


def restore_rng(state: dict[str, Any]) -> None:
    """Put back what :func:`capture_rng` returned."""
    torch.set_rng_state(state["torch"].cpu())
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["internal"]), p["gauss_next"]))
    cuda = state.get("cuda")
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([t.cpu() for t in cuda])


class RNGState(Callback):
    """Owns the RNG stream of the training steps; checkpointed (see the module doc)."""

    def __init__(self) -> None:
        self._state: dict[str, Any] | None = None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._state is None:  # a fresh run: the stream starts where seed_everything left it
            self._state = capture_rng()

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        if self._state is not None:
            restore_rng(self._state)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self._state = capture_rng()

    def state_dict(self) -> dict[str, Any]:
        return dict(self._state) if self._state is not None else capture_rng()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict:
            self._state = dict(state_dict)


# ------------------------------------------------------------------------------------------------ checkpoints
def parse_interval(value: Any) -> timedelta | None:
    """``"DD:HH:MM:SS"`` / ``"HH:MM:SS"`` / seconds / ``{hours: .., minutes: ..}`` / timedelta -> timedelta."""
    if value is None or value == "" or isinstance(value, timedelta):
        return value or None
    if isinstance(value, (int, float)):
        return timedelta(seconds=float(value))
    if isinstance(value, dict):
        return timedelta(**{k: float(v) for k, v in value.items()})
    text = str(value).strip()
    if re.fullmatch(r"\d+(\.\d+)?", text):
        return timedelta(seconds=float(text))
    parts = text.split(":")
    if 2 <= len(parts) <= 4 and all(re.fullmatch(r"\d+(\.\d+)?", p) for p in parts):
        nums = [float(p) for p in parts]
        nums = [0.0] * (4 - len(nums)) + nums
        return timedelta(days=nums[0], hours=nums[1], minutes=nums[2], seconds=nums[3])
    from mom.model.config import ConfigError

    raise ConfigError(f"callbacks.model_checkpoint.train_time_interval: {value!r} is not a duration "
                      "(DD:HH:MM:SS, HH:MM:SS or seconds)")


class ModelCheckpoint(_LightningModelCheckpoint):
    """``ModelCheckpoint`` saving every ``every_n_train_steps`` steps and/or every ``train_time_interval``
    (``"DD:HH:MM:SS"``, ``"HH:MM:SS"`` or seconds), whichever comes first."""

    def __init__(self, *args: Any, every_n_train_steps: int | None = None, train_time_interval: Any = None,
                 **kwargs: Any) -> None:
        interval = parse_interval(train_time_interval)
        both = bool(every_n_train_steps) and interval is not None
        super().__init__(*args, every_n_train_steps=every_n_train_steps,
                         train_time_interval=None if both else interval, **kwargs)
        if both:  # Lightning's trigger code handles both; only its argument check forbids the pair
            self._train_time_interval = interval

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Training ended by max_steps or max_time between two periodic saves: checkpoint the last step too,
        so resuming a finished run retrains nothing. (A run stopped by an error keeps its last good one.)"""
        if not self._should_skip_saving_checkpoint(trainer):
            candidates = self._monitor_candidates(trainer)
            if self._every_n_train_steps or self._train_time_interval is not None:
                self._save_topk_checkpoint(trainer, candidates)
            self._save_last_checkpoint(trainer, candidates)
        super().on_train_end(trainer, pl_module)


class ModelSummary(_LightningModelSummary):
    """Lightning's module table without its FLOPs column and "Total FLOPs" line: Lightning counts FLOPs only
    for a module with an ``example_input_array`` and prints 0 otherwise. (The parameter line MoM logs at fit
    start, from :func:`mom.model.summary.summary`, has the counts that matter: active, ternary, bytes.)"""

    @staticmethod
    def summarize(summary_data: list[tuple[str, list[str]]], total_parameters: int, trainable_parameters: int,
                  model_size: float, total_training_modes: dict[str, int], total_flops: int,
                  **summarize_kwargs: Any) -> None:
        from lightning.pytorch.utilities.model_summary.model_summary import _format_summary_table

        columns = [c for c in summary_data if c[0] != "FLOPs"]
        table = _format_summary_table(total_parameters, trainable_parameters, model_size, total_training_modes,
                                      0, *columns)
        log.info("\n%s", "\n".join(ln for ln in table.splitlines() if "Total Flops" not in ln))


class StepProgressBar(RichProgressBar):
    """Lightning's rich bar counting optimizer steps of the whole run when it is step-bound (``max_steps``):
    ``step 400/420`` continues after a resume instead of restarting per epoch (``Epoch 0/-2``, ``83/19``)."""

    def _by_steps(self) -> bool:
        return self.trainer.max_steps is not None and self.trainer.max_steps > 0

    @property
    def total_train_batches(self) -> int | float:
        return self.trainer.max_steps if self._by_steps() else super().total_train_batches

    def _get_train_description(self, current_epoch: int) -> str:
        if not self._by_steps():
            return super()._get_train_description(current_epoch)
        return f"{'Training':{len(self.validation_description)}}"

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._by_steps() and self.train_progress_bar_id is not None:
            return  # one bar for the whole run: no reset at an epoch boundary
        super().on_train_epoch_start(trainer, pl_module)
        if self._by_steps():
            self._update(self.train_progress_bar_id, trainer.global_step)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if self._by_steps():
            self._update(self.train_progress_bar_id, trainer.global_step)


# ------------------------------------------------------------------------------------------------ non-finite
class NonFiniteGuard(Callback):
    """What a non-finite training loss does: ``action="stop"`` or ``"skip"`` (see the module doc)."""

    def __init__(self, action: str = "stop", max_consecutive_skips: int = 20,
                 check_every_n_steps: int | None = None) -> None:
        self.action = action  # checked in setup: an error raised here would reach the user wrapped by Hydra
        self.max_consecutive_skips = int(max_consecutive_skips)
        self.check_every_n_steps = check_every_n_steps
        self.skipped = 0
        self.consecutive = 0
        self._names: list[str] | None = None  # stop: the loss terms, and on the device the first bad step
        self._first: torch.Tensor | None = None  # (-1: none yet) and its term values
        self._values: torch.Tensor | None = None

    # ---------------------------------------------------------------- stop: recorded on the device
    def record(self, res: dict[str, Any], step: int) -> None:
        """Remember the first step whose loss terms are not all finite, with device ops only."""
        aux = res.get("aux_losses") or {}
        names = ["lm_loss", *aux, "loss"]
        terms = [res.get("lm_loss"), *aux.values(), res.get("loss")]
        if not all(torch.is_tensor(t) and t.numel() == 1 for t in terms):
            return
        if names != self._names and self._first is not None:  # another set of terms: settle the old one
            self._check(None)
        v = torch.stack([t.detach().float().reshape(()) for t in terms])
        if names != self._names or self._first is None:
            self._names = names
            self._first = torch.full((), -1, dtype=torch.long, device=v.device)
            self._values = torch.zeros_like(v)
        new = torch.isfinite(v).all().logical_not_() & (self._first < 0)
        self._first = torch.where(new, step, self._first)
        self._values = torch.where(new, v, self._values)

    def _check(self, trainer: L.Trainer | None) -> None:
        """The host sync: raise NonFiniteLossError if a recorded step (on any process) was non-finite."""
        if self.action != "stop" or self._first is None:
            return
        first = int(self._first)
        bad = first >= 0
        if trainer is not None and trainer.world_size > 1:
            bad_anywhere = trainer.strategy.reduce_boolean_decision(bad, all=False)
        else:
            bad_anywhere = bad
        if not bad_anywhere:
            return
        if bad:
            vals = [torch.tensor(x) for x in self._values.tolist()]
            res = {"lm_loss": vals[0], "aux_losses": dict(zip(self._names[1:-1], vals[1:-1], strict=True)),
                   "loss": vals[-1]}
            where, what = f"step {first + 1}", _describe(res, nonfinite_terms(res))
        else:
            step = trainer.global_step if trainer is not None else "?"
            where, what = f"step {step} or before", "loss on another process"
        raise NonFiniteLossError(f"training stopped at {where}: non-finite {what}{_last_ckpt(trainer)}; "
                                 "callbacks.nonfinite.action=skip skips such batches instead")

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        every = self.check_every_n_steps or trainer.log_every_n_steps or 1
        if trainer.global_step % every == 0:
            self._check(trainer)

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        self._check(trainer)  # raising here writes nothing: the last good checkpoint stays

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._check(trainer)

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self.action not in ("stop", "skip"):
            from mom.model.config import ConfigError

            raise ConfigError(f"callbacks.nonfinite.action: must be 'stop' or 'skip', got {self.action!r}")
        if self.action == "skip" and trainer.world_size > 1:
            from mom.model.config import ConfigError

            raise ConfigError("callbacks.nonfinite.action: skip needs a single process (Lightning cannot skip a "
                              "step under DDP/FSDP); use stop")

    def state_dict(self) -> dict[str, Any]:
        return {"skipped": self.skipped}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.skipped = int(state_dict.get("skipped", 0))


def nonfinite_terms(res: dict[str, Any]) -> list[str]:
    """Which terms of a ``compute_loss`` result are NaN/inf: ``lm_loss``, ``aux loss <name>``, or ``loss``."""
    bad = []

    def finite(v: Any) -> bool:
        return not torch.is_tensor(v) or bool(torch.isfinite(v.detach()).all())

    if not finite(res.get("lm_loss")):
        bad.append("LM loss (lm_loss)")
    for name, v in (res.get("aux_losses") or {}).items():
        if not finite(v):
            bad.append(f"aux loss {name}")
    if not bad and not finite(res.get("loss")):
        bad.append("total loss")
    return bad


def _describe(res: dict[str, Any], terms: list[str]) -> str:
    def val(v: Any) -> str:
        return f"{float(v.detach()):.4g}" if torch.is_tensor(v) and v.numel() == 1 else "non-finite"

    parts = []
    for t in terms:
        if t.startswith("aux loss "):
            parts.append(f"{t} = {val(res['aux_losses'][t[len('aux loss '):]])}")
        elif t.startswith("LM"):
            parts.append(f"{t} = {val(res['lm_loss'])}")
        else:
            parts.append(f"{t} = {val(res['loss'])}")
    return ", ".join(parts)


def handle_nonfinite(module: L.LightningModule, res: dict[str, Any]) -> bool:
    """Check a training step's loss: True means skip this batch (return None from training_step); raises
    :class:`NonFiniteLossError` when the policy is ``stop``; False when the loss is finite."""
    trainer = module._trainer  # None outside a Trainer
    if trainer is not None:
        guard = next((c for c in trainer.callbacks if isinstance(c, NonFiniteGuard)), None)
        if guard is not None and guard.action == "stop":  # no host sync here: see NonFiniteGuard
            guard.record(res, trainer.global_step)
            return False
    loss = res.get("loss")
    finite = bool(torch.isfinite(loss.detach()).all()) if torch.is_tensor(loss) else True
    if trainer is not None and trainer.world_size > 1:  # every rank takes the same decision
        finite = not trainer.strategy.reduce_boolean_decision(not finite, all=False)
    guard = None
    if trainer is not None:
        guard = next((c for c in trainer.callbacks if isinstance(c, NonFiniteGuard)), None)
    if finite:
        if guard is not None:
            guard.consecutive = 0
        return False
    terms = nonfinite_terms(res) or ["loss on another process"]
    step = (trainer.global_step + 1) if trainer is not None else "?"
    what = _describe(res, [t for t in terms if not t.startswith("loss on")]) or terms[0]
    if guard is not None and guard.action == "skip":
        guard.skipped += 1
        guard.consecutive += 1
        if guard.consecutive > guard.max_consecutive_skips:
            raise NonFiniteLossError(f"training stopped at step {step}: {guard.consecutive} batches in a row had a "
                                     f"non-finite loss ({what}){_last_ckpt(trainer)}")
        log.warning("step %s: non-finite %s; batch skipped (%d skipped so far)", step, what, guard.skipped)
        return True
    raise NonFiniteLossError(f"training stopped at step {step}: non-finite {what}{_last_ckpt(trainer)}; "
                             "callbacks.nonfinite.action=skip skips such batches instead")


def _last_ckpt(trainer: Any) -> str:
    if trainer is None:
        return ""
    cb = getattr(trainer, "checkpoint_callback", None)
    path = getattr(cb, "last_model_path", "") or getattr(cb, "best_model_path", "")
    return f"; last good checkpoint: {path}" if path else "; no checkpoint written yet"


__all__ = ["ModelCheckpoint", "NonFiniteGuard", "RNGState", "capture_rng", "handle_nonfinite",
           "nonfinite_terms", "parse_interval", "restore_rng"]
