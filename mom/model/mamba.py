"""Jamba's Mamba mixer: in_proj, causal depthwise conv, x_proj, inner RMSNorms on dt/B/C, dt_proj,
selective scan, out_proj. Parameter names match transformers' JambaMambaMixer.

One code path serves training, prefill and decoding: the conv runs over ``[conv state, new inputs]``
(zeros when there is no state) and the scan starts from the SSM state. A one-token step uses the
recurrent update instead of a scan.

On CUDA with the ``gpu`` extra, the conv and the scan run in causal-conv1d's and mamba-ssm's kernels
(``mom.model.kernels``). dt_proj's bias is kept out of the low-precision matmul and given to the scan as
``delta_bias`` (added in fp32 inside the scan, as upstream Mamba does).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from mom.model import kernels
from mom.model.bitlinear import BitLinear, make_linear
from mom.model.cache import MambaState
from mom.model.config import MoMConfig
from mom.model.norm import RMSNorm
from mom.model.scan import selective_scan, selective_state_update

_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _conv_kernel(name: str, x: torch.Tensor, width: int):
    """causal-conv1d's kernel for ``x`` when usable (it takes widths 2 to 4 and float inputs), else None."""
    if x.dtype not in _KERNEL_DTYPES or not 2 <= width <= 4:
        return None
    return kernels.get(name, x.device)


class _CausalConvSiLUCPU(torch.autograd.Function):
    """silu(causal depthwise conv) on time-major (B, T, C) activations in C++ (``csrc/scan.cpp``): no transposing
    copy of in_proj's output, and the output feeds x_proj and the scan as it is."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight, bias)
        return torch.ops.mom_infer.causal_conv1d_cpu_fwd(x, weight, bias)

    @staticmethod
    def backward(ctx, gout):
        x, weight, bias = ctx.saved_tensors
        gx, gw, gb = torch.ops.mom_infer.causal_conv1d_cpu_bwd(x, weight, bias, gout)
        return gx, gw, gb if bias is not None else None


def _cpu_conv(x: torch.Tensor, width: int):
    """The C++ conv's ops when they apply to ``x`` (fp32 on the CPU, width <= 8, the kernels built), else None."""
    if x.device.type != "cpu" or x.dtype != torch.float32 or width > 8:
        return None
    return kernels.cpu_ops()


class MambaMixer(nn.Module):
    def __init__(self, config: MoMConfig):
        super().__init__()
        kind = config.precision["mamba"]
        d, d_inner, n, r = config.hidden_size, config.mamba_d_inner, config.mamba_d_state, config.mamba_dt_rank
        self.d_inner, self.d_state, self.dt_rank, self.d_conv = d_inner, n, r, config.mamba_d_conv
        self.scan_impl = config.scan_impl
        self.in_proj = make_linear(d, 2 * d_inner, bias=config.mamba_proj_bias, kind=kind)
        # the depthwise conv is tiny and read directly by fused kernels: always high precision
        self.conv1d = nn.Conv1d(d_inner, d_inner, config.mamba_d_conv, groups=d_inner, bias=config.mamba_conv_bias,
                                padding=config.mamba_d_conv - 1)
        self.x_proj = make_linear(d_inner, r + 2 * n, bias=False, kind=kind)
        self.dt_proj = make_linear(r, d_inner, bias=True, kind=kind)
        self.dt_layernorm = RMSNorm(r, eps=config.rms_norm_eps)
        self.b_layernorm = RMSNorm(n, eps=config.rms_norm_eps)
        self.c_layernorm = RMSNorm(n, eps=config.rms_norm_eps)
        self.A_log = nn.Parameter(torch.log(torch.arange(1, n + 1, dtype=torch.float32)).repeat(d_inner, 1))
        self.D = nn.Parameter(torch.ones(d_inner))
        self.out_proj = make_linear(d_inner, d, bias=config.mamba_proj_bias, kind=kind)

    @torch.no_grad()
    def reset_dt(self, dt_min: float = 1e-3, dt_max: float = 0.1) -> None:
        """Mamba's dt initialisation: softplus(dt_proj.bias) log-uniform in [dt_min, dt_max]."""
        nn.init.uniform_(self.dt_proj.weight, -self.dt_rank**-0.5, self.dt_rank**-0.5)
        dt = torch.exp(torch.rand(self.d_inner) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
        dt = dt.clamp_min(1e-4)
        self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # inverse softplus

    def _delta(self, dt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(dt_proj(dt_layernorm(dt)) without its bias, the bias) for the scan to add in fp32. A layer
        type that cannot leave its bias out (packed inference layers) returns (its output, None)."""
        dt = self.dt_layernorm(dt)
        proj = self.dt_proj
        if type(proj) is nn.Linear:
            return F.linear(dt, proj.weight), proj.bias
        if isinstance(proj, BitLinear):
            return proj(dt, add_bias=False), proj.bias
        return proj(dt), None

    def _conv(self, x: torch.Tensor, state: MambaState | None) -> torch.Tensor:
        """silu(causal depthwise conv) over (B, d_inner, T); updates state.conv. On the CPU without a state, the
        input and output are (B, d_inner, T) views of time-major memory (the scan takes them as they are)."""
        T = x.shape[-1]
        if state is None or state.conv is None:  # no past inputs: training, or a prefill
            conv = _conv_kernel("causal_conv1d", x, self.d_conv)
            if conv is not None:
                if state is not None:  # the last d_conv - 1 inputs (zeros before the first)
                    state.conv = F.pad(x, (max(self.d_conv - 1 - T, 0), 0))[..., -(self.d_conv - 1):].contiguous()
                w, b = self.conv1d.weight.squeeze(1), self.conv1d.bias
                return conv(x.contiguous(), w, b.to(w.dtype) if b is not None else None, activation="silu")
            if state is None and _cpu_conv(x, self.d_conv) is not None:  # training/scoring on the CPU: time-major
                w = self.conv1d.weight.squeeze(1)
                w = w if w.is_contiguous() else w.contiguous()
                rows = x.transpose(1, 2)  # (B, T, d_inner): in_proj's rows, channels contiguous
                rows = rows if rows.stride(2) == 1 else rows.contiguous()
                return _CausalConvSiLUCPU.apply(rows, w, self.conv1d.bias).transpose(1, 2)
            if state is None:
                return F.silu(self.conv1d(x)[..., :T])
        past = state.conv if state.conv is not None else x.new_zeros(x.shape[0], self.d_inner, self.d_conv - 1)
        full = torch.cat([past.to(x.dtype), x], dim=-1)
        # a copy, not a view: the cache must not keep the whole prompt's activations alive
        state.conv = full[..., full.shape[-1] - (self.d_conv - 1):].contiguous() if T > 1 else full[..., 1:]
        if T == 1:  # decode step: a dot product over the window
            w = self.conv1d.weight.squeeze(1)  # (d_inner, d_conv)
            y = (full * w).sum(-1, keepdim=True)
            if self.conv1d.bias is not None:
                y = y + self.conv1d.bias[:, None]
            return F.silu(y)
        return F.silu(F.conv1d(full, self.conv1d.weight, self.conv1d.bias, groups=self.d_inner))

    def _conv_step(self, u: torch.Tensor, state: MambaState) -> torch.Tensor:
        """One token (B, d_inner) through the conv, shifting state.conv (B, d_inner, d_conv - 1)."""
        w, b = self.conv1d.weight[:, 0], self.conv1d.bias  # (d_inner, d_conv)
        update = _conv_kernel("causal_conv1d_update", u, self.d_conv)
        if update is not None:  # in place on the state, which must have u's dtype
            if state.conv.dtype != u.dtype:
                state.conv = state.conv.to(u.dtype)
            return update(u, state.conv, w, b.to(w.dtype) if b is not None else None, activation="silu")
        window = torch.cat([state.conv.to(u.dtype), u.unsqueeze(-1)], dim=-1)  # (B, d_inner, d_conv)
        state.conv = window[..., 1:]
        u = (window * w).sum(-1)
        if b is not None:
            u = u + b
        return F.silu(u)

    def _A(self) -> torch.Tensor:
        """A = -exp(A_log), in fp32 (fp64 for an fp64 model); cached while A_log does not change and no
        gradient is needed (decoding calls this every token)."""
        a_log = self.A_log if self.A_log.dtype == torch.float64 else self.A_log.float()
        if torch.is_grad_enabled() and self.A_log.requires_grad:
            return -torch.exp(a_log)
        key = (self.A_log.data_ptr(), self.A_log._version, self.A_log.dtype, self.A_log.device)
        if getattr(self, "_A_cache", (None,))[0] != key:
            self._A_cache = (key, -torch.exp(a_log))
        return self._A_cache[1]

    def step(self, x: torch.Tensor, state: MambaState) -> torch.Tensor:
        """One decoding step from a prefilled state, on (B, d) rows with no transposes: decoding is bound
        by the number of small ops, not by arithmetic. Same function as ``forward`` with T = 1."""
        u, z = self.in_proj(x).chunk(2, dim=-1)  # (B, d_inner) each
        u = self._conv_step(u, state)
        dt, Bm, Cm = torch.split(self.x_proj(u), [self.dt_rank, self.d_state, self.d_state], dim=-1)
        dt, dt_bias = self._delta(dt)
        y = selective_state_update(state.ssm, u, dt, self._A(), self.b_layernorm(Bm),
                                   self.c_layernorm(Cm), self.D, z=z, dt_bias=dt_bias, dt_softplus=True)
        return self.out_proj(y.to(x.dtype))

    def forward(self, x: torch.Tensor, token_mask: torch.Tensor | None = None, state: MambaState | None = None):
        """x: (B, T, d). token_mask: (B, T) bool, False for padding (its input is zeroed, so left padding
        leaves the state at zero). Returns (B, T, d)."""
        B, T, _ = x.shape
        if T == 1 and token_mask is None and state is not None and state.ssm is not None and state.conv is not None:
            return self.step(x[:, 0], state).unsqueeze(1)
        dtype = x.dtype
        xz = self.in_proj(x).transpose(1, 2)
        u, z = xz.chunk(2, dim=1)
        m = token_mask[:, None, :].to(u.dtype) if token_mask is not None else None
        if m is not None:
            u = u * m
        u = self._conv(u, state)
        if m is not None:
            u = u * m
        dt, Bm, Cm = torch.split(self.x_proj(u.transpose(1, 2)), [self.dt_rank, self.d_state, self.d_state], dim=-1)
        dt, dt_bias = self._delta(dt)  # (B, T, d_inner), (d_inner,)
        Bm, Cm = self.b_layernorm(Bm), self.c_layernorm(Cm)
        A = self._A()
        init = state.ssm if state is not None else None
        out = selective_scan(u, dt.transpose(1, 2), A, Bm.transpose(1, 2), Cm.transpose(1, 2), self.D,
                             z=z, delta_bias=dt_bias, delta_softplus=True, initial_state=init,
                             return_last_state=state is not None, impl=self.scan_impl)
        if state is not None:
            y, state.ssm = out
        else:
            y = out
        return self.out_proj(y.transpose(1, 2).to(dtype))


# ------------------------------------------------------------------------------------------------ kernel probes
@kernels.probe("causal_conv1d")
def _probe_conv(fn, device):
    g = torch.Generator().manual_seed(0)
    x, w, bias = torch.randn(1, 8, 6, generator=g), torch.randn(8, 4, generator=g), torch.randn(8, generator=g)
    y = fn(x.to(device), w.to(device), bias.to(device), activation="silu")
    kernels.close(y, F.silu(F.conv1d(x, w[:, None], bias, padding=3, groups=8)[..., :6]), "causal_conv1d_fn")


@kernels.probe("causal_conv1d_update")
def _probe_conv_update(fn, device):
    g = torch.Generator().manual_seed(0)
    x, state = torch.randn(1, 8, generator=g), torch.randn(1, 8, 3, generator=g)
    w, bias = torch.randn(8, 4, generator=g), torch.randn(8, generator=g)
    s_dev = state.to(device, copy=True)
    y = fn(x.to(device), s_dev, w.to(device), bias.to(device), activation="silu")
    window = torch.cat([state, x[..., None]], -1)
    kernels.close(y, F.silu((window * w).sum(-1) + bias), "causal_conv1d_update output")
    kernels.close(s_dev, window[..., 1:], "causal_conv1d_update state")
