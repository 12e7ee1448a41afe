"""Mixture of Depths (arXiv 2404.02258): a scalar router per routed block.

Training: the top ``capacity`` share of the sequence by router logit goes through the block, in its
original order; the block's update is multiplied by sigmoid(logit) (``mod_update_scale="sigmoid"``) or by the
raw router weight as in the paper (``"router"``), which is how the router learns.
The top-k over the sequence is not causal, so the router is also trained (auxiliary BCE, the paper's
option (a)) to predict its own top-k membership from its logit alone. Eval and decoding route a token
when sigmoid(logit) > 0.5, a decision that depends on that token only: the model is causal.

How MoD treats blocks (decided so that training and decoding see the same thing):
- attention blocks are routed whole (attention + feed-forward). A skipped token is not a key for the
  routed tokens, in training (they attend among themselves) as in decoding (its KV entry is masked).
- Mamba blocks keep their mixer on every token (the recurrence must see the whole sequence, or training
  and decoding would differ); MoD routes their feed-forward, which is per token.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from mom.model.bitlinear import make_linear
from mom.model.config import MoMConfig


class DepthRouter(nn.Module):
    def __init__(self, config: MoMConfig):
        super().__init__()
        self.capacity = config.mod_capacity
        self.update_scale = config.mod_update_scale
        self.proj = make_linear(config.hidden_size, 1, bias=True, kind=config.precision["mod_router"])

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).squeeze(-1).float()  # (B, T)

    def scale(self, logits: torch.Tensor) -> torch.Tensor:
        """What multiplies a routed token's update (see the module docstring)."""
        return torch.sigmoid(logits) if self.update_scale == "sigmoid" else logits

    def top_k(self, x: torch.Tensor, token_mask: torch.Tensor | None):
        """Training-time routing. Returns (sorted indices (B, k), weights (B, T), BCE aux loss, mask (B, T))."""
        logits = self.logits(x)
        T = logits.shape[1]
        k = max(1, math.ceil(self.capacity * T - 1e-6))
        scores = logits.detach() if token_mask is None else logits.detach().masked_fill(~token_mask, float("-inf"))
        idx = torch.topk(scores, k, dim=1).indices.sort(dim=1).values  # keep the original order
        chosen = torch.zeros_like(logits, dtype=torch.bool).scatter(1, idx, True)
        bce = F.binary_cross_entropy_with_logits(logits, chosen.float(), reduction="none")
        bce = bce.mean() if token_mask is None else (bce * token_mask).sum() / token_mask.sum().clamp_min(1)
        return idx, self.scale(logits), bce, chosen

    def threshold(self, x: torch.Tensor, token_mask: torch.Tensor | None):
        """Causal routing for eval and decoding. Returns (selected (B, T) bool, weights (B, T))."""
        logits = self.logits(x)
        selected = logits > 0
        if token_mask is not None:
            selected = selected & token_mask
        return selected, self.scale(logits)
