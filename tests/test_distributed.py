"""Several processes on CPU (gloo): FSDP on 2 processes and DDP across 2 one-process "nodes", each launched by
torchrun (rendezvous on 127.0.0.1) running tests/dist_job.py: exact resume (the run resumed from step 2 ends with
the uninterrupted run's weights and losses) and a model/ that one process loads. Plus the pieces that need no
second process: sharding, launch checks, FLOPs and peak accounting (the samplers' shards and local-rank-0 data
preparation: tests/test_data_scale.py)."""

from __future__ import annotations

import csv
import json
import pickle
import socket
import subprocess
from pathlib import Path

import pytest
import torch

from tests.helpers import PYTHON, REPO
from tests.helpers.overrides import tiny_overrides

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
    for a, out in zip(agents, outs, strict=True):
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


# ------------------------------------------------------------------------------ one process
@pytest.fixture
def one_process_group():
    """A gloo process group of one (FSDP2 and DTensors need one), torn down afterwards."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    dist.init_process_group("gloo", rank=0, world_size=1, store=dist.HashStore())
    try:
        yield init_device_mesh("cpu", (1,))
    finally:
        dist.destroy_process_group()


def _tiny_model(compose):
    from mom.config import model_config
    from mom.model import MoMForCausalLM

    cfg = compose(tiny_overrides("unused"))
    torch.manual_seed(0)
    return MoMForCausalLM(model_config(cfg.model, cfg.precision))


def test_fsdp_units_per_block_bf16_compute_fp32_mamba_state_parameters(compose, one_process_group):
    from torch.distributed.fsdp import FSDPModule

    from mom.distributed import shard_model

    model = _tiny_model(compose)
    names = list(model.state_dict())
    shard_model(model, one_process_group, param_dtype="bf16", activation_checkpointing=True)
    assert isinstance(model, FSDPModule) and all(isinstance(b, FSDPModule) for b in model.model.layers)
    assert list(model.state_dict()) == names  # checkpoints keep the plain names (wrappers are invisible)
    mamba = next(b for b in model.model.layers if hasattr(b, "mamba")).mamba
    seen = {}
    mamba.in_proj.register_forward_pre_hook(lambda m, a: seen.update(in_proj=mamba.in_proj.weight.dtype))
    mamba.dt_layernorm.register_forward_pre_hook(lambda m, a: seen.update(
        A_log=mamba.A_log.dtype, D=mamba.D.dtype, dt_bias=mamba.dt_proj.bias.dtype))
    ids = torch.randint(0, 512, (2, 16))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(ids, labels=ids)
    out.loss.backward()
    assert seen == {"in_proj": torch.bfloat16, "A_log": torch.float32, "D": torch.float32,
                    "dt_bias": torch.float32}, seen
    assert mamba.A_log.dtype == torch.float32 and mamba.A_log.grad.dtype == torch.float32  # sharded masters fp32


def test_global_grad_norm_of_sharded_model_is_the_whole_models(compose, one_process_group):
    from mom.distributed import global_grad_norm, shard_model

    plain, sharded = _tiny_model(compose), _tiny_model(compose)
    shard_model(sharded, one_process_group)
    ids = torch.randint(0, 512, (2, 16))
    for m in (plain, sharded):
        m(ids, labels=ids).loss.backward()
    expected = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in plain.parameters() if p.grad is not None]))
    got = global_grad_norm(sharded.parameters())
    assert got == pytest.approx(expected.item(), rel=1e-5)
    clipped = torch.nn.utils.clip_grad_norm_(list(sharded.parameters()), 1e-3)  # what configure_gradient_clipping calls
    assert float(clipped.full_tensor()) == pytest.approx(expected.item(), rel=1e-5)
    assert global_grad_norm(sharded.parameters()) == pytest.approx(1e-3, rel=1e-3)


def test_datamodule_pickles(compose, tmp_path):
    from mom.data.datamodule import build_datamodule

    cfg = compose(tiny_overrides(tmp_path))
    dm = build_datamodule(cfg.data, tokenizer_dir=tmp_path / "tok")
    dm.prepare_data()
    dm.setup("fit")
    copy = pickle.loads(pickle.dumps(dm))  # what a spawning launcher (and DataLoader workers) need
    assert len(copy.train_dataset) == len(dm.train_dataset) and copy.vocab_size == dm.vocab_size


def test_a_multirun_with_a_command_line_relauncher_is_refused(compose, monkeypatch):
    import mom.distributed as d
    from mom.model.config import ConfigError

    monkeypatch.setattr(d, "in_multirun", lambda: True)
    for var in ("TORCHELASTIC_RUN_ID", "SLURM_NTASKS", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    for trainer in ("ddp_cpu", "fsdp_cpu"):
        with pytest.raises(ConfigError, match="multirun") as e:
            d.check_launch(compose([f"trainer={trainer}", "paths.run_dir=unused"]).trainer)
        assert "\n" not in str(e.value)
    d.check_launch(compose(tiny_overrides("unused")).trainer)  # one process: fine
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "x")  # torchrun started the processes: no relaunch
    d.check_launch(compose(["trainer=ddp_cpu", "paths.run_dir=unused"]).trainer)
    cfg = compose(["trainer=fsdp_cpu", "optimizer=galore_adamw", "paths.run_dir=unused"])
    with pytest.raises(ConfigError, match="GaLore"):
        d.check_launch(cfg.trainer, cfg.optimizer)


def test_training_flops_per_token(compose):
    from mom.config import model_config
    from mom.model.summary import summary, training_flops_per_token

    composed = compose(["model=momv4", "paths.run_dir=unused"])
    cfg = model_config(composed.model, composed.precision)
    s = summary(cfg)
    short, long = training_flops_per_token(cfg, 1024, s), training_flops_per_token(cfg, 2048, s)
    embedding = 0 if cfg.tie_word_embeddings else cfg.vocab_size * cfg.hidden_size
    assert short["matmul"] == 6 * (s["active_params"] - embedding)
    attn = [i for i in range(cfg.num_hidden_layers) if cfg.is_attention_layer(i)]
    per_key = sum(12 * cfg.num_attention_heads * cfg.head_dim * (cfg.mod_capacity if cfg.is_mod_layer(i) else 1)
                  for i in attn)
    assert long["attention"] - short["attention"] == pytest.approx(1024 * per_key)
    assert short["scan"] > 0 and short["total"] == short["matmul"] + short["attention"] + short["scan"]
    assert 0.9 < short["matmul"] / short["total"] < 1.0  # 6N dominates at momv4 size


def test_peak_flops_values_and_presets():
    from mom.model.config import ConfigError
    from mom.throughput import PEAK_FLOPS, resolve_peak_flops

    assert resolve_peak_flops(2.5e14, "cpu") == (2.5e14, "trainer.peak_flops")
    assert resolve_peak_flops("3e12", "cpu")[0] == 3e12
    assert resolve_peak_flops("h100", "cpu") == (PEAK_FLOPS["h100"], "h100")
    assert resolve_peak_flops(None, "cpu")[0] is None
    peak, why = resolve_peak_flops("auto", "cpu")
    assert peak is None and "trainer.peak_flops" in why
    with pytest.raises(ConfigError, match="trainer.peak_flops"):
        resolve_peak_flops("h1000", "cpu")


def test_throughput_and_mfu_logged_and_summarised(compose, train_fn, tmp_path, capsys):
    run = tmp_path / "run"
    metrics = train_fn(compose(tiny_overrides(run) + ["trainer.max_steps=4", "trainer.peak_flops=1e11",
                                                     "final_validate=false", "save_model=false"]))
    for key in ("train/tokens_per_s", "train/samples_per_s", "train/tflops_per_s", "train/mfu", "run/mfu"):
        assert key in metrics and metrics[key] > 0, (key, sorted(metrics))
    assert metrics["run/tokens_per_s"] == pytest.approx(metrics["run/samples_per_s"] * 32)  # 32-token windows
    assert metrics["run/mfu"] == pytest.approx(metrics["run/tflops_per_s"] * 1e12 / 1e11)
    with open(run / "metrics.csv", newline="") as f:
        cols = set(next(csv.DictReader(f)))
    assert {"train/tokens_per_s", "train/mfu"} <= cols
    out = capsys.readouterr().out
    assert "tokens/s" in out and "MFU" in out and "trainer.peak_flops" in out


def test_trainer_fsdp_builds_as_on_gpus(compose, tmp_path):
    """trainer=fsdp (the GPU option) with the accelerator swapped for the CPU: FSDP2 strategy, bf16 compute, fp32
    reductions, clipping by norm kept (configure_gradient_clipping makes it work under FSDP)."""
    from mom.distributed import FSDPStrategy
    from mom.train import build_trainer

    cfg = compose(["trainer=fsdp", "trainer.accelerator=cpu", "trainer.devices=2", "logger=csv",
                   f"paths.run_dir={tmp_path}"])
    trainer = build_trainer(cfg, tmp_path)
    assert isinstance(trainer.strategy, FSDPStrategy) and trainer.world_size == 2
    assert trainer.strategy.shard_options == {"param_dtype": torch.bfloat16, "reduce_dtype": torch.float32,
                                              "activation_checkpointing": False, "reshard_after_forward": True}
    assert str(trainer.precision) == "bf16-mixed" and trainer.gradient_clip_val == 1.0


@pytest.mark.slow
def test_a_ddp_cpu_sweep_is_refused_in_one_line(python_env, tmp_path):
    cmd = [PYTHON, "-m", "mom.train", "-m", "trainer=ddp_cpu", "debug=fast", "model=jamba_tiny", "seed=1,2",
           f"hydra.sweep.dir={tmp_path / 'sweep'}"]
    res = subprocess.run(cmd, env=python_env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert res.returncode == 1
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert lines[-1].startswith("error: trainer.strategy: a multirun (-m)") and "Traceback" not in res.stderr
