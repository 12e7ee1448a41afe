"""PackedTernaryLinear: 2-bit packing, equality with BitLinear eval, safetensors round trip, model helpers."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from mom.model.bitlinear import BitLinear
from mom.model.packed import (
    PackedTernaryLinear,
    onednn_available,
    pack_model,
    pack_ternary,
    packed_module_names,
    replace_with_packed,
    unpack_ternary,
)
from tests.helpers.models import random_bitlinear

SHAPES = [(64, 96), (130, 70), (256, 256)]
EXACT_KERNELS = ["auto", "dense"] + (["onednn"] if onednn_available() else [])


def _bitlinear(fin, fout, bias=True, seed=0):
    return random_bitlinear(fin, fout, bias, seed).eval()


def _rel_err(a, b):
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("k", [1, 3, 4, 5, 8, 130, 257])
def test_pack_unpack_lossless(k):
    t = torch.randint(-1, 2, (7, k), dtype=torch.int8)
    p = pack_ternary(t)
    assert p.dtype == torch.uint8 and p.shape == (7, (k + 3) // 4)
    assert torch.equal(unpack_ternary(p, k), t)


def test_unpack_rejects_bad_input():
    with pytest.raises(ValueError, match="values"):
        pack_ternary(torch.tensor([[2, 0]]))
    with pytest.raises(ValueError, match="corrupt"):
        unpack_ternary(torch.full((2, 1), 0xFF, dtype=torch.uint8), 4)
    with pytest.raises(ValueError, match="in_features"):
        unpack_ternary(torch.zeros(2, 3, dtype=torch.uint8), 4)


@pytest.mark.parametrize("kernel", EXACT_KERNELS)
@pytest.mark.parametrize("fin,fout", SHAPES)
def test_matches_bitlinear_eval(fin, fout, kernel):
    bl = _bitlinear(fin, fout)
    p = PackedTernaryLinear.from_bitlinear(bl, kernel=kernel)
    t, _ = bl.quantized_weight()
    assert torch.equal(p.ternary_weight(), t)
    for m in (1, 3, 64, 300):
        x = torch.randn(m, fin) * 3
        with torch.no_grad():
            ref, got = bl(x), p(x)
        assert got.shape == ref.shape and got.dtype == ref.dtype
        assert _rel_err(got, ref) < 2e-6, (m, _rel_err(got, ref))


def test_batched_input_and_greedy_argmax_identical():
    bl = _bitlinear(256, 512, bias=False)
    p = PackedTernaryLinear.from_bitlinear(bl)
    x = torch.randn(2, 9, 256)
    with torch.no_grad():
        ref, got = bl(x), p(x)
    assert got.shape == (2, 9, 512)
    assert _rel_err(got, ref) < 2e-6
    assert torch.equal(got.argmax(-1), ref.argmax(-1))
    # a row computed alone (decode) equals the same row in a batch (prefill)
    with torch.no_grad():
        torch.testing.assert_close(p(x[:1, 4:5]), got[:1, 4:5], rtol=0, atol=0)


@pytest.mark.parametrize("kernel", ["int8pack", "int4pack"])
def test_bf16_lowbit_kernels_are_close(kernel):
    bl = _bitlinear(130, 70)
    p = PackedTernaryLinear.from_bitlinear(bl, kernel=kernel)
    x = torch.randn(5, 130)
    with torch.no_grad():
        assert _rel_err(p(x), bl(x)) < 1e-2  # bf16-rounded output: ~1e-3


def test_autocast_output_dtype():
    bl = _bitlinear(64, 96)
    p = PackedTernaryLinear.from_bitlinear(bl)
    x = torch.randn(3, 64)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        y, ref = p(x), bl(x)
    assert y.dtype == ref.dtype == torch.bfloat16
    assert _rel_err(y.float(), ref.float()) < 2e-2


def test_storage_is_two_bits():
    bl = _bitlinear(256, 256)
    p = PackedTernaryLinear.from_bitlinear(bl)
    packed_bytes = p.packed_weight.numel() * p.packed_weight.element_size()
    bf16_bytes = bl.weight.numel() * 2
    assert packed_bytes <= bf16_bytes / 6
    assert packed_bytes * 4 == bl.weight.numel()  # 2 bits per weight
    assert p.weight_scale.dtype == torch.float32 and p.weight_scale.dim() == 0
    p.to(torch.bfloat16)  # gamma stays fp32
    assert p.weight_scale.dtype == torch.float32


def test_state_dict_safetensors_round_trip(tmp_path):
    from safetensors.torch import load_file, save_file

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = BitLinear(130, 70, bias=True)
            self.b = nn.ModuleDict({"c": BitLinear(70, 64)})
            self.head = nn.Linear(64, 10)

        def forward(self, x):
            return self.head(self.b["c"](self.a(x)))

    torch.manual_seed(0)
    net = Net().eval()
    x = torch.randn(4, 130)
    with torch.no_grad():
        ref = net(x)
    packed = pack_model(copy.deepcopy(net))
    assert isinstance(packed.a, PackedTernaryLinear) and isinstance(packed.b["c"], PackedTernaryLinear)
    assert type(packed.head) is nn.Linear
    sd = packed.state_dict()
    assert set(k for k in sd if k.startswith("a.")) == {"a.packed_weight", "a.weight_scale", "a.bias",
                                                        "a.norm.weight"}
    assert "b.c.bias" not in sd
    save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp_path / "m.safetensors"))
    loaded = load_file(str(tmp_path / "m.safetensors"))
    names = packed_module_names(loaded)
    assert names == {"a", "b.c"}
    with torch.device("meta"):
        fresh = Net()
    replace_with_packed(fresh, names)
    assert isinstance(fresh.a, PackedTernaryLinear) and fresh.a.packed_weight.is_meta
    missing, unexpected = fresh.load_state_dict(loaded, strict=True, assign=True)
    assert not missing and not unexpected
    fresh.eval()
    assert fresh.a.in_features == 130 and fresh.a.out_features == 70
    with torch.no_grad():
        got = fresh(x)
        torch.testing.assert_close(got, packed(x), rtol=0, atol=0)
    assert _rel_err(got, ref) < 1e-5
    # a deep copy works once the opaque kernel cache exists
    copy.deepcopy(fresh)


def test_replace_with_packed_errors():
    net = nn.Sequential(nn.Linear(4, 4))
    with pytest.raises(ValueError, match="not a BitLinear"):
        replace_with_packed(net, {"0"})
    with pytest.raises(ValueError, match="no such module"):
        replace_with_packed(net, {"nope"})


def test_pack_model_keeps_tied_weights():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(10, 8)
            self.head = BitLinear(8, 10)
            self.head.weight = self.emb.weight
            self.mid = BitLinear(8, 8)

    m = pack_model(Tied())
    assert isinstance(m.head, BitLinear) and isinstance(m.mid, PackedTernaryLinear)


def test_exact_kernel_gives_bitlinear_bits():
    """Same integer sums, same scaling order: packed and unpacked layers agree bit for bit, so a deep packed
    model makes the same rounding decisions (and greedy tokens) as the unpacked one."""
    torch.manual_seed(0)
    for fin, fout in ((64, 96), (130, 70)):
        bl = BitLinear(fin, fout, bias=True).eval()
        packed = PackedTernaryLinear.from_bitlinear(bl)
        for m in (1, 5, 64):
            x = torch.randn(m, fin)
            with torch.no_grad():
                assert torch.equal(packed(x), bl(x)), (fin, fout, m, packed.resolved_kernel(x.device))
