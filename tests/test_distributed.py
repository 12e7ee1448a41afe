"""Several processes on CPU (gloo): FSDP on 2 processes and DDP across 2 one-process "nodes", each launched by
torchrun (rendezvous on 127.0.0.1) running tests/dist_job.py: exact resume (the run resumed from step 2 ends with
the uninterrupted run's weights and losses) and a model/ that one process loads. Plus the pieces that need no
second process: sharding, the sampler's shards, launch checks, FLOPs and peak accounting."""

from __future__ import annotations

import csv
import json
import pickle
import socket
import subprocess
from pathlib import Path

import pytest
import torch

from tests.conftest import PYTHON, REPO, tiny_overrides

JOB = REPO / "tests" / "dist_job.py"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(nodes: int, procs_per_node: int, args: list[str], env: dict, cwd: Path, timeout: int = 300) -> None:
    """``nodes`` torchrun agents on this machine (one per "node"), rendezvous (c10d) on 127.0.0.1."""
    port = _free_port()
    cmd = [PYTHON, "-m", "torch.distributed.run", f"--nnodes={nodes}", f"--nproc-per-node={procs_per_node}",
           "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}", "--rdzv-id=mom-test", "--max-restarts=0",
           str(JOB), *args]
    agents = [subprocess.Popen(cmd, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
              for _ in range(nodes)]
    outs = []
    try:
        for a in agents:
            outs.append(a.communicate(timeout=timeout)[0])
    except subprocess.TimeoutExpired:
        for a in agents:
            a.kill()
        pytest.fail(f"timed out after {timeout}s: {' '.join(cmd)}")
    for a, out in zip(agents, outs):
        assert a.returncode == 0, f"{' '.join(cmd)}\n{out[-6000:]}"


def _train_losses(run: Path) -> dict[int, float]:
    with open(run / "metrics.csv", newline="") as f:
        return {int(r["step"]): float(r["train/loss"]) for r in csv.DictReader(f) if r.get("train/loss")}


def _check_exact_resume_and_model(out: Path) -> None:
    from mom.checkpoint import load_checkpoint_file
    from mom.model import MoMForCausalLM

    result = json.loads((out / "result.json").read_text())
    assert result["full"]["step"] == result["resumed"]["step"] == 4
    full, resumed = _train_losses(out / "full"), _train_losses(out / "resumed")
    assert sorted(resumed) == [2, 3], resumed  # the resumed run logs only its own steps (3 and 4; 0-based here)
    for step, loss in resumed.items():  # same batches, same weights: the same losses, bit for bit
        assert loss == full[step], (step, loss, full[step])
    a = load_checkpoint_file(out / "full" / "checkpoints" / "last.ckpt")["state_dict"]
    b = load_checkpoint_file(out / "resumed" / "checkpoints" / "last.ckpt")["state_dict"]
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    model = MoMForCausalLM.from_pretrained(out / "resumed" / "model")  # one process, full weights
    for k, v in model.state_dict().items():
        assert torch.equal(v, a[f"model.{k}"]), k
    assert "train/tokens_per_s" in result["resumed"] and "train/tflops_per_s" in result["resumed"]


@pytest.mark.slow
def test_fsdp_two_processes_resume_exactly_and_save_a_loadable_model(python_env, tmp_path):
    _torchrun(1, 2, [str(tmp_path), "trainer=fsdp_cpu"], python_env, tmp_path)
    _check_exact_resume_and_model(tmp_path)


@pytest.mark.slow
def test_ddp_two_nodes_resume_exactly_and_save_a_loadable_model(python_env, tmp_path):
    _torchrun(2, 1, [str(tmp_path), "trainer=ddp_cpu", "trainer.devices=1", "trainer.num_nodes=2"],
              python_env, tmp_path)
    _check_exact_resume_and_model(tmp_path)
