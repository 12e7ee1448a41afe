"""The inference engine (mom.infer) against the reference network (mom.model): C++ kernels bit-identical to
BitLinear, engine decoding = full forward, batched = one by one, the eager path without a compiler."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F

from mom.infer import kernels
from mom.infer.engine import Engine
from mom.infer.generate import generate
from mom.model.packed import PackedTernaryLinear, pack_model
from tests.helpers.models import V, build, random_bitlinear

needs_kernels = pytest.mark.skipif(not kernels.available(), reason=f"C++ kernels: {kernels.why_unavailable()}")


def _bitlinear(fin, fout, bias, seed):
    return random_bitlinear(fin, fout, bias, seed).eval()


@needs_kernels
@pytest.mark.parametrize("fin,fout", [(8, 5), (64, 96), (130, 70), (256, 33), (384, 200)])
def test_ternary_kernel_bit_identical_to_bitlinear(fin, fout):
    for bias in (False, True):
        bl = _bitlinear(fin, fout, bias, seed=fin + fout)
        p = PackedTernaryLinear.from_bitlinear(bl)
        for m in (1, 2, 5, 9):
            x = torch.randn(m, fin) * 3
            with torch.no_grad():
                ref = bl(x)
            got = torch.ops.mom_infer.ternary_linear(x, p.packed_weight, p.norm.weight, p.norm.eps, p.weight_scale,
                                                     p.bias)
            assert torch.equal(got, ref), (fin, fout, bias, m, float((got - ref).abs().max()))


@needs_kernels
@pytest.mark.parametrize("fin,fout", [(7, 5), (130, 70), (256, 260)])
def test_dense_kernels_match_f_linear(fin, fout):
    w, b = torch.randn(fout, fin), torch.randn(fout)
    for m in (1, 3, 6):
        x = torch.randn(m, fin)
        torch.testing.assert_close(torch.ops.mom_infer.linear_f32(x, w, b), F.linear(x, w, b), rtol=1e-5, atol=1e-5)
        wb = w.bfloat16()
        torch.testing.assert_close(torch.ops.mom_infer.linear_bf16w(x, wb, None), F.linear(x, wb.float()),
                                   rtol=1e-5, atol=1e-5)
        # a row's result does not depend on the other rows (batched decoding = one by one)
        assert torch.equal(torch.ops.mom_infer.linear_f32(x[1:2], w, b), torch.ops.mom_infer.linear_f32(x, w, b)[1:2])


@needs_kernels
@pytest.mark.parametrize("precision", ["bf16", "attn_bf16", "ternary"])
def test_engine_uses_kernels_and_equals_full_forward_when_packed(precision):
    model = pack_model(build(mod=True, moa=True, precision=precision)).eval()
    eng = Engine(model)
    assert eng.use_kernels and sum(not isinstance(f, torch.nn.Module) for f in eng._lin.values()) > 10
    prompt = torch.randint(3, V, (1, 6))
    assert torch.equal(generate(model, prompt, 12), generate(model, prompt, 12, use_cache=False))


@pytest.mark.parametrize("mod,moa,mhmoe", [(False, False, False), (True, True, True)])
def test_batched_decoding_equals_one_by_one(mod, moa, mhmoe):
    model = build(mod=mod, moa=moa, mhmoe=mhmoe, precision="attn_bf16").eval()
    prompts = [torch.randint(3, V, (n,)) for n in (7, 3, 5)]
    n = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), n, dtype=torch.long)
    mask = torch.zeros(len(prompts), n, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, n - len(p):], mask[i, n - len(p):] = p, 1
    out = generate(model, ids, 8, attention_mask=mask)
    for i, p in enumerate(prompts):
        assert torch.equal(out[i, n:], generate(model, p[None], 8)[0, len(p):]), i


def test_mod_skipped_token_costs_no_block_compute():
    model = build(mod=True, precision="bf16").eval()
    eng = Engine(model)
    calls = []
    for layer in model.model.layers:
        if layer.mod_router is not None and layer.is_attention:
            with torch.no_grad():  # this block's router now skips every token
                layer.mod_router.proj.weight.zero_()
                layer.mod_router.proj.bias.fill_(-1.0)
            q = layer.self_attn.q_proj
            eng._lin[id(q)] = (lambda f: (lambda x: calls.append(1) or f(x)))(eng._lin[id(q)])
    cache = eng.get_cache(1, 8)
    cache.reset()
    for t in range(3):
        eng.step(torch.tensor([t + 3]), cache)
    assert calls == [] and cache.length == 3
    assert not cache.layers[1].valid[0, :3].any()


def test_without_a_compiler_generation_still_works_and_says_why(monkeypatch):
    model = build(mod=True, precision="ternary").eval()
    prompt = torch.randint(3, V, (1, 5))
    monkeypatch.setenv("CXX", "/nonexistent/c++")
    kernels.reset()
    try:
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            out = generate(model, prompt, 8, use_kernels=None)
        msgs = [str(w.message) for w in seen if "C++ kernels unavailable" in str(w.message)]
        assert len(msgs) == 1 and "no C++ compiler found" in msgs[0] and "slower" in msgs[0]
        assert not Engine(model).use_kernels
        assert torch.equal(out, generate(model, prompt, 8, use_cache=False))
    finally:
        monkeypatch.undo()
        kernels.reset()
        kernels.available()
