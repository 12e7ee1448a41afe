"""The optional CUDA kernels (extra ``gpu``): where MoM looks them up and whether they work here.

============================  ===============================================================  ================
name                          looked up as                                                     used by
============================  ===============================================================  ================
``selective_scan``            ``mamba_ssm.ops.selective_scan_interface.selective_scan_fn``     training/prefill
``selective_state_update``    ``mamba_ssm.ops.triton.selective_state_update``                  decoding (Triton)
``causal_conv1d``             ``causal_conv1d.causal_conv1d_fn``                               training/prefill
``causal_conv1d_update``      ``causal_conv1d.causal_conv1d_update``                           decoding
============================  ===============================================================  ================

Importable is not usable: mamba-ssm's git main installs without its scan extension unless asked
(``MAMBA_KEEP_CUDA_BUILD=TRUE``), and then ``selective_scan_fn`` imports but raises when called; a wheel
built for another GPU architecture fails the same way. So each kernel is *probed* once per device: a tiny
call checked against MoM's own math. A kernel that fails its probe is reported once (a warning naming it
and the error) and MoM uses its own path (``mom.model.scan``, PyTorch convolutions) from then on.

Kernels run only on tensors whose device type is in :data:`KERNEL_DEVICES` (CUDA). Tests add ``"cpu"`` and
install stand-ins that enforce the real kernels' argument checks (tests/helpers/kernel_standins.py).

On the CPU, :func:`cpu_ops` hands the training code MoM's own C++ loops (the selective scan's recurrences),
which live in the inference engine's extension (``mom.infer.kernels``, built at first use; without a compiler
the torch ops run).
"""

from __future__ import annotations

import importlib
import logging

import torch

log = logging.getLogger("mom")

#: Device types on which the kernels are tried.
KERNEL_DEVICES: tuple[str, ...] = ("cuda",)

_LOOKUP = {
    "selective_scan": ("mamba_ssm.ops.selective_scan_interface", "selective_scan_fn"),
    "selective_state_update": ("mamba_ssm.ops.triton.selective_state_update", "selective_state_update"),
    "causal_conv1d": ("causal_conv1d", "causal_conv1d_fn"),
    "causal_conv1d_update": ("causal_conv1d", "causal_conv1d_update"),
}
_found: dict[str, object] = {}  # name -> function, or None when not importable
_usable: dict[tuple[str, str], str | None] = {}  # (name, device) -> None if usable, else why not


def cpu_ops():
    """``torch.ops.mom_infer`` once MoM's C++ CPU extension is built (``mom.infer.kernels``), else None."""
    from mom.infer import kernels as cpu_kernels  # imported here: mom.infer imports mom.model

    return torch.ops.mom_infer if cpu_kernels.available() else None


def reset() -> None:
    """Forget what was looked up and probed (tests install stand-ins between calls)."""
    _found.clear()
    _usable.clear()


def lookup(name: str):
    """The kernel function if its package imports, else None (looked up once)."""
    if name not in _found:
        module, attr = _LOOKUP[name]
        try:
            _found[name] = getattr(importlib.import_module(module), attr)
        except Exception:  # noqa: BLE001 - ImportError, or a build that fails to load its extension
            _found[name] = None
    return _found[name]


def get(name: str, device: torch.device):
    """The kernel to use on ``device``, or None (not a kernel device, not installed, or its probe failed)."""
    if device.type not in KERNEL_DEVICES:
        return None
    fn = lookup(name)
    if fn is None:
        return None
    key = (name, str(device))
    if key not in _usable:
        try:
            if name not in _PROBES:
                raise RuntimeError("no probe registered (import mom.model)")
            with torch.no_grad(), torch.autocast(device.type, enabled=False):
                _PROBES[name](fn, device)
            _usable[key] = None
        except Exception as e:  # noqa: BLE001 - any failure means "use MoM's own path"
            why = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
            _usable[key] = why
            log.warning("%s is installed but unusable on %s (%s); using MoM's PyTorch path instead",
                        ".".join(_LOOKUP[name]), device, why)
    return fn if _usable[key] is None else None


def why_unusable(name: str, device: torch.device) -> str:
    """One line on why :func:`get` returns None for ``name`` on ``device``."""
    if device.type not in KERNEL_DEVICES:
        return f"the tensors are on {device.type}, not a CUDA device"
    if lookup(name) is None:
        return f"{_LOOKUP[name][0]} is not importable (pip install 'mom[gpu]', see the README)"
    return f"its probe call failed ({_usable.get((name, str(device)), 'not probed')})"


def status(device: torch.device | str = "cuda") -> dict[str, str]:
    """``{kernel: "used" | why not}`` on ``device``: what ``python -c 'import mom.model.kernels as k;
    print(k.status())'`` shows to check that mamba-ssm is used."""
    device = torch.device(device)
    return {name: "used" if get(name, device) is not None else why_unusable(name, device) for name in _LOOKUP}


# ------------------------------------------------------------------------------------------------ probes
_PROBES: dict = {}  # name -> probe(fn, device): raises unless fn computes MoM's result on a tiny input


def probe(name: str):
    """Register the probe of kernel ``name`` (defined next to the code that knows its math: scan.py, mamba.py;
    importing ``mom.model`` registers them all)."""
    def register(fn):
        _PROBES[name] = fn
        return fn
    return register


def close(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    """For probes: raise unless ``got`` (any device) matches ``want`` to 1e-3."""
    got = got.detach().cpu()
    if got.shape != want.shape or not torch.allclose(got.float(), want.float(), rtol=1e-3, atol=1e-3):
        raise RuntimeError(f"{what} differs from MoM's reference")
