"""Feed-forward layers: dense SwiGLU MLP, top-k sparse MoE (Jamba), multi-head MoE (MH-MoE, 2404.15045)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mom.model.bitlinear import make_linear
from mom.model.config import MoMConfig
from mom.model.experts import expert_map, load_balance_loss, load_max, top_k_routing, want_aux

ACTIVATIONS = {"silu": F.silu, "gelu": F.gelu, "relu": F.relu}


class MLP(nn.Module):
    """SwiGLU MLP: down(act(gate(x)) * up(x)), Jamba's JambaMLP."""

    def __init__(self, d_model: int, d_ff: int, act: str = "silu", kind: str = "bf16"):
        super().__init__()
        self.gate_proj = make_linear(d_model, d_ff, bias=False, kind=kind)
        self.up_proj = make_linear(d_model, d_ff, bias=False, kind=kind)
        self.down_proj = make_linear(d_ff, d_model, bias=False, kind=kind)
        self.act = ACTIVATIONS[act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class SparseMoE(nn.Module):
    """Top-k of a softmax router over ``num_experts`` SwiGLU experts (transformers' Jamba semantics:
    the chosen softmax weights are not renormalised)."""

    def __init__(self, config: MoMConfig):
        super().__init__()
        p = config.precision
        self.num_experts, self.top_k = config.num_experts, config.num_experts_per_tok
        self.router = make_linear(config.hidden_size, self.num_experts, bias=False, kind=p["moe_router"])
        self.experts = nn.ModuleList(
            MLP(config.hidden_size, config.intermediate_size, config.hidden_act, p["ffn"]) for _ in range(self.num_experts)
        )

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, dict, dict]:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        probs, top_w, top_i = top_k_routing(self.router(flat), self.top_k, normalize=False)
        y = expert_map(flat.repeat_interleave(self.top_k, 0), top_i.flatten(), self.experts)
        y = (y.view(-1, self.top_k, shape[-1]) * top_w.unsqueeze(-1).to(y.dtype)).sum(1)
        if not want_aux(self):
            return y.view(shape), {}, {}
        aux = {"moe_balance": load_balance_loss(probs, top_i)}
        stats = {"moe_load_max": load_max(top_i, self.num_experts)}
        return y.view(shape), aux, stats


class MultiHeadMoE(nn.Module):
    """MH-MoE: project, split every token into ``h`` sub-tokens of width d/h, route each sub-token top-k to
    experts of width d/h, put the sub-tokens back in order and merge."""

    def __init__(self, config: MoMConfig):
        super().__init__()
        p = config.precision
        d, h = config.hidden_size, config.mhmoe_num_heads
        self.heads, self.sub_dim = h, d // h
        self.normalize_gates, self.balance = config.mhmoe_normalize_gates, config.mhmoe_balance
        self.num_experts, self.top_k = config.num_experts, config.num_experts_per_tok
        self.head_proj = make_linear(d, d, bias=config.mhmoe_proj_bias, kind=p["ffn"])
        self.merge_proj = make_linear(d, d, bias=config.mhmoe_proj_bias, kind=p["ffn"])
        self.router = make_linear(self.sub_dim, self.num_experts, bias=False, kind=p["moe_router"])
        self.experts = nn.ModuleList(
            MLP(self.sub_dim, config.intermediate_size, config.hidden_act, p["ffn"]) for _ in range(self.num_experts)
        )

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, dict, dict]:
        shape = x.shape
        sub = self.head_proj(x).reshape(-1, self.sub_dim)  # (N*h, d/h), sub-tokens of a token are adjacent
        probs, top_w, top_i = top_k_routing(self.router(sub), self.top_k, normalize=self.normalize_gates)
        y = expert_map(sub.repeat_interleave(self.top_k, 0), top_i.flatten(), self.experts)
        y = (y.view(-1, self.top_k, self.sub_dim) * top_w.unsqueeze(-1).to(y.dtype)).sum(1)
        y = self.merge_proj(y.reshape(shape))
        if not want_aux(self):
            return y, {}, {}
        counted = top_i if self.balance == "topk" else top_i[:, :1]  # top1: the first (largest) choice only
        aux = {"moe_balance": load_balance_loss(probs, counted)}
        stats = {"moe_load_max": load_max(top_i, self.num_experts)}
        return y, aux, stats


def build_ffn(config: MoMConfig, layer_idx: int) -> nn.Module:
    if config.is_expert_layer(layer_idx):
        return MultiHeadMoE(config) if config.mhmoe_enabled else SparseMoE(config)
    return MLP(config.hidden_size, config.intermediate_size, config.hidden_act, config.precision["ffn"])
