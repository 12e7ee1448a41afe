"""BitNet b1.58 quantisation-aware linear layer and the linear-layer factory.

``BitLinear`` keeps full-precision latent weights (``weight``/``bias`` exactly as ``nn.Linear``, plus the
SubLN gain ``norm.weight``) and in ``forward`` computes::

    x_n = RMSNorm(x)                                    # inside the layer, before quantisation (SubLN)
    s   = 127 / max(|x_n|, 1e-5)            per token   # absmax activation quantisation, int8 grid
    x_q = clamp(round(x_n * s), -128, 127) / s
    g   = max(mean|W|, 1e-5)                per tensor
    W_q = clamp(round(W / g), -1, 1) * g                # ternary weights {-1, 0, 1} * g
    y   = x_q @ W_q^T + b

with straight-through estimators for both quantisers (``d x_q / d x_n = 1``, ``d W_q / d W = 1``), i.e. the
gradients of ``x + (q(x) - x).detach()``. The quantisation and the matmul are fused in one autograd
``Function`` (:class:`_BitLinearFn`): the forward values fed to the matmul are exactly on the grids (the
``x + (q - x)`` formula would be off by one rounding), only the quantised operands are saved for backward and
no graph is built for the quantisers. Quantisation math is always fp32; under ``torch.autocast`` the matmul
(forward and backward) runs in the autocast dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mom.model.norm import RMSNorm

LINEAR_KINDS = ("bf16", "ternary")

_ACT_EPS = 1e-5
_WEIGHT_EPS = 1e-5


# --------------------------------------------------------------------------- quantisers (fp32, no autograd)
def _fp32_or_wider(t: torch.Tensor) -> torch.Tensor:
    """Quantisation math runs in fp32, or fp64 for an fp64 model (used to test exactness without float noise)."""
    return t if t.dtype == torch.float64 else t.float()


def weight_scale(w: torch.Tensor) -> torch.Tensor:
    """gamma = mean|W| (per tensor), clamped at 1e-5; fp32 0-dim tensor."""
    w = _fp32_or_wider(w.detach())
    # (torch.linalg.vector_norm is unvectorised on CPU for ord=1/inf: ~5-20x slower than abs().sum())
    return w.abs().sum().div_(max(w.numel(), 1)).clamp_min_(_WEIGHT_EPS)


def ternarize(w: torch.Tensor, gamma: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(clamp(round(W / gamma), -1, 1) as fp32 values in {-1, 0, 1}, gamma)."""
    w = _fp32_or_wider(w.detach())
    if gamma is None:
        gamma = weight_scale(w)
    t = torch.div(w, gamma)
    t.round_().clamp_(-1.0, 1.0)
    return t, gamma


def act_quant_int(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token absmax quantisation of the last dim to the int8 grid.

    Returns ``(x_int, s)``: ``x_int`` fp32 with integer values in [-128, 127] and the per-token scale
    ``s = 127 / max|x|`` (shape ``x.shape[:-1] + (1,)``), so the dequantised activation is ``x_int / s``.
    """
    x = _fp32_or_wider(x.detach())
    amax = torch.maximum(x.amax(-1, keepdim=True), x.amin(-1, keepdim=True).neg_()).clamp_min_(_ACT_EPS)
    s = torch.div(127.0, amax)
    x_int = torch.mul(x, s)
    x_int.round_().clamp_(-128.0, 127.0)
    return x_int, s


def act_quant(x: torch.Tensor) -> torch.Tensor:
    """Dequantised per-token int8-grid activations ``clamp(round(x * s), -128, 127) / s`` (fp32, no grad)."""
    x_int, s = act_quant_int(x)
    return x_int.div_(s)


class _STE(torch.autograd.Function):
    """Returns ``q`` exactly; the gradient flows to ``x`` unchanged (straight-through)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, q: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return q

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # noqa: D102
        return grad, None


def ste(x: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Value ``q``, gradient of ``x`` (the same gradients as ``x + (q - x).detach()``)."""
    return _STE.apply(x, q.to(x.dtype))


def quantize_input(x: torch.Tensor, norm_weight: torch.Tensor, eps: float):
    """RMSNorm (gain ``norm_weight``) then per-token absmax quantisation to the int8 grid, computed so that
    the integers do not depend on anything but the token itself.

    Mathematically ``x_int = round(xn * 127 / max|xn|)`` with ``xn = norm_weight * x * r``, ``r = rsqrt(mean
    x^2 + eps)``. The factor ``r`` cancels, so it is left out of the rounding: ``x_int = round(y * 127 /
    max|y|)``, ``y = norm_weight * x``, which uses only elementwise ops and an (exact) max. The mean over the
    row, whose last bits depend on how a kernel splits the batch, only scales the output. That matters:
    chained ternary layers put activations exactly on rounding boundaries (ratios of integers), where such
    noise would choose the side, and a token would round differently alone (decoding) than in a batch.

    Returns ``(x_int, inv_s, xhat, r)``: the dequantised activation is ``x_int * inv_s`` (``inv_s = 1 / s``,
    ``s = 127 / max|xn|`` clamped as in ``act_quant_int``), ``xhat = x * r`` (for the backward)."""
    xf = _fp32_or_wider(x)
    r = torch.linalg.vector_norm(xf, 2, dim=-1, keepdim=True).square_().div_(x.shape[-1]).add_(eps).rsqrt_()
    y = xf * norm_weight.to(xf.dtype)
    amax = torch.maximum(y.amax(-1, keepdim=True), y.amin(-1, keepdim=True).neg_())
    scale_y = torch.div(127.0, torch.maximum(amax, _ACT_EPS / r))  # = s / r
    x_int = y.mul_(scale_y).round_().clamp_(-128.0, 127.0)
    return x_int, r / scale_y, xf * r, r


# --------------------------------------------------------------------------- fused quantise + matmul
def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    dev = x.device.type
    if torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return x.dtype


class _BitLinearFn(torch.autograd.Function):
    """Fused RMSNorm -> act_quant -> ternary linear with straight-through gradients.

    Numerically the same as ``RMSNorm(x)`` (``mom.model.norm``: fp32 normalisation, cast back to the input
    dtype, times the gain) followed by the quantised linear; the RMSNorm backward is written out so the whole
    layer costs a handful of memory passes on top of the matmuls.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, norm_weight: torch.Tensor, eps: float, weight: torch.Tensor,
                bias: torch.Tensor | None, cdtype: torch.dtype) -> torch.Tensor:
        x_int, inv_s, xhat, r = quantize_input(x, norm_weight, eps)  # integers in [-128, 127]
        if xhat.dtype != x.dtype:
            xhat = xhat.to(x.dtype)
        t, gamma = ternarize(weight)  # {-1, 0, 1}, per-tensor scale
        # Integer operands: the matmul's sums are exact in fp32 (|sum| <= 128 * K < 2^24), so the result
        # does not depend on the summation order, i.e. on the batch shape or kernel: a token's output is the
        # same bits whether it is decoded alone or inside a batch (see quantize_input for the other half).
        scale = gamma * inv_s  # (..., 1)
        with torch.autocast(x.device.type, enabled=False):
            y = F.linear(x_int.to(cdtype), t.to(cdtype)).mul_(scale.to(cdtype))
            if bias is not None:
                y = y.add_(bias.to(cdtype))
        x_q = x_int.mul_(inv_s).to(cdtype)  # the dequantised operands, for the straight-through backward
        w_q = t.mul_(gamma).to(cdtype)
        xn_dtype = torch.promote_types(norm_weight.dtype, xhat.dtype)
        ctx.save_for_backward(xhat, r, norm_weight, x_q, w_q)
        ctx.has_bias = bias is not None
        ctx.meta = (x.dtype, xn_dtype, norm_weight.dtype, weight.dtype, bias.dtype if bias is not None else None)
        return y

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        xhat, r, norm_weight, x_q, w_q = ctx.saved_tensors
        x_dtype, xn_dtype, nw_dtype, w_dtype, b_dtype = ctx.meta
        need_x, need_nw, _, need_w, need_b, _ = ctx.needs_input_grad
        g = grad_out.to(w_q.dtype)
        grad_x = grad_nw = grad_w = grad_b = None
        with torch.autocast(g.device.type, enabled=False):
            g2 = g.reshape(-1, g.shape[-1])
            if need_w:
                grad_w = torch.mm(g2.t(), x_q.reshape(-1, x_q.shape[-1])).to(w_dtype)
            if ctx.has_bias and need_b:
                grad_b = g2.sum(0).to(b_dtype)
            if need_x or need_nw:
                # straight-through: d loss / d xn = d loss / d x_q
                g_xn = torch.matmul(g, w_q).to(xn_dtype)
                if need_nw:
                    grad_nw = (g_xn * xhat).reshape(-1, xhat.shape[-1]).sum(0).to(nw_dtype)
                if need_x:
                    g_xhat = (g_xn * norm_weight).to(xhat.dtype).float()
                    xh = xhat.float()
                    c = torch.linalg.vecdot(g_xhat, xh, dim=-1).unsqueeze(-1).div_(-xh.shape[-1])
                    grad_x = torch.addcmul(g_xhat, xh, c).mul_(r).to(x_dtype)
        return grad_x, grad_nw, None, grad_w, grad_b, None


# --------------------------------------------------------------------------- modules
class BitLinear(nn.Linear):
    """BitNet b1.58 linear layer (QAT) with an inner RMSNorm (SubLN); see the module docstring."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False, norm_eps: float = 1e-6,
                 device=None, dtype=None):
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.norm = RMSNorm(in_features, eps=norm_eps)
        if device is not None or dtype is not None:
            self.norm.to(device=device, dtype=dtype)

    def forward(self, x: torch.Tensor, add_bias: bool = True) -> torch.Tensor:
        # self.norm's math is fused into the function (same values as self.norm(x); see _BitLinearFn)
        bias = self.bias if add_bias else None
        return _BitLinearFn.apply(x, self.norm.weight, self.norm.eps, self.weight, bias, _compute_dtype(x))

    @torch.no_grad()
    def quantized_weight(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(ternary weights as int8 in {-1, 0, 1}, gamma as an fp32 0-dim tensor)."""
        t, gamma = ternarize(self.weight)
        return t.to(torch.int8), gamma

    def effective_weight(self) -> torch.Tensor:
        """W_q = ternary(W) * gamma with a straight-through gradient to ``weight`` (what forward uses)."""
        t, gamma = ternarize(self.weight)
        return ste(self.weight, t.mul_(gamma))

    def extra_repr(self) -> str:
        return super().extra_repr() + ", quant=b1.58"


def make_linear(in_features: int, out_features: int, bias: bool = False, kind: str = "bf16",
                norm_eps: float = 1e-6) -> nn.Module:
    """``"bf16"`` -> ``nn.Linear`` (its compute dtype comes from autocast); ``"ternary"`` -> ``BitLinear``."""
    if kind == "bf16":
        return nn.Linear(in_features, out_features, bias=bias)
    if kind == "ternary":
        return BitLinear(in_features, out_features, bias=bias, norm_eps=norm_eps)
    raise ValueError(f"unknown linear kind {kind!r} (known: {', '.join(LINEAR_KINDS)})")


def linear_kind(module: nn.Module) -> str:
    """The kind of a linear module: ``"ternary"`` for BitLinear, ``"bf16"`` for a plain ``nn.Linear``."""
    if isinstance(module, BitLinear):
        return "ternary"
    if isinstance(module, nn.Linear):
        return "bf16"
    raise TypeError(f"not a linear layer: {type(module).__name__}")


def convert_linear(linear: nn.Module, kind: str, norm_eps: float = 1e-6) -> nn.Module:
    """An equivalent linear module of ``kind`` holding the same latent weights.

    The same kind returns ``linear`` itself. ``nn.Linear -> BitLinear`` shares the ``weight``/``bias``
    Parameters (so an optimizer keeps tracking them) and adds a fresh unit-gain ``norm``; ``BitLinear ->
    nn.Linear`` shares ``weight``/``bias`` and drops the inner norm (its gain is lost: the plain layer is the
    un-normalised, un-quantised latent linear).
    """
    if kind not in LINEAR_KINDS:
        raise ValueError(f"unknown linear kind {kind!r} (known: {', '.join(LINEAR_KINDS)})")
    if linear_kind(linear) == kind:
        return linear
    w = linear.weight
    factory = {"device": w.device, "dtype": w.dtype}
    if kind == "ternary":
        new: nn.Linear = BitLinear(linear.in_features, linear.out_features, bias=linear.bias is not None,
                                   norm_eps=norm_eps, device="meta")
        new.norm = RMSNorm(linear.in_features, eps=norm_eps).to(**factory)
    else:
        new = nn.Linear(linear.in_features, linear.out_features, bias=linear.bias is not None, device="meta")
    new.weight = linear.weight
    if linear.bias is not None:
        new.bias = linear.bias
    new.train(linear.training)
    return new
