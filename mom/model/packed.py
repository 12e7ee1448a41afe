"""Inference-only packed ternary linear layers (2 bits per weight) with exact low-bit CPU kernels.

``PackedTernaryLinear.from_bitlinear(bl)`` stores a trained :class:`~mom.model.bitlinear.BitLinear` as

- ``packed_weight``: uint8 (out, ceil(in / 4)), four ternary weights per byte, weight ``k`` of a row in bits
  ``2 * (k % 4)`` of byte ``k // 4`` as the code ``w + 1`` in {0, 1, 2} (padding: code 1 = weight 0);
- ``weight_scale``: gamma, fp32 0-dim tensor (kept fp32 by ``.to(dtype)``/``.half()``);
- ``bias`` (if any) and ``norm.weight`` (the SubLN gain; ``in_features = norm.weight.shape[0]``,
  ``out_features = packed_weight.shape[0]``).

and computes the same function as ``BitLinear.forward`` in eval mode::

    x_int, 1/s = quantize_input(x, norm)      # integers in [-128, 127], the same bits as BitLinear's
    y = (x_int @ T^T) * gamma / s + bias     # T in {-1, 0, 1}: the product is an exact integer

Kernel paths (``kernel`` attribute; ``"auto"`` picks per device). The unpacked kernel layout is built once on
first use and cached on the module, never saved (the persistent storage is the 2-bit one). It is a private
cache rather than a non-persistent buffer because oneDNN's prepacked weight is an opaque tensor that cannot
be copied, moved or pickled; the cache is keyed on the packed weight's storage and version, dropped by
``.to()``/``load_state_dict`` and left out of deep copies.

``onednn`` (CPU default)
    ``torch.ops.onednn.qlinear_pointwise``: u8 activations (``x_int + 128``, zero point 128) times s8 ternary
    weights (prepacked by ``onednn.qlinear_prepack``), int32 accumulation, fp32 output (the exact integer
    sums), then ``* (gamma / s)`` in the order BitLinear uses. Exact product (no saturation: without VNNI
    the u8 x s8 pair sums stay <= 510 in int16), so the output equals BitLinear's bit for bit (tested). Measured on the 2-core dev machine (AVX-512, no VNNI) at K=N=2048, 1 thread: the whole
    layer (norm + quantisation + kernel) is 2.1x / 5.5x / 3.1x faster than a bare fp32 ``F.linear`` at
    M = 1 / 8 / 256 (the kernel alone ~5-9x at M=1), so it is used at every M: unlike the bf16 kernels below it
    does not lose to fp32 mm at prefill sizes, and no per-M switch is needed.
``dense`` (CPU fallback when the oneDNN op is missing or fails its first-use self test)
    fp32 ``F.linear`` on the {-1, 0, 1} matrix with integer activations: exact, fp32-mm speed.
``int8pack`` / ``int4pack`` (opt-in, for benchmarks)
    ``aten._weight_int8pack_mm`` / ``aten._weight_int4pack_mm_for_cpu`` with bf16 activations (the integers
    are exact in bf16; weights zero-padded to the kernels' shape rules). They beat fp32 mm only at small M
    (layer 1.4x at M=1, 1.9x at M=8, 0.9x at M=256) and round their output to bf16: max relative error
    ~3e-3 vs BitLinear, enough to flip greedy argmaxes, so ``auto`` never picks them.
``lowp`` (CUDA default)
    plain dequantised matmul in the autocast dtype (else the input's half dtype, else bf16) on the integer
    activations and {-1, 0, 1} weights, then ``* gamma / s`` in fp32. Inputs are exact, the output is rounded
    to bf16/fp16 (relative error ~1e-3/5e-4), so CUDA decoding is not bit-identical to fp32 BitLinear eval.

Note on memory: the checkpoint holds 2 bits per weight; the kernel layout, built lazily on first use and never
saved (``drop_kernel_cache()`` frees it), adds 1 byte per weight for ``onednn`` (int8) and 2 bytes for ``lowp`` (a
bf16/fp16 copy): on CUDA a packed model takes as much memory as a bf16 one; the 2-bit form saves disk and load time.
"""

from __future__ import annotations

import math
import platform

import torch
import torch.nn.functional as F
from torch import nn

from mom.model.bitlinear import BitLinear, quantize_input
from mom.model.norm import RMSNorm

KERNELS = ("auto", "onednn", "dense", "int8pack", "int4pack", "lowp")
_PAD_CODE = 0b01  # code of weight 0


# --------------------------------------------------------------------------- 2-bit packing
def pack_ternary(t: torch.Tensor) -> torch.Tensor:
    """(out, in) integer tensor with values in {-1, 0, 1} -> uint8 (out, ceil(in / 4)), 4 weights per byte."""
    if t.dim() != 2:
        raise ValueError(f"pack_ternary expects a 2-D weight, got shape {tuple(t.shape)}")
    if t.numel() and (t.min() < -1 or t.max() > 1):
        raise ValueError("pack_ternary: values must be in {-1, 0, 1}")
    n, k = t.shape
    k4 = math.ceil(k / 4)
    codes = torch.full((n, 4 * k4), _PAD_CODE, dtype=torch.uint8, device=t.device)
    codes[:, :k] = (t.to(torch.int16) + 1).to(torch.uint8)
    codes = codes.view(n, k4, 4)
    return codes[..., 0] | (codes[..., 1] << 2) | (codes[..., 2] << 4) | (codes[..., 3] << 6)


def unpack_ternary(packed: torch.Tensor, in_features: int) -> torch.Tensor:
    """Inverse of :func:`pack_ternary`: int8 (out, in_features) with values in {-1, 0, 1}."""
    if packed.dtype != torch.uint8 or packed.dim() != 2:
        raise ValueError(f"packed ternary weights must be 2-D uint8, got {packed.dtype} {tuple(packed.shape)}")
    if packed.shape[1] != math.ceil(in_features / 4):
        raise ValueError(f"packed weight has {packed.shape[1]} bytes per row; in_features={in_features} "
                         f"needs {math.ceil(in_features / 4)}")
    shifts = torch.tensor([0, 2, 4, 6], dtype=torch.uint8, device=packed.device)
    codes = (packed.unsqueeze(-1) >> shifts) & 3
    codes = codes.reshape(packed.shape[0], -1)[:, :in_features]
    if bool((codes == 3).any()):
        raise ValueError("corrupt packed ternary weight: code 3 is not a valid weight")
    return codes.to(torch.int8) - 1


# --------------------------------------------------------------------------- oneDNN availability
_ONEDNN_OK: bool | None = None


def onednn_available() -> bool:
    """Whether ``onednn.qlinear_pointwise`` exists here and computes an exact ternary product (tested once)."""
    global _ONEDNN_OK
    if _ONEDNN_OK is None:
        _ONEDNN_OK = False
        try:
            if (torch.backends.mkldnn.is_available() and hasattr(torch.ops.onednn, "qlinear_pointwise")
                    and platform.machine().lower() in ("x86_64", "amd64", "i386", "i686")):
                g = torch.Generator().manual_seed(0)
                w = torch.randint(-1, 2, (8, 37), generator=g, dtype=torch.int8)
                w[:, 0] = 1
                x = torch.randint(-128, 128, (3, 37), generator=g)
                x[0] = 127
                got = _onednn_mm((x + 128).to(torch.uint8), torch.ops.onednn.qlinear_prepack(w, None),
                                 torch.ones(8), torch.zeros(8, dtype=torch.long))
                _ONEDNN_OK = bool(torch.equal(got, (x @ w.long().T).float()))
        except Exception:  # noqa: BLE001 - any failure means "use the fallback"
            _ONEDNN_OK = False
    return _ONEDNN_OK


def _onednn_mm(x_u8, w_packed, w_scales, w_zps):
    return torch.ops.onednn.qlinear_pointwise(x_u8, 1.0, 128, w_packed, w_scales, w_zps, None, 1.0, 0,
                                              torch.float32, "none", [], "")


# --------------------------------------------------------------------------- module
class PackedTernaryLinear(nn.Module):
    """Inference-only BitLinear with 2-bit weight storage; see the module docstring."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False, norm_eps: float = 1e-6,
                 device=None, kernel: str = "auto"):
        super().__init__()
        if kernel not in KERNELS:
            raise ValueError(f"unknown kernel {kernel!r} (known: {', '.join(KERNELS)})")
        self.in_features = in_features
        self.out_features = out_features
        self.kernel = kernel
        k4 = math.ceil(in_features / 4)
        self.register_buffer("packed_weight", torch.full((out_features, k4), 0b01010101, dtype=torch.uint8,
                                                         device=device))
        self.register_buffer("weight_scale", torch.ones((), dtype=torch.float32, device=device))
        if bias:
            self.register_buffer("bias", torch.zeros(out_features, device=device))
        else:
            self.bias = None
        self.norm = RMSNorm(in_features, eps=norm_eps).to(device=device)
        self.norm.weight.requires_grad_(False)
        self._kernel_cache: dict = {}

    # ------------------------------------------------------------------ construction
    @classmethod
    @torch.no_grad()
    def from_bitlinear(cls, bl: BitLinear, kernel: str = "auto") -> PackedTernaryLinear:
        t, gamma = bl.quantized_weight()
        m = cls(bl.in_features, bl.out_features, bias=bl.bias is not None, norm_eps=bl.norm.eps,
                device=bl.weight.device, kernel=kernel)
        m.packed_weight.copy_(pack_ternary(t))
        m.weight_scale.copy_(gamma)
        if bl.bias is not None:
            m.bias = bl.bias.detach().clone()
        m.norm.weight.data = bl.norm.weight.detach().clone()
        m.norm.weight.requires_grad_(False)
        return m.train(bl.training)

    def ternary_weight(self) -> torch.Tensor:
        """The unpacked ternary weights, int8 (out, in) in {-1, 0, 1}."""
        return unpack_ternary(self.packed_weight, self.in_features)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # shapes are authoritative: a checkpoint may come from a layer built with other sizes
        pw = state_dict.get(prefix + "packed_weight")
        nw = state_dict.get(prefix + "norm.weight")
        if pw is not None and nw is not None:
            self.in_features, self.out_features = int(nw.shape[0]), int(pw.shape[0])
        self._kernel_cache.clear()
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    # ------------------------------------------------------------------ kernel layouts (cached, not saved)
    def rebuild_buffers(self, device=None) -> None:
        """No non-persistent buffers to rebuild (the kernel layouts are a lazy cache); drops the cache."""
        self._kernel_cache.clear()

    def resolved_kernel(self, device: torch.device | None = None) -> str:
        device = device or self.packed_weight.device
        if self.kernel != "auto":
            return self.kernel
        if device.type == "cuda":
            return "lowp"
        return "onednn" if onednn_available() else "dense"

    def _layout(self, kernel: str, dtype: torch.dtype | None = None):
        pw, ws = self.packed_weight, self.weight_scale
        key = (kernel, dtype, pw.device, pw.data_ptr(), pw._version, ws.data_ptr(), ws._version)
        hit = self._kernel_cache.get(kernel)
        if hit is not None and hit[0] == key:
            return hit[1]
        t = self.ternary_weight()
        n, k = t.shape
        if kernel == "onednn":
            if t.device.type != "cpu":
                raise RuntimeError("the onednn kernel runs on CPU only")
            # unit weight scales: oneDNN returns the exact integer sums; gamma / s is applied afterwards,
            # in the same order as BitLinear, so both give the same bits
            layout = (torch.ops.onednn.qlinear_prepack(t.contiguous(), None), torch.ones(n),
                      torch.zeros(n, dtype=torch.long))
        elif kernel == "dense":
            layout = t.float()
        elif kernel == "lowp":
            layout = t.to(dtype)
        elif kernel == "int8pack":
            # the CPU kernel needs in_features % 16 == 0 (measured: 136 gives NaN, 130 crashes): zero-pad to 64
            kp = math.ceil(k / 64) * 64
            w8 = torch.zeros(n, kp, dtype=torch.int8, device=t.device)
            w8[:, :k] = t
            layout = (w8, torch.ones(n, dtype=torch.bfloat16, device=t.device), kp)
        elif kernel == "int4pack":
            # the kernel wants in % group == 0 and out % 16 == 0: zero-pad (code 8 = weight 0), dequant (q-8)*1+0
            gs = 32
            kp, np_ = math.ceil(k / gs) * gs, math.ceil(n / 16) * 16
            q = torch.full((np_, kp), 8, dtype=torch.int32, device=t.device)
            q[:n, :k] = t.to(torch.int32) + 8
            sz = torch.zeros(kp // gs, np_, 2, dtype=torch.bfloat16, device=t.device)
            sz[..., 0] = 1.0
            layout = (torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1), sz, gs, kp)
        else:
            raise ValueError(f"unknown kernel {kernel!r} (known: {', '.join(KERNELS)})")
        self._kernel_cache[kernel] = (key, layout)
        return layout

    def _int_matmul(self, x_int: torch.Tensor, kernel: str, lowp_dtype: torch.dtype = torch.bfloat16
                    ) -> torch.Tensor:
        """fp32 (M, out) = x_int @ T^T for integer-valued fp32 x_int (M, in) (exact for the exact kernels)."""
        if kernel == "onednn":
            w, scales, zps = self._layout("onednn")
            return _onednn_mm(x_int.add(128.0).to(torch.uint8), w, scales, zps)
        if kernel == "dense":
            return F.linear(x_int, self._layout("dense"))
        if kernel == "lowp":
            with torch.autocast(x_int.device.type, enabled=False):
                w = self._layout("lowp", lowp_dtype)
                return F.linear(x_int.to(lowp_dtype), w).float()
        if kernel == "int8pack":
            w, scales, kp = self._layout("int8pack")
            xb = x_int.to(torch.bfloat16)
            if kp != xb.shape[-1]:
                xb = F.pad(xb, (0, kp - xb.shape[-1]))
            return torch.ops.aten._weight_int8pack_mm(xb, w, scales).float()
        if kernel == "int4pack":
            w, sz, gs, kp = self._layout("int4pack")
            xb = x_int.to(torch.bfloat16)
            if kp != xb.shape[-1]:
                xb = F.pad(xb, (0, kp - xb.shape[-1]))
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(xb, w, gs, sz)[:, : self.out_features]
            return y.float()
        raise ValueError(f"unknown kernel {kernel!r} (known: {', '.join(KERNELS)})")

    # ------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dev = x.device.type
        out_dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype
        lowp = out_dtype if out_dtype in (torch.float16, torch.bfloat16) else torch.bfloat16
        lead = x.shape[:-1]
        with torch.no_grad():
            x_int, inv_s, _, _ = quantize_input(x.reshape(-1, self.in_features), self.norm.weight, self.norm.eps)
            y = self._int_matmul(x_int, self.resolved_kernel(x.device), lowp)
            y.mul_(self.weight_scale.to(inv_s.dtype) * inv_s)  # BitLinear's order: (x_int @ T^T) * (gamma / s)
            if self.bias is not None:
                y.add_(self.bias)
        return y.to(out_dtype).reshape(*lead, self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, bits=2, kernel={self.kernel}")

    # ------------------------------------------------------------------ keep gamma fp32, caches off copies
    def _apply(self, fn, recurse=True):
        ws = self.weight_scale
        super()._apply(fn, recurse)
        if self.weight_scale.dtype != torch.float32:  # .half()/.to(bf16) would round gamma
            self.weight_scale = ws.to(device=self.weight_scale.device, dtype=torch.float32)
        self._kernel_cache.clear()
        return self

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_kernel_cache"] = {}  # oneDNN's opaque tensors cannot be copied or pickled
        return state


# --------------------------------------------------------------------------- model-level helpers
def _shared_weight_ids(model: nn.Module) -> set[int]:
    seen: dict[int, int] = {}
    for _, module in model.named_modules(remove_duplicate=False):
        for _, p in module.named_parameters(recurse=False):
            seen[id(p)] = seen.get(id(p), 0) + 1
    return {i for i, c in seen.items() if c > 1}


def pack_model(model: nn.Module, kernel: str = "auto", skip_shared: bool = True) -> nn.Module:
    """Replace every BitLinear in ``model`` by a PackedTernaryLinear (in place; returns ``model``).

    With ``skip_shared`` a BitLinear whose weight is tied to another module (e.g. a tied ternary lm_head)
    stays unpacked, so the tie survives.
    """
    if isinstance(model, BitLinear):
        raise TypeError("pack_model needs a container module; use PackedTernaryLinear.from_bitlinear(layer)")
    shared = _shared_weight_ids(model) if skip_shared else set()
    for _, parent in list(model.named_modules()):
        for child_name, child in list(parent.named_children()):
            if isinstance(child, BitLinear) and id(child.weight) not in shared:
                setattr(parent, child_name, PackedTernaryLinear.from_bitlinear(child, kernel=kernel))
    return model


def packed_module_names(state_dict) -> set[str]:
    """Module prefixes (``"model.layers.0.mamba.in_proj"``) whose state has a ``packed_weight``."""
    suffix = "packed_weight"
    return {k[: -len(suffix)].rstrip(".") for k in state_dict if k == suffix or k.endswith("." + suffix)}


def replace_with_packed(model: nn.Module, names) -> nn.Module:
    """Swap the BitLinear modules called ``names`` for empty PackedTernaryLinear of the same shape (on the
    same device, e.g. meta) so a packed state dict can be loaded into ``model``. Returns ``model``."""
    for name in sorted(names):
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"packed weights for {name!r}, but the model has no such module") from None
        if isinstance(module, PackedTernaryLinear):
            continue
        if not isinstance(module, BitLinear):
            raise ValueError(f"packed weights for {name!r}, but that module is a {type(module).__name__}, "
                             "not a BitLinear (does the config's precision match the checkpoint?)")
        new = PackedTernaryLinear(module.in_features, module.out_features, bias=module.bias is not None,
                                  norm_eps=module.norm.eps, device=module.weight.device)
        new.train(module.training)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, new)
    return model


__all__ = ["PackedTernaryLinear", "pack_model", "packed_module_names", "replace_with_packed", "pack_ternary",
           "unpack_ternary", "onednn_available", "KERNELS"]
