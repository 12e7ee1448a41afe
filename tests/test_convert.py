"""transformers' Jamba -> MoM: same logits (fp32) and the same greedy tokens."""

from __future__ import annotations

import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")

from mom.convert import from_hf_jamba  # noqa: E402

CONFIGS = {
    "gqa_moe": dict(num_key_value_heads=2),
    "mha_dense_period3": dict(num_key_value_heads=4, num_experts=1, attn_layer_period=3, attn_layer_offset=0,
                              mamba_dt_rank=5, mamba_d_conv=3),
    "mqa_top1_offsets": dict(num_key_value_heads=1, num_experts=3, num_experts_per_tok=1, expert_layer_period=3,
                             expert_layer_offset=2, mamba_proj_bias=True, mamba_d_conv=2),
    "attn_first_every_layer_moe": dict(num_key_value_heads=2, attn_layer_period=4, attn_layer_offset=0,
                                       expert_layer_period=1, expert_layer_offset=0, mamba_expand=1),
}


def hf_jamba(seed=0, **kw):
    from transformers import JambaConfig, JambaForCausalLM

    defaults = dict(vocab_size=101, hidden_size=32, num_hidden_layers=4, num_attention_heads=4, intermediate_size=40,
                    num_experts=4, num_experts_per_tok=2, attn_layer_period=2, attn_layer_offset=1,
                    expert_layer_period=2, expert_layer_offset=1, mamba_d_state=8)
    defaults.update(kw)
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = JambaForCausalLM(JambaConfig(**defaults)).eval()
    with torch.no_grad():  # move away from the init so every weight matters
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model


@pytest.mark.parametrize("name", list(CONFIGS))
def test_logits_match_transformers_jamba(name):
    hf = hf_jamba(**CONFIGS[name])
    mom = from_hf_jamba(hf)
    ids = torch.randint(0, 101, (2, 13))
    with torch.no_grad():
        ref, out = hf(ids).logits, mom(ids).logits
    rel = float((out - ref).norm() / ref.norm())
    assert rel <= 1e-5, f"relative error {rel:.2e}"


@pytest.mark.parametrize("name", ["gqa_moe", "mha_dense_period3"])
def test_greedy_tokens_match_transformers_generate(name):
    hf = hf_jamba(seed=1, **CONFIGS[name])
    mom = from_hf_jamba(hf)
    prompt = torch.randint(3, 101, (1, 5))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = hf.generate(prompt, max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=0)
    ours = mom.generate(prompt, max_new_tokens=12)
    assert torch.equal(ours, ref), (ours.tolist(), ref.tolist())


def test_converted_model_is_high_precision_without_mixtures():
    mom = from_hf_jamba(hf_jamba(**CONFIGS["gqa_moe"]))
    cfg = mom.config
    assert not (cfg.mod_enabled or cfg.moa_enabled or cfg.mhmoe_enabled)
    assert set(cfg.precision.values()) == {"bf16"}
