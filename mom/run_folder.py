"""Run folders and model folders: finding them, loading what they hold, and the entry points' logging.

A training run folder (``mom.train``'s Hydra output dir) holds ``.hydra/config.yaml`` and ``model/``; a model
folder holds ``config.json``, ``model.safetensors`` and ``tokenizer.json`` (``<run>/model``, or a packed
``<run>/model-packed`` from ``mom.export``). Every entry point that reads one (eval, generate, export, score,
the Rho-1 reference of train, the data filter) goes through the helpers here, so a missing folder or a
tokenizer that is not the model's is refused with the same one-line message everywhere.

The callers pass their own error class (``EvalError``, ``GenerationError`` ...) so the user sees which tool
refused; by default :class:`RunFolderError`.
"""

from __future__ import annotations

import hashlib
import logging
import os
import sys
from pathlib import Path
from typing import Any

from mom.errors import MoMError


class RunFolderError(MoMError, ValueError):
    """A run or model folder that is missing or incomplete, or a tokenizer that is not the model's."""


def setup_stderr_logging(level: int = logging.INFO) -> None:
    """Logs to stderr only (stdout is the command's output)."""
    root = logging.getLogger()
    if not any(getattr(h, "_mom_stderr", False) for h in root.handlers):
        h = logging.StreamHandler(sys.stderr)
        h.setFormatter(logging.Formatter("[%(name)s][%(levelname)s] %(message)s"))
        h._mom_stderr = True  # type: ignore[attr-defined]
        root.addHandler(h)
    root.setLevel(level)


# Lightning lines that say nothing about the run, dropped from mom.train's log (why, for each):
_DROPPED_LINES = (
    "Tip: For seamless cloud logging",  # an advert for Lightning's hosted logger (litlogger), at every fit
    "Skipping setting a default `ModelSummary`",  # says it uses ours (callbacks.model_summary), as configured
)
# Warnings known to be harmless (why, for each):
_HARMLESS_WARNINGS = (
    # Lightning 2.6's pytree helper calls an isinstance check torch 2.13 deprecated: Lightning's to change, and
    # it has no effect on what is computed
    r"`isinstance\(treespec, LeafSpec\)` is deprecated",
    # a resumed run (ckpt_path=last) saves into its own checkpoints/ again: that folder holding last.ckpt is
    # expected, and checkpoints are written atomically (mom.checkpoint)
    r"Checkpoint directory .* exists and is not empty",
)


class _DropLines(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not any(text in str(record.msg) for text in _DROPPED_LINES)


def setup_train_logging() -> None:
    """mom.train's log: one line per event. When the root logger has handlers (Hydra's: the console and the
    run's ``train.log``), Lightning's own console handler is removed, since its records reach the root too
    and were printed twice; the advert and the known-harmless warnings above are filtered."""
    import warnings

    lightning = logging.getLogger("lightning")
    if logging.getLogger().handlers:
        for h in list(lightning.handlers):
            if type(h) is logging.StreamHandler:
                lightning.removeHandler(h)
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        lg = logging.getLogger(name)
        if not any(isinstance(f, _DropLines) for f in lg.filters):
            lg.addFilter(_DropLines())
    for pattern in _HARMLESS_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)


# ----------------------------------------------------------------------------------------------- finding
def resolve_model_dir(run_dir: Any, model_dir: Any, error: type[Exception] = RunFolderError) -> Path:
    """``model_dir`` when given, else ``<run_dir>/model``; checked to exist."""
    if model_dir:
        path = Path(str(model_dir)).expanduser()
        if not path.is_dir():
            raise error(f"model_dir not found: {path}")
    elif run_dir:
        run = Path(str(run_dir)).expanduser()
        if not run.is_dir():
            raise error(f"run_dir not found: {run}")
        path = run / "model"
        if not path.is_dir():
            raise error(f"{run} has no model/ folder (not a finished training run?); pass model_dir=...")
    else:
        raise error("give run_dir=<training run folder> or model_dir=<model folder>")
    for name in ("config.json", "model.safetensors"):
        if not (path / name).is_file():
            raise error(f"{path / name} is missing: not a MoM model folder")
    return path


def resolve_ref_model_dir(ref_run: Any, error: type[Exception] = RunFolderError) -> Path:
    """A reference model folder (Rho-1, data filter): ``<ref_run>/model`` for a training run folder, or
    ``ref_run`` itself when it is a model folder (config.json + model.safetensors + tokenizer.json)."""
    if not ref_run:
        raise error("no reference model: give slm.ref_run=<training run folder> (or ref_run=... for mom.score)")
    path = Path(str(ref_run)).expanduser()
    if not path.is_dir():
        raise error(f"reference run not found: {path}")
    if not (path / "config.json").is_file() and (path / "model").is_dir():
        path = path / "model"
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        if not (path / name).is_file():
            raise error(f"{path / name} is missing: the reference must be a finished run (its model/ folder)")
    return path


def model_identity(model_dir: str | os.PathLike) -> str:
    """A short hash of a model folder's config.json and model.safetensors (what stored losses key on)."""
    h = hashlib.sha256()
    for name in ("config.json", "model.safetensors"):
        with open(Path(model_dir) / name, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()[:16]


# ----------------------------------------------------------------------------------------------- loading
def load_model_and_tokenizer(model_dir: Path, error: type[Exception] = RunFolderError, *,
                             map_location: Any = "cpu", same_vocab: bool = True):
    """The model (eval mode) and its ``tokenizer.json``; with ``same_vocab`` a tokenizer whose vocabulary size
    differs from the model's ``vocab_size`` is refused."""
    from mom.data.tokenizer import load_tokenizer
    from mom.model import MoMForCausalLM

    tok_path = model_dir / "tokenizer.json"
    if not tok_path.is_file():
        raise error(f"{tok_path} is missing: the model folder must hold its tokenizer")
    tok = load_tokenizer(path=tok_path)
    try:
        model = MoMForCausalLM.from_pretrained(model_dir, map_location=map_location).eval()
    except (FileNotFoundError, ValueError) as e:
        raise error(str(e).splitlines()[0]) from None
    if same_vocab:
        check_vocab(tok, model.config.vocab_size, tok_path, error)
    return model, tok


class TextTokenizer:
    """A model folder's ``tokenizer.json`` (a ``tokenizers.Tokenizer``, as ``.backend``) with the calls a user
    needs around ``model.generate``: :meth:`encode` text -> ids, :meth:`decode` ids -> text."""

    def __init__(self, backend) -> None:
        from mom.data.tokenizer import special_token_ids

        self.backend = backend
        special = special_token_ids(backend)
        self.eos_token_id: int | None = special["eos"]
        self.pad_token_id: int | None = special["pad"]
        self.vocab_size: int = backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, return_tensors: bool = False):
        """Token ids of ``text``: a list, or with ``return_tensors`` a (1, T) LongTensor for ``model.generate``."""
        ids = self.backend.encode(text).ids
        if return_tensors:
            import torch

            return torch.tensor([ids], dtype=torch.long)
        return ids

    def decode(self, ids) -> str | list[str]:
        """Text of a sequence of ids (a list or a 1-D tensor); a 2-D tensor or a list of lists gives one text
        per row. Special tokens are left out; byte-level tokens are decoded to their exact UTF-8."""
        from mom.data.tokenizer import decoded_bytes, uses_byte_level

        if hasattr(ids, "tolist"):
            ids = ids.tolist()
        if ids and isinstance(ids[0], list):
            return [self.decode(row) for row in ids]
        if uses_byte_level(self.backend):
            return decoded_bytes(self.backend, ids).decode("utf-8", errors="replace")
        return self.backend.decode(ids)

    def __len__(self) -> int:
        return self.vocab_size

    def __repr__(self) -> str:
        return f"TextTokenizer(vocab_size={self.vocab_size}, eos_token_id={self.eos_token_id})"


def load(run_or_model_dir: str | os.PathLike, map_location: Any = "cpu"):
    """``(model, tokenizer)`` of a training run folder (its ``model/``) or of a model folder: the model in eval
    mode and its :class:`TextTokenizer`. :class:`RunFolderError` (one line) when the folder is not one."""
    path = Path(str(run_or_model_dir)).expanduser()
    if not path.is_dir():
        raise RunFolderError(f"not a folder: {path}")
    is_model = (path / "config.json").is_file()
    model_dir = resolve_model_dir(None if is_model else path, path if is_model else None)
    model, tok = load_model_and_tokenizer(model_dir, map_location=map_location)
    return model, TextTokenizer(tok)


def check_vocab(tok, model_vocab: int, where: Any, error: type[Exception] = RunFolderError) -> None:
    """Refuse a tokenizer whose vocabulary size is not the model's."""
    n = tok.get_vocab_size(with_added_tokens=True)
    if n != model_vocab:
        raise error(f"tokenizer {where} has {n} tokens but the model's vocab_size is {model_vocab}: "
                    "not the tokenizer this model was trained with")


def trained_context(run_dir: Any = None, model_dir: Any = None) -> int | None:
    """The window length (``data.seq_len``) the model was trained on, from the run's ``.hydra/config.yaml``
    (``run_dir``, or the run folder holding ``model_dir``); None when there is no readable run config."""
    from omegaconf import OmegaConf

    candidates = [Path(str(run_dir)).expanduser()] if run_dir else []
    if model_dir:
        candidates.append(Path(str(model_dir)).expanduser().resolve().parent)
    for run in candidates:
        path = run / ".hydra" / "config.yaml"
        if path.is_file():
            try:
                seq_len = OmegaConf.select(OmegaConf.load(path), "data.seq_len")
                return int(seq_len) if seq_len else None
            except Exception:  # noqa: BLE001 - an unreadable config only loses the default
                return None
    return None


def run_data_config(run_dir: Path, error: type[Exception] = RunFolderError) -> dict[str, Any]:
    """The ``data`` node of a training run's ``.hydra/config.yaml``, resolved."""
    from omegaconf import OmegaConf

    path = run_dir / ".hydra" / "config.yaml"
    if not path.is_file():
        raise error(f"{path} not found: give data=<data config> (e.g. data=shakespeare)")
    cfg = OmegaConf.load(path)
    if "data" not in cfg or not cfg.data:
        raise error(f"{path} has no data config: give data=<data config>")
    try:
        return OmegaConf.to_container(cfg.data, resolve=True)
    except Exception as e:  # an interpolation that needs Hydra's runtime (hydra:...) or a missing env var
        raise error(f"cannot resolve the data config of {path}: {e}".splitlines()[0]) from None


__all__ = ["RunFolderError", "TextTokenizer", "load", "check_vocab", "load_model_and_tokenizer", "model_identity", "resolve_model_dir",
           "resolve_ref_model_dir", "run_data_config", "trained_context", "setup_stderr_logging", "setup_train_logging"]
