"""scripts/gpu_check.sh on a machine without a GPU: its plan, its argument handling and the momv4 shrink."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from tests.helpers import REPO

sys.path.insert(0, str(REPO / "scripts"))
import gpu_check  # noqa: E402

SCRIPT = REPO / "scripts" / "gpu_check.sh"


def _sh(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, timeout=120)


@pytest.mark.slow
def test_dry_run_prints_the_plan():
    res = _sh("--dry-run", "--layers", "4", "--steps", "20")
    assert res.returncode == 0, res.stderr
    names = [ln.split("]")[0].lstrip("[") for ln in res.stdout.splitlines()]
    assert names == ["install", "kernels", "tests", "scan", "train", "decode"]
    assert "-m cuda" in res.stdout and "model.num_hidden_layers=4" in res.stdout and "trainer.max_steps=20" in res.stdout
    assert "install" not in _sh("--dry-run", "--skip-install").stdout


@pytest.mark.slow
@pytest.mark.parametrize("args", [["--steps", "1"], ["--layers", "0"], ["--nope"]])
def test_bad_arguments_are_refused(args):
    res = _sh(*args)
    assert res.returncode == 2 and "error:" in res.stderr


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="the no-GPU path")
def test_without_a_gpu_it_says_so():
    res = _sh("--skip-install")
    assert res.returncode == 1 and "no CUDA device" in res.stderr and "cuda available: False" in res.stdout


def test_the_momv4_shrink_keeps_momv4_but_its_depth(compose):
    from mom.config import model_config
    from mom.model.summary import summary

    ovr = [o for o in gpu_check.train_overrides(6, 50, REPO / "unused") if not o.startswith("hydra.")]
    shrunk = compose(ovr + ["paths.run_dir=unused"])
    full = compose(["experiment=momv4", "paths.run_dir=unused"])
    assert shrunk.model.num_hidden_layers == 6 < full.model.num_hidden_layers
    for key, value in full.model.items():  # same widths, mixtures and layout periods
        if key != "num_hidden_layers":
            assert shrunk.model[key] == value, key
    assert shrunk.trainer.precision == "bf16-mixed" and shrunk.trainer.max_steps == 50
    assert shrunk.data.tokenizer.name is None  # no network needed
    cfg = model_config(shrunk.model, shrunk.precision)  # a valid model
    attention = [cfg.is_attention_layer(i) for i in range(6)]
    assert any(attention) and not all(attention)  # Mamba and attention both survive the shrink
    assert any(cfg.is_expert_layer(i) for i in range(6))
    assert summary(cfg)["total_params"] < summary(model_config(full.model, full.precision))["total_params"]


def test_the_gpu_scan_table_runs_its_forms_and_reports_their_agreement(capsys):
    """``bench_gpu_paths.py --cuda``'s table, on the CPU at toy sizes: both forms of MoM's scan time and agree, and
    mamba-ssm is named as not used (the tensors are not on CUDA)."""
    sys.path.insert(0, str(REPO / "scripts"))
    import bench_gpu_paths

    bench_gpu_paths.cuda_scan_table(L=40, repeats=1, b=1, d=8, n=4, device="cpu")
    out = capsys.readouterr().out
    rows = [ln.split("|") for ln in out.splitlines() if ln.startswith("| per step") or ln.startswith("| log-depth")]
    assert len(rows) == 2 and "mamba-ssm selective_scan_fn" not in out and "not a CUDA device" in out
    assert float(rows[1][4]) < 1e-4  # the log-depth form's largest difference from the per-step form
