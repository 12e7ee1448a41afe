"""Inference state of a MoM model: a KV cache for attention layers, conv + SSM state for Mamba layers.

Attention caches keep a validity mask beside K/V: a padding token, or a token that Mixture of Depths did
not route through the block, is stored as an invalid (never attended) entry. That keeps every sequence of a
batch at the same cache length while leaving what the block computes untouched by those tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class AttentionState:
    k: torch.Tensor | None = None  # (B, H_kv, P, head_dim)
    v: torch.Tensor | None = None
    valid: torch.Tensor | None = None  # (B, P) bool

    def append(self, k: torch.Tensor, v: torch.Tensor, valid: torch.Tensor):
        if self.k is None:
            self.k, self.v, self.valid = k, v, valid
        else:
            self.k = torch.cat([self.k, k], dim=2)
            self.v = torch.cat([self.v, v], dim=2)
            self.valid = torch.cat([self.valid, valid], dim=1)
        return self.k, self.v, self.valid

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.k, self.v, self.valid) if t is not None)


@dataclass
class MambaState:
    conv: torch.Tensor | None = None  # (B, d_inner, d_conv - 1): the last inputs of the causal conv
    ssm: torch.Tensor | None = None  # (B, d_inner, d_state), fp32

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.conv, self.ssm) if t is not None)


@dataclass
class MoMCache:
    layers: list = field(default_factory=list)
    seen_tokens: int = 0

    @classmethod
    def for_config(cls, config) -> MoMCache:
        return cls([AttentionState() if config.is_attention_layer(i) else MambaState()
                    for i in range(config.num_hidden_layers)])

    def nbytes(self) -> int:
        return sum(layer.nbytes() for layer in self.layers)
