"""Cached decoding = full recompute, for every mixture combination and precision preset."""

from __future__ import annotations

import pytest
import torch

from mom.model import PRECISION_PRESETS
from mom.model.cache import MoMCache
from mom.model.generation import GenerationError
from tests.helpers.models import MIXTURES, V, build


@pytest.mark.parametrize("precision", list(PRECISION_PRESETS))
@pytest.mark.parametrize("mod,moa,mhmoe", MIXTURES)
def test_cached_steps_equal_full_forward(mod, moa, mhmoe, precision):
    # Ternary layers multiply integers (exact whatever the batch shape, see BitLinear) and routers break
    # ties by index (stable_top_k). What is left is float noise from high-precision layers of another shape
    # (prefill vs one-token step): in fp32 it can still push an activation across an int8 rounding boundary
    # of a following ternary layer, a float effect, not a cache bug. So presets with ternary layers are
    # checked in float64 (agreement ~1e-16), the bf16 preset in fp32; greedy tokens are checked in fp32 below.
    dtype = torch.float32 if precision == "bf16" else torch.float64
    model = build(mod=mod, moa=moa, mhmoe=mhmoe, precision=precision).eval().to(dtype)
    ids = torch.randint(0, V, (2, 14))
    with torch.no_grad():
        full = model(ids).logits
        cache = MoMCache.for_config(model.config)
        steps = [model(ids[:, :6], cache=cache).logits]
        for t in range(6, 14):
            steps.append(model(ids[:, t : t + 1], cache=cache).logits)
    stepped = torch.cat(steps, dim=1)
    rel = float((stepped - full).norm() / full.norm())
    assert rel <= 1e-4, rel
    torch.testing.assert_close(stepped, full, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("precision", list(PRECISION_PRESETS))
@pytest.mark.parametrize("mod,moa,mhmoe", MIXTURES)
def test_greedy_with_cache_equals_without(mod, moa, mhmoe, precision):
    model = build(mod=mod, moa=moa, mhmoe=mhmoe, precision=precision)
    prompt = torch.randint(3, V, (2, 5))
    cached = model.generate(prompt, max_new_tokens=10, use_cache=True)
    recomputed = model.generate(prompt, max_new_tokens=10, use_cache=False)
    assert cached.shape == (2, 15)
    assert torch.equal(cached, recomputed)


def test_left_padded_batch_equals_each_prompt_alone():
    model = build(mod=True, moa=True)
    a, b = torch.randint(3, V, (1, 7)), torch.randint(3, V, (1, 4))
    batch = torch.cat([a, torch.cat([torch.zeros(1, 3, dtype=torch.long), b], 1)])
    mask = torch.tensor([[1] * 7, [0] * 3 + [1] * 4])
    out = model.generate(batch, attention_mask=mask, max_new_tokens=6)
    for use_cache in (True, False):
        assert torch.equal(model.generate(batch, attention_mask=mask, max_new_tokens=6, use_cache=use_cache), out)
    assert torch.equal(out[0, 7:], model.generate(a, max_new_tokens=6)[0, 7:])
    assert torch.equal(out[1, 7:], model.generate(b, max_new_tokens=6)[0, 4:])


def test_mamba_state_is_constant_size_and_kv_only_for_attention_layers():
    model = build()
    cache = MoMCache.for_config(model.config)
    with torch.no_grad():
        model(torch.randint(0, V, (1, 8)), cache=cache)
        mamba_bytes = [cache.layers[i].nbytes() for i in (0, 2)]
        model(torch.randint(0, V, (1, 1)), cache=cache)
    assert [cache.layers[i].nbytes() for i in (0, 2)] == mamba_bytes
    assert cache.layers[1].k.shape[2] == 9 and cache.layers[3].k.shape[2] == 9


def test_sampling_is_seeded_and_respects_eos():
    model = build()
    prompt = torch.randint(3, V, (2, 4))
    g = lambda: torch.Generator().manual_seed(7)  # noqa: E731
    s1 = model.generate(prompt, max_new_tokens=8, do_sample=True, temperature=0.8, top_k=20, top_p=0.9, generator=g())
    s2 = model.generate(prompt, max_new_tokens=8, do_sample=True, temperature=0.8, top_k=20, top_p=0.9, generator=g())
    assert torch.equal(s1, s2)
    greedy = model.generate(prompt[:1], max_new_tokens=8)
    eos = int(greedy[0, 5])
    stopped = model.generate(prompt[:1], max_new_tokens=8, eos_token_id=eos)
    assert stopped.shape[1] == 6 and int(stopped[0, -1]) == eos


def test_bad_prompts_are_refused():
    model = build(max_position_embeddings=16)
    with pytest.raises(GenerationError, match="empty prompt"):
        model.generate(torch.zeros(1, 0, dtype=torch.long))
    with pytest.raises(GenerationError, match="longer than the model's trained context"):
        model.generate(torch.ones(1, 17, dtype=torch.long))
