"""Conversion from transformers' Jamba to MoM (mixtures off, every component high precision).

``transformers`` is only needed by the caller (it is a test dependency); this module reads the model's
config attributes and state dict.
"""

from __future__ import annotations

import torch

from mom.model.config import MoMConfig
from mom.model.model import MoMForCausalLM


def config_from_hf_jamba(hf_config) -> MoMConfig:
    c = hf_config
    return MoMConfig(
        vocab_size=c.vocab_size,
        hidden_size=c.hidden_size,
        num_hidden_layers=c.num_hidden_layers,
        rms_norm_eps=c.rms_norm_eps,
        initializer_range=c.initializer_range,
        tie_word_embeddings=bool(c.tie_word_embeddings),
        max_position_embeddings=int(getattr(c, "max_position_embeddings", 262144) or 262144),
        pad_token_id=c.pad_token_id,
        bos_token_id=c.bos_token_id,
        eos_token_id=c.eos_token_id if isinstance(c.eos_token_id, int) or c.eos_token_id is None else c.eos_token_id[0],
        num_attention_heads=c.num_attention_heads,
        num_key_value_heads=c.num_key_value_heads,
        attn_layer_period=c.attn_layer_period,
        attn_layer_offset=c.attn_layer_offset,
        attention_dropout=float(c.attention_dropout),
        intermediate_size=c.intermediate_size,
        hidden_act=c.hidden_act,
        num_experts=c.num_experts,
        num_experts_per_tok=min(c.num_experts_per_tok, c.num_experts),  # irrelevant with one expert
        expert_layer_period=c.expert_layer_period,
        expert_layer_offset=c.expert_layer_offset,
        router_aux_loss_coef=c.router_aux_loss_coef,
        mamba_d_state=c.mamba_d_state,
        mamba_d_conv=c.mamba_d_conv,
        mamba_expand=c.mamba_expand,
        mamba_dt_rank=c.mamba_dt_rank,
        mamba_conv_bias=c.mamba_conv_bias,
        mamba_proj_bias=c.mamba_proj_bias,
    )


def convert_hf_jamba_state_dict(state: dict[str, torch.Tensor], config: MoMConfig) -> dict[str, torch.Tensor]:
    """Rename/split transformers' Jamba weights into MoM's layout. Fused expert tensors
    (``experts.gate_up_proj`` (E, 2I, H), ``experts.down_proj`` (E, H, I)) are split per expert."""
    out = {}
    for name, tensor in state.items():
        if name.endswith("experts.gate_up_proj"):
            prefix = name[: -len("gate_up_proj")]
            for e in range(tensor.shape[0]):
                gate, up = tensor[e].chunk(2, dim=0)
                out[f"{prefix}{e}.gate_proj.weight"] = gate.clone()
                out[f"{prefix}{e}.up_proj.weight"] = up.clone()
        elif name.endswith("experts.down_proj"):
            prefix = name[: -len("down_proj")]
            for e in range(tensor.shape[0]):
                out[f"{prefix}{e}.down_proj.weight"] = tensor[e].clone()
        else:
            out[name] = tensor.detach().clone()
    if config.tie_word_embeddings:
        out["lm_head.weight"] = out["model.embed_tokens.weight"]
    return out


def from_hf_jamba(hf_model) -> MoMForCausalLM:
    """A ``MoMForCausalLM`` computing the same function as a ``transformers.JambaForCausalLM``."""
    config = config_from_hf_jamba(hf_model.config)
    model = MoMForCausalLM(config)
    state = convert_hf_jamba_state_dict(hf_model.state_dict(), config)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"Jamba weights do not map onto MoM: missing {missing[:5]}, unexpected {unexpected[:5]}")
    return model.to(next(hf_model.parameters()).dtype).eval()
