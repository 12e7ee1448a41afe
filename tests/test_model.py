"""Unit tests of the Jamba-MoM network on tiny dimensions: causality, gradients, mixtures vs references,
precision presets, persistence."""

from __future__ import annotations

import itertools

import pytest
import torch

from mom.model import PRECISION_PRESETS, MoMForCausalLM
from mom.model.attention import MixtureOfAttention
from mom.model.bitlinear import BitLinear
from mom.model.moe import MLP, MultiHeadMoE, SparseMoE
from tests.helpers.models import MIXTURES, V, build, tiny_config


@pytest.mark.parametrize("precision", list(PRECISION_PRESETS))
@pytest.mark.parametrize("mod,moa,mhmoe", MIXTURES)
def test_eval_mode_is_causal(mod, moa, mhmoe, precision):
    model = build(mod=mod, moa=moa, mhmoe=mhmoe, precision=precision).eval()
    ids = torch.randint(0, V, (2, 12))
    changed = ids.clone()
    changed[:, 7:] = torch.randint(0, V, (2, 5))
    with torch.no_grad():
        a, b = model(ids).logits, model(changed).logits
    torch.testing.assert_close(a[:, :7], b[:, :7], rtol=0, atol=1e-5)
    assert not torch.allclose(a[:, 7:], b[:, 7:])


@pytest.mark.parametrize("mod,moa,mhmoe", MIXTURES)
def test_gradients_reach_every_parameter(mod, moa, mhmoe):
    model = build(mod=mod, moa=moa, mhmoe=mhmoe, precision="attn_bf16").train()
    ids = torch.randint(0, V, (3, 16))
    out = model(ids, labels=ids)
    out.loss.backward()
    silent = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()
              or p.grad.abs().sum() == 0]
    assert not silent, f"no gradient for {silent}"
    assert torch.isfinite(out.loss)


def test_loss_is_lm_plus_weighted_aux():
    model = build(mod=True, moa=True, mhmoe=True).train()
    ids = torch.randint(0, V, (2, 16))
    out = model(ids, labels=ids)
    assert set(out.aux_losses) == {"moe_balance", "moa_balance", "moa_z", "mod_bce"}
    torch.testing.assert_close(out.loss, out.lm_loss + sum(out.aux_losses.values()))
    manual = torch.nn.functional.cross_entropy(out.logits[:, :-1].reshape(-1, V), ids[:, 1:].reshape(-1))
    torch.testing.assert_close(out.lm_loss, manual)
    assert 0 < float(out.stats["mod_selected_frac"]) <= 0.5 + 1e-6


def test_ignore_index_in_labels():
    model = build()
    ids = torch.randint(0, V, (2, 10))
    labels = ids.clone()
    labels[:, 5:] = -100
    out = model(ids, labels=labels)
    manual = torch.nn.functional.cross_entropy(out.logits[:, :4].reshape(-1, V), ids[:, 1:5].reshape(-1))
    torch.testing.assert_close(out.lm_loss, manual)


@pytest.mark.parametrize("moa", [False, True])
def test_mod_capacity_one_equals_block_without_mod(moa):
    ref = build(moa=moa).train()
    routed = MoMForCausalLM(tiny_config(mod=True, moa=moa, mod_capacity=1.0, mod_layer_period=1, mod_layer_offset=0))
    missing, unexpected = routed.load_state_dict(ref.state_dict(), strict=False)
    assert not unexpected and all("mod_router" in m for m in missing)
    with torch.no_grad():
        for layer in routed.model.layers:
            layer.mod_router.proj.bias.fill_(30.0)  # sigmoid = 1.0 in fp32: the update is unscaled
    routed.train()
    ids = torch.randint(0, V, (2, 11))
    torch.testing.assert_close(routed(ids).logits, ref(ids).logits, rtol=1e-5, atol=1e-5)


def test_mod_train_routes_exactly_capacity_tokens():
    model = build(mod=True, mod_capacity=0.25).train()
    out = model(torch.randint(0, V, (2, 16)))
    assert float(out.stats["mod_selected_frac"]) == pytest.approx(0.25)


def test_mod_skipped_tokens_are_untouched_by_the_block():
    model = build(mod=True, mod_layer_period=1, mod_layer_offset=0, num_hidden_layers=1, attn_layer_period=1,
                  attn_layer_offset=0).eval()
    block = model.model.layers[0]
    x = torch.randn(2, 9, 32)
    with torch.no_grad():
        selected, _ = block.mod_router.threshold(x, None)
        y, _, _ = block(x)
    assert selected.any() and (~selected).any()
    torch.testing.assert_close(y[~selected], x[~selected], rtol=0, atol=0)
    assert not torch.allclose(y[selected], x[selected])


def test_moa_equals_naive_loop():
    torch.manual_seed(0)
    cfg = tiny_config(moa=True, moa_num_experts=3, moa_top_k=2)
    moa = MixtureOfAttention(cfg).eval()
    with torch.no_grad():
        moa.router.weight.normal_(0, 1.0)
    x = torch.randn(2, 7, 32)
    with torch.no_grad():
        y, _, _ = moa(x)
        logits = moa.router(x).float()
        top_logits, top_i = torch.topk(logits, 2, -1)
        gates = torch.softmax(top_logits, -1)
        k = moa.k_proj(x).view(2, 7, 2, 8)  # (B, T, Hkv, hd)
        v = moa.v_proj(x).view(2, 7, 2, 8)
        ref = torch.zeros_like(x)
        for b in range(2):
            for t in range(7):
                for slot in range(2):
                    e = int(top_i[b, t, slot])
                    q = moa.q_proj[e](x[b, t]).view(2, 8)  # one query head per KV head
                    heads = []
                    for h in range(2):  # expert head h always meets KV head h
                        att = torch.softmax(k[b, : t + 1, h] @ q[h] / 8**0.5, 0)
                        heads.append(att @ v[b, : t + 1, h])
                    ref[b, t] += gates[b, t, slot] * moa.o_proj[e](torch.cat(heads))
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)


def test_sparse_moe_equals_naive_loop_and_one_expert_equals_mlp():
    torch.manual_seed(0)
    moe = SparseMoE(tiny_config())
    x = torch.randn(2, 5, 32)
    y, _, _ = moe(x)
    probs = torch.softmax(moe.router(x), -1)
    w, idx = torch.topk(probs, 2, -1)
    ref = torch.zeros_like(x)
    for b, t in itertools.product(range(2), range(5)):
        for s in range(2):
            ref[b, t] += w[b, t, s] * moe.experts[int(idx[b, t, s])](x[b, t])
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)

    one = SparseMoE(tiny_config(num_experts=1, num_experts_per_tok=1))
    mlp = one.experts[0]
    torch.testing.assert_close(one(x)[0], mlp(x), rtol=1e-6, atol=1e-6)  # softmax over one expert = 1


def test_mhmoe_equals_naive_loop_and_reduces_to_dense():
    torch.manual_seed(0)
    cfg = tiny_config(mhmoe=True, mhmoe_num_heads=2)
    layer = MultiHeadMoE(cfg)
    x = torch.randn(2, 5, 32)
    y, _, _ = layer(x)
    sub = layer.head_proj(x).reshape(2, 5, 2, 16)
    merged = torch.zeros_like(sub)
    for b, t, h in itertools.product(range(2), range(5), range(2)):
        probs = torch.softmax(layer.router(sub[b, t, h]), -1)
        w, idx = torch.topk(probs, 2)
        w = w / w.sum()
        for s in range(2):
            merged[b, t, h] += w[s] * layer.experts[int(idx[s])](sub[b, t, h])
    torch.testing.assert_close(y, layer.merge_proj(merged.reshape(2, 5, 32)), rtol=1e-5, atol=1e-5)

    dense_cfg = tiny_config(mhmoe=True, mhmoe_num_heads=1, num_experts=1, num_experts_per_tok=1)
    one = MultiHeadMoE(dense_cfg)
    with torch.no_grad():
        one.head_proj.weight.copy_(torch.eye(32))
        one.merge_proj.weight.copy_(torch.eye(32))
    torch.testing.assert_close(one(x)[0], one.experts[0](x), rtol=1e-6, atol=1e-6)
    assert isinstance(one.experts[0], MLP)


def test_aux_losses_are_finite_and_respond_to_imbalance():
    torch.manual_seed(0)
    cfg = tiny_config(moa=True)
    x = torch.randn(4, 16, 32) + 1.0  # positive mean: a router row of ones prefers its expert for every token
    for layer, name in ((SparseMoE(cfg), "moe_balance"), (MixtureOfAttention(cfg), "moa_balance")):
        with torch.no_grad():
            layer.router.weight.zero_()
        balanced = layer(x)[1][name]
        with torch.no_grad():
            layer.router.weight.zero_()
            layer.router.weight[0] = 1.0
        skewed = layer(x)[1][name]
        assert torch.isfinite(balanced) and torch.isfinite(skewed)
        assert float(balanced) == pytest.approx(1.0, abs=1e-4)  # uniform router: the loss's minimum
        assert float(skewed) > float(balanced) + 0.2, name
    moa = MixtureOfAttention(cfg)
    small = moa(x)[1]["moa_z"]
    with torch.no_grad():
        moa.router.weight.mul_(100)
    assert float(moa(x)[1]["moa_z"]) > float(small)


def test_mod_bce_responds_to_router_disagreement():
    model = build(mod=True).train()
    ids = torch.randint(0, V, (2, 16))
    agree = float(model(ids).aux_losses["mod_bce"])
    with torch.no_grad():
        for layer in model.model.layers:
            if layer.mod_router is not None:
                layer.mod_router.proj.bias.fill_(8.0)  # says "route" for every token, top-k keeps half
    assert float(model(ids).aux_losses["mod_bce"]) > agree


@pytest.mark.parametrize("precision", list(PRECISION_PRESETS))
def test_precision_presets_choose_layers_by_component(precision):
    model = build(mod=True, moa=True, precision=precision)
    kinds = PRECISION_PRESETS[precision]
    layer = model.model.layers[1]  # attention + MoE + MoD router
    assert isinstance(layer.self_attn.k_proj, BitLinear) == (kinds["attention"] == "ternary")
    assert isinstance(layer.self_attn.router, BitLinear) == (kinds["moa_router"] == "ternary")
    assert isinstance(layer.feed_forward.router, BitLinear) == (kinds["moe_router"] == "ternary")
    assert isinstance(layer.feed_forward.experts[0].up_proj, BitLinear) == (kinds["ffn"] == "ternary")
    assert isinstance(layer.mod_router.proj, BitLinear) == (kinds["mod_router"] == "ternary")
    assert isinstance(model.model.layers[0].mamba.in_proj, BitLinear) == (kinds["mamba"] == "ternary")
    assert isinstance(model.lm_head, BitLinear) == (kinds["lm_head"] == "ternary")
    assert not isinstance(model.model.embed_tokens, BitLinear)


def test_apply_precision_converts_existing_model():
    from mom.model import apply_precision

    model = build(moa=True)
    ids = torch.randint(0, V, (1, 8))
    apply_precision(model, PRECISION_PRESETS["attn_bf16"])
    assert model.config.precision["ffn"] == "ternary"
    assert isinstance(model.model.layers[1].feed_forward.experts[0].up_proj, BitLinear)
    assert not isinstance(model.model.layers[1].self_attn.k_proj, BitLinear)
    assert torch.isfinite(model(ids).logits).all()


def test_save_and_load_round_trip_is_exact(tmp_path):
    model = build(mod=True, moa=True, mhmoe=True, precision="attn_bf16").eval()
    model.save_pretrained(tmp_path)
    assert {p.name for p in tmp_path.iterdir()} == {"config.json", "model.safetensors"}
    loaded = MoMForCausalLM.from_pretrained(tmp_path)
    assert loaded.config == model.config
    for (n1, p1), (n2, p2) in zip(model.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert n1 == n2 and torch.equal(p1, p2), n1
    ids = torch.randint(0, V, (2, 9))
    with torch.no_grad():  # same weights (bit for bit above); a matmul on other memory may round differently
        torch.testing.assert_close(model(ids).logits, loaded(ids).logits, rtol=1e-6, atol=1e-6)


def test_tied_embeddings_round_trip(tmp_path):
    model = build(tie_word_embeddings=True).eval()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    model.save_pretrained(tmp_path)
    loaded = MoMForCausalLM.from_pretrained(tmp_path)
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    ids = torch.randint(0, V, (1, 5))
    with torch.no_grad():  # same weights (bit for bit above); a matmul on other memory may round differently
        torch.testing.assert_close(model(ids).logits, loaded(ids).logits, rtol=1e-6, atol=1e-6)


def test_bad_model_dirs_get_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        MoMForCausalLM.from_pretrained(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="config.json is missing"):
        MoMForCausalLM.from_pretrained(tmp_path)
    build().save_pretrained(tmp_path)
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(ValueError, match="model.safetensors is corrupt or truncated"):
        MoMForCausalLM.from_pretrained(tmp_path)


@pytest.mark.parametrize("key,value,match", [
    ("mod_capacity", 0.0, "mod_capacity"), ("mod_capacity", 1.5, "mod_capacity"),
    ("num_experts_per_tok", 5, "num_experts_per_tok"), ("num_attention_heads", 5, "num_attention_heads"),
    ("precision", {"attention": "int4"}, "precision.attention"), ("precision", {"encoder": "bf16"}, "precision.encoder"),
    ("scan_impl", "magic", "scan_impl"),
])
def test_bad_config_values_name_the_key(key, value, match):
    from mom.model import ConfigError

    with pytest.raises(ConfigError, match=match):
        tiny_config(**{key: value})


# ------------------------------------------------------------------ reference choices kept as config options
@pytest.mark.parametrize("normalize", [True, False])
def test_mhmoe_gates_renormalised_or_raw_as_configured(normalize):
    import torch.nn.functional as F

    from mom.model.experts import stable_top_k

    model = build(mhmoe=True, mhmoe_normalize_gates=normalize).eval()
    moe = next(m for m in model.modules() if isinstance(m, MultiHeadMoE))
    x = torch.randn(3, 5, 32)
    with torch.no_grad():
        got, _, _ = moe(x)
        sub = moe.head_proj(x).reshape(-1, moe.sub_dim)
        top_w, top_i = stable_top_k(F.softmax(moe.router(sub).float(), dim=-1), moe.top_k)
        if normalize:
            top_w = top_w / top_w.sum(-1, keepdim=True)
        y = sum(top_w[:, s:s + 1] * torch.stack([moe.experts[int(e)](r) for r, e in zip(sub, top_i[:, s], strict=True)])
                for s in range(moe.top_k))
        want = moe.merge_proj(y.reshape(x.shape))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_mhmoe_projection_bias_and_top1_balance_as_configured():
    from mom.model.config import ConfigError
    from mom.model.experts import load_balance_loss, stable_top_k

    plain = build(mhmoe=True)
    assert all(m.head_proj.bias is None and m.merge_proj.bias is None
               for m in plain.modules() if isinstance(m, MultiHeadMoE))
    model = build(mhmoe=True, mhmoe_proj_bias=True, mhmoe_balance="top1")
    moe = next(m for m in model.modules() if isinstance(m, MultiHeadMoE))
    assert moe.head_proj.bias.shape == (32,) and moe.merge_proj.bias.shape == (32,)
    x = torch.randn(2, 7, 32)
    _, aux, _ = moe(x)
    with torch.no_grad():
        probs = torch.softmax(moe.router(moe.head_proj(x).reshape(-1, moe.sub_dim)).float(), -1)
    first = stable_top_k(probs, moe.top_k)[1][:, 0]
    # E * sum_e (share of sub-tokens whose FIRST choice is e) * (mean probability of e)
    want = moe.num_experts * sum((first == e).float().mean() * probs[:, e].mean() for e in range(moe.num_experts))
    torch.testing.assert_close(aux["moe_balance"], want, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(aux["moe_balance"], load_balance_loss(probs, stable_top_k(probs, moe.top_k)[1]))
    with torch.no_grad():  # the bias is used: moving it moves the output; cached decoding follows
        torch.nn.init.normal_(moe.merge_proj.bias)
        prompt = torch.randint(3, V, (1, 8), generator=torch.Generator().manual_seed(1))
        assert torch.equal(model.eval().generate(prompt, 5), model.generate(prompt, 5, use_cache=False))
    with pytest.raises(ConfigError, match="mhmoe_balance"):
        tiny_config(mhmoe=True, mhmoe_balance="top2")


def test_mod_update_scale_sigmoid_or_raw_router_weight():
    from mom.model.config import ConfigError

    outs = {}
    for mode in ("sigmoid", "router"):
        model = build(mod=True, mod_update_scale=mode).eval()
        router = next(layer.mod_router for layer in model.model.layers if layer.mod_router is not None)
        logits = torch.tensor([-2.0, 0.5, 3.0])
        want = torch.sigmoid(logits) if mode == "sigmoid" else logits
        assert torch.equal(router.scale(logits), want)
        prompt = torch.randint(3, V, (2, 9), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            outs[mode] = model(prompt).logits
        # cached decoding (the engine) follows the same choice: greedy tokens equal the full recompute
        assert torch.equal(model.generate(prompt[:1], 6), model.generate(prompt[:1], 6, use_cache=False)), mode
    assert not torch.allclose(outs["sigmoid"], outs["router"])  # same weights, a different function
    with pytest.raises(ConfigError, match="mod_update_scale"):
        tiny_config(mod=True, mod_update_scale="tanh")


@pytest.mark.parametrize("precision", ["bf16", "attn_bf16"])
def test_bf16_autocast_trains_evaluates_and_decodes_with_mod(precision):
    """bf16-mixed (every GPU run): the blocks' updates come out in bf16 while the residual stream stays fp32, and
    MoD's scatter_add/index_add do not promote like ``+`` does. momv4's layout puts MoD on dense-MLP layers, where
    the update is bf16 (the first GPU run would have stopped at step 0)."""
    from mom.model.cache import MoMCache

    model = build(mod=True, moa=True, precision=precision, num_hidden_layers=6, attn_layer_period=6,
                  attn_layer_offset=5, expert_layer_period=2, expert_layer_offset=1, mod_layer_period=2,
                  mod_layer_offset=0)
    ids = torch.randint(0, V, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(ids, labels=ids).loss
        loss.backward()
        model.eval()
        with torch.no_grad():
            full = model(ids).logits
            cache = MoMCache.for_config(model.config)
            steps = [model(ids[:, :4], cache=cache).logits] + [model(ids[:, t:t + 1], cache=cache).logits
                                                                for t in range(4, 10)]
    assert torch.isfinite(loss) and all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    assert torch.cat(steps, 1).shape == full.shape and torch.isfinite(full).all()
