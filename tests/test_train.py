"""End-to-end training on seconds-long CPU configs: in-process through ``mom.train.train`` and, for the
slow tests, through the real entry points in subprocesses (DDP on 2 CPU processes, a Hydra multirun +
``mom.report``)."""

from __future__ import annotations

import csv
import subprocess
from pathlib import Path

import pytest
import torch

from mom.model.config import ConfigError
from tests.helpers import PYTHON, REPO
from tests.helpers.overrides import TINY_RUN, small_model_overrides, tiny_overrides

EXPERIMENTS = sorted(p.stem for p in (REPO / "conf" / "experiment").glob("*.yaml"))


def _rows(run_dir: Path) -> list[dict[str, str]]:
    with open(run_dir / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_fast_dev_run_every_experiment(compose, train_fn, experiment, tmp_path):
    cfg = compose(tiny_overrides(tmp_path, experiment) + ["trainer.fast_dev_run=2"])
    metrics = train_fn(cfg)
    assert metrics["step"] == 2
    assert torch.isfinite(torch.tensor(metrics["train/loss"]))


def test_train_writes_run_dir_metrics_and_model(compose, train_fn, tmp_path):
    run = tmp_path / "run"
    cfg = compose(tiny_overrides(run, "tiny") + ["trainer.max_steps=4"])
    metrics = train_fn(cfg)
    assert metrics["step"] == 4
    for key in ("val/loss", "val/ppl", "val/bpb", "train/loss"):
        assert key in metrics and metrics[key] == metrics[key], key
    assert metrics["val/ppl"] == pytest.approx(torch.exp(torch.tensor(metrics["val/loss"])).item(), rel=1e-4)
    assert 0 < metrics["val/bpb"] < 20
    assert (run / "checkpoints" / "last.ckpt").is_file()
    assert (run / "model" / "tokenizer.json").is_file() and (run / "model" / "config.json").is_file()
    assert (run / "param_summary.json").is_file()
    cols = set(_rows(run)[0])
    for col in ("train/loss", "train/lm_loss", "train/grad_norm", "train/tokens_per_s", "train/lr", "val/bpb"):
        assert col in cols, (col, sorted(cols))
    assert any(c.startswith("train/mod") for c in cols) and any(c.startswith("train/moa") for c in cols), cols

    from mom.model import MoMForCausalLM

    model = MoMForCausalLM.from_pretrained(run / "model")
    ids = torch.randint(0, 512, (1, 8))
    assert model(ids).logits.shape[-1] == cfg.model.vocab_size


def test_resume_from_last_ckpt_continues_step_count(compose, train_fn, tmp_path):
    first = tmp_path / "first"
    train_fn(compose(tiny_overrides(first) + ["trainer.max_steps=4", "final_validate=false", "save_model=false"]))
    ckpt = first / "checkpoints" / "last.ckpt"
    assert ckpt.is_file()
    assert torch.load(ckpt, map_location="cpu", weights_only=False)["global_step"] == 4
    second = tmp_path / "second"
    metrics = train_fn(compose(tiny_overrides(second) + ["trainer.max_steps=6", f"ckpt_path={ckpt}",
                                                         "final_validate=false", "save_model=false"]))
    assert metrics["step"] == 6
    steps = sorted({int(r["step"]) for r in _rows(second) if r.get("train/loss")})
    assert steps and steps[0] >= 4, steps  # the resumed run logs only the new steps


def test_galore_adamw_trains(compose, train_fn, tmp_path):
    cfg = compose(tiny_overrides(tmp_path) + ["optimizer=galore_adamw", "optimizer.rank=16",
                                              "trainer.max_steps=3", "final_validate=false", "save_model=false"])
    metrics = train_fn(cfg)
    assert metrics["step"] == 3


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU error path")
def test_galore_adamw8bit_on_cpu_is_a_clear_error(compose, train_fn, tmp_path):
    cfg = compose(tiny_overrides(tmp_path) + ["optimizer=galore_adamw8bit"])
    with pytest.raises(ConfigError) as e:
        train_fn(cfg)
    msg = str(e.value)
    assert msg.startswith("optimizer:") and "CUDA" in msg and "\n" not in msg


def test_optimizer_state_bytes_galore_vs_adamw(compose):
    """Optimizer-state bytes after 3 steps on jamba_mini (hidden 256, ~11M parameters), rank 128 and 64."""
    from mom.config import model_config
    from mom.model import MoMForCausalLM
    from mom.optim import build_optimizer, optimizer_state_bytes

    base = compose(["model=jamba_mini", "precision=bf16", "paths.run_dir=/tmp/unused"])
    ids = torch.randint(0, base.model.vocab_size, (2, 32))
    figures = {}
    for name, extra in (("adamw", []), ("galore_adamw", ["optimizer.rank=128"]),
                        ("galore_adamw r64", ["optimizer.rank=64"])):
        cfg = compose(["model=jamba_mini", "precision=bf16", f"optimizer={name.split()[0]}", *extra,
                       "paths.run_dir=/tmp/unused"])
        torch.manual_seed(0)
        model = MoMForCausalLM(model_config(cfg.model, cfg.precision))
        opt = build_optimizer(model, cfg.optimizer)
        for _ in range(3):
            model(ids, labels=ids).loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        n_params = sum(p.numel() for p in model.parameters())
        figures[name] = optimizer_state_bytes(opt)
        print(f"\n[optimizer state] {name:18s} {figures[name] / 2**20:8.2f} MiB "
              f"({figures[name] / n_params:.2f} bytes/param, {n_params:,} params)")
    assert figures["galore_adamw"] < figures["adamw"]
    assert figures["galore_adamw r64"] < figures["galore_adamw"]


# ------------------------------------------------------------------------------ subprocess (slow)
def _run(cmd: list[str], env: dict, timeout: int, cwd: Path) -> subprocess.CompletedProcess:
    try:
        res = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"timed out after {timeout}s: {' '.join(cmd)}\n{(e.stdout or b'')[-3000:]!r}\n{(e.stderr or b'')[-3000:]!r}")
    assert res.returncode == 0, f"{' '.join(cmd)}\nSTDOUT:\n{res.stdout[-4000:]}\nSTDERR:\n{res.stderr[-6000:]}"
    return res


@pytest.mark.slow
def test_ddp_cpu_two_processes(python_env, tmp_path):
    """Two gloo processes, with every MoE router collapsed (tests/helpers/collapsed_router_train.py): half the experts
    get no token, and DDP (find_unused_parameters=False) still finds a gradient for each of their parameters."""
    run = tmp_path / "ddp"
    cmd = [PYTHON, str(REPO / "tests" / "helpers" / "collapsed_router_train.py"), "trainer=ddp_cpu", "model=jamba_tiny", *small_model_overrides(),
           *[o for o in TINY_RUN if not o.startswith(("trainer.accelerator", "trainer.devices",
                                                       "trainer.strategy"))],
           "trainer.max_steps=3", "final_validate=false", f"hydra.run.dir={run}"]
    res = _run(cmd, python_env, timeout=420, cwd=tmp_path)
    assert "[mom.train] step 3" in res.stdout, res.stdout[-3000:]
    assert (run / "model" / "model.safetensors").is_file()
    assert (run / "checkpoints" / "last.ckpt").is_file()


@pytest.mark.slow
def test_multirun_then_report(python_env, tmp_path):
    sweep = tmp_path / "sweep"
    cmd = [PYTHON, "-m", "mom.train", "-m", "model=jamba_tiny", *small_model_overrides(), *TINY_RUN,
           "precision=bf16,ternary", "logger=wandb", f"hydra.sweep.dir={sweep}"]
    _run(cmd, python_env, timeout=420, cwd=tmp_path)
    runs = sorted(p for p in sweep.iterdir() if (p / "metrics.csv").is_file())
    assert len(runs) == 2, list(sweep.iterdir())
    # each job its own (offline) wandb run: multirun jobs never merge
    wandb_runs = {p.name for r in runs for p in (r / "wandb").glob("offline-run-*")}
    assert len(wandb_runs) == 2, wandb_runs
    res = _run([PYTHON, "-m", "mom.report", str(sweep)], python_env, timeout=120, cwd=tmp_path)
    assert (sweep / "report.png").is_file() and (sweep / "report.png").stat().st_size > 1000
    assert "| run |" in res.stdout and "precision=bf16" in res.stdout and "precision=ternary" in res.stdout
    print(res.stdout)


def test_model_vocabulary_follows_the_tokenizer(compose):
    """A BPE trained on a small corpus can end below the configured vocabulary: the model takes the
    tokenizer's size, so the saved pair passes eval/generate's tokenizer check."""
    from mom.config import to_plain
    from mom.lit import MoMLitModule

    cfg = compose(tiny_overrides("unused"))
    lit = MoMLitModule(model=to_plain(cfg.model), precision=to_plain(cfg.precision),
                       optimizer=to_plain(cfg.optimizer), scheduler=to_plain(cfg.scheduler), vocab_size=300)
    assert lit.model.config.vocab_size == 300
    assert lit.model.lm_head.out_features == 300


def test_compile_option_wraps_without_duplicating_the_state_dict(compose):
    from mom.config import to_plain
    from mom.lit import MoMLitModule

    cfg = compose(tiny_overrides("unused") + ["compile=true"])
    lit = MoMLitModule(model=to_plain(cfg.model), precision=to_plain(cfg.precision),
                       optimizer=to_plain(cfg.optimizer), scheduler=to_plain(cfg.scheduler), compile=cfg.compile)
    assert lit._compiled is not None and lit._compiled is not lit.model  # torch.compile is lazy: nothing compiled yet
    assert not any("_orig_mod" in k for k in lit.state_dict())
