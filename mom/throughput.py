"""Throughput and model FLOPs utilisation (MFU) of a training run, logged to every logger and summarised at the end.

:class:`ThroughputMonitor` (``mom.train`` adds it to every Trainer) logs, over a rolling window of the last
``window_size`` training batches (validation time excluded):

- ``train/tokens_per_s`` and ``train/samples_per_s``: all processes together;
- ``train/tflops_per_s``: model TFLOP/s per device, from
  :func:`mom.model.summary.training_flops_per_token` (6 x active parameters + attention and scan terms);
- ``train/mfu``: that divided by the device's peak (``trainer.peak_flops``), when a peak is known;
- ``train/time_s``: seconds of training so far (validation excluded), the wall-clock axis of ``mom.report``.

The process's resident memory is sampled after every batch (Linux ``/proc``); its peak during training is in
the summary (``peak_rss_mib``), beside the peak CUDA memory on GPUs.

``trainer.peak_flops`` is the dense bf16 peak FLOP/s of one device: a number, a preset of :data:`PEAK_FLOPS`
(``h100``, ``a100`` ...), ``auto`` (the preset matching the CUDA device's name, else Lightning's table; none on
CPU) or ``null`` (no MFU). :meth:`ThroughputMonitor.summary` gives the run averages for the final summary (and
the peak CUDA memory allocated, on GPUs).
"""

from __future__ import annotations

import os
import time
from collections import deque
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

# Dense (no sparsity) bf16 tensor-core peak FLOP/s of one device, from the vendors' data sheets.
PEAK_FLOPS: dict[str, float] = {
    "b200": 2.25e15,
    "h200": 989.4e12,
    "h100": 989.4e12,       # SXM
    "h100_pcie": 756.5e12,
    "a100": 312e12,
    "l40s": 362.05e12,
    "l4": 121e12,
    "a10": 125e12,
    "rtx4090": 165.2e12,
    "mi300x": 1307.4e12,
}
# how CUDA device names map to presets (first match wins: more specific names first)
_NAME_TO_PRESET = (("b200", "b200"), ("h200", "h200"), ("h100 pcie", "h100_pcie"), ("h100", "h100"),
                   ("a100", "a100"), ("l40s", "l40s"), ("l4", "l4"), ("a10", "a10"), ("4090", "rtx4090"),
                   ("mi300x", "mi300x"))


def resolve_peak_flops(value: Any, device: torch.device | str) -> tuple[float | None, str]:
    """``trainer.peak_flops`` -> (FLOP/s per device or None, where it came from). ConfigError for a bad value."""
    from mom.model.config import ConfigError

    device = torch.device(device)
    if value in (None, "", 0, "none", "null"):
        return None, "trainer.peak_flops not set"
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if value <= 0:
            raise ConfigError(f"trainer.peak_flops: must be a positive FLOP/s figure, got {value}")
        return float(value), "trainer.peak_flops"
    name = str(value).lower()
    if name in PEAK_FLOPS:
        return PEAK_FLOPS[name], name
    if name != "auto":
        try:
            return resolve_peak_flops(float(name), device)
        except ValueError:
            raise ConfigError(f"trainer.peak_flops: {value!r} is neither a FLOP/s figure nor a preset "
                              f"({', '.join(sorted(PEAK_FLOPS))}, auto, null)") from None
    if device.type != "cuda" or not torch.cuda.is_available():
        return None, f"no known peak for {device.type} (set trainer.peak_flops)"
    gpu = torch.cuda.get_device_name(device).lower()
    for key, preset in _NAME_TO_PRESET:
        if key in gpu:
            return PEAK_FLOPS[preset], f"{preset} ({gpu})"
    from lightning.fabric.utilities.throughput import get_available_flops

    flops = get_available_flops(device, torch.bfloat16)
    return (float(flops), f"Lightning's table ({gpu})") if flops else (None, f"no known peak for {gpu}")


class ThroughputMonitor(Callback):
    """Logs tokens/s, samples/s, TFLOP/s per device and MFU (see the module doc)."""

    def __init__(self, peak_flops: float | None = None, peak_source: str = "", window_size: int = 10) -> None:
        self.peak_flops, self.peak_source = peak_flops, peak_source
        self.window_size = max(2, int(window_size))
        self.flops_per_token: float | None = None
        self._reset()

    def _reset(self) -> None:
        self._window: deque[tuple[float, int, int]] = deque(maxlen=self.window_size)
        self._train_time = 0.0  # seconds of training (validation excluded) since the first batch ended
        self._tokens = self._samples = 0  # all processes, since the first batch ended
        self._t_last: float | None = None
        self._world = 1
        self._cuda: torch.device | None = None
        self._peak_rss = 0

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._reset()
        release_freed_memory()  # a multirun's arm should not count what the previous arm freed
        self._world = trainer.world_size
        self._cuda = trainer.strategy.root_device if trainer.strategy.root_device.type == "cuda" else None
        if self._cuda is not None:
            torch.cuda.reset_peak_memory_stats(self._cuda)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        now = time.perf_counter()
        ids = batch["input_ids"]
        if self.flops_per_token is None:
            from mom.model.summary import training_flops_per_token

            self.flops_per_token = training_flops_per_token(pl_module.model.config, ids.shape[1])["total"]
        samples, tokens = ids.shape[0] * self._world, ids.numel() * self._world
        if self._t_last is not None:  # the first batch (warm-up, compilation) only starts the clock
            self._train_time += now - self._t_last
            self._tokens += tokens
            self._samples += samples
        self._t_last = now
        self._peak_rss = max(self._peak_rss, resident_bytes())
        pl_module.log("train/time_s", self._train_time)
        self._window.append((self._train_time, self._tokens, self._samples))
        if len(self._window) < 2:
            return
        (t0, k0, s0), (t1, k1, s1) = self._window[0], self._window[-1]
        if t1 <= t0:
            return
        for name, value in self._rates((k1 - k0) / (t1 - t0), (s1 - s0) / (t1 - t0)).items():
            pl_module.log(f"train/{name}", value, prog_bar=name in ("tokens_per_s", "mfu"))

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._t_val = time.perf_counter()

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._t_last is not None and getattr(self, "_t_val", None) is not None:
            self._t_last += time.perf_counter() - self._t_val  # the clock stops during validation
        self._t_val = None

    def _rates(self, tokens_per_s: float, samples_per_s: float) -> dict[str, float]:
        out = {"tokens_per_s": tokens_per_s, "samples_per_s": samples_per_s}
        if self.flops_per_token:
            per_device = tokens_per_s * self.flops_per_token / self._world
            out["tflops_per_s"] = per_device / 1e12
            if self.peak_flops:
                out["mfu"] = per_device / self.peak_flops
        return out

    def summary(self) -> dict[str, float]:
        """Run averages (first batch excluded): tokens_per_s, samples_per_s, tflops_per_s, mfu (when known)."""
        if self._train_time <= 0:
            return {}
        out = self._rates(self._tokens / self._train_time, self._samples / self._train_time)
        if self._cuda is not None:
            out["peak_memory_gib"] = torch.cuda.max_memory_allocated(self._cuda) / 2**30
        if self._peak_rss:
            out["peak_rss_mib"] = self._peak_rss / 2**20
        out["train_time_s"] = self._train_time
        return out

    def summary_line(self) -> str:
        s = self.summary()
        if not s:
            return "throughput: too few steps to measure"
        line = (f"throughput: {s['tokens_per_s']:,.0f} tokens/s, {s['samples_per_s']:,.2f} samples/s "
                f"({self._world} process{'es' if self._world > 1 else ''})")
        if "tflops_per_s" in s:
            line += f", {s['tflops_per_s'] * 1e3:.4g} model GFLOP/s per device ({self.flops_per_token / 1e6:.4g} " \
                    "MFLOP/token)"
        if "mfu" in s:
            line += f", MFU {s['mfu']:.2%} of {self.peak_flops / 1e12:.4g} TFLOP/s ({self.peak_source})"
        else:
            line += f", MFU n/a: {self.peak_source}"
        if "peak_memory_gib" in s:
            line += f", peak memory {s['peak_memory_gib']:.2f} GiB"
        if "peak_rss_mib" in s:
            line += f", peak RSS {s['peak_rss_mib']:,.0f} MiB"
        return line


def release_freed_memory() -> None:
    """Collect garbage and hand the allocator's free pages back to the OS (glibc's malloc_trim), so the
    resident size measures what is in use. A no-op where there is no glibc."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def resident_bytes() -> int:
    """The process's resident set size now (Linux /proc/self/statm), 0 where that cannot be read."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * _PAGE
    except (OSError, ValueError, IndexError):
        return 0


_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


__all__ = ["PEAK_FLOPS", "ThroughputMonitor", "resident_bytes", "resolve_peak_flops"]
