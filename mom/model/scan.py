"""Mamba-1 selective scan: a sequential reference, a fast pure-PyTorch path and the mamba_ssm kernels.

Conventions follow ``mamba_ssm.ops.selective_scan_interface.selective_scan_fn`` plus an initial state:

    u, delta: (b, d, l)   A: (d, n)   B, C: (b, n, l)   D: (d,)   z: (b, d, l)   delta_bias: (d,)
    initial_state: (b, d, n)

    dt  = delta (+ delta_bias[:, None]) (then softplus if delta_softplus)
    h_t = exp(dt_t * A) * h_{t-1} + dt_t * B_t * u_t          (h_{-1} = initial_state or 0)
    y_t = <h_t, C_t> + D * u_t ;  y *= silu(z) when z is given

Everything is computed in float32 (autocast is disabled inside), ``y`` is returned in ``u.dtype`` and the
last state in float32 (as mamba_ssm does).

Implementations (``impl``):

* ``"reference"``: a plain per-step loop under autograd; the ground truth (slow backward, small graphs).
* ``"fast"``: a custom ``torch.autograd.Function``. Time is cut into chunks; inside a chunk ``exp(dt*A)``
  and ``dt*B*u`` are materialised as contiguous time-major ``(T, b, d, n)`` buffers and the recurrence is
  an in-place ``addcmul_`` per step (no autograd graph). Only the chunk-start states are kept for backward;
  the backward recomputes each chunk's states and runs the adjoint recurrence in reverse time
  (``g_{t-1} += exp(dt_t*A) * g_t``), then forms every gradient with a few batched matmuls. Memory is
  O(b*d*T*n) on top of the inputs, independent of the sequence length. On GPUs (``parallel``, the default
  off the CPU) each chunk's recurrences are solved in log2(chunk) rounds of a few whole-chunk ops
  (Hillis-Steele) instead of one small op per step: a GPU without mamba-ssm is bound by kernel launches,
  and this cuts them ~10x (tests/test_scan.py counts them); the CPU keeps the per-step form, which reads
  the buffers once. On the CPU in fp32 the per-step loops run in C++ when the engine's kernels are built
  (``mom/infer/csrc/scan.cpp``, ``native``): each (sequence, channel) row keeps its state in registers, the
  same chunked algorithm, ~4x faster than the torch ops; without a compiler the torch ops run.
* ``"cuda"``: mamba_ssm's CUDA kernel (needs mamba_ssm, a CUDA device and a successful probe call, see
  ``mom.model.kernels``; it has no initial state, so with ``initial_state`` this falls back to ``"fast"``).
  Raises ``RuntimeError`` when unavailable. The arguments are cast to the dtypes the kernel checks.
* ``"auto"``: ``"cuda"`` when usable, else ``"fast"``; never fails.
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F

from mom.model import kernels

__all__ = [
    "selective_scan",
    "selective_scan_reference",
    "selective_scan_fast",
    "selective_state_update",
    "mamba_ssm_available",
    "step_reference",
]

#: Time steps per chunk of the fast path (trades Python overhead against buffer size).
CHUNK_SIZE = 16
#: Most time steps per chunk of its log-depth form (GPUs): ~40 ops forward and ~100 backward per chunk,
#: whatever its length, and 3-5 (chunk, b, d, n) fp32 buffers ...
PARALLEL_CHUNK_SIZE = 256
#: ... of at most this many bytes each (the chunk is shortened for large b * d * n).
PARALLEL_BUFFER_BYTES = 256 * 2**20

_F32 = torch.float32


def _acc(t: torch.Tensor) -> torch.dtype:
    """Accumulation dtype: float32, or float64 for float64 inputs (exactness tests without float noise)."""
    return torch.float64 if t.dtype == torch.float64 else _F32

def mamba_ssm_available() -> bool:
    """True when mamba_ssm's selective scan is importable *and* passes its probe call on the CUDA device."""
    return torch.cuda.is_available() and kernels.get("selective_scan", torch.device("cuda")) is not None


def _no_autocast(device_type: str):
    if device_type in ("cpu", "cuda"):
        return torch.autocast(device_type=device_type, enabled=False)
    return contextlib.nullcontext()


def _check_shapes(u, delta, A, B, C, D, z, delta_bias, initial_state):
    if u.dim() != 3:
        raise ValueError(f"u must be (b, d, l), got {tuple(u.shape)}")
    b, d, L = u.shape
    if delta.shape != u.shape:
        raise ValueError(f"delta must have u's shape {tuple(u.shape)}, got {tuple(delta.shape)}")
    if A.dim() != 2 or A.shape[0] != d:
        raise ValueError(f"A must be (d, n) with d={d}, got {tuple(A.shape)}")
    n = A.shape[1]
    for name, t in (("B", B), ("C", C)):
        if t.shape != (b, n, L):
            raise ValueError(f"{name} must be (b, n, l) = {(b, n, L)}, got {tuple(t.shape)}")
    if D is not None and D.shape != (d,):
        raise ValueError(f"D must be ({d},), got {tuple(D.shape)}")
    if z is not None and z.shape != u.shape:
        raise ValueError(f"z must have u's shape {tuple(u.shape)}, got {tuple(z.shape)}")
    if delta_bias is not None and delta_bias.shape != (d,):
        raise ValueError(f"delta_bias must be ({d},), got {tuple(delta_bias.shape)}")
    if initial_state is not None and initial_state.shape != (b, d, n):
        raise ValueError(f"initial_state must be (b, d, n) = {(b, d, n)}, got {tuple(initial_state.shape)}")
    if L < 1:
        raise ValueError("selective_scan needs a sequence length >= 1")


def _dt(delta, delta_bias, delta_softplus):
    """Returns (pre-activation, dt), both float32 (b, d, l)."""
    pre = delta.to(_acc(delta))
    if delta_bias is not None:
        pre = pre + delta_bias.to(_acc(delta_bias))[:, None]
    dt = F.softplus(pre) if delta_softplus else pre
    return pre, dt


# --------------------------------------------------------------------------------------------------------
# reference
# --------------------------------------------------------------------------------------------------------
def selective_scan_reference(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                             initial_state=None, return_last_state=False):
    """Plain sequential loop (autograd through every step). The ground truth for the other paths."""
    _check_shapes(u, delta, A, B, C, D, z, delta_bias, initial_state)
    out_dtype = u.dtype
    with _no_autocast(u.device.type):
        b, d, L = u.shape
        n = A.shape[1]
        _, dt = _dt(delta, delta_bias, delta_softplus)
        uf, Af, Bf, Cf = u.to(_acc(u)), A.to(_acc(A)), B.to(_acc(B)), C.to(_acc(C))
        h = initial_state.to(_acc(initial_state)) if initial_state is not None else u.new_zeros((b, d, n), dtype=_acc(u))
        ys = []
        for dt_t, u_t, B_t, C_t in zip(dt.unbind(2), uf.unbind(2), Bf.unbind(2), Cf.unbind(2), strict=True):
            dA = torch.exp(dt_t[:, :, None] * Af)  # (b, d, n)
            h = dA * h + (dt_t * u_t)[:, :, None] * B_t[:, None, :]
            ys.append((h * C_t[:, None, :]).sum(-1))
        y = torch.stack(ys, dim=-1)
        if D is not None:
            y = y + D.to(_acc(D))[:, None] * uf
        if z is not None:
            y = y * F.silu(z.to(_acc(z)))
        y = y.to(out_dtype)
    return (y, h) if return_last_state else y


# --------------------------------------------------------------------------------------------------------
# fast path
# --------------------------------------------------------------------------------------------------------
def _recurrence_(x, P, reverse=False):
    """Solve a linear recurrence in place along dim 0 in log2(T) rounds (Hillis-Steele), ~4 ops per round
    instead of one per step: forward ``x_t += P_t * x_{t-1}`` (t = 1..T-1, P_0 unused), reverse
    ``x_t += P_t * x_{t+1}`` (t = T-2..0, P_{T-1} unused). ``P`` holds the coefficients and is overwritten
    (products of runs of them); entries never read at a later round may be left stale."""
    T = x.shape[0]
    k = 1
    while k < T:
        if reverse:
            x[:-k] += P[:-k] * x[k:]
            if 2 * k < T:
                P[:-k].copy_(P[:-k] * P[k:])
        else:
            x[k:] += P[k:] * x[:-k]
            if 2 * k < T:
                P[k:].copy_(P[k:] * P[:-k])
        k *= 2


def _chunk_states(dt_t, u_t, B_t, Af, h0, s, e, dA_buf, hs_buf, P_buf=None):
    """States of steps s..e-1 written into the (chunk, b, d, n) work buffers; returns the (T, b, d, n) views
    dA = exp(dt*A) and hs = the states. With ``P_buf`` (a third buffer) the recurrence runs in log-depth
    rounds (few large ops: GPUs), else one in-place ``addcmul_`` per step (least memory traffic: CPUs)."""
    dts = dt_t[s:e]
    dA = dA_buf[: e - s]
    hs = hs_buf[: e - s]
    torch.mul(dts.unsqueeze(-1), Af, out=dA).exp_()
    torch.mul((dts * u_t[s:e]).unsqueeze(-1), B_t[s:e].unsqueeze(2), out=hs)
    if h0 is not None:
        hs[0].addcmul_(dA[0], h0)
    if P_buf is not None:
        P = P_buf[: e - s]
        P.copy_(dA)
        _recurrence_(hs, P)
        return dA, hs
    hs_l = hs.unbind(0)
    dA_l = dA.unbind(0)
    prev = hs_l[0]
    for t in range(1, e - s):
        cur = hs_l[t]
        cur.addcmul_(dA_l[t], prev)
        prev = cur
    return dA, hs


def _time_major(x):
    """(b, k, l) -> contiguous float32 (l, b, k)."""
    return x.to(_acc(x)).permute(2, 0, 1).contiguous()


def _cpu_scan_ops(u, A, parallel):
    """``torch.ops.mom_infer`` when the C++ scan loops apply to this call (fp32 on the CPU, the per-step form,
    a state of at most 64, the kernels built: ``kernels.cpu_ops``), else None."""
    if u.device.type != "cpu" or _acc(u) != _F32 or parallel or A.shape[1] > 64:
        return None
    return kernels.cpu_ops()


def _dense(x):
    """fp32 x in a dense (b, d, l) layout the C++ scan takes: as it is when channel-major or a view of time-major
    (b, l, d) memory (Mamba's activations on the CPU), else a contiguous copy."""
    x = x.to(_F32)
    return x if x.is_contiguous() or x.transpose(1, 2).is_contiguous() else x.contiguous()


def _like(x, ref):
    """fp32 x in ref's memory layout (the C++ scan wants u, dt and gy to share one)."""
    x = x.to(_F32)
    return x if x.stride() == ref.stride() else torch.empty_strided(ref.shape, ref.stride(), dtype=_F32).copy_(x)


def _channels_last(*xs):
    """Whether every given (b, d, l) tensor is a view of (b, l, d) memory with contiguous channels (Mamba's CPU
    activations): the C++ time-major scan then runs the epilogues around the recurrence too."""
    return all(x is None or x.transpose(1, 2).stride(2) == 1 for x in xs)


def _vec(x):
    return x.to(_F32).contiguous() if x is not None else None


def _lanes(t, n8):
    """fp32, contiguous, the last dim zero-padded to n8 (the C++ scan keeps whole vectors of 8 state lanes;
    a zero lane of A, B, C and the initial state stays zero and adds nothing)."""
    if t is None:
        return None
    t = t.to(_F32)
    return F.pad(t, (0, n8 - t.shape[-1])).contiguous() if t.shape[-1] != n8 else t.contiguous()


def _forward_chunks(dt, u, A, B, C, h, chunk, parallel, keep_states):
    """PyTorch form of the forward recurrence: (y = <h_t, C_t> (b, d, l), last state, chunk-start states)."""
    b, d, L = u.shape
    n = A.shape[1]
    dt_t, u_t, B_t, C_t = _time_major(dt), _time_major(u), _time_major(B), _time_major(C)
    Af = A.to(_acc(A))
    ys = torch.empty((L, b, d), dtype=_acc(u), device=u.device)
    work = min(chunk, L)
    dA_buf = torch.empty((work, b, d, n), dtype=_acc(u), device=u.device)
    hs_buf = torch.empty_like(dA_buf)
    P_buf = torch.empty_like(dA_buf) if parallel else None
    starts = []
    for s in range(0, L, chunk):
        e = min(s + chunk, L)
        starts.append(h)
        _, hs = _chunk_states(dt_t, u_t, B_t, Af, h, s, e, dA_buf, hs_buf, P_buf)
        h = hs[-1].clone()
        torch.sum(hs.mul_(C_t[s:e].unsqueeze(2)), dim=-1, out=ys[s:e])
    del dA_buf, hs_buf, hs, P_buf
    st = None
    if keep_states:  # the first chunk starts from the initial state or zeros
        zero = u.new_zeros((b, d, n), dtype=_acc(u)) if starts[0] is None else None
        st = torch.stack([x if x is not None else zero for x in starts])
    return ys.permute(1, 2, 0).contiguous(), h, st


def _backward_chunks(dt, u, A, B, C, st, gy, glast, has_h0, chunk, parallel, need_g, need_A, need_B, need_C):
    """PyTorch form of the backward recurrence (the C++ ``selective_scan_cpu_bwd`` returns the same):
    ``(sGB, gdtA, gA, gB, gC, gh0)`` with sGB = sum_n G B and gdtA = sum_n G dA h_{t-1} A, both (b, d, l),
    gA (d, n), gB and gC (b, n, l), gh0 = the gradient wrt the initial state; what is not needed is None."""
    b, d, L = u.shape
    n = A.shape[1]
    dt_t, u_t, B_t, C_t = _time_major(dt), _time_major(u), _time_major(B), _time_major(C)
    gy_t = gy.permute(2, 0, 1).contiguous()  # (l, b, d)
    Af = A.to(_acc(A))
    gC_t = torch.empty((L, b, n), dtype=_acc(u), device=u.device) if need_C else None
    gB_t = sGB_t = gdt_t = gAf = None
    if need_g:
        gB_t = torch.empty((L, b, n), dtype=_acc(u), device=u.device) if need_B else None
        sGB_t = torch.empty((L, b, d), dtype=_acc(u), device=u.device)  # sum_n G * B
        gdt_t = torch.empty((L, b, d), dtype=_acc(u), device=u.device)  # via dA
        gAf = torch.zeros((d, n), dtype=_acc(u), device=u.device) if need_A else None
    carry = glast.to(_acc(glast)) if glast is not None else None
    work = min(chunk, L)
    dA_buf = torch.empty((work, b, d, n), dtype=_acc(u), device=u.device)
    hs_buf = torch.empty_like(dA_buf)
    tmp_buf = torch.empty_like(dA_buf)
    G_buf = torch.empty_like(dA_buf) if need_g else None
    P_buf = torch.empty_like(dA_buf) if parallel else None
    carry_buf = torch.empty((b, d, n), dtype=_acc(u), device=u.device)
    n_chunks = (L + chunk - 1) // chunk
    for c in range(n_chunks - 1, -1, -1):
        s = c * chunk
        e = min(s + chunk, L)
        T = e - s
        h0 = st[c] if (c > 0 or has_h0) else None
        dA, hs = _chunk_states(dt_t, u_t, B_t, Af, h0, s, e, dA_buf, hs_buf, P_buf)
        tmp = tmp_buf[:T]
        if gC_t is not None:
            torch.sum(torch.mul(hs, gy_t[s:e].unsqueeze(-1), out=tmp), dim=2, out=gC_t[s:e])
        if not need_g:
            continue
        # adjoint of the states: G_t = C_t gy_t + dA_{t+1} G_{t+1}
        G = torch.mul(gy_t[s:e].unsqueeze(-1), C_t[s:e].unsqueeze(2), out=G_buf[:T])
        if carry is not None:
            G[T - 1].add_(carry)
        if P_buf is not None and T > 1:
            P_buf[: T - 1].copy_(dA[1:])  # G_t += dA_{t+1} * G_{t+1}
            P_buf[T - 1].zero_()  # never a coefficient; defined so no stale NaN travels
            _recurrence_(G, P_buf[:T], reverse=True)
        else:
            G_l, dA_l = G.unbind(0), dA.unbind(0)
            for t in range(T - 2, -1, -1):
                G_l[t].addcmul_(dA_l[t + 1], G_l[t + 1])
            del G_l, dA_l
        carry = torch.mul(dA[0], G[0], out=carry_buf)  # grad wrt the chunk's incoming state
        if gB_t is not None:
            dtu = dt_t[s:e] * u_t[s:e]
            torch.sum(torch.mul(G, dtu.unsqueeze(-1), out=tmp), dim=2, out=gB_t[s:e])
        torch.sum(torch.mul(G, B_t[s:e].unsqueeze(2), out=tmp), dim=-1, out=sGB_t[s:e])
        # X_t = G_t * dA_t * h_{t-1}   (grad wrt dt*A), built in place in dA
        X = dA.mul_(G)
        if T > 1:
            X[1:].mul_(hs[:-1])
        if h0 is not None:
            X[0].mul_(h0)
        else:
            X[0].zero_()
        if gAf is not None:
            gAf.add_(torch.mul(X, dt_t[s:e].unsqueeze(-1), out=tmp).sum((0, 1)))
        torch.sum(X.mul_(Af), dim=-1, out=gdt_t[s:e])
    del dA_buf, hs_buf, tmp_buf, G_buf, P_buf

    def batch_major(x):  # (l, b, k) -> (b, k, l)
        return x.permute(1, 2, 0).contiguous() if x is not None else None

    return (batch_major(sGB_t), batch_major(gdt_t), gAf, batch_major(gB_t), batch_major(gC_t),
            carry if need_g else None)


class _SelectiveScanFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, initial_state, delta_softplus, chunk, parallel, native):
        with _no_autocast(u.device.type):
            h = initial_state.to(_acc(initial_state)) if initial_state is not None else None
            keep = any(ctx.needs_input_grad)
            ctx.time_major = native and _channels_last(u, delta, z)
            if ctx.time_major:  # C++ with softplus, D and the z gate fused (csrc/scan.cpp, time-major)
                n, n8 = A.shape[1], -(-A.shape[1] // 8) * 8
                out, last, st, dt, y_pre = torch.ops.mom_infer.selective_scan_cpu_tm_fwd(
                    u.to(_F32).transpose(1, 2), delta.to(_F32).transpose(1, 2), _vec(delta_bias), _lanes(A, n8),
                    _lanes(B.transpose(1, 2), n8), _lanes(C.transpose(1, 2), n8), _vec(D),
                    z.to(_F32).transpose(1, 2) if z is not None else None, _lanes(h, n8), bool(delta_softplus),
                    chunk, keep)
                ctx.save_for_backward(u, dt if keep else None, A, B, C, D, z, delta_bias, st if keep else None,
                                      y_pre if z is not None and keep else None)
                ctx.has_h0 = initial_state is not None
                ctx.h0_dtype = initial_state.dtype if initial_state is not None else None
                ctx.delta_softplus, ctx.chunk, ctx.delta_dtype = delta_softplus, chunk, delta.dtype
                ctx.set_materialize_grads(False)
                return out.transpose(1, 2).to(u.dtype), (last[..., :n] if n8 != n else last)
            _, dt = _dt(delta, delta_bias, delta_softplus)
            if native:  # the same recurrence in C++ (csrc/scan.cpp); B and C time-major per sequence
                n, n8 = A.shape[1], -(-A.shape[1] // 8) * 8
                uf = _dense(u)
                y, last, st = torch.ops.mom_infer.selective_scan_cpu_fwd(
                    uf, _like(dt, uf), _lanes(A, n8), _lanes(B.transpose(1, 2), n8),
                    _lanes(C.transpose(1, 2), n8), _lanes(h, n8), chunk, keep)
                last = last[..., :n] if n8 != n else last
                st = st if keep else None
            else:
                y, last, st = _forward_chunks(dt, u, A, B, C, h, chunk, parallel, keep)
            if D is not None:
                y = y + D.to(_acc(D))[:, None] * u.to(_acc(u))
            y_pre = y
            if z is not None:
                y = y * F.silu(z.to(_acc(z)))
            y_out = y.to(u.dtype)
            ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, st,
                                  y_pre if z is not None else None)
            ctx.has_h0 = initial_state is not None
            ctx.h0_dtype = initial_state.dtype if initial_state is not None else None
            ctx.delta_softplus = delta_softplus
            ctx.chunk, ctx.parallel, ctx.native = chunk, parallel, native
            ctx.set_materialize_grads(False)
        return y_out, last

    @staticmethod
    def backward(ctx, gy, glast):
        if ctx.time_major:
            return _SelectiveScanFn._backward_time_major(ctx, gy, glast)
        u, delta, A, B, C, D, z, delta_bias, st, y_pre = ctx.saved_tensors
        need = ctx.needs_input_grad  # u, delta, A, B, C, D, z, delta_bias, initial_state, ...
        with _no_autocast(u.device.type):
            b, d, L = u.shape
            pre, dt = _dt(delta, delta_bias, ctx.delta_softplus)
            uf = u.to(_acc(u))
            gu = gdelta = gA = gB = gC = gD = gz = gbias = gh0 = None

            if gy is None:
                gy = torch.zeros((b, d, L), dtype=_acc(u), device=u.device)
            gy = gy.to(_acc(gy))
            if z is not None:
                zf = z.to(_acc(z))
                sz = torch.sigmoid(zf)
                if need[6]:
                    gz = gy * y_pre * sz * (1 + zf * (1 - sz))
                gy = gy * (zf * sz)  # grad wrt the pre-gate output
            if D is not None and need[5]:
                gD = (gy * uf).sum((0, 2))

            need_g = any(need[i] for i in (0, 1, 2, 3, 7, 8))  # anything that needs the state adjoint
            if need_g or need[4]:
                if ctx.native:
                    n = A.shape[1]
                    n8 = -(-n // 8) * 8
                    ud = _dense(uf)
                    sGB, gdtA, gAf, gBf, gCf, carry = torch.ops.mom_infer.selective_scan_cpu_bwd(
                        ud, _like(dt, ud), _lanes(A, n8), _lanes(B.transpose(1, 2), n8),
                        _lanes(C.transpose(1, 2), n8), st, gy, _lanes(glast, n8), ctx.chunk)
                    gAf, carry = gAf[:, :n], carry[..., :n]
                    gBf, gCf = gBf[..., :n].transpose(1, 2), gCf[..., :n].transpose(1, 2)  # (b, n, l)
                else:
                    sGB, gdtA, gAf, gBf, gCf, carry = _backward_chunks(
                        dt, u, A, B, C, st, gy, glast, ctx.has_h0, ctx.chunk, ctx.parallel, need_g,
                        need[2], need[3], need[4])
                if need_g:
                    if need[8] and ctx.has_h0:
                        gh0 = carry.to(ctx.h0_dtype, copy=True)
                    if need[2]:
                        gA = gAf.to(A.dtype)
                    if need[3]:
                        gB = gBf.to(B.dtype).contiguous()
                    if need[0]:
                        gu = sGB * dt
                    if need[1] or need[7]:
                        gdt = gdtA + sGB * uf
                        if ctx.delta_softplus:
                            gdt = gdt * torch.sigmoid(pre)
                        if need[1]:
                            gdelta = gdt.to(delta.dtype)
                        if need[7]:
                            gbias = gdt.sum((0, 2)).to(delta_bias.dtype)
                if need[4]:
                    gC = gCf.to(C.dtype).contiguous()
            if need[0]:
                if D is not None:
                    du = gy * D.to(_acc(D))[:, None]
                    gu = du if gu is None else gu + du
                if gu is None:
                    gu = torch.zeros_like(uf)
                gu = gu.to(u.dtype)
            if gD is not None:
                gD = gD.to(D.dtype)
            if gz is not None:
                gz = gz.to(z.dtype)
        return gu, gdelta, gA, gB, gC, gD, gz, gbias, gh0, None, None, None, None

    @staticmethod
    def _backward_time_major(ctx, gy, glast):
        u, dt, A, B, C, D, z, delta_bias, st, y_pre = ctx.saved_tensors
        b, d, L = u.shape
        n, n8 = A.shape[1], -(-A.shape[1] // 8) * 8
        if gy is None:
            gy = u.new_zeros((b, d, L), dtype=_F32)
        with _no_autocast(u.device.type):
            gu, gdelta, gA, gB, gC, gD, gz, gbias, gh0 = torch.ops.mom_infer.selective_scan_cpu_tm_bwd(
                u.to(_F32).transpose(1, 2), dt, _lanes(A, n8), _lanes(B.transpose(1, 2), n8),
                _lanes(C.transpose(1, 2), n8), _vec(D), z.to(_F32).transpose(1, 2) if z is not None else None, y_pre,
                st, gy.to(_F32).transpose(1, 2), _lanes(glast, n8), bool(ctx.delta_softplus), delta_bias is not None,
                ctx.chunk)
        need = ctx.needs_input_grad
        return (gu.transpose(1, 2).to(u.dtype) if need[0] else None,
                gdelta.transpose(1, 2).to(ctx.delta_dtype) if need[1] else None,
                gA[:, :n].to(A.dtype) if need[2] else None,
                gB[..., :n].transpose(1, 2).to(B.dtype).contiguous() if need[3] else None,
                gC[..., :n].transpose(1, 2).to(C.dtype).contiguous() if need[4] else None,
                gD.to(D.dtype) if need[5] and D is not None else None,
                gz.transpose(1, 2).to(z.dtype) if need[6] and z is not None else None,
                gbias.to(delta_bias.dtype) if need[7] and delta_bias is not None else None,
                gh0[..., :n].to(ctx.h0_dtype, copy=True) if need[8] and ctx.has_h0 else None,
                None, None, None, None)


def selective_scan_fast(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                        initial_state=None, return_last_state=False, chunk_size=None, parallel=None, native=None):
    """Chunked in-place scan with a hand-written backward (see the module docstring). ``parallel``: solve
    each chunk's recurrence in log-depth rounds (default: on every device but the CPU). ``native``: run the
    per-step form's loops in C++ (fp32 on the CPU; default: when the kernels are built; False: PyTorch ops)."""
    _check_shapes(u, delta, A, B, C, D, z, delta_bias, initial_state)
    if parallel is None:
        parallel = u.device.type != "cpu"
    if chunk_size is None and parallel:
        per_step = u.shape[0] * u.shape[1] * A.shape[1] * 4
        chunk_size = max(CHUNK_SIZE, min(PARALLEL_CHUNK_SIZE, 2 ** int(math.log2(max(PARALLEL_BUFFER_BYTES // per_step, 1)))))
    chunk = int(chunk_size or CHUNK_SIZE)
    if chunk < 1:
        raise ValueError("chunk_size must be >= 1")
    ops = _cpu_scan_ops(u, A, parallel) if native is not False else None
    if native and ops is None:
        raise RuntimeError("selective_scan_fast(native=True) needs fp32 CPU inputs, parallel=False, a state size "
                           "<= 64 and the C++ kernels (mom.infer.kernels.why_unavailable() says why they are not "
                           "built)")
    y, last = _SelectiveScanFn.apply(u, delta, A, B, C, D, z, delta_bias, initial_state,
                                     bool(delta_softplus), chunk, bool(parallel), ops is not None)
    return (y, last) if return_last_state else y


# --------------------------------------------------------------------------------------------------------
# dispatch
# --------------------------------------------------------------------------------------------------------
_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _kernel_scan(fn, u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state):
    """mamba_ssm's selective_scan_fn with the argument dtypes its CUDA code checks (selective_scan.cpp):
    delta, B, C and z in u's dtype, A, D and delta_bias float32. MoM's B and C come out of fp32 RMSNorms and,
    under FSDP or a bf16 model, D and the dt bias are bf16: without these casts the kernel refuses them."""
    low = u.dtype
    out = fn(u, delta.to(low), A.float(), B.to(low), C.to(low),
             D=D.float() if D is not None else None, z=z.to(low) if z is not None else None,
             delta_bias=delta_bias.float() if delta_bias is not None else None,
             delta_softplus=delta_softplus, return_last_state=return_last_state)
    if return_last_state:
        y, last = out
        return y, last.float().contiguous()  # a view into the kernel's chunk states: do not keep those alive
    return out


def _scan_kernel(u, A, initial_state, return_last_state, tensors):
    """mamba_ssm's scan when it can compute this call exactly, else None. It has no initial state, needs
    dstate <= 256, and ignores the gradient of the last state (so not when that state may need one)."""
    if initial_state is not None or u.dtype not in _KERNEL_DTYPES or A.shape[1] > 256:
        return None
    if return_last_state and torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
        return None
    if any(t is not None and t.device != u.device for t in tensors):
        return None
    return kernels.get("selective_scan", u.device)


def selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                   initial_state=None, return_last_state=False, impl="auto"):
    """Mamba-1 selective scan; returns ``y`` (b, d, l) [, ``last_state`` (b, d, n) float32].

    ``impl``: ``"auto"`` | ``"fast"`` | ``"reference"`` | ``"cuda"`` (see the module docstring).
    """
    if impl == "reference":
        return selective_scan_reference(u, delta, A, B, C, D, z, delta_bias, delta_softplus,
                                        initial_state, return_last_state)
    if impl == "fast":
        return selective_scan_fast(u, delta, A, B, C, D, z, delta_bias, delta_softplus,
                                   initial_state, return_last_state)
    if impl in ("cuda", "auto"):
        _check_shapes(u, delta, A, B, C, D, z, delta_bias, initial_state)
        tensors = (u, delta, A, B, C, D, z, delta_bias)
        fn = _scan_kernel(u, A, None, False, tensors)  # usable at all for these tensors?
        if impl == "cuda" and fn is None:
            why = kernels.why_unusable("selective_scan", u.device) if u.dtype in _KERNEL_DTYPES else \
                f"dtype {u.dtype} is not supported by the kernel"
            raise RuntimeError(f"selective_scan(impl='cuda') is unavailable: {why}; use impl='auto' or 'fast'")
        if fn is not None and _scan_kernel(u, A, initial_state, return_last_state, tensors) is not None:
            return _kernel_scan(fn, u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state)
        return selective_scan_fast(u, delta, A, B, C, D, z, delta_bias, delta_softplus,
                                   initial_state, return_last_state)
    raise ValueError(f"unknown selective_scan impl {impl!r}; expected auto, fast, reference or cuda")


# --------------------------------------------------------------------------------------------------------
# one decoding step
# --------------------------------------------------------------------------------------------------------
def selective_state_update(state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False):
    """One recurrent step, updating ``state`` (b, d, n) in place; x, dt, z: (b, d); B, C: (b, n).

    Returns y (b, d) in ``x.dtype``. Uses mamba_ssm's Triton kernel on CUDA when it is usable; it is given
    a ``dt_bias`` always (its wrapper cannot take None: it unpacks the bias's strides).
    """
    b, d = x.shape
    if state.dim() != 3 or state.shape[:2] != (b, d):
        raise ValueError(f"state must be (b, d, n) with (b, d)={(b, d)}, got {tuple(state.shape)}")
    n = state.shape[2]
    if dt.shape != (b, d) or B.shape != (b, n) or C.shape != (b, n) or A.shape != (d, n):
        raise ValueError("selective_state_update: expected dt (b, d), A (d, n), B and C (b, n); got "
                         f"{tuple(dt.shape)}, {tuple(A.shape)}, {tuple(B.shape)}, {tuple(C.shape)}")
    if x.dtype in _KERNEL_DTYPES and state.dtype in _KERNEL_DTYPES:
        step = kernels.get("selective_state_update", x.device)
        if step is not None:
            bias = dt_bias.float() if dt_bias is not None else torch.zeros(d, device=x.device)
            return step(state, x, dt, A, B, C, D=D, z=z, dt_bias=bias, dt_softplus=dt_softplus)
    return step_reference(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus)


def step_reference(state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False):
    """PyTorch form of :func:`selective_state_update` (updates ``state`` in place, returns y in x.dtype)."""
    with _no_autocast(x.device.type):
        dtf = dt.to(_acc(dt))
        if dt_bias is not None:
            dtf = dtf + dt_bias.to(_acc(dt_bias))
        if dt_softplus:
            dtf = F.softplus(dtf)
        xf = x.to(_acc(x))
        dA = torch.exp(dtf[:, :, None] * A.to(_acc(A)))
        if state.dtype == dA.dtype:  # in place: no new (b, d, n) tensors
            h = state.mul_(dA).addcmul_((dtf * xf)[:, :, None], B.to(dA.dtype)[:, None, :])
        else:
            h = state.to(dA.dtype) * dA + (dtf * xf)[:, :, None] * B.to(dA.dtype)[:, None, :]
            state.copy_(h)
        y = torch.matmul(h, C.to(h.dtype)[:, :, None]).squeeze(-1)
        if D is not None:
            y = y + D.to(_acc(D)) * xf
        if z is not None:
            y = y * F.silu(z.to(_acc(z)))
    return y.to(x.dtype)


# --------------------------------------------------------------------------------------------------------
# probes of the kernels (mom.model.kernels): a tiny call checked against the code above
# --------------------------------------------------------------------------------------------------------
@kernels.probe("selective_scan")
def _probe_scan(fn, device):
    g = torch.Generator().manual_seed(0)
    b, d, n, L = 1, 4, 4, 5
    u, dt, z = (torch.randn(b, d, L, generator=g) for _ in range(3))
    A = -torch.rand(d, n, generator=g) - 0.5
    B, C = torch.randn(b, n, L, generator=g), torch.randn(b, n, L, generator=g)
    D, bias = torch.randn(d, generator=g), torch.randn(d, generator=g)
    args = [t.to(device) for t in (u, dt, A, B, C, D, z, bias)]
    y, last = fn(*args[:5], D=args[5], z=args[6], delta_bias=args[7], delta_softplus=True, return_last_state=True)
    y_ref, last_ref = selective_scan_reference(u, dt, A, B, C, D, z, bias, True, return_last_state=True)
    kernels.close(y, y_ref, "selective_scan_fn output")
    kernels.close(last, last_ref, "selective_scan_fn last state")


@kernels.probe("selective_state_update")
def _probe_step(fn, device):
    g = torch.Generator().manual_seed(0)
    b, d, n = 2, 4, 4
    state = torch.randn(b, d, n, generator=g)
    x, dt, z = (torch.randn(b, d, generator=g) for _ in range(3))
    A = -torch.rand(d, n, generator=g) - 0.5
    B, C = torch.randn(b, n, generator=g), torch.randn(b, n, generator=g)
    D, bias = torch.randn(d, generator=g), torch.randn(d, generator=g)
    s_dev = state.to(device, copy=True)
    y = fn(s_dev, *(t.to(device) for t in (x, dt, A, B, C)), D=D.to(device), z=z.to(device),
           dt_bias=bias.to(device), dt_softplus=True)
    y_ref = step_reference(state, x, dt, A, B, C, D, z, bias, True)  # updates ``state`` in place
    kernels.close(y, y_ref, "selective_state_update output")
    kernels.close(s_dev, state, "selective_state_update state")
