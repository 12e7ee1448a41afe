"""Parameter accounting of a MoM configuration, computed on the meta device (no memory).

- total: every parameter.
- active per token: experts count k/E (MoE, MH-MoE), MoA expert Q/O projections count k/E, and what
  Mixture of Depths routes counts its capacity (whole attention blocks; the feed-forward of Mamba blocks).
  Embeddings and head are counted (as MoE papers usually do); the ``*_body`` figures leave both out.
- precision: parameters in ternary (BitLinear) layers vs high precision (everything else).
- inference weight bytes: ternary weights at 2 bits plus one fp32 scale per layer, the rest in bf16.
"""

from __future__ import annotations

import re

import torch

from mom.model.config import MoMConfig


def _active_fraction(name: str, config: MoMConfig, routed_layers: dict[int, bool]) -> float:
    frac = 1.0
    if ".feed_forward.experts." in name:
        frac *= config.num_experts_per_tok / config.num_experts
    if config.moa_enabled and re.search(r"\.self_attn\.(q_proj|o_proj)\.\d+\.", name):
        frac *= config.moa_top_k / config.moa_num_experts
    m = re.match(r"model\.layers\.(\d+)\.", name)
    if m and int(m.group(1)) in routed_layers and ".mod_router." not in name:
        is_attention = routed_layers[int(m.group(1))]
        if is_attention or ".feed_forward." in name or ".pre_ff_layernorm." in name:
            frac *= config.mod_capacity
    return frac


def summary(config: MoMConfig) -> dict:
    from mom.model.bitlinear import BitLinear
    from mom.model.model import MoMForCausalLM

    with torch.device("meta"):
        model = MoMForCausalLM(config)
    ternary_names = set()
    for mname, module in model.named_modules():
        if isinstance(module, BitLinear):
            ternary_names.add(f"{mname}.weight")
    routed = {i: config.is_attention_layer(i) for i in range(config.num_hidden_layers) if config.is_mod_layer(i)}
    total = active = embedding = ternary = ternary_io = 0
    n_ternary_layers = len(ternary_names)
    seen = set()
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in seen:
            continue
        seen.add(id(p))
        n = p.numel()
        total += n
        active += n * _active_fraction(name, config, routed)
        if name in ("model.embed_tokens.weight", "lm_head.weight"):
            embedding += n
            ternary_io += n if name in ternary_names else 0
        if name in ternary_names:
            ternary += n
    high = total - ternary
    weight_bytes = ternary * 2 / 8 + n_ternary_layers * 4 + high * 2
    return {
        "total_params": total,
        "active_params": int(round(active)),
        "active_body": int(round(active - embedding)),
        "active_share": active / total,
        "body_params": total - embedding,
        "ternary_params": ternary,
        "high_precision_params": high,
        "high_precision_share": high / total,
        "high_precision_share_body": (high - (embedding - ternary_io)) / max(1, total - embedding),
        "inference_weight_bytes": int(weight_bytes),
        "bf16_weight_bytes": total * 2,
    }


def training_flops_per_token(config: MoMConfig, seq_len: int, s: dict | None = None) -> dict:
    """Model FLOPs of one trained token (forward + backward = 3 x forward), the accounting MFU uses (PaLM's):

    - ``matmul``: 6 x the active parameters that multiply activations (:func:`summary`'s ``active_params`` less
      the input embedding, a lookup; a tied head counts once);
    - ``attention``: 12 x seq_len x (heads x head_dim) per attention layer (QK^T and AV over all ``seq_len``
      keys, the usual convention even though causal masking halves the useful work), times the Mixture-of-Depths
      capacity on routed attention layers;
    - ``scan``: 3 x (7 x d_inner x d_state + 2 x d_conv x d_inner) per Mamba layer (discretisation, state update
      and read-out of the selective scan, and the depthwise convolution).

    Recomputation (activation checkpointing) is not counted: MFU counts the model's FLOPs, not the hardware's.
    """
    s = s or summary(config)
    embedding = 0 if config.tie_word_embeddings else config.vocab_size * config.hidden_size
    matmul = 6 * (s["active_params"] - embedding)
    attention = scan = 0.0
    d_attn = config.num_attention_heads * config.head_dim
    d_inner, n = config.mamba_d_inner, config.mamba_d_state
    for i in range(config.num_hidden_layers):
        if config.is_attention_layer(i):
            capacity = config.mod_capacity if config.is_mod_layer(i) else 1.0
            attention += 12 * seq_len * d_attn * capacity
        else:
            scan += 3 * (7 * d_inner * n + 2 * config.mamba_d_conv * d_inner)
    total = matmul + attention + scan
    return {"matmul": float(matmul), "attention": float(attention), "scan": float(scan), "total": float(total)}


def format_summary(s: dict) -> str:
    def h(n):
        return f"{n / 1e9:.3f}B" if n >= 1e9 else f"{n / 1e6:.2f}M"

    rows = [
        ("total parameters", h(s["total_params"])),
        ("active per token", f"{h(s['active_params'])} ({s['active_share']:.1%})"),
        ("body (without embeddings and head)", h(s["body_params"])),
        ("active per token in the body", h(s["active_body"])),
        ("high precision / ternary", f"{h(s['high_precision_params'])} / {h(s['ternary_params'])} "
                                     f"({s['high_precision_share']:.1%} high precision)"),
        ("high precision share of the body", f"{s['high_precision_share_body']:.1%}"),
        ("inference weights (ternary at 2 bits)", f"{s['inference_weight_bytes'] / 2**20:.1f} MiB"
                                                  f" (bf16: {s['bf16_weight_bytes'] / 2**20:.1f} MiB)"),
    ]
    return "\n".join(["| quantity | value |", "|---|---|"] + [f"| {k} | {v} |" for k, v in rows])
