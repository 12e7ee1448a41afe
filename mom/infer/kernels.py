"""The engine's CPU kernels: a small C++ extension built at first use, with eager torch fallbacks.

``csrc/kernels.cpp``, ``csrc/step.cpp`` and ``csrc/scan.cpp`` (loops shared through ``csrc/kernels.h``) are compiled once per machine and torch version by ``torch.utils.cpp_extension.load``
into ``$MOM_KERNEL_CACHE`` (default ``~/.cache/mom/kernels``), ``-O3 -march=native`` (AVX2 + FMA is the
floor; the compiler uses what the CPU has), and registers the ops ``torch.ops.mom_infer.*``:

- ``ternary_linear(x, packed, norm_weight, eps, gamma, bias)``: BitLinear's inference forward read from
  2-bit weights (RMSNorm and int8 quantisation fused in), bit-identical to ``BitLinear``;
- ``linear_f32(x, w, bias)`` / ``linear_bf16w(x, w, bias)`` / ``linear_i8w(x, q, scale, bias)`` (int8 weights, one
  scale a row) / ``linear_multi_f32(x, [w...])``: few-row
  matrix products at memory bandwidth (torch's GEMV reaches about half of it at batch 1 on the machines
  measured); the last one serves several weights sharing an input (q/k/v, gate/up) in one parallel pass;
- ``rms_norm``, ``mamba_conv_step``, ``mamba_ssm_step``: the decode step's small ops fused (one call instead
  of five to fifteen torch ops each);
- ``selective_scan_cpu_tm_fwd`` / ``_tm_bwd`` and ``causal_conv1d_cpu_fwd`` / ``_bwd`` (``csrc/scan.cpp``): the Mamba
  mixer's CPU training path on time-major activations (the scan with softplus, D and the z gate fused; the
  causal conv with its SiLU).
- ``selective_scan_cpu_fwd`` / ``selective_scan_cpu_bwd`` (``csrc/scan.cpp``): the training scan's forward and
  backward recurrences on the CPU (``mom.model.scan``'s fast path uses them when they are built).

Fake (meta) implementations are registered beside them so ``torch.compile`` traces through the ops.
Without a C++ compiler, or when the build fails, ``available()`` is False, one warning says why, and the
engine falls back to the eager ops (the reference modules' math): slower, same results.
"""

from __future__ import annotations

import hashlib
import os
import platform
import shutil
import warnings
from pathlib import Path

import torch

_CSRC = Path(__file__).with_name("csrc")
_SOURCES = [_CSRC / "kernels.cpp", _CSRC / "step.cpp", _CSRC / "scan.cpp"]
_STATE: dict = {"tried": False, "ok": False, "why": ""}
_FLAGS = ["-O3", "-march=native", "-ffp-contract=off", "-fopenmp", "-std=c++17"]


def cache_dir() -> Path:
    root = os.environ.get("MOM_KERNEL_CACHE") or Path.home() / ".cache" / "mom" / "kernels"
    text = "".join(p.read_text() for p in [*_SOURCES, _CSRC / "kernels.h"])
    tag = hashlib.sha1((text + torch.__version__ + " ".join(_FLAGS)).encode()).hexdigest()[:12]
    return Path(root) / f"{platform.machine()}-torch{torch.__version__.split('+')[0]}-{tag}"


def _compiler() -> str | None:
    cxx = os.environ.get("CXX", "c++")
    return shutil.which(cxx)


def _cpu_has_avx2() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.machine().lower() in ("x86_64", "amd64")
    return " avx2" in flags and " fma" in flags


def _build() -> None:
    if platform.machine().lower() not in ("x86_64", "amd64") or not _cpu_has_avx2():
        raise RuntimeError(f"the C++ kernels need an x86-64 CPU with AVX2 and FMA ({platform.machine()} here)")
    if _compiler() is None:
        raise RuntimeError(f"no C++ compiler found (looked for {os.environ.get('CXX', 'c++')!r}: install g++ "
                           "or set CXX)")
    if shutil.which("ninja") is None and not (Path(torch.__file__).parent.parent / "ninja").exists():
        try:
            import ninja  # noqa: F401
        except ImportError:
            raise RuntimeError("ninja is not installed (pip install ninja), needed to build the C++ kernels") from None
    from torch.utils.cpp_extension import load

    build = cache_dir()
    build.mkdir(parents=True, exist_ok=True)
    load(name="mom_infer_kernels", sources=[str(p) for p in _SOURCES], extra_cflags=_FLAGS, extra_ldflags=["-fopenmp"],
         build_directory=str(build), is_python_module=False, verbose=False)


def available() -> bool:
    """Build (once per process; the library is cached on disk) and load the kernels; False if impossible."""
    if not _STATE["tried"]:
        _STATE["tried"] = True
        if os.environ.get("MOM_NO_KERNELS"):
            _STATE["why"] = "MOM_NO_KERNELS is set"
        else:
            try:
                _build()
                _register_fakes()
                _STATE["ok"] = True
            except Exception as e:  # noqa: BLE001 - any failure: say why once, use the eager path
                lines = [ln for ln in str(e).splitlines() if ln.strip()]
                first = next((ln for ln in lines if "error:" in ln), lines[0] if lines else type(e).__name__)
                _STATE["why"] = first[:300]
        if not _STATE["ok"]:
            warnings.warn(f"mom.infer: C++ kernels unavailable ({_STATE['why']}); decoding and CPU training "
                          "use the eager torch path, which is several times slower", RuntimeWarning, stacklevel=2)
    return _STATE["ok"]


def why_unavailable() -> str:
    return _STATE["why"]


def reset() -> None:
    """Forget the outcome of the last attempt (tests simulate a machine without a compiler)."""
    _STATE.update(tried=False, ok=False, why="")


def quantize_rows_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(q, scale): int8 weights and one fp32 scale per output row, w ~ q * scale[:, None] (absmax: the largest
    weight of a row maps to 127). The format of ``linear_i8w`` and the engine's ``high_precision="int8"``."""
    w = w.detach().float()
    scale = (w.abs().amax(dim=1) / 127.0).clamp_min(1e-12)
    q = torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8)
    return q.contiguous(), scale.contiguous()


_FAKES_DONE = False


def _register_fakes() -> None:
    global _FAKES_DONE
    if _FAKES_DONE:
        return

    @torch.library.register_fake("mom_infer::ternary_linear")
    def _(x, packed, norm_weight, eps, gamma, bias):
        return x.new_empty((*x.shape[:-1], packed.shape[0]))

    @torch.library.register_fake("mom_infer::linear_f32")
    def _(x, weight, bias):
        return x.new_empty((*x.shape[:-1], weight.shape[0]))

    @torch.library.register_fake("mom_infer::linear_bf16w")
    def _(x, weight, bias):
        return x.new_empty((*x.shape[:-1], weight.shape[0]))

    @torch.library.register_fake("mom_infer::linear_i8w")
    def _(x, weight, scale, bias):
        return x.new_empty((*x.shape[:-1], weight.shape[0]))

    @torch.library.register_fake("mom_infer::linear_multi_f32")
    def _(x, weights):
        return [x.new_empty((*x.shape[:-1], w.shape[0])) for w in weights]

    @torch.library.register_fake("mom_infer::rms_norm")
    def _(x, weight, eps):
        return torch.empty_like(x)

    @torch.library.register_fake("mom_infer::mamba_conv_step")
    def _(xz, conv_state, weight, bias):
        return xz.new_empty(conv_state.shape[:2])

    @torch.library.register_fake("mom_infer::mamba_ssm_step")
    def _(ssm, u, dt, A, B, C, D, xz):
        return torch.empty_like(u)

    @torch.library.register_fake("mom_infer::selective_scan_cpu_fwd")
    def _(u, dt, A, B, C, h0, chunk, keep_states):
        b, d, L = u.shape
        states = u.new_empty((-(-L // chunk), b, d, A.shape[1]) if keep_states else (0,))
        return [torch.empty_like(u), u.new_empty((b, d, A.shape[1])), states]

    @torch.library.register_fake("mom_infer::selective_scan_cpu_bwd")
    def _(u, dt, A, B, C, states, gy, glast, chunk):
        b, d, _ = u.shape
        return [torch.empty_like(u), torch.empty_like(u), torch.empty_like(A), torch.empty_like(B),
                torch.empty_like(C), u.new_empty((b, d, A.shape[1]))]

    @torch.library.register_fake("mom_infer::selective_scan_cpu_tm_fwd")
    def _(u, delta, delta_bias, A, B, C, D, z, h0, softplus, chunk, keep_states):
        b, L, d = u.shape
        states = u.new_empty((-(-L // chunk), b, d, A.shape[1]) if keep_states else (0,))
        y_pre = u.new_empty((b, L, d) if z is not None else (0,))
        return [u.new_empty((b, L, d)), u.new_empty((b, d, A.shape[1])), states, u.new_empty((b, L, d)), y_pre]

    @torch.library.register_fake("mom_infer::selective_scan_cpu_tm_bwd")
    def _(u, dt, A, B, C, D, z, y_pre, states, gout, glast, softplus, has_bias, chunk):
        b, L, d = u.shape
        return [u.new_empty((b, L, d)), u.new_empty((b, L, d)), torch.empty_like(A), torch.empty_like(B),
                torch.empty_like(C), u.new_empty((d,) if D is not None else (0,)),
                u.new_empty((b, L, d) if z is not None else (0,)), u.new_empty((d,) if has_bias else (0,)),
                u.new_empty((b, d, A.shape[1]))]

    @torch.library.register_fake("mom_infer::causal_conv1d_cpu_fwd")
    def _(x, w, bias):
        return x.new_empty(x.shape)

    @torch.library.register_fake("mom_infer::causal_conv1d_cpu_bwd")
    def _(x, w, bias, gout):
        return [x.new_empty(x.shape), torch.empty_like(w), x.new_empty((x.shape[2],) if bias is not None else (0,))]

    _FAKES_DONE = True


__all__ = ["available", "why_unavailable", "cache_dir", "reset", "quantize_rows_int8"]
