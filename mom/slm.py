"""Selective language modelling (Rho-1, arXiv 2404.07965): token selection and stored reference losses.

Rho-1 trains on the tokens a reference model (trained on clean, curated text) finds easy but the current
model still finds hard. Per batch::

    excess_i = L_theta(x_i) - L_ref(x_i)          (per-token NLL of the current and the reference model)
    keep the top ``token_ratio`` of the (non-ignored) tokens by excess loss
    loss = mean over the kept tokens of L_theta   (+ the model's aux losses, unchanged)

The reference losses come from ``python -m mom.score`` (stored per token of the packed token cache, see
below) or from a frozen reference model run on each batch (``slm.reference: online``).

Stored reference losses (written by :func:`write_ref_losses`, read by :func:`load_ref_losses`)::

    <data cache_dir>/ref_losses/<windows key>.<ref id>.bin        float16/32, n_tokens - 1 values
    <data cache_dir>/ref_losses/<windows key>.<ref id>.docs.npy   float64 mean loss per document
    <data cache_dir>/ref_losses/<windows key>.<ref id>.json       metadata, written last

``windows key`` is :attr:`mom.data.cache.PackedSequences.key` (token cache key + seq_len: the context the
losses were scored in) and ``ref id`` is :func:`model_identity` of the reference model folder (hash of its
config and weights). Value ``j`` is the reference NLL of cache token ``j + 1`` given the tokens before it in
its window (window ``w`` = tokens ``[w (T-1), w (T-1) + T)``, the windows training reads), so the targets of
window ``w`` are values ``[w (T-1), w (T-1) + T - 1)``: a batch's ``index`` finds its reference losses by
slicing. The tail after the last full window is scored in one shorter window, so every target has a value.
Every file goes through a temporary file and ``os.replace``; the JSON comes last, so a store is complete or
absent.

Nothing here imports Lightning.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mom.model.config import ConfigError

IGNORE_INDEX = -100
STORE_VERSION = 1
QUANTILES = (0.1, 0.5, 0.9)


class SlmError(ConfigError):
    """A bad selective-LM setup (missing reference, tokenizer mismatch, missing scores): one line (a ConfigError,
    so the entry points report it as one ``error:`` line)."""


# ------------------------------------------------------------------------------------------- selection
def select_tokens(excess: torch.Tensor, valid: torch.Tensor, ratio: float) -> torch.Tensor:
    """Boolean mask (same shape as ``excess``) of the top ``ratio`` of the ``valid`` tokens by ``excess``.

    Exactly ``round(ratio * n_valid)`` tokens are kept (at least one when ``ratio > 0`` and any is valid), over
    the whole batch; invalid tokens are never kept; a NaN excess ranks below every finite one.
    """
    if not 0.0 <= ratio <= 1.0:
        raise SlmError(f"slm.token_ratio must be in [0, 1], got {ratio}")
    valid = valid.bool()
    n_valid = int(valid.sum())
    k = int(math.floor(ratio * n_valid + 0.5))
    if ratio > 0 and n_valid > 0:
        k = max(k, 1)
    mask = torch.zeros(excess.numel(), dtype=torch.bool, device=excess.device)
    if k == 0:
        return mask.view_as(excess)
    scores = excess.detach().float().reshape(-1)
    lowest = torch.finfo(torch.float32).min
    scores = torch.where(torch.isnan(scores), torch.full_like(scores, lowest), scores)
    scores = scores.masked_fill(~valid.reshape(-1), float("-inf"))
    mask[torch.topk(scores, k, sorted=False).indices] = True
    return mask.view_as(excess)


@dataclass
class SelectiveLoss:
    loss: torch.Tensor  # mean current-model NLL over the kept tokens (differentiable)
    mask: torch.Tensor  # (B, T-1) bool, the kept tokens
    excess: torch.Tensor  # (B, T-1) float, detached
    stats: dict[str, torch.Tensor]  # detached scalars, logged as train/<name>


def selective_loss(token_loss: torch.Tensor, ref_loss: torch.Tensor, valid: torch.Tensor, ratio: float
                   ) -> SelectiveLoss:
    """The Rho-1 objective of one batch from per-token losses (B, T-1) of the current and reference models."""
    excess = token_loss.detach().float() - ref_loss.to(token_loss.device).float()
    mask = select_tokens(excess, valid, ratio)
    n_kept = mask.sum()
    loss = (token_loss.float() * mask).sum() / n_kept.clamp_min(1)
    valid = valid.bool()
    n_valid = valid.sum().clamp_min(1)
    ex = excess[valid & ~torch.isnan(excess)]
    stats = {
        "slm_selected_frac": (n_kept / n_valid).float(),
        "slm_full_lm_loss": ((token_loss.detach().float() * valid).sum() / n_valid).float(),
        "slm_ref_loss": ((ref_loss.to(excess.device).float().nan_to_num(0.0) * valid).sum() / n_valid).float(),
    }
    if ex.numel():
        stats["slm_excess_mean"] = ex.mean()
        qs = torch.quantile(ex, torch.tensor(QUANTILES, device=ex.device))
        for q, v in zip(QUANTILES, qs, strict=True):
            stats[f"slm_excess_q{round(q * 100):02d}"] = v
        if bool(mask.any()):
            stats["slm_excess_threshold"] = excess[mask].min()  # the smallest excess that was kept
    return SelectiveLoss(loss=loss, mask=mask, excess=excess, stats={k: v.detach() for k, v in stats.items()})


# ------------------------------------------------------------------------------------------- reference
def resolve_ref_model_dir(ref_run: Any) -> Path:
    """The reference model folder: ``<ref_run>/model`` for a training run folder, or ``ref_run`` itself when
    it is a model folder (config.json + model.safetensors + tokenizer.json)."""
    if not ref_run:
        raise SlmError("no reference model: give slm.ref_run=<training run folder> (or ref_run=... for mom.score)")
    path = Path(str(ref_run)).expanduser()
    if not path.is_dir():
        raise SlmError(f"reference run not found: {path}")
    if not (path / "config.json").is_file() and (path / "model").is_dir():
        path = path / "model"
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        if not (path / name).is_file():
            raise SlmError(f"{path / name} is missing: the reference must be a finished run (its model/ folder)")
    return path


def model_identity(model_dir: str | os.PathLike) -> str:
    """A short hash of a model folder's config.json and model.safetensors (what the stored losses key on)."""
    h = hashlib.sha256()
    for name in ("config.json", "model.safetensors"):
        with open(Path(model_dir) / name, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()[:16]


def load_reference(model_dir: Path, device: str | torch.device = "cpu"):
    """(model in eval mode, frozen; its tokenizer)."""
    from mom.data.tokenizer import load_tokenizer
    from mom.model import MoMForCausalLM

    try:
        model = MoMForCausalLM.from_pretrained(model_dir, map_location=device)
    except (FileNotFoundError, ValueError) as e:
        raise SlmError(str(e).splitlines()[0]) from None
    model.eval().requires_grad_(False)
    return model, load_tokenizer(path=model_dir / "tokenizer.json")


def check_same_tokenizer(ref_tok, data_tok, model_dir: Path) -> None:
    """Refuse (SlmError, one line) a reference whose tokenizer is not the data's."""
    from mom.data.tokenizer import tokenizer_hash

    h_ref, h_data = tokenizer_hash(ref_tok), tokenizer_hash(data_tok)
    if h_ref != h_data:
        n_ref = ref_tok.get_vocab_size(with_added_tokens=True)
        n_data = data_tok.get_vocab_size(with_added_tokens=True)
        raise SlmError(
            f"the reference {model_dir} uses a different tokenizer than the data "
            f"(reference: {n_ref} tokens, sha256 {h_ref[:12]}; data: {n_data} tokens, sha256 {h_data[:12]}); "
            f"reference losses need the same tokenizer: set data.tokenizer.path={model_dir / 'tokenizer.json'}"
        )


# ------------------------------------------------------------------------------------------- storage
def store_stem(cache_dir: str | os.PathLike, windows_key: str, ref_id: str) -> Path:
    return Path(cache_dir).expanduser() / "ref_losses" / f"{windows_key}.{ref_id}"


@dataclass
class RefLosses:
    """Stored per-token reference losses of one (token cache, seq_len, reference model)."""

    stem: Path
    meta: dict[str, Any]

    @property
    def n_targets(self) -> int:
        return int(self.meta["n_targets"])

    @property
    def seq_len(self) -> int:
        return int(self.meta["seq_len"])

    @property
    def losses(self) -> np.ndarray:
        """(n_tokens - 1,) memory-mapped read-only: value j = reference NLL of cache token j + 1."""
        if getattr(self, "_losses", None) is None:
            from mom.data.cache import open_array

            self._losses = open_array(f"{self.stem}.bin", self.meta["dtype"], self.n_targets)
        return self._losses

    @property
    def doc_losses(self) -> np.ndarray:
        """(n_docs,) mean reference NLL of each document's target tokens (NaN for a document without any)."""
        return np.load(f"{self.stem}.docs.npy")

    def window_losses(self, index: torch.Tensor | np.ndarray, seq_len: int) -> torch.Tensor:
        """(B, seq_len - 1) float32 reference losses of the windows ``index`` (a batch's ``index``)."""
        idx = np.asarray(index.cpu() if torch.is_tensor(index) else index, dtype=np.int64).reshape(-1)
        stride = seq_len - 1
        pos = idx[:, None] * stride + np.arange(stride)[None, :]
        if pos.size and int(pos.max()) >= self.n_targets:
            raise SlmError(f"window {int(idx.max())} is past the {self.n_targets} stored reference losses "
                           f"({self.stem}): not the token cache they were scored on")
        return torch.from_numpy(np.asarray(self.losses[pos], dtype=np.float32))

    def __getstate__(self):  # picklable (DataLoader workers, DDP spawn): reopen the memmap there
        state = self.__dict__.copy()
        state.pop("_losses", None)
        return state


def load_ref_losses(cache_dir: str | os.PathLike, windows_key: str, ref_id: str) -> RefLosses | None:
    """The stored losses for the key if complete, else None."""
    stem = store_stem(cache_dir, windows_key, ref_id)
    meta_path = Path(f"{stem}.json")
    if not meta_path.is_file():
        return None
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    store = RefLosses(stem, meta)
    size = store.n_targets * np.dtype(meta["dtype"]).itemsize
    binp = Path(f"{stem}.bin")
    if not binp.is_file() or binp.stat().st_size != size or not Path(f"{stem}.docs.npy").is_file():
        return None
    return store


def _atomic_write(path: Path, write) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def document_losses(losses: np.ndarray, doc_offsets: np.ndarray) -> np.ndarray:
    """Mean of ``losses`` (value j = target token j + 1) per document (doc d owns tokens from its offset up to
    and including the EOS before the next document); NaN for a document with no target token."""
    n_docs = len(doc_offsets)
    if n_docs == 0:
        return np.zeros(0)
    doc_of = np.searchsorted(doc_offsets, np.arange(1, len(losses) + 1), side="right") - 1
    vals = np.asarray(losses, dtype=np.float64)
    sums = np.bincount(doc_of, weights=vals, minlength=n_docs)
    counts = np.bincount(doc_of, minlength=n_docs)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)


def write_ref_losses(cache_dir: str | os.PathLike, windows_key: str, ref_id: str, losses: np.ndarray,
                     doc_offsets: np.ndarray, meta: dict[str, Any], dtype: str = "float16") -> RefLosses:
    stem = store_stem(cache_dir, windows_key, ref_id)
    dt = np.dtype(dtype)
    if dt not in (np.dtype(np.float16), np.dtype(np.float32)):
        raise SlmError(f"reference losses are stored as float16 or float32, not {dtype}")
    arr = np.asarray(losses, dtype=dt)
    _atomic_write(Path(f"{stem}.bin"), lambda f: f.write(arr.tobytes()))
    docs = document_losses(np.asarray(losses, dtype=np.float64), doc_offsets)
    _atomic_write(Path(f"{stem}.docs.npy"), lambda f: np.save(f, docs))
    full = {"version": STORE_VERSION, "n_targets": int(arr.size), "dtype": dt.name, "windows_key": windows_key,
            "ref_id": ref_id, "mean_loss": float(np.mean(losses)) if len(losses) else None, **meta}
    _atomic_write(Path(f"{stem}.json"), lambda f: f.write(json.dumps(full, indent=1, default=str).encode()))
    return RefLosses(stem, full)


@torch.no_grad()
def score_tokens(model, tokens: np.ndarray, seq_len: int, batch_size: int = 16,
                 device: str | torch.device = "cpu", progress=None) -> np.ndarray:
    """Per-target NLL (float32, ``len(tokens) - 1`` values) of ``model`` over a token stream, in the windows of
    stride ``seq_len - 1`` (the tail in one shorter window). The model is put in eval mode."""
    model.eval()
    n = len(tokens)
    stride = seq_len - 1
    out = np.empty(max(n - 1, 0), dtype=np.float32)
    if n < 2:
        return out
    n_full = (n - 1) // stride if n >= seq_len else 0
    t0 = time.perf_counter()
    for b0 in range(0, n_full, batch_size):
        ws = range(b0, min(b0 + batch_size, n_full))
        ids = torch.from_numpy(np.stack([tokens[w * stride : w * stride + seq_len] for w in ws]).astype(np.int64))
        loss = model(ids.to(device), labels=ids.to(device), reduction="none").token_loss
        out[ws[0] * stride : (ws[-1] + 1) * stride] = loss.float().cpu().numpy().reshape(-1)
        if progress is not None:
            progress(ws[-1] + 1, n_full, time.perf_counter() - t0)
    start = n_full * stride
    if start < n - 1:  # the tail: tokens [start, n), one shorter window
        ids = torch.from_numpy(np.asarray(tokens[start:n], dtype=np.int64))[None]
        out[start:] = model(ids.to(device), labels=ids.to(device), reduction="none").token_loss.float().cpu().numpy()[0]
    return out


__all__ = [
    "IGNORE_INDEX", "RefLosses", "SelectiveLoss", "SlmError", "check_same_tokenizer", "document_losses",
    "load_ref_losses", "load_reference", "model_identity", "resolve_ref_model_dir", "score_tokens",
    "select_tokens", "selective_loss", "store_stem", "write_ref_losses",
]
