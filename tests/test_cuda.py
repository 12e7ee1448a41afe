"""The CUDA paths against their CPU references (``pytest -m cuda``; ``scripts/gpu_check.sh`` runs them). Each test
skips, with the reason, where there is no CUDA device (or no mamba-ssm for the kernel test)."""

from __future__ import annotations

import pytest
import torch

from tests.helpers.overrides import tiny_overrides

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (none on this machine)")]


def _scan_inputs(device: str, b: int = 2, d: int = 16, L: int = 300, n: int = 8) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    t = {"u": torch.randn(b, d, L, generator=g), "delta": torch.randn(b, d, L, generator=g) * 0.5,
         "A": -torch.exp(torch.randn(d, n, generator=g) * 0.5), "B": torch.randn(b, n, L, generator=g),
         "C": torch.randn(b, n, L, generator=g), "D": torch.randn(d, generator=g),
         "z": torch.randn(b, d, L, generator=g), "delta_bias": torch.randn(d, generator=g) * 0.3}
    return {k: v.to(device).requires_grad_() for k, v in t.items()}


def _scan_with_grads(impl: str, device: str) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    from mom.model.scan import selective_scan

    t = _scan_inputs(device)
    y = selective_scan(t["u"], t["delta"], t["A"], t["B"], t["C"], t["D"], t["z"], t["delta_bias"],
                       delta_softplus=True, impl=impl)
    y.backward(torch.ones_like(y))
    return y.detach().cpu(), {k: v.grad.cpu() for k, v in t.items()}


def test_pure_pytorch_scan_on_cuda_matches_the_cpu_reference():
    y_ref, g_ref = _scan_with_grads("reference", "cpu")
    y, g = _scan_with_grads("fast", "cuda")
    torch.testing.assert_close(y, y_ref, rtol=1e-4, atol=1e-4)
    for k in g_ref:
        torch.testing.assert_close(g[k], g_ref[k], rtol=1e-3, atol=1e-3, msg=k)


def test_selective_scan_cuda_kernel_matches_the_cpu_reference():
    from mom.model.scan import mamba_ssm_available

    if not mamba_ssm_available():
        pytest.skip("mamba-ssm is not installed (pip install -e '.[gpu]' --no-build-isolation, with nvcc)")
    y_ref, g_ref = _scan_with_grads("reference", "cpu")
    y, g = _scan_with_grads("cuda", "cuda")
    torch.testing.assert_close(y, y_ref, rtol=1e-3, atol=1e-3)
    for k in g_ref:
        torch.testing.assert_close(g[k], g_ref[k], rtol=1e-2, atol=1e-2, msg=k)


def test_packed_layers_on_cuda_match_bitlinear():
    from mom.model.bitlinear import BitLinear
    from mom.model.packed import PackedTernaryLinear

    torch.manual_seed(0)
    bl = BitLinear(256, 384, bias=False)
    packed = PackedTernaryLinear.from_bitlinear(bl).cuda()
    x = torch.randn(5, 256) * 3
    with torch.no_grad():
        ref, got = bl(x), packed(x.cuda()).cpu()
    assert float((got.float() - ref).norm() / ref.norm()) < 1e-2


def test_cached_generation_on_cuda_equals_full_recompute(compose):
    from mom.config import model_config
    from mom.model import MoMForCausalLM
    from mom.model.cache import MoMCache

    cfg = compose(tiny_overrides("unused"))
    torch.manual_seed(0)
    model = MoMForCausalLM(model_config(cfg.model, cfg.precision)).cuda().eval()
    ids = torch.randint(0, cfg.model.vocab_size, (2, 12), device="cuda")
    with torch.no_grad():
        full = model(ids).logits
        cache = MoMCache.for_config(model.config)
        steps = [model(ids[:, :5], cache=cache).logits]
        steps += [model(ids[:, t : t + 1], cache=cache).logits for t in range(5, 12)]
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=2e-3, atol=2e-3)


def test_one_bf16_mixed_training_step_is_finite(compose, train_fn, tmp_path):
    cfg = compose(tiny_overrides(tmp_path) + ["trainer.accelerator=gpu", "trainer.precision=bf16-mixed",
                                              "trainer.fast_dev_run=1"])
    metrics = train_fn(cfg)
    assert metrics["step"] == 1 and torch.isfinite(torch.tensor(metrics["train/loss"]))
