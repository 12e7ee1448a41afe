"""Selective language modelling (Rho-1, arXiv 2404.07965): token selection and stored reference losses.

Rho-1 trains on the tokens a reference model (trained on clean, curated text) finds easy but the current
model still finds hard. Per batch::

    excess_i = L_theta(x_i) - L_ref(x_i)          (per-token NLL of the current and the reference model)
    keep the top ``token_ratio`` of the (non-ignored) tokens by excess loss
    loss = mean over the kept tokens of L_theta   (+ the model's aux losses, unchanged)

The reference losses come from ``python -m mom.score`` (stored per token of the packed token cache, see
below) or from a frozen reference model run on each batch (``slm.reference: online``).

The stored losses and their alignment with the token cache: :mod:`mom.data.ref_losses`. :class:`Rho1Selection`
is the objective as an object: ``MoMLitModule`` builds one from the ``slm`` config group, attaches it to the
data module (:meth:`Rho1Selection.attach`) and calls it on each batch's per-token losses.

Nothing here imports Lightning.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mom.model.config import ConfigError

log = logging.getLogger("mom")
IGNORE_INDEX = -100
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
def load_reference(model_dir: Path, device: str | torch.device = "cpu"):
    """(model in eval mode, frozen; its tokenizer)."""
    from mom.run_folder import load_model_and_tokenizer

    model, tok = load_model_and_tokenizer(model_dir, error=SlmError, map_location=device, same_vocab=False)
    model.requires_grad_(False)
    return model, tok


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
        loss = model(ids.to(device), labels=ids.to(device)).token_loss
        out[ws[0] * stride : (ws[-1] + 1) * stride] = loss.float().cpu().numpy().reshape(-1)
        if progress is not None:
            progress(ws[-1] + 1, n_full, time.perf_counter() - t0)
    start = n_full * stride
    if start < n - 1:  # the tail: tokens [start, n), one shorter window
        ids = torch.from_numpy(np.asarray(tokens[start:n], dtype=np.int64))[None]
        out[start:] = model(ids.to(device), labels=ids.to(device)).token_loss.float().cpu().numpy()[0]
    return out


# ------------------------------------------------------------------------------------------- the objective
class Rho1Selection:
    """The Rho-1 objective of a training run (the ``slm`` config group with ``name: rho``).

    :meth:`attach` finds the reference (its tokenizer must be the data's): the stored losses of the data
    module's train windows (``reference: precomputed``, from ``python -m mom.score``) or the frozen reference
    model, run on each batch (``reference: online``). Calling the object on a batch's per-token losses gives
    the :class:`SelectiveLoss`.
    """

    def __init__(self, token_ratio: float = 0.6, reference: str = "precomputed", ref_run: Any = None,
                 histogram_every_n_steps: int = 50) -> None:
        if reference not in ("precomputed", "online"):
            raise SlmError(f"slm.reference must be precomputed or online, got {reference!r}")
        self.token_ratio = float(token_ratio)
        self.reference = reference
        self.ref_run = ref_run
        self.histogram_every_n_steps = int(histogram_every_n_steps or 0)
        self.ref_losses = None  # mom.data.ref_losses.RefLosses (precomputed)
        self.ref_model = None  # the frozen reference (online): not a submodule of the LightningModule, not saved

    @classmethod
    def from_config(cls, slm: dict[str, Any] | None) -> Rho1Selection | None:
        """The objective of an ``slm`` config group (None for ``name: none``, plain LM)."""
        slm = dict(slm or {})
        name = slm.pop("name", "none")
        if name not in ("none", "rho"):
            raise SlmError(f"slm.name must be none or rho, got {name!r}")
        if name == "none":
            return None
        known = ("token_ratio", "reference", "ref_run", "histogram_every_n_steps")
        return cls(**{k: v for k, v in slm.items() if k in known})

    @property
    def attached(self) -> bool:
        return self.ref_losses is not None or self.ref_model is not None

    def attach(self, datamodule: Any) -> None:
        """Find the reference for the data module's train windows; SlmError (one line) when there is none."""
        from mom.data.ref_losses import load_ref_losses
        from mom.run_folder import model_identity, resolve_ref_model_dir

        model_dir = resolve_ref_model_dir(self.ref_run, error=SlmError)
        if datamodule is None or getattr(datamodule, "train_dataset", None) is None:
            raise SlmError("slm=rho needs the MoMDataModule (its tokenizer and train windows)")
        ref, ref_tok = load_reference(model_dir, "cpu")
        check_same_tokenizer(ref_tok, datamodule.tokenizer, model_dir)
        if self.reference == "online":
            self.ref_model = ref
            log.info("slm=rho: online reference %s, token_ratio %s", model_dir, self.token_ratio)
            return
        ds = datamodule.train_dataset
        store = load_ref_losses(datamodule.cache_dir, ds.key, model_identity(model_dir))
        if store is None:
            raise SlmError(f"no stored reference losses of {model_dir} for the train windows {ds.key}: run "
                           f"python -m mom.score ref_run={self.ref_run} with this data config "
                           f"(seq_len {ds.seq_len}), or set slm.reference=online")
        self.ref_losses = store
        log.info("slm=rho: reference losses %s.bin (mean %.4f), token_ratio %s", store.stem,
                 store.meta.get("mean_loss") or float("nan"), self.token_ratio)

    def reference_losses(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """(B, T-1) reference NLL of the batch's targets."""
        ids = batch["input_ids"]
        if self.ref_model is not None:
            ref = self.ref_model
            if next(ref.parameters()).device != ids.device:
                ref.to(ids.device)
            with torch.no_grad():
                return ref(ids, labels=batch["labels"]).token_loss.float()
        if self.ref_losses is None:
            raise SlmError("slm=rho: no reference attached (attach was not called)")
        if "index" not in batch:
            raise SlmError("slm.reference=precomputed needs the batch's window 'index' (MoMDataModule batches)")
        return self.ref_losses.window_losses(batch["index"], ids.shape[1]).to(ids.device)

    def __call__(self, token_loss: torch.Tensor, batch: dict[str, torch.Tensor]) -> SelectiveLoss:
        """The selective loss of a batch from the current model's per-token losses (B, T-1)."""
        valid = batch["labels"][:, 1:] != IGNORE_INDEX
        return selective_loss(token_loss, self.reference_losses(batch), valid, self.token_ratio)


__all__ = [
    "IGNORE_INDEX", "Rho1Selection", "SelectiveLoss", "SlmError", "check_same_tokenizer", "load_reference",
    "score_tokens", "select_tokens", "selective_loss",
]
