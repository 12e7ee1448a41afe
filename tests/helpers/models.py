"""Tiny Jamba-MoM networks for the unit tests (every mixture combination, any precision preset)."""

from __future__ import annotations

import itertools

import torch

from mom.model import PRECISION_PRESETS, MoMConfig, MoMForCausalLM
from mom.model.bitlinear import BitLinear

V = 61
MIXTURES = list(itertools.product([False, True], repeat=3))  # (mod, moa, mhmoe)


def tiny_config(mod=False, moa=False, mhmoe=False, precision="bf16", **kw) -> MoMConfig:
    base = dict(vocab_size=V, hidden_size=32, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                intermediate_size=24, num_experts=4, num_experts_per_tok=2, mamba_d_state=4,
                mod_enabled=mod, mod_capacity=0.5, moa_enabled=moa, moa_num_experts=3, moa_top_k=2,
                mhmoe_enabled=mhmoe, mhmoe_num_heads=2,
                precision=dict(PRECISION_PRESETS[precision]) if isinstance(precision, str) else precision)
    base.update(kw)
    return MoMConfig(**base)


def build(seed=0, **kw) -> MoMForCausalLM:
    torch.manual_seed(seed)
    model = MoMForCausalLM(tiny_config(**kw))
    with torch.no_grad():  # routers start near zero: spread them so routing decisions are not ties
        for name, p in model.named_parameters():
            if "router" in name and p.dim() == 2:
                p.normal_(0, 0.5)
    return model


def random_bitlinear(fin: int, fout: int, bias: bool = True, seed: int = 0) -> BitLinear:
    """A BitLinear with spread weights, input-norm gains and bias, so ternary and int8 rounding are exercised."""
    torch.manual_seed(seed)
    m = BitLinear(fin, fout, bias=bias)
    with torch.no_grad():
        m.weight.normal_(0, 0.05)
        m.norm.weight.uniform_(0.5, 1.5)
        if bias:
            m.bias.normal_()
    return m
