"""The CUDA kernel paths, on CPU: stand-ins enforcing mamba-ssm's and causal-conv1d's argument checks
(tests/helpers/kernel_standins.py) are installed where MoM looks the kernels up, then the model trains a step under
bf16 autocast, with bf16 parameters, and decodes; a scan that raises when called proves the fallback."""

from __future__ import annotations

import pytest
import torch

from mom.model import MoMConfig, MoMForCausalLM, kernels
from mom.model.scan import selective_scan, selective_scan_reference
from tests.helpers import kernel_standins as ks


def tiny(**kw) -> MoMForCausalLM:
    torch.manual_seed(0)
    cfg = dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
               intermediate_size=64, num_experts=2, num_experts_per_tok=1, mamba_d_state=8)
    return MoMForCausalLM(MoMConfig(**{**cfg, **kw}))


def train_step(model, ids, autocast: bool):
    model.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = model(ids, labels=ids)
    out.loss.backward()
    return out.loss.detach().float(), {n: p.grad.float().clone() for n, p in model.named_parameters()
                                        if p.grad is not None}


IDS = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(1))


# ------------------------------------------------------------------------------ the stand-ins themselves
def test_standins_enforce_the_kernels_checks():
    g = torch.Generator().manual_seed(0)
    u = torch.randn(1, 8, 5, generator=g).bfloat16()
    A = -torch.rand(8, 4, generator=g)
    B = torch.randn(1, 4, 5, generator=g)
    with pytest.raises(ks.KernelCheckError, match="B.scalar_type"):  # fp32 B with bf16 u: problem 1
        ks.selective_scan_fn(u, u, A, B, B.bfloat16())
    with pytest.raises(ks.KernelCheckError, match="D.scalar_type"):  # bf16 D
        ks.selective_scan_fn(u, u, A, B.bfloat16(), B.bfloat16(), D=torch.ones(8, dtype=torch.bfloat16))
    x = torch.randn(2, 8, generator=g)
    with pytest.raises(TypeError, match="Value after \\*"):  # dt_bias=None: problem 2
        ks.selective_state_update(torch.zeros(2, 8, 4), x, x, A, x[:, :4], x[:, :4])
    with pytest.raises(ks.KernelCheckError, match="bias.scalar_type"):
        ks.causal_conv1d_fn(u, torch.randn(8, 4), torch.randn(8).bfloat16(), activation="silu")
    with pytest.raises(ks.KernelCheckError, match="width between 2 and 4"):
        ks.causal_conv1d_fn(u, torch.randn(8, 5), activation="silu")


def test_standin_math_matches_moms_reference():
    g = torch.Generator().manual_seed(0)
    b, d, n, L = 2, 8, 4, 6
    u, dt, z = (torch.randn(b, d, L, generator=g) for _ in range(3))
    A, B, C = -torch.rand(d, n, generator=g), torch.randn(b, n, L, generator=g), torch.randn(b, n, L, generator=g)
    D, bias = torch.randn(d, generator=g), torch.randn(d, generator=g)
    y, last = ks.selective_scan_fn(u, dt, A, B, C, D, z, bias, True, return_last_state=True)
    y_ref, last_ref = selective_scan_reference(u, dt, A, B, C, D, z, bias, True, return_last_state=True)
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(last, last_ref)


# ------------------------------------------------------------------------------ problem 1: bf16 training
@pytest.mark.parametrize("params_bf16", [False, True], ids=["autocast", "bf16-params"])
def test_training_step_through_the_kernels_in_bf16(monkeypatch, params_bf16):
    model = tiny()
    if params_bf16:  # what FSDP's bf16 param_dtype hands the mixer: D, A_log, dt bias, conv all bf16
        model = model.to(torch.bfloat16)
    loss_ref, grads_ref = train_step(model, IDS, autocast=not params_bf16)
    calls = ks.install(monkeypatch)
    loss, grads = train_step(model, IDS, autocast=not params_bf16)
    assert calls["selective_scan"] >= 2 and calls["causal_conv1d"] >= 2  # probe + the layer's call
    assert torch.isfinite(loss)
    torch.testing.assert_close(loss, loss_ref, rtol=2e-2, atol=2e-2)
    assert grads.keys() == grads_ref.keys()
    for name in ("model.layers.0.mamba.D", "model.layers.0.mamba.A_log", "model.layers.0.mamba.dt_proj.bias",
                 "model.layers.0.mamba.conv1d.weight", "model.layers.0.mamba.b_layernorm.weight"):
        assert grads[name].abs().sum() > 0, name


def test_ternary_mamba_through_the_kernels(monkeypatch):
    model = tiny(precision={"mamba": "ternary"})
    calls = ks.install(monkeypatch)
    loss, grads = train_step(model, IDS, autocast=True)
    assert calls["selective_scan"] >= 2 and torch.isfinite(loss)
    assert grads["model.layers.0.mamba.dt_proj.bias"].abs().sum() > 0


# ------------------------------------------------------------------------------ problem 2: decoding
@pytest.mark.parametrize("dtype,prompt_len", [(torch.float32, 5), (torch.float32, 2), (torch.bfloat16, 5)])
def test_generation_through_the_kernels(monkeypatch, dtype, prompt_len):
    """MambaMixer's cached path (prefill forward + one-token steps, mom.model.generation)."""
    from mom.model.generation import generate

    model = tiny().to(dtype).eval()
    prompt = IDS[:, :prompt_len]  # 2: shorter than the conv window, whose state the prefill pads
    want = generate(model, prompt, max_new_tokens=6, use_cache=False)
    calls = ks.install(monkeypatch)
    got = generate(model, prompt, max_new_tokens=6)
    assert calls["selective_state_update"] >= 5 and calls["causal_conv1d_update"] >= 5
    assert calls["causal_conv1d"] >= 2 and calls["selective_scan"] >= 2  # the prefill too
    if dtype == torch.float32:  # bf16 rounding may flip a near-tie; fp32 must agree token for token
        assert torch.equal(got, want)
    assert got.shape == want.shape


def test_engine_decoding_through_the_step_kernel(monkeypatch):
    """mom.infer's engine (model.generate) in bf16 calls mom.model.scan.selective_state_update, which
    always hands the Triton wrapper a dt_bias (here zeros: the engine folds the bias into dt)."""
    model = tiny().to(torch.bfloat16).eval()
    calls = ks.install(monkeypatch)
    out = model.generate(IDS[:, :5], max_new_tokens=6)
    assert calls["selective_state_update"] >= 5 and out.shape == (2, 11)


# ------------------------------------------------------------------------------ problem 3: usable, not importable
def test_auto_falls_back_when_the_installed_scan_raises(monkeypatch, caplog):
    def broken_scan(*args, **kwargs):  # mamba-ssm's git main without MAMBA_KEEP_CUDA_BUILD
        raise RuntimeError("selective_scan_cuda is not installed. To use Mamba-1, reinstall with: ...")

    model = tiny()
    loss_ref, _ = train_step(model, IDS, autocast=False)
    calls = ks.install(monkeypatch, scan=broken_scan)
    with caplog.at_level("WARNING", logger="mom"):
        loss1, _ = train_step(model, IDS, autocast=False)
        loss2, _ = train_step(model, IDS, autocast=False)
    torch.testing.assert_close(loss1, loss_ref)
    torch.testing.assert_close(loss2, loss_ref)
    assert calls["selective_scan"] == 1  # probed once, then never called again
    assert calls["causal_conv1d"] >= 2  # the other kernels still work
    assert sum("selective_scan_fn is installed but unusable" in r.message for r in caplog.records) == 1
    u = torch.randn(1, 4, 3)
    with pytest.raises(RuntimeError, match="impl='cuda'.*probe call failed.*selective_scan_cuda is not installed"):
        selective_scan(u, u, -torch.ones(4, 2), torch.ones(1, 2, 3), torch.ones(1, 2, 3), impl="cuda")
    status = kernels.status("cpu")
    assert status["causal_conv1d"] == "used" and "probe call failed" in status["selective_scan"]


def test_without_standins_nothing_is_used_on_cpu():
    assert kernels.get("selective_scan", torch.device("cpu")) is None
    assert "not a CUDA device" in kernels.status("cpu")["selective_scan"]


# ------------------------------------------------------------------------------ problem 9
#: PyTorch APIs MoM calls and the release that added them
API_SINCE = {"enable_gqa=": (2, 5), "torch.get_autocast_dtype(": (2, 4), "F.rms_norm(": (2, 4)}


def test_torch_floor_covers_the_apis_called():
    import re

    from tests.helpers import REPO

    floor = re.search(r'"torch>=(\d+)\.(\d+)', (REPO / "pyproject.toml").read_text())
    floor = (int(floor.group(1)), int(floor.group(2)))
    source = "\n".join(p.read_text() for p in (REPO / "mom").rglob("*.py"))
    needed = max((v for api, v in API_SINCE.items() if api in source), default=(0, 0))
    assert floor >= needed, f"pyproject allows torch {floor}, the code needs {needed}"


def test_packed_lowp_layout_costs_what_the_docstring_says():
    from mom.model import packed
    from mom.model.bitlinear import BitLinear

    layer = packed.PackedTernaryLinear.from_bitlinear(BitLinear(64, 32), kernel="lowp")
    layer(torch.randn(3, 64))
    layout = layer._kernel_cache["lowp"][1]
    per_weight = layout.element_size() * layout.numel() / (64 * 32)
    assert per_weight == 2
    assert "2 bytes for ``lowp``" in packed.__doc__

