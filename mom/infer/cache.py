"""Static inference state: preallocated KV buffers of the maximum length, Mamba conv/SSM state updated in
place (the gpt-fast pattern: a decode step allocates no cache memory and keeps every buffer's address).

Every sequence of a batch sits at the same position (prompts are left-padded); ``valid`` marks the K/V
entries that may be attended (False for padding and for tokens Mixture of Depths did not route through the
block), exactly as ``mom.model.cache.AttentionState`` does for the reference path.
"""

from __future__ import annotations

import torch

from mom.model.cache import AttentionState, MambaState, MoMCache


class StaticAttention:
    def __init__(self, batch: int, kv_heads: int, max_len: int, head_dim: int, dtype, device):
        self.k = torch.zeros(batch, kv_heads, max_len, head_dim, dtype=dtype, device=device)
        self.v = torch.zeros_like(self.k)
        self.valid = torch.ones(batch, max_len, dtype=torch.bool, device=device)
        self.all_valid = True

    def nbytes(self, length: int) -> int:
        per = self.k[:, :, :1].numel() * self.k.element_size() * 2 + self.valid[:, :1].numel()
        return per * length


class StaticMamba:
    def __init__(self, batch: int, d_inner: int, d_conv: int, d_state: int, dtype, device):
        self.conv = torch.zeros(batch, d_inner, d_conv - 1, dtype=dtype, device=device)
        self.ssm = torch.zeros(batch, d_inner, d_state, dtype=torch.float32 if dtype != torch.float64 else dtype,
                               device=device)

    def nbytes(self) -> int:
        return self.conv.numel() * self.conv.element_size() + self.ssm.numel() * self.ssm.element_size()


class StaticCache:
    """State of ``batch`` sequences for up to ``max_len`` tokens; ``length`` tokens are filled."""

    def __init__(self, config, batch: int, max_len: int, dtype=torch.float32, device="cpu"):
        self.batch, self.max_len, self.length = batch, max_len, 0
        self.layers = []
        for i in range(config.num_hidden_layers):
            if config.is_attention_layer(i):
                self.layers.append(StaticAttention(batch, config.num_key_value_heads, max_len, config.head_dim,
                                                   dtype, device))
            else:
                self.layers.append(StaticMamba(batch, config.mamba_d_inner, config.mamba_d_conv,
                                               config.mamba_d_state, dtype, device))

    def fits(self, batch: int, max_len: int, dtype) -> bool:
        first = self.layers[0]
        have = first.k.dtype if isinstance(first, StaticAttention) else first.conv.dtype
        return self.batch == batch and self.max_len >= max_len and have == dtype

    def reset(self) -> None:
        self.length = 0
        for st in self.layers:
            if isinstance(st, StaticAttention):
                st.valid.fill_(True)
                st.all_valid = True
            else:
                st.conv.zero_()
                st.ssm.zero_()

    def load(self, ref: MoMCache, length: int) -> None:
        """Copy a reference cache (``mom.model.cache.MoMCache``) prefilled with ``length`` tokens."""
        if length > self.max_len:
            raise ValueError(f"prompt of {length} tokens does not fit a cache of {self.max_len}")
        self.reset()
        self.length = length
        for st, src in zip(self.layers, ref.layers, strict=True):
            if isinstance(src, AttentionState):
                n = src.length
                st.k[:, :, :n].copy_(src.k)
                st.v[:, :, :n].copy_(src.v)
                if src.valid is not None:
                    st.valid[:, :n].copy_(src.valid)
                st.all_valid = src.all_valid
            elif isinstance(src, MambaState):
                st.conv.copy_(src.conv)
                st.ssm.copy_(src.ssm)

    def nbytes(self) -> int:
        return sum(s.nbytes(self.length) if isinstance(s, StaticAttention) else s.nbytes() for s in self.layers)
