"""CPU stand-ins for the CUDA kernels MoM calls, enforcing the real ones' argument checks.

Written from the sources of mamba-ssm 2.3.x (``selective_scan_interface.py``'s wrapper, then
``csrc/selective_scan/selective_scan.cpp``; ``ops/triton/selective_state_update.py``) and causal-conv1d 1.6
(``causal_conv1d_interface.py``, then ``csrc/causal_conv1d.cpp``): the same dtype, device, stride and shape
rules, in the same order (the wrapper's ``.contiguous()`` calls first, then the extension's checks). The
math is a plain fp32 loop; outputs have the dtypes the kernels give (``empty_like`` of their inputs).

``install(monkeypatch)`` puts them where ``mom.model.kernels`` looks (``sys.modules``) and lets the kernels
run on CPU tensors; it returns a ``Counter`` of calls per kernel, so a test can check they were used.
"""

from __future__ import annotations

import sys
import types
from collections import Counter

import torch
import torch.nn.functional as F

FLOATS = (torch.float32, torch.float16, torch.bfloat16)


class KernelCheckError(RuntimeError):
    """What TORCH_CHECK raises (a RuntimeError) in the real extensions."""


def check(cond: bool, what: str) -> None:
    if not cond:
        raise KernelCheckError(f"Expected {what} to be true, but got false.")


def check_shape(t: torch.Tensor, *shape: int, name: str) -> None:
    check(tuple(t.shape) == tuple(shape), f"{name} must have shape {shape}, got {tuple(t.shape)}")


def same_device(device: torch.device, **tensors) -> None:
    for name, t in tensors.items():  # is_cuda() in the real code: every tensor on the kernel's device
        if t is not None:
            check(t.device == device, f"{name}.is_cuda() (on {t.device}, the kernel runs on {device})")


class _GradDtype(torch.autograd.Function):
    """Identity whose backward checks the incoming gradient's dtype (the kernels' ``dout`` checks)."""

    @staticmethod
    def forward(ctx, y, dtype, what):
        ctx.dtype, ctx.what = dtype, what
        return y.view_as(y)

    @staticmethod
    def backward(ctx, g):
        check(g.dtype == ctx.dtype, f"{ctx.what}: dout.scalar_type() == input_type ({g.dtype} vs {ctx.dtype})")
        return g, None, None


# ------------------------------------------------------------------------------------------------ mamba-ssm
def selective_scan_fn(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                      return_last_state=False):
    # the Python wrapper (SelectiveScanFn.forward)
    if u.stride(-1) != 1:
        u = u.contiguous()
    if delta.stride(-1) != 1:
        delta = delta.contiguous()
    if D is not None:
        D = D.contiguous()
    if B.stride(-1) != 1:
        B = B.contiguous()
    if C.stride(-1) != 1:
        C = C.contiguous()
    if z is not None and z.stride(-1) != 1:
        z = z.contiguous()
    squeeze_B, squeeze_C = B.dim() == 3, C.dim() == 3
    if squeeze_B:
        B = B.unsqueeze(1)  # (b, groups=1, n, l)
    if squeeze_C:
        C = C.unsqueeze(1)
    # selective_scan_fwd (selective_scan.cpp)
    input_type, weight_type = u.dtype, A.dtype
    check(input_type in FLOATS, "input_type == Float || input_type == Half || input_type == BFloat16")
    check(weight_type == torch.float32, "weight_type == Float || weight_type == ComplexFloat")
    var_B, var_C = B.dim() >= 3, C.dim() >= 3
    check(delta.dtype == input_type, "delta.scalar_type() == input_type")
    check(B.dtype == (input_type if var_B else weight_type), "B.scalar_type() == (!is_variable_B ? weight_type : input_type)")
    check(C.dtype == (input_type if var_C else weight_type), "C.scalar_type() == (!is_variable_C ? weight_type : input_type)")
    same_device(u.device, delta=delta, A=A, B=B, C=C)
    check(u.stride(-1) == 1 or u.size(-1) == 1, "u.stride(-1) == 1 || u.size(-1) == 1")
    check(delta.stride(-1) == 1 or delta.size(-1) == 1, "delta.stride(-1) == 1 || delta.size(-1) == 1")
    b, d, L = u.shape
    n = A.shape[1]
    check(n <= 256, "selective_scan only supports state dimension <= 256")
    check_shape(u, b, d, L, name="u")
    check_shape(delta, b, d, L, name="delta")
    check_shape(A, d, n, name="A")
    groups = B.shape[1] if var_B else 1
    for name, t, var in (("B", B, var_B), ("C", C, var_C)):
        if var:
            check_shape(t, b, groups, n, L, name=name)
            check(t.stride(-1) == 1 or t.size(-1) == 1, f"{name}.stride(-1) == 1 || {name}.size(-1) == 1")
        else:
            check_shape(t, d, n, name=name)
    if D is not None:
        check(D.dtype == torch.float32, "D.scalar_type() == at::ScalarType::Float")
        same_device(u.device, D=D)
        check(D.stride(-1) == 1 or D.size(-1) == 1, "D.stride(-1) == 1 || D.size(-1) == 1")
        check_shape(D, d, name="D")
    if delta_bias is not None:
        check(delta_bias.dtype == torch.float32, "delta_bias.scalar_type() == at::ScalarType::Float")
        same_device(u.device, delta_bias=delta_bias)
        check(delta_bias.stride(-1) == 1 or delta_bias.size(-1) == 1, "delta_bias.stride(-1) == 1")
        check_shape(delta_bias, d, name="delta_bias")
    if z is not None:
        check(z.dtype == input_type, "z.scalar_type() == input_type")
        same_device(u.device, z=z)
        check(z.stride(-1) == 1 or z.size(-1) == 1, "z.stride(-1) == 1 || z.size(-1) == 1")
        check_shape(z, b, d, L, name="z")
    check(groups == 1, "MoM passes one group")
    # the math, fp32 (differentiable: the real backward gives each input's gradient in its dtype)
    dt = delta.float() + (delta_bias[:, None] if delta_bias is not None else 0)
    dt = F.softplus(dt) if delta_softplus else dt
    Bf, Cf, uf = B[:, 0].float(), C[:, 0].float(), u.float()
    h = u.new_zeros(b, d, n, dtype=torch.float32)
    ys = []
    for t in range(L):
        h = torch.exp(dt[:, :, t, None] * A) * h + (dt[:, :, t] * uf[:, :, t])[:, :, None] * Bf[:, None, :, t]
        ys.append((h * Cf[:, None, :, t]).sum(-1))
    y = torch.stack(ys, -1)
    if D is not None:
        y = y + D[:, None] * uf
    if z is not None:
        y = y * F.silu(z.float())
    out = _GradDtype.apply(y.to(input_type), input_type, "selective_scan bwd")
    # the last state is read from the kernel's chunk states: no gradient flows through it
    return (out, h.detach()) if return_last_state else out


def selective_state_update(state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False,
                           state_batch_indices=None):
    """The Triton wrapper's argument handling, then the kernel's math (state updated in place)."""
    has_heads = state.dim() > 3
    if state.dim() == 3:
        state = state.unsqueeze(1)
    if x.dim() == 2:
        x = x.unsqueeze(1)
    if dt.dim() == 2:
        dt = dt.unsqueeze(1)
    if A.dim() == 2:
        A = A.unsqueeze(0)
    if B.dim() == 2:
        B = B.unsqueeze(1)
    if C.dim() == 2:
        C = C.unsqueeze(1)
    if D is not None and D.dim() == 1:
        D = D.unsqueeze(0)
    if z is not None and z.dim() == 2:
        z = z.unsqueeze(1)
    if dt_bias is not None and dt_bias.dim() == 1:
        dt_bias = dt_bias.unsqueeze(0)
    _, nheads, dim, dstate = state.shape
    batch = x.shape[0]
    assert x.shape == (batch, nheads, dim)
    assert dt.shape == x.shape
    assert A.shape == (nheads, dim, dstate)
    ngroups = B.shape[1]
    assert nheads % ngroups == 0, "nheads must be divisible by ngroups"
    assert B.shape == (batch, ngroups, dstate)
    assert C.shape == B.shape
    if D is not None:
        assert D.shape == (nheads, dim)
    if z is not None:
        assert z.shape == x.shape
    if dt_bias is not None:
        assert dt_bias.shape == (nheads, dim)
    # the kernel launch unpacks the bias's strides with `*(...) if dt_bias is not None else 0`
    if dt_bias is None:
        raise TypeError("Value after * must be an iterable, not int")
    for name, t in dict(state=state, x=x, dt=dt, dt_bias=dt_bias, A=A, B=B, C=C, D=D, z=z).items():
        if t is not None:  # Triton needs every pointer on the launching device
            assert t.device == x.device, f"{name} is on {t.device}, x on {x.device}"
    dtf = F.softplus(dt.float() + dt_bias.float()) if dt_softplus else dt.float() + dt_bias.float()
    new = state.float() * torch.exp(A.float() * dtf[..., None]) + (dtf * x.float())[..., None] * B.float()[:, :, None]
    state.copy_(new)  # tl.store in the state's dtype
    out = (new * C.float()[:, :, None]).sum(-1)
    if D is not None:
        out = out + x.float() * D.float()
    if z is not None:
        out = out * F.silu(z.float())
    out = out.to(x.dtype)  # torch.empty_like(x)
    return out if has_heads else out.squeeze(1)


# ------------------------------------------------------------------------------------------------ causal-conv1d
def _conv_checks(x, weight, bias):
    input_type, weight_type = x.dtype, weight.dtype
    check(input_type in FLOATS, "input_type == Float || input_type == Half || input_type == BFloat16")
    check(weight_type in FLOATS, "weight_type == Float || weight_type == Half || weight_type == BFloat16")
    same_device(x.device, weight=weight)
    b, dim, L = x.shape
    width = weight.shape[-1]
    check_shape(weight, dim, width, name="weight")
    check(2 <= width <= 4, "causal_conv1d only supports width between 2 and 4")
    if bias is not None:
        check(bias.dtype == weight_type, "bias.scalar_type() == weight_type")
        same_device(x.device, bias=bias)
        check(bias.stride(-1) == 1, "bias.stride(-1) == 1")
        check_shape(bias, dim, name="bias")
    return b, dim, L, width


def causal_conv1d_fn(x, weight, bias=None, seq_idx=None, initial_states=None, return_final_states=False,
                     final_states_out=None, activation=None):
    if activation not in (None, "silu", "swish"):
        raise NotImplementedError("activation must be None, silu, or swish")
    if x.stride(2) != 1 and x.stride(1) != 1:
        x = x.contiguous()
    bias = bias.contiguous() if bias is not None else None
    check(seq_idx is None and initial_states is None and not return_final_states, "MoM passes no states")
    b, dim, L, width = _conv_checks(x, weight, bias)
    check(x.stride(2) == 1 or x.stride(1) == 1, "x.stride(2) == 1 || x.stride(1) == 1")
    if x.stride(1) == 1 and x.stride(2) > 1:  # channel-last layout
        check(dim % 8 == 0, "causal_conv1d only supports channel dimension divisible by 8 for now")
        check(x.stride(2) % 8 == 0 and x.stride(0) % 8 == 0,
              "causal_conv1d with channel last layout requires strides (x.stride(0) and x.stride(2)) to be multiples of 8")
    y = F.conv1d(x.float(), weight.float()[:, None], bias.float() if bias is not None else None,
                 padding=width - 1, groups=dim)[..., :L]
    if activation is not None:
        y = F.silu(y)
    return _GradDtype.apply(y.to(x.dtype), x.dtype, "causal_conv1d bwd")  # out = torch.empty_like(x)


def causal_conv1d_update(x, conv_state, weight, bias=None, activation=None, cache_seqlens=None,
                         conv_state_indices=None):
    if activation not in (None, "silu", "swish"):
        raise NotImplementedError("activation must be None, silu, or swish")
    unsqueeze = x.dim() == 2
    if unsqueeze:
        x = x.unsqueeze(-1)
    check(cache_seqlens is None and conv_state_indices is None, "MoM passes a plain state")
    check(conv_state.dtype == x.dtype, "conv_state.scalar_type() == input_type")
    same_device(x.device, conv_state=conv_state)
    b, dim, L, width = _conv_checks(x, weight, bias)
    state_len = conv_state.shape[2]
    check(state_len >= width - 1, "conv_state_len >= width - 1")
    check_shape(conv_state, b, dim, state_len, name="conv_state")
    full = torch.cat([conv_state.float(), x.float()], -1)
    k = state_len - (width - 1)  # the window starts width - 1 before each new token
    y = torch.stack([(full[..., k + t: k + t + width] * weight.float()).sum(-1) for t in range(L)], -1)
    if bias is not None:
        y = y + bias.float()[:, None]
    if activation is not None:
        y = F.silu(y)
    conv_state.copy_(full[..., -state_len:])
    out = y.to(x.dtype)
    return out.squeeze(-1) if unsqueeze else out


# ------------------------------------------------------------------------------------------------ install
def install(monkeypatch, scan=selective_scan_fn, step=selective_state_update, conv=causal_conv1d_fn,
            conv_update=causal_conv1d_update) -> Counter:
    """Make ``mom.model.kernels`` find these functions (or the ones given) and try them on CPU tensors."""
    from mom.model import kernels

    calls: Counter = Counter()

    def counted(name, fn):
        def wrapper(*args, **kwargs):
            calls[name] += 1
            return fn(*args, **kwargs)
        return wrapper

    def module(name, **attrs):
        m = types.ModuleType(name)
        for k, v in attrs.items():
            setattr(m, k, v)
        monkeypatch.setitem(sys.modules, name, m)
        return m

    module("mamba_ssm")
    module("mamba_ssm.ops")
    module("mamba_ssm.ops.triton")
    module("mamba_ssm.ops.selective_scan_interface", selective_scan_fn=counted("selective_scan", scan))
    module("mamba_ssm.ops.triton.selective_state_update",
           selective_state_update=counted("selective_state_update", step))
    module("causal_conv1d", causal_conv1d_fn=counted("causal_conv1d", conv),
           causal_conv1d_update=counted("causal_conv1d_update", conv_update))
    monkeypatch.setattr(kernels, "KERNEL_DEVICES", ("cuda", "cpu"))
    kernels.reset()
    monkeypatch.setattr(kernels, "_found", {})  # restored (and so forgotten) after the test
    monkeypatch.setattr(kernels, "_usable", {})
    return calls
