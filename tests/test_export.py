"""mom.export format=packed: the packed folder loads, is small, and computes what the ternary model computes."""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mom.model import MoMForCausalLM
from tests.helpers.run_folder import ENV, make_run

pytest.importorskip("mom.model.packed")


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A tiny attn_bf16 model (mixtures on) and its packed export, made in-process."""
    from mom.export import export

    run = make_run(tmp_path_factory.mktemp("export"), precision="attn_bf16", hidden_size=64, intermediate_size=256,
                   mod_enabled=True, moa_enabled=True, moa_num_experts=4, moa_top_k=2)
    buf = io.StringIO()
    result = export({"run_dir": str(run), "format": "packed"}, out=buf)
    return run, result, buf.getvalue()


def test_packed_folder_layout_and_size(exported):
    from mom.model.packed import PackedTernaryLinear

    run, result, printed = exported
    packed_dir = run / "model-packed"
    assert Path(result["output_dir"]) == packed_dir
    assert sorted(p.name for p in packed_dir.iterdir()) == ["config.json", "model.safetensors", "tokenizer.json"]
    assert not [p for p in run.iterdir() if p.name.startswith(".model-packed")]  # no temp folder left
    assert (packed_dir / "tokenizer.json").read_bytes() == (run / "model" / "tokenizer.json").read_bytes()
    model = MoMForCausalLM.from_pretrained(packed_dir)
    n_packed = sum(isinstance(m, PackedTernaryLinear) for m in model.modules())
    assert n_packed == result["ternary_layers"] > 0
    # attention stays high precision (attn_bf16), so q/k/v/o are plain linears
    assert all(type(m).__name__ == "Linear" for n, m in model.named_modules() if n.endswith("k_proj"))
    assert result["ternary_bytes_bf16"] >= 6 * result["ternary_bytes_packed"], result
    assert "smaller than bf16" in printed and "ternary part, packed" in printed


def test_packed_greedy_is_identical(exported):
    run, _, _ = exported
    ternary = MoMForCausalLM.from_pretrained(run / "model")
    packed = MoMForCausalLM.from_pretrained(run / "model-packed")
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(3, ternary.config.vocab_size, (2, 6), generator=g)
    a = ternary.generate(prompt, max_new_tokens=24)
    b = packed.generate(prompt, max_new_tokens=24)
    assert torch.equal(a, b), (a, b)
    with torch.no_grad():
        la, lb = ternary(prompt).logits, packed(prompt).logits
    torch.testing.assert_close(lb, la, rtol=1e-4, atol=1e-4)


def test_eval_and_generate_accept_the_packed_folder(exported):
    from mom.eval import evaluate
    from mom.generate import generate_text

    run, _, _ = exported
    base = {"run_dir": str(run), "max_seq_length": 32, "batch_size": 4}
    a = evaluate(base)
    b = evaluate({**base, "model_dir": str(run / "model-packed")})
    assert a["tokens"] == b["tokens"]
    assert abs(a["loss"] - b["loss"]) < 1e-4, (a["loss"], b["loss"])
    gen = {"run_dir": str(run), "prompt": "the king", "max_new_tokens": 20}
    assert generate_text({**gen, "model_dir": str(run / "model-packed")}, out=None) == generate_text(gen, out=None)


@pytest.mark.slow
def test_export_cli(exported, tmp_path):
    run, _, _ = exported
    out_dir = tmp_path / "again"
    p = subprocess.run([sys.executable, "-m", "mom.export", f"run_dir={run}", f"output_dir={out_dir}"],
                       capture_output=True, text=True, cwd=tmp_path, timeout=120, env=ENV)
    assert p.returncode == 0, p.stderr
    assert "ternary part, packed" in p.stdout
    assert (out_dir / "model.safetensors").is_file()
    assert not [x for x in tmp_path.iterdir() if x.name != "again"]  # nothing else written


def test_export_errors(exported, tmp_path):
    from mom.export import ExportError, export

    run, _, _ = exported

    with pytest.raises(ExportError, match="run_dir not found"):
        export({"run_dir": str(tmp_path / "missing")})
    with pytest.raises(ExportError, match="unknown export format"):
        export({"run_dir": str(run), "format": "gguf"})
