"""Next-token loss and bits per byte, summed exactly over batches and processes.

:class:`LanguageModelMetrics` is the one accumulator behind ``val/loss``, ``val/ppl`` and ``val/bpb`` in
training (``MoMLitModule.validation_step``) and the numbers of ``python -m mom.eval``::

    loss = sum(nll) / tokens        perplexity = exp(loss)        bpb = sum(nll) / (ln 2 * bytes)

over the target tokens ``labels[:, 1:]`` that are not ignored (-100), where ``bytes`` is the UTF-8 length of
those target tokens (``token_bytes[target]``). The sums are float64 torchmetrics states with a ``sum``
reduction, so they are exact across batches and, under DDP/FSDP, across processes.
"""

from __future__ import annotations

import math

import torch
from torchmetrics import Metric

IGNORE_INDEX = -100


class LanguageModelMetrics(Metric):
    full_state_update = False

    def __init__(self) -> None:
        super().__init__()
        for name in ("nll", "tokens", "bytes"):
            self.add_state(name, torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.set_dtype(torch.float64)

    def update(self, token_loss: torch.Tensor, labels: torch.Tensor, token_bytes: torch.Tensor | None = None) -> None:
        """``token_loss`` (B, T-1): per-target NLL (``MoMOutput.token_loss``); ``labels`` (B, T); ``token_bytes``
        (V,): UTF-8 bytes of each token (without it the byte count stays 0 and bpb is NaN)."""
        targets = labels[:, 1:]
        valid = targets != IGNORE_INDEX
        self.nll += token_loss.double()[valid].sum()
        self.tokens += valid.sum().double()
        if token_bytes is not None:
            ids = targets[valid].clamp(0, token_bytes.numel() - 1)
            self.bytes += token_bytes.to(ids.device)[ids].sum().double()

    def compute(self) -> dict[str, torch.Tensor]:
        """{"nll", "tokens", "bytes", "loss", "bpb"} (float64; loss NaN without tokens, bpb NaN without bytes)."""
        nan = torch.tensor(math.nan, dtype=torch.float64, device=self.nll.device)
        loss = self.nll / self.tokens if self.tokens > 0 else nan
        bpb = self.nll / (math.log(2) * self.bytes) if self.bytes > 0 else nan
        return {"nll": self.nll, "tokens": self.tokens, "bytes": self.bytes, "loss": loss, "bpb": bpb}


__all__ = ["IGNORE_INDEX", "LanguageModelMetrics"]
