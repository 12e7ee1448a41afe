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
