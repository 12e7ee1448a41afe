"""Safe Lightning checkpoints: atomic writes, weights-only loads, clear errors.

:class:`SafeCheckpointIO` is the ``CheckpointIO`` plugin ``mom.train`` gives its Trainer:

- **atomic**: a checkpoint goes through :func:`mom.files.atomic_write` (a temporary file in the same folder,
  fsync'ed, renamed over the target, the folder fsync'ed); a crash (even SIGKILL) at any moment
  leaves either the old ``last.ckpt`` or the new one, never half of one;
- **never non-finite**: a checkpoint whose weights hold NaN/inf is refused (:class:`NonFiniteLossError`), so
  the last good one stays;
- **weights-only**: everything stored is made of tensors and plain Python containers (:func:`to_safe`:
  OmegaConf nodes become dicts/lists, enums their values, paths strings, numpy arrays tensors, GaLore
  projectors tagged dicts) and loading always uses ``torch.load(weights_only=True)``, so a checkpoint cannot
  run code: one that holds any other pickled object is refused;
- **clear errors**: a missing, truncated or corrupt file, a refused pickle and a checkpoint of another model
  (parameter names/shapes differ) each raise :class:`CheckpointError` naming the file.
"""

from __future__ import annotations

import enum
import logging
import os
import pickle
import re
import zipfile
from collections import OrderedDict
from collections.abc import Mapping
from datetime import timedelta
from pathlib import Path, PurePath
from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

from mom.errors import CheckpointError, NonFiniteLossError
from mom.files import atomic_write

log = logging.getLogger("mom")

_TAG = "__mom_type__"
_SCALARS = (str, int, float, bool, type(None), bytes, complex)
_TORCH_SCALARS = (torch.Size, torch.dtype, torch.device, torch.memory_format, torch.layout)


# ------------------------------------------------------------------------------- weights-only content
def _galore_projector_type() -> type | None:
    try:
        from galore_torch.galore_projector import GaLoreProjector
    except Exception:  # noqa: BLE001 - galore-torch (and bitsandbytes behind it) is optional
        return None
    return GaLoreProjector


def to_safe(obj: Any, where: str = "checkpoint") -> Any:
    """``obj`` made of tensors and plain containers only (what ``torch.load(weights_only=True)`` reads).

    Raises :class:`CheckpointError` naming the entry when something cannot be expressed that way.
    """
    if isinstance(obj, torch.Tensor) or isinstance(obj, _TORCH_SCALARS):
        return obj
    if isinstance(obj, enum.Enum):
        return to_safe(obj.value, where)
    if isinstance(obj, _SCALARS):
        return obj
    if isinstance(obj, PurePath):
        return str(obj)
    if isinstance(obj, timedelta):
        return obj.total_seconds()
    try:
        from omegaconf import OmegaConf

        if OmegaConf.is_config(obj):
            try:
                obj = OmegaConf.to_container(obj, resolve=True, enum_to_str=True)
            except Exception:  # noqa: BLE001 - an interpolation that needs Hydra's runtime: keep it as text
                obj = OmegaConf.to_container(obj, resolve=False, enum_to_str=True)
    except ImportError:  # pragma: no cover
        pass
    if isinstance(obj, Mapping):
        items = [(to_safe(k, where), to_safe(v, f"{where}[{k!r}]")) for k, v in obj.items()]
        return OrderedDict(items) if isinstance(obj, OrderedDict) else dict(items)
    if isinstance(obj, (list, tuple)):
        seq = [to_safe(v, f"{where}[{i}]") for i, v in enumerate(obj)]
        return seq if isinstance(obj, list) else tuple(seq)
    if isinstance(obj, (set, frozenset)):
        return [to_safe(v, where) for v in sorted(obj, key=repr)]
    try:
        import numpy as np

        if isinstance(obj, np.ndarray):
            return torch.from_numpy(obj.copy())
        if isinstance(obj, np.generic):
            return obj.item()
    except ImportError:  # pragma: no cover
        pass
    galore = _galore_projector_type()
    if galore is not None and isinstance(obj, galore):
        return {_TAG: "galore_projector", **{k: to_safe(v, f"{where}.{k}") for k, v in vars(obj).items()}}
    raise CheckpointError(f"cannot store {where} in a weights-only checkpoint: {type(obj).__module__}."
                          f"{type(obj).__qualname__} is not a tensor or a plain container")


def from_safe(obj: Any) -> Any:
    """Undo the tagging of :func:`to_safe` (GaLore projectors are rebuilt from their fields)."""
    if isinstance(obj, dict):
        if obj.get(_TAG) == "galore_projector":
            galore = _galore_projector_type()
            if galore is None:
                raise CheckpointError("the checkpoint holds GaLore optimizer state but galore-torch is not installed")
            fields = {k: v for k, v in obj.items() if k != _TAG}
            proj = galore(fields.get("rank", 128))
            for k, v in fields.items():
                setattr(proj, k, v)
            return proj
        for k, v in obj.items():
            obj[k] = from_safe(v)
        return obj
    if isinstance(obj, list):
        return [from_safe(v) for v in obj]
    if isinstance(obj, tuple) and not isinstance(obj, torch.Size):
        return tuple(from_safe(v) for v in obj)
    return obj


def nonfinite_weights(state_dict: Mapping[str, Any] | None) -> list[str]:
    """Names of floating-point tensors of ``state_dict`` that hold a NaN or an inf."""
    bad = []
    for name, t in (state_dict or {}).items():
        if isinstance(t, torch.Tensor) and t.is_floating_point() and t.numel() and not bool(torch.isfinite(t).all()):
            bad.append(name)
    return bad


# ------------------------------------------------------------------------------------- files
def save_checkpoint_file(checkpoint: Mapping[str, Any], path: str | os.PathLike) -> Path:
    """``torch.save`` a (weights-only) checkpoint dict atomically."""
    safe = to_safe(checkpoint)
    return atomic_write(path, lambda f: torch.save(safe, f))


_GLOBAL_RE = re.compile(r"GLOBAL ([\w.]+)")
_DETAIL_RE = re.compile(r"(Unsupported [^\n]*|WeightsUnpickler error: [^\n]+)")


def load_checkpoint_file(path: str | os.PathLike, map_location: Any = "cpu") -> dict[str, Any]:
    """Load a MoM/Lightning checkpoint with ``torch.load(weights_only=True)``; :class:`CheckpointError` naming
    the file when it is missing, not a checkpoint, truncated/corrupt, or holds objects that are not weights."""
    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"checkpoint not found: {p}")
    if p.stat().st_size == 0:
        raise CheckpointError(f"{p}: empty file (a truncated or corrupt checkpoint)")
    try:
        ckpt = torch.load(p, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        text = str(e)
        m = _GLOBAL_RE.search(text)
        if m:
            raise CheckpointError(f"{p}: refused to load: it holds a pickled object that is not a tensor or a plain "
                                  f"container ({m.group(1)}); only weights-only checkpoints are loaded") from None
        d = _DETAIL_RE.search(text)
        raise CheckpointError(f"{p}: refused to load: corrupt, or not a weights-only checkpoint "
                              f"({d.group(1).strip() if d else _first_line(e)})") from None
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile, KeyError, IndexError,
            AttributeError, TypeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{p}: corrupt or truncated checkpoint ({_first_line(e)})") from None
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise CheckpointError(f"{p}: not a Lightning training checkpoint (no state_dict)")
    return from_safe(ckpt)


def _first_line(e: BaseException) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return f"{type(e).__name__}: {lines[0][:200]}" if lines else type(e).__name__


def check_state_matches(ckpt_state: Mapping[str, Any], expected: Mapping[str, tuple[int, ...]], path: Any) -> None:
    """CheckpointError when the checkpoint's parameter names or shapes differ from the model's."""
    have = {k: tuple(v.shape) for k, v in ckpt_state.items() if isinstance(v, torch.Tensor)}
    diffs = []
    for k in sorted(set(have) | set(expected)):
        a, b = have.get(k), expected.get(k)
        if a != b:
            diffs.append(f"{k} {a if a is not None else 'missing'} in the checkpoint vs "
                         f"{b if b is not None else 'absent'} here")
    if diffs:
        more = f" (and {len(diffs) - 1} more)" if len(diffs) > 1 else ""
        raise CheckpointError(f"{path} does not match this model: {diffs[0]}{more}; resume with the model config "
                              "(and tokenizer) it was trained with")


# ------------------------------------------------------------------------------------- the plugin
class SafeCheckpointIO(TorchCheckpointIO):
    """Atomic, weights-only, finite-only checkpoints (see the module doc).

    Args:
        expected_shapes: ``{name: shape}`` of the LightningModule's state dict; a loaded checkpoint must match
            (an error naming the first difference instead of a size-mismatch traceback deep in torch).
    """

    def __init__(self, expected_shapes: Mapping[str, tuple[int, ...]] | None = None) -> None:
        super().__init__()
        self.expected_shapes = dict(expected_shapes) if expected_shapes is not None else None

    @staticmethod
    def _is_remote(path: Any) -> bool:
        return "://" in str(path)

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options")
        bad = nonfinite_weights(checkpoint.get("state_dict"))
        if bad:
            raise NonFiniteLossError(f"refusing to write checkpoint {path}: non-finite weights in {bad[0]}"
                                     f"{f' and {len(bad) - 1} more tensors' if len(bad) > 1 else ''}; "
                                     "the previous checkpoint is kept")
        if self._is_remote(path):  # fsspec targets: no rename there; Lightning's writer
            super().save_checkpoint(to_safe(checkpoint), path)
            return
        save_checkpoint_file(checkpoint, path)

    def load_checkpoint(self, path: Any, map_location: Any = "cpu", weights_only: bool | None = None
                        ) -> dict[str, Any]:
        if weights_only is False:
            log.info("checkpoints are always loaded weights-only (%s)", path)
        if self._is_remote(path):
            from lightning.fabric.utilities.cloud_io import _load

            ckpt = from_safe(_load(path, map_location=map_location, weights_only=True))
        else:
            ckpt = load_checkpoint_file(path, map_location=map_location if not callable(map_location) else "cpu")
        if self.expected_shapes is not None:
            check_state_matches(ckpt["state_dict"], self.expected_shapes, path)
        return ckpt


def resolve_ckpt_path(ckpt_path: str | None, checkpoint_dir: str | os.PathLike) -> str | None:
    """``ckpt_path`` as given (checked to exist), or for ``last``: ``<checkpoint_dir>/last.ckpt`` when it exists
    (else None: a fresh start). CheckpointError when a given file does not exist."""
    if ckpt_path in (None, ""):
        return None
    if str(ckpt_path) == "last":
        last = Path(checkpoint_dir) / "last.ckpt"
        if last.is_file():
            log.info("ckpt_path=last: resuming from %s", last)
            return str(last)
        log.info("ckpt_path=last: no %s yet, starting from scratch", last)
        return None
    if "://" not in str(ckpt_path) and not Path(ckpt_path).is_file():
        raise CheckpointError(f"ckpt_path: checkpoint not found: {ckpt_path}")
    return str(ckpt_path)


__all__ = ["SafeCheckpointIO", "check_state_matches", "from_safe", "load_checkpoint_file",
           "nonfinite_weights", "resolve_ckpt_path", "save_checkpoint_file", "to_safe"]
