"""Attention without positional embedding (Jamba): GQA through SDPA, and the mixture of attention heads.

Both take ``key_valid`` (B, T): False for tokens that must not be attended (padding, or tokens that
Mixture of Depths skipped at this block). With an ``AttentionState`` they append their K/V to it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mom.model.bitlinear import make_linear
from mom.model.cache import AttentionState
from mom.model.config import MoMConfig
from mom.model.experts import (
    expert_map,
    load_balance_loss,
    load_max,
    plan_experts,
    stable_top_k,
    want_aux,
    z_loss,
)


def with_cache(k, v, key_valid, state: AttentionState | None):
    """Append the new K/V (B, H_kv, T, hd) to the cache; returns all keys, values and their validity
    (None when every key is valid)."""
    if state is None:
        return k, v, key_valid
    return state.append(k, v, key_valid)


def causal_attention(q, k, v, key_valid, dropout: float = 0.0):
    """q: (B, Hq, T, hd) for the T newest tokens; k, v: (B, H_kv, S, hd), S >= T, the last T being the new
    tokens, H_kv dividing Hq (query head j meets KV head j // (Hq / H_kv)); key_valid: (B, S) or None."""
    T, S = q.shape[2], k.shape[2]
    gqa = q.shape[1] != k.shape[1]
    if key_valid is None and (S == T or T == 1):
        # no padding, nothing skipped: plain causal attention, or one new query that sees every key
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=S == T and T > 1,
                                              enable_gqa=gqa)
    q_pos = torch.arange(S - T, S, device=q.device)
    k_pos = torch.arange(S, device=q.device)
    mask = (k_pos[None, :] <= q_pos[:, None])[None]
    if key_valid is not None:
        mask = mask & key_valid[:, None, :]
    # A query whose own key is invalid (skipped or padding) could see nothing: let it see itself so the
    # softmax stays finite. The caller discards its output.
    mask = mask | (k_pos[None, :] == q_pos[:, None])[None]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None], dropout_p=dropout, enable_gqa=gqa)


class Attention(nn.Module):
    """Grouped-query attention, names as transformers' JambaAttention."""

    def __init__(self, config: MoMConfig):
        super().__init__()
        kind = config.precision["attention"]
        d, hd = config.hidden_size, config.head_dim
        self.num_heads, self.num_kv_heads, self.head_dim = config.num_attention_heads, config.num_key_value_heads, hd
        self.dropout = config.attention_dropout
        self.q_proj = make_linear(d, self.num_heads * hd, bias=False, kind=kind)
        self.k_proj = make_linear(d, self.num_kv_heads * hd, bias=False, kind=kind)
        self.v_proj = make_linear(d, self.num_kv_heads * hd, bias=False, kind=kind)
        self.o_proj = make_linear(self.num_heads * hd, d, bias=False, kind=kind)

    def forward(self, x, key_valid=None, state=None):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, -1, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, T, -1, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, -1, self.head_dim).transpose(1, 2)
        k, v, key_valid = with_cache(k, v, key_valid, state)
        o = causal_attention(q, k, v, key_valid, self.dropout if self.training else 0.0)  # GQA inside SDPA
        return self.o_proj(o.transpose(1, 2).reshape(B, T, -1)), {}, {}


class MixtureOfAttention(nn.Module):
    """Mixture of attention heads (MoA, 2210.05144; JetMoE's form).

    K/V projections are shared. Each of ``moa_num_experts`` experts owns a query projection giving one
    query head per KV head and an output projection back to the model width. A token picks ``moa_top_k``
    experts; query head (slot s, h) always meets KV head h (K/V tiled slot-major, ``repeat`` not
    ``repeat_interleave``), so an expert's heads see the same K/V whatever slot it lands in. The expert
    outputs are combined with the softmax of the top-k router logits.
    """

    def __init__(self, config: MoMConfig):
        super().__init__()
        p = config.precision
        d, hd = config.hidden_size, config.head_dim
        self.num_kv_heads, self.head_dim = config.num_key_value_heads, hd
        self.num_experts, self.top_k = config.moa_num_experts, config.moa_top_k
        self.dropout = config.attention_dropout
        width = self.num_kv_heads * hd
        self.k_proj = make_linear(d, width, bias=False, kind=p["attention"])
        self.v_proj = make_linear(d, width, bias=False, kind=p["attention"])
        self.router = make_linear(d, self.num_experts, bias=False, kind=p["moa_router"])
        self.q_proj = nn.ModuleList(make_linear(d, width, bias=False, kind=p["attention"]) for _ in range(self.num_experts))
        self.o_proj = nn.ModuleList(make_linear(width, d, bias=False, kind=p["attention"]) for _ in range(self.num_experts))

    def route(self, x):
        logits = self.router(x).float()
        top_logits, top_i = stable_top_k(logits, self.top_k)
        gates = F.softmax(top_logits, dim=-1)
        return logits, gates, top_i

    def forward(self, x, key_valid=None, state=None):
        B, T, d = x.shape
        flat = x.reshape(-1, d)
        logits, gates, top_i = self.route(flat)
        idx = top_i.flatten()  # (N*k,), slot-major inside each token
        if flat.shape[0] * self.top_k > 4 or torch.is_grad_enabled():
            idx = plan_experts(idx, self.num_experts)  # one plan (one host sync) for both projections
        q = expert_map(flat.repeat_interleave(self.top_k, 0), idx, self.q_proj)  # (N*k, Hkv*hd)
        q = q.view(B, T, self.top_k * self.num_kv_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, T, -1, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, -1, self.head_dim).transpose(1, 2)
        k, v, key_valid = with_cache(k, v, key_valid, state)
        # Query head (slot s, h) must meet KV head h whichever expert fills slot s. Order the query heads
        # h-major (h * top_k + s) so grouped-query attention maps each to KV head h, then order them back.
        Hkv, kk = self.num_kv_heads, self.top_k
        q = q.view(B, kk, Hkv, T, self.head_dim).transpose(1, 2).reshape(B, Hkv * kk, T, self.head_dim)
        o = causal_attention(q, k, v, key_valid, self.dropout if self.training else 0.0)
        o = o.view(B, Hkv, kk, T, self.head_dim).transpose(1, 2).reshape(B, kk * Hkv, T, self.head_dim)
        o = o.transpose(1, 2).reshape(-1, self.num_kv_heads * self.head_dim)  # (N*k, width)
        y = expert_map(o, idx, self.o_proj).view(-1, self.top_k, d)
        y = (y * gates.unsqueeze(-1).to(y.dtype)).sum(1).view(B, T, d)
        if not want_aux(self):
            return y, {}, {}
        probs = F.softmax(logits, dim=-1)
        aux = {"moa_balance": load_balance_loss(probs, top_i), "moa_z": z_loss(logits)}
        stats = {"moa_load_max": load_max(top_i, self.num_experts)}
        return y, aux, stats


def build_attention(config: MoMConfig) -> nn.Module:
    return MixtureOfAttention(config) if config.moa_enabled else Attention(config)
