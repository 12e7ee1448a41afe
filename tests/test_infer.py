"""The inference engine (mom.infer) against the reference network (mom.model): C++ kernels bit-identical to
BitLinear, engine decoding = full forward (native whole-step and per-layer paths), batched = one by one, skipped
work not done, the eager path without a compiler."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F

from mom.generate import left_pad
from mom.infer import kernels
from mom.infer.engine import Engine
from mom.infer.generate import generate
from mom.model.packed import PackedTernaryLinear, pack_model
from tests.helpers.models import MIXTURES, V, build, random_bitlinear

needs_kernels = pytest.mark.skipif(not kernels.available(), reason=f"C++ kernels: {kernels.why_unavailable()}")


def _bitlinear(fin, fout, bias, seed):
    return random_bitlinear(fin, fout, bias, seed).eval()


@needs_kernels
@pytest.mark.parametrize("fin,fout", [(8, 5), (48, 37), (64, 96), (130, 70), (256, 33), (384, 200), (1100, 9)])
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
@pytest.mark.parametrize("fin,fout", [(7, 5), (130, 70), (256, 260), (1100, 37)])  # every remainder of 16 / 8 / 1
def test_dense_kernels_match_f_linear(fin, fout):
    torch.manual_seed(fin)  # sums of ~256 unit products: fp32 summation order differs by ~1e-5
    w, b = torch.randn(fout, fin), torch.randn(fout)
    for m in (1, 3, 6):
        x = torch.randn(m, fin)
        torch.testing.assert_close(torch.ops.mom_infer.linear_f32(x, w, b), F.linear(x, w, b), rtol=1e-5, atol=1e-4)
        wb = w.bfloat16()
        torch.testing.assert_close(torch.ops.mom_infer.linear_bf16w(x, wb, None), F.linear(x, wb.float()),
                                   rtol=1e-5, atol=1e-4)
        # a row's result does not depend on the other rows (batched decoding = one by one): the one-row and the
        # four-row kernels sum in the same order, whichever thread takes the row
        q, scale = kernels.quantize_rows_int8(w)
        for op, args in ((torch.ops.mom_infer.linear_f32, (w, b)), (torch.ops.mom_infer.linear_bf16w, (wb, b)),
                         (torch.ops.mom_infer.linear_i8w, (q, scale, b))):
            assert torch.equal(op(x[1:2], *args), op(x, *args)[1:2]), op


@needs_kernels
@pytest.mark.parametrize("precision", ["bf16", "attn_bf16", "ternary"])
def test_engine_uses_kernels_and_equals_full_forward_when_packed(precision):
    model = pack_model(build(mod=True, moa=True, precision=precision)).eval()
    eng = Engine(model, native=False)  # the per-layer step: each linear layer on its kernel
    assert eng.use_kernels and sum(not isinstance(f, torch.nn.Module) for f in eng._lin.values()) > 10
    prompt = torch.randint(3, V, (1, 6))
    assert torch.equal(generate(model, prompt, 12, native=False), generate(model, prompt, 12, use_cache=False))


@pytest.mark.parametrize("mod,moa,mhmoe", [(False, False, False), (True, True, True)])
def test_batched_decoding_equals_one_by_one(mod, moa, mhmoe):
    model = build(mod=mod, moa=moa, mhmoe=mhmoe, precision="attn_bf16").eval()
    prompts = [torch.randint(3, V, (n,)) for n in (7, 3, 5)]
    n = max(len(p) for p in prompts)
    ids, mask = left_pad([p.tolist() for p in prompts], 0)
    out = generate(model, ids, 8, attention_mask=mask)
    for i, p in enumerate(prompts):
        assert torch.equal(out[i, n:], generate(model, p[None], 8)[0, len(p):]), i


def test_mod_skipped_token_costs_no_block_compute():
    model = build(mod=True, precision="bf16").eval()
    eng = Engine(model, native=False)  # the per-layer path (the native one: test_native_step_reads_only_...)
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


# ------------------------------------------------------------------------------------------ the native step
def _native_model(mod, moa, mhmoe, precision, packed, seed=0):
    # dt_rank 8: a ternary dt_proj with fewer than 8 inputs keeps the engine on its per-layer path
    model = build(seed=seed, mod=mod, moa=moa, mhmoe=mhmoe, precision=precision, mamba_dt_rank=8).eval()
    return pack_model(model).eval() if packed else model


@needs_kernels
@pytest.mark.parametrize("precision", ["bf16", "attn_bf16", "ternary"])
@pytest.mark.parametrize("mod,moa,mhmoe", MIXTURES)
def test_native_step_equals_full_forward(mod, moa, mhmoe, precision):
    for packed in (False, True):
        model = _native_model(mod, moa, mhmoe, precision, packed)
        eng = Engine(model)
        assert eng.native is not None, eng.native_why
        prompt = torch.randint(3, V, (1, 7), generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            ref = model(prompt).logits[0]
        cache = eng.get_cache(1, 16)
        got = eng.prefill(prompt, None, cache)  # the prompt as rows of one native call
        torch.testing.assert_close(got[0], ref[-1], rtol=1e-4, atol=1e-4)
        cache.reset()
        for t in range(prompt.shape[1]):  # token by token through the decode call
            logits = eng.step(prompt[:, t], cache)
            torch.testing.assert_close(logits[0], ref[t], rtol=1e-4, atol=1e-4)
        out = generate(model, prompt, 10)
        assert torch.equal(out, generate(model, prompt, 10, use_cache=False)), (packed, precision)


@needs_kernels
@pytest.mark.parametrize("precision", ["bf16", "ternary"])
def test_native_and_per_layer_steps_with_the_mhmoe_authors_options(precision):
    """MH-MoE with biased head/merge projections and raw gates (model.mhmoe_proj_bias, mhmoe_normalize_gates)."""
    from mom.model.moe import MultiHeadMoE

    model = build(seed=4, mhmoe=True, mhmoe_proj_bias=True, mhmoe_normalize_gates=False, precision=precision,
                  mamba_dt_rank=8).eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, MultiHeadMoE):
                torch.nn.init.normal_(m.head_proj.bias)
                torch.nn.init.normal_(m.merge_proj.bias)
    for m in (model, pack_model(model).eval()) if precision == "ternary" else (model,):
        prompt = torch.randint(3, V, (1, 6), generator=torch.Generator().manual_seed(5))
        with torch.no_grad():
            ref = m(prompt).logits[0]
        for native in (True, False):
            eng = Engine(m, native=native)
            assert (eng.native is not None) == native, eng.native_why
            cache = eng.get_cache(1, 8)
            cache.reset()
            for t in range(prompt.shape[1]):
                torch.testing.assert_close(eng.step(prompt[:, t], cache)[0], ref[t], rtol=1e-4, atol=1e-4)


@needs_kernels
@pytest.mark.parametrize("mod,moa,mhmoe", [(False, False, False), (True, True, True), (True, False, True)])
def test_native_prefill_and_batched_decoding_with_padding(mod, moa, mhmoe):
    model = _native_model(mod, moa, mhmoe, "ternary", packed=True, seed=3)
    assert Engine(model).native is not None
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(3, V, (n,), generator=g) for n in (7, 2, 5, 1)]
    n = max(len(p) for p in prompts)
    ids, mask = left_pad([p.tolist() for p in prompts], 0)
    out = generate(model, ids, 6, attention_mask=mask)
    ref = generate(model, ids, 6, attention_mask=mask, use_cache=False)
    assert torch.equal(out, ref)
    for i, p in enumerate(prompts):
        assert torch.equal(out[i, n:], generate(model, p[None], 6)[0, len(p):]), i


@needs_kernels
def test_native_greedy_loop_equals_the_python_loop_with_eos_and_padding():
    """generate's greedy decoding runs in C++ after the first token (Program.greedy); a streamer keeps the
    Python loop (one Engine.step a token). Same tokens, eos ending sequences at different steps."""
    model = _native_model(True, True, False, "ternary", packed=True, seed=6)
    g = torch.Generator().manual_seed(3)
    ids, mask = left_pad([torch.randint(3, V, (n,), generator=g).tolist() for n in (5, 3, 6)], 0)
    free = generate(model, ids, 12, attention_mask=mask)
    eos = int(free[1, ids.shape[1] + 2])  # sequence 1 stops at its third new token, the others maybe later
    stats: dict = {}
    fast = generate(model, ids, 12, attention_mask=mask, eos_token_id=eos, stats=stats)
    slow = generate(model, ids, 12, attention_mask=mask, eos_token_id=eos, streamer=lambda t: None)
    assert torch.equal(fast, slow) and stats["new_tokens"] == fast.shape[1] - ids.shape[1]
    assert torch.equal(fast, generate(model, ids, 12, attention_mask=mask, eos_token_id=eos, use_cache=False))
    assert (fast[1, ids.shape[1] + 3:] == 0).all()  # padding after sequence 1's eos
    assert torch.equal(free, generate(model, ids, 12, attention_mask=mask, streamer=lambda t: None))


@needs_kernels
def test_native_decode_tokens_equals_one_step_a_token():
    model = _native_model(True, False, True, "ternary", packed=True, seed=7)
    eng = Engine(model)
    prompt = torch.randint(3, V, (2, 4), generator=torch.Generator().manual_seed(8))
    feed = torch.randint(3, V, (5, 2), generator=torch.Generator().manual_seed(9))
    cache = eng.get_cache(2, 12)
    eng.prefill(prompt, None, cache)
    for t in feed:
        want = eng.step(t, cache)
    assert cache.length == 9
    eng.prefill(prompt, None, cache)
    got = eng.native.decode_tokens(feed, cache)
    assert cache.length == 9 and torch.equal(got, want)
    with pytest.raises(ValueError, match="full"):
        eng.native.decode_tokens(feed, cache)


@needs_kernels
def test_native_step_reads_only_the_weights_it_uses():
    model = _native_model(True, True, False, "bf16", packed=False)  # plain MoE: a token reads 2 of 4 experts
    skipped_at = [i for i, m in enumerate(model.model.layers) if m.mod_router is not None and m.is_attention]
    assert skipped_at

    def one_step(bias: float):
        for i in skipped_at:  # the routed attention blocks take (bias > 0) or skip every token
            with torch.no_grad():
                model.model.layers[i].mod_router.proj.weight.zero_()
                model.model.layers[i].mod_router.proj.bias.fill_(bias)
        eng = Engine(model)
        cache = eng.get_cache(1, 8)
        cache.reset()
        eng.step(torch.tensor([5]), cache)
        return eng.native.program.weight_bytes_read(), cache

    routed, _ = one_step(1.0)
    experts = sum(p.numel() * 4 for n, p in model.named_parameters() if ".experts." in n)
    total = sum(m.weight.numel() * 4 for m in model.modules() if isinstance(m, torch.nn.Linear))
    assert routed <= total - experts / 2  # top-2 of 4 experts: half of the experts' weights are not read
    skipped, cache = one_step(-1.0)
    block_bytes = sum(p.numel() * 4 for i in skipped_at for n, p in model.model.layers[i].named_parameters()
                      if p.dim() == 2 and "mod_router" not in n and ".experts." not in n)
    assert skipped <= routed - block_bytes  # a skipped block reads nothing but its router
    assert not any(bool(cache.layers[i].valid[0, 0]) for i in skipped_at)  # and its token is not a key


@needs_kernels
def test_native_step_declines_what_it_cannot_run():
    model = build(precision="ternary").eval()  # dt_rank 2: a ternary layer with 2 inputs
    eng = Engine(model)
    assert eng.native is None and "fewer than 8" not in eng.native_why and "2 inputs" in eng.native_why
    prompt = torch.randint(3, V, (1, 5))
    assert torch.equal(generate(model, prompt, 6), generate(model, prompt, 6, use_cache=False))


@needs_kernels
def test_int8_high_precision_equals_the_forward_of_its_dequantised_weights():
    """high_precision="int8": each plain linear layer read as int8 rows with one scale a row; both steps equal
    the reference forward of a copy whose weights are the dequantised ones (q * scale)."""
    import copy

    from mom.infer.kernels import quantize_rows_int8

    x, w, b = torch.randn(3, 70), torch.randn(37, 70), torch.randn(37)
    q, scale = quantize_rows_int8(w)
    assert q.dtype == torch.int8 and int(q.abs().max()) == 127 and float((q.float() * scale[:, None] - w).abs().max()) < 0.03
    torch.testing.assert_close(torch.ops.mom_infer.linear_i8w(x, q, scale, b), F.linear(x, q.float() * scale[:, None], b),
                               rtol=1e-5, atol=1e-5)
    model = _native_model(True, True, True, "ternary", packed=True)
    deq = copy.deepcopy(model)
    with torch.no_grad():
        for m in deq.modules():
            if type(m) is torch.nn.Linear:
                q, scale = quantize_rows_int8(m.weight)
                m.weight.copy_(q.float() * scale[:, None])
    prompt = torch.randint(3, V, (1, 6), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        ref, fp32 = deq(prompt).logits[0], model(prompt).logits[0]
    assert not torch.allclose(ref, fp32, rtol=1e-4, atol=1e-4)  # the head really is rounded
    for native in (None, False):
        eng = Engine(model, native=native, high_precision="int8")
        assert (eng.native is not None) == (native is None)
        cache = eng.get_cache(1, 8)
        for t in range(prompt.shape[1]):
            torch.testing.assert_close(eng.step(prompt[:, t], cache)[0], ref[t], rtol=1e-4, atol=1e-4)


@needs_kernels
def test_bf16_high_precision_weights_close_to_fp32():
    model = _native_model(True, True, True, "ternary", packed=True)  # the preset keeps lm_head "bf16"
    prompt = torch.randint(3, V, (1, 6), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        ref = model(prompt).logits[0, -1]
    for native in (None, False):
        eng = Engine(model, native=native, high_precision="bf16")
        assert (eng.native is not None) == (native is None)
        cache = eng.get_cache(1, 8)
        got = eng.prefill(prompt, None, cache)[0] if native is None else None
        if got is None:
            cache.reset()
            for t in range(prompt.shape[1]):
                got = eng.step(prompt[:, t], cache)[0]
        err = float((got - ref).abs().max())
        assert 0 < err < 0.05 * float(ref.abs().max()), err  # rounded (not equal) but close
    with pytest.raises(ValueError, match="high_precision"):
        Engine(model, high_precision="fp16")


@pytest.mark.slow
@needs_kernels
def test_compiled_per_layer_step_equals_eager_and_full_forward():
    # torch.compile (Inductor, C++ on CPU) of the per-layer step; the native step is compiled code already
    model = build(mod=True, moa=True, mhmoe=True, precision="attn_bf16", mamba_dt_rank=8).eval()
    prompt = torch.randint(3, V, (1, 5), generator=torch.Generator().manual_seed(5))
    stats: dict = {}
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # a failed compilation falls back with one: fail instead
        out = generate(model, prompt, 8, native=False, compile=True, stats=stats)
    assert stats["compile_s"] > 0 and not stats["native"]
    assert torch.equal(out, generate(model, prompt, 8, native=False))
    assert torch.equal(out, generate(model, prompt, 8, use_cache=False))
    native: dict = {}
    generate(model, prompt, 8, compile=True, stats=native)
    assert native["native"] and native["compile_s"] == 0.0  # nothing to compile
