"""Inference state of a MoM model: a KV cache for attention layers, conv + SSM state for Mamba layers.

Attention caches keep a validity mask beside K/V: a padding token, or a token that Mixture of Depths did
not route through the block, is stored as an invalid (never attended) entry. That keeps every sequence of a
batch at the same cache length while leaving what the block computes untouched by those tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


class AttentionState:
    """K/V of the tokens seen so far, in buffers that grow geometrically (no copy of the whole cache per
    decoded token). ``valid`` is None while every entry is valid, which lets attention skip its mask."""

    def __init__(self):
        self._k = self._v = self._valid = None
        self.length = 0
        self.all_valid = True

    def append(self, k: torch.Tensor, v: torch.Tensor, valid: torch.Tensor | None):
        """k, v: (B, H_kv, T, hd) for T new tokens; valid: (B, T) bool or None (all valid).
        Returns the keys, values and validity (or None) of all cached tokens."""
        B, H, T, D = k.shape
        need = self.length + T
        if self._k is None or need > self._k.shape[2]:
            cap = max(need + 64, 2 * (self._k.shape[2] if self._k is not None else 0))
            new_k, new_v = k.new_empty(B, H, cap, D), v.new_empty(B, H, cap, D)
            new_valid = torch.ones(B, cap, dtype=torch.bool, device=k.device)
            if self._k is not None:
                new_k[:, :, : self.length] = self._k[:, :, : self.length]
                new_v[:, :, : self.length] = self._v[:, :, : self.length]
                new_valid[:, : self.length] = self._valid[:, : self.length]
            self._k, self._v, self._valid = new_k, new_v, new_valid
        self._k[:, :, self.length : need] = k
        self._v[:, :, self.length : need] = v
        if valid is not None:
            self._valid[:, self.length : need] = valid
            self.all_valid = self.all_valid and bool(valid.all())
        self.length = need
        return self.k, self.v, None if self.all_valid else self.valid

    @property
    def k(self):
        return None if self._k is None else self._k[:, :, : self.length]

    @property
    def v(self):
        return None if self._v is None else self._v[:, :, : self.length]

    @property
    def valid(self):
        return None if self._valid is None else self._valid[:, : self.length]

    def nbytes(self) -> int:
        """Bytes of the cached entries (not of the spare capacity)."""
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
