"""Parameter accounting (mom.model.summary) on the meta device."""

from __future__ import annotations

import pytest

from mom.model import MoMForCausalLM
from mom.model.summary import format_summary, summary
from tests.helpers.models import tiny_config


def count(config):
    return sum(p.numel() for p in MoMForCausalLM(config).parameters())


def test_dense_bf16_model_is_all_active_and_high_precision():
    cfg = tiny_config(num_experts=1, num_experts_per_tok=1)
    s = summary(cfg)
    assert s["total_params"] == count(cfg)
    assert s["active_params"] == s["total_params"]
    assert s["ternary_params"] == 0 and s["high_precision_share"] == 1.0
    assert s["inference_weight_bytes"] == 2 * s["total_params"]


def test_moe_experts_count_top_k_over_num_experts():
    cfg = tiny_config()  # 4 experts, top-2, in layers 1 and 3
    moe = MoMForCausalLM(cfg)
    expert_params = sum(p.numel() for n, p in moe.named_parameters() if ".experts." in n)
    s = summary(cfg)
    assert s["total_params"] - s["active_params"] == pytest.approx(expert_params / 2, abs=1)


def test_mod_and_moa_reduce_active_params():
    plain = summary(tiny_config())
    mixed = summary(tiny_config(mod=True, moa=True, mhmoe=True))
    assert mixed["active_share"] < plain["active_share"] < 1.0


def test_ternary_weights_count_two_bits():
    s = summary(tiny_config(precision="ternary"))
    assert s["ternary_params"] > 0
    assert s["inference_weight_bytes"] < 2 * s["high_precision_params"] + s["ternary_params"] / 4 + 4 * 200
    assert "ternary at 2 bits" in format_summary(s)


def test_summary_allocates_nothing():
    # momv4-sized: 1B parameters would need 4 GB if materialised
    from mom.model import MoMConfig

    cfg = MoMConfig(vocab_size=65536, hidden_size=1024, num_hidden_layers=14, num_attention_heads=32,
                    num_key_value_heads=8, attn_layer_period=6, attn_layer_offset=5, intermediate_size=4048,
                    num_experts=8, num_experts_per_tok=2, mamba_dt_rank=256, mod_enabled=True, mod_capacity=0.25,
                    moa_enabled=True, moa_num_experts=16, moa_top_k=4)
    import resource

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB
    s = summary(cfg)
    assert 0.9e9 < s["total_params"] < 1.2e9
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss < 1_000_000  # < 1 GiB, not 4 GB
