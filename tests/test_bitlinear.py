"""BitLinear (BitNet b1.58 QAT): quantisers, straight-through gradients, factory and converter."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mom.model.bitlinear import BitLinear, act_quant, convert_linear, make_linear, ternarize
from mom.model.norm import RMSNorm
from tests.helpers.models import random_bitlinear


def _layer(fin=48, fout=40, bias=True, seed=0):
    return random_bitlinear(fin, fout, bias, seed)


def _reference(m: BitLinear, x: torch.Tensor) -> torch.Tensor:
    """The textbook formula, with STE via x + (q(x) - x).detach(), written independently of bitlinear.py."""
    xn = m.norm(x)
    s = 127.0 / xn.detach().abs().amax(-1, keepdim=True).clamp(min=1e-5)
    xq = (xn.detach() * s).round().clamp(-128, 127) / s
    gamma = m.weight.detach().abs().mean().clamp(min=1e-5)
    wq = (m.weight.detach() / gamma).round().clamp(-1, 1) * gamma
    x_ste = xn + (xq - xn).detach()
    w_ste = m.weight + (wq - m.weight).detach()
    return F.linear(x_ste, w_ste, m.bias)


def test_state_dict_keys_are_linear_plus_norm():
    m = BitLinear(8, 4, bias=True)
    assert set(m.state_dict()) == {"weight", "bias", "norm.weight"}
    assert isinstance(m, nn.Linear) and isinstance(m.norm, RMSNorm)
    assert set(BitLinear(8, 4).state_dict()) == {"weight", "norm.weight"}


def test_effective_weight_is_ternary_times_mean_abs():
    m = _layer()
    w_eff = m.effective_weight()
    gamma = m.weight.detach().abs().mean()
    levels = torch.unique(w_eff.detach())
    assert set((levels / gamma).round().tolist()) <= {-1.0, 0.0, 1.0}
    assert torch.allclose(levels.abs().max(), gamma)
    torch.testing.assert_close(w_eff.detach() / gamma, (w_eff.detach() / gamma).round(), rtol=0, atol=1e-6)
    t, g = m.quantized_weight()
    assert t.dtype == torch.int8 and set(t.unique().tolist()) <= {-1, 0, 1}
    torch.testing.assert_close(g, gamma)
    torch.testing.assert_close(t.float() * g, w_eff.detach(), rtol=0, atol=0)
    # all three levels are used by a Gaussian weight
    assert set(t.unique().tolist()) == {-1, 0, 1}
    # the straight-through estimator passes the gradient to the latent weight
    (w_eff * torch.arange(w_eff.numel()).view_as(w_eff)).sum().backward()
    torch.testing.assert_close(m.weight.grad, torch.arange(w_eff.numel()).view_as(w_eff).float())


def test_weight_scale_clamped_for_zero_weight():
    t, g = ternarize(torch.zeros(3, 5))
    assert float(g) == pytest.approx(1e-5) and torch.all(t == 0)


def test_activations_on_int8_grid():
    m = _layer()
    x = torch.randn(4, 7, 48) * 5
    fed = {}

    real_linear = F.linear

    def spy(inp, w, b=None):
        fed["x"], fed["w"] = inp.detach().clone(), w.detach().clone()
        return real_linear(inp, w, b)

    F.linear, saved = spy, F.linear
    try:
        m(x)
    finally:
        F.linear = saved
    # the matmul runs on the integer grid values (exact sums); the scales are applied after it
    x_int = fed["x"]
    xn = m.norm(x).detach()
    s = 127.0 / xn.abs().amax(-1, keepdim=True).clamp(min=1e-5)
    torch.testing.assert_close(x_int, x_int.round(), rtol=0, atol=0)
    assert x_int.min() >= -128 and x_int.max() <= 127
    assert (x_int.abs().amax(-1) == 127).all()  # the absmax element lands on the grid edge
    torch.testing.assert_close(x_int, (xn * s).round(), rtol=0, atol=0)
    t, gamma = m.quantized_weight()
    assert torch.equal(fed["w"], t.float())
    torch.testing.assert_close(fed["w"] * gamma, m.effective_weight().detach())
    # act_quant of a tiny vector: the scale clamp keeps it finite
    assert torch.isfinite(act_quant(torch.full((1, 4), 1e-9))).all()


def test_forward_matches_manual_computation():
    m = _layer()
    x = torch.randn(2, 5, 48)
    y = m(x)
    # manual: RMSNorm -> absmax int8 -> ternary weights -> linear
    xf = x.float()
    xn = m.norm.weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + m.norm.eps))
    s = 127.0 / xn.abs().amax(-1, keepdim=True).clamp(min=1e-5)
    xq = (xn * s).round().clamp(-128, 127) / s
    gamma = m.weight.abs().mean()
    wq = (m.weight / gamma).round().clamp(-1, 1) * gamma
    ref = xq @ wq.T + m.bias
    torch.testing.assert_close(y, ref.detach(), rtol=1e-5, atol=1e-5)
    assert y.shape == (2, 5, 40) and y.dtype == torch.float32


@pytest.mark.parametrize("bias", [False, True])
def test_ste_gradients_match_reference(bias):
    m = _layer(bias=bias)
    x = torch.randn(3, 6, 48, requires_grad=True)
    gy = torch.randn(3, 6, 40)
    m(x).backward(gy)
    params = [x, m.weight, m.norm.weight] + ([m.bias] if bias else [])
    got = [p.grad.clone() for p in params]
    for p in params:
        p.grad = None
    _reference(m, x).backward(gy)
    for g, p in zip(got, params, strict=True):
        assert g is not None and g.abs().sum() > 0
        torch.testing.assert_close(g, p.grad, rtol=1e-4, atol=1e-5 * float(p.grad.abs().max()))


def test_autocast_bf16_matmul_and_fp32_quantisation():
    m = _layer()
    x = torch.randn(4, 48, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = m(x)
    assert y.dtype == torch.bfloat16
    ref = m(x.detach())
    torch.testing.assert_close(y.float(), ref.detach(), rtol=2e-2, atol=2e-2)
    y.float().sum().backward()
    assert x.grad.dtype == torch.float32 and m.weight.grad.dtype == torch.float32
    assert m.norm.weight.grad is not None and m.bias.grad.dtype == torch.float32


def test_bf16_params_without_autocast():
    m = _layer().to(torch.bfloat16)
    x = torch.randn(4, 48, dtype=torch.bfloat16, requires_grad=True)
    y = m(x)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert x.grad.dtype == torch.bfloat16 and m.weight.grad.dtype == torch.bfloat16


def test_make_linear_kinds():
    lin = make_linear(8, 4, bias=True, kind="bf16")
    assert type(lin) is nn.Linear and lin.bias is not None
    bit = make_linear(8, 4, kind="ternary")
    assert isinstance(bit, BitLinear) and bit.bias is None
    with pytest.raises(ValueError, match="int4"):
        make_linear(8, 4, kind="int4")


def test_convert_linear_round_trip():
    torch.manual_seed(0)
    lin = nn.Linear(16, 8, bias=True)
    bit = convert_linear(lin, "ternary")
    assert isinstance(bit, BitLinear) and bit.weight is lin.weight and bit.bias is lin.bias
    torch.testing.assert_close(bit.norm.weight, torch.ones(16))
    x = torch.randn(3, 16)
    y = bit(x)
    assert y.shape == (3, 8)
    # a shared Parameter: the converted layer trains the same tensor
    y.sum().backward()
    assert lin.weight.grad is not None
    back = convert_linear(bit, "bf16")
    assert type(back) is nn.Linear and back.weight is lin.weight and back.bias is lin.bias
    torch.testing.assert_close(back(x), lin(x))
    assert convert_linear(bit, "ternary") is bit
    with pytest.raises(ValueError, match="fp8"):
        convert_linear(lin, "fp8")
    # load/save compatible with nn.Linear plus the norm
    fresh = BitLinear(16, 8, bias=True)
    missing, unexpected = fresh.load_state_dict(lin.state_dict(), strict=False)
    assert missing == ["norm.weight"] and unexpected == []
