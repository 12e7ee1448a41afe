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
def test_every_experiment_runs_one_step_here(compose, train_fn, experiment, tmp_path, caplog):
    """Each experiment file as a user runs it on this machine: its own accelerator and precision (auto), the
    offline corpus instead of a Hub dataset (`data=shakespeare`, whose own tokenizer settings then apply),
    only the sizes shrunk."""
    shrink = ["data.tokenizer.vocab_size=512", "data.seq_len=32", "data.batch_size=2", "data.val_batch_size=4",
              "data.num_workers=0", "data.pin_memory=false", "trainer.max_time=null", "trainer.limit_val_batches=2",
              "trainer.num_sanity_val_steps=0", "trainer.enable_progress_bar=false",
              "trainer.enable_model_summary=false", "scheduler.warmup_steps=1"]  # not debug=fast: it sets cpu
    offline = ["data=shakespeare"] if compose([f"experiment={experiment}", f"paths.run_dir={tmp_path}"]
                                              ).data.source.type == "hub" else []
    if experiment == "ablate_slm":  # its tokenizer is the slm_reference run's, which a test does not have
        offline.append("data.tokenizer.path=null")
    cfg = compose([f"experiment={experiment}", *offline, *small_model_overrides(), *shrink,
                   "trainer.fast_dev_run=1", f"paths.run_dir={tmp_path}"])
    assert cfg.data.tokenizer.name is None and cfg.trainer.accelerator == "auto", experiment
    with caplog.at_level("INFO", logger="mom"):
        metrics = train_fn(cfg)
    assert metrics["step"] == 1
    assert torch.isfinite(torch.tensor(metrics["train/loss"]))
    if not torch.cuda.is_available():
        choice = [r.getMessage() for r in caplog.records if r.getMessage().startswith("device:")]
        assert choice == ["device: cpu, precision: 32-true (trainer.accelerator=auto, trainer.precision=auto; "
                          "no CUDA GPU)"], choice
        cpu = [r.getMessage() for r in caplog.records if r.getMessage().startswith("CPU kernels:")]
        from mom.infer import kernels as cpu_kernels

        want = "C++ (mom.infer.kernels)" if cpu_kernels.available() else f"torch ops ({cpu_kernels.why_unavailable()})"
        assert cpu == [f"CPU kernels: {want}"], cpu  # settled before the first step (and trainer.max_time's clock)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the no-GPU error path")
def test_a_gpu_trainer_without_a_gpu_is_one_line(compose, train_fn, tmp_path):
    cfg = compose(tiny_overrides(tmp_path) + ["trainer.accelerator=gpu"])
    with pytest.raises(ConfigError, match=r"^trainer.accelerator: a GPU was asked for .* use trainer.accelerator=auto"):
        train_fn(cfg)
    assert not (tmp_path / "tokenizer").exists()  # refused before any data work


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


def test_time_budget_ends_the_schedule(compose, train_fn, tmp_path):
    """trainer.max_time with no step budget: the clock stops the run and the cosine has decayed by then
    (scheduler.follow_time); run_summary.json records the run for mom.report."""
    import json

    run = tmp_path / "run"
    cfg = compose(tiny_overrides(run) + ["trainer.max_steps=-1", "trainer.max_time=00:00:00:06",
                                         "trainer.val_check_interval=1000", "trainer.limit_val_batches=1",
                                         "optimizer.lr=1e-3", "scheduler.min_lr_ratio=0.1"])
    metrics = train_fn(cfg)
    assert metrics["step"] >= 4  # the clock stopped it, not a step count
    # peak 1e-3; the step-based progress is ~0 with no step budget, so only the clock brought it this low
    assert metrics["train/lr"] < 0.5e-3, metrics["train/lr"]
    summary = json.loads((run / "run_summary.json").read_text())
    assert summary["step"] == metrics["step"] and summary["train/tokens"] > 0
    assert summary["run/peak_rss_mib"] > 50 and 0 < summary["run/train_time_s"] <= 7
    assert "train/time_s" in set(_rows(run)[0])


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
    from mom.optim import build_optimizer, config_state_bytes, expected_state_bytes, optimizer_state_bytes

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
        with torch.device("meta"):  # the count from shapes (how `python -m mom.optim` sizes momv4) agrees
            meta = MoMForCausalLM(model_config(cfg.model, cfg.precision))
        assert expected_state_bytes(meta, cfg.optimizer) == figures[name], name
        assert config_state_bytes(cfg) == (n_params, figures[name])  # what mom.report's column reads
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
           "trainer.max_steps=3", "final_validate=false", f"hydra.run.dir={run}",
           "trainer.max_time=00:00:30:00"]  # a time budget too: each step the ranks share rank 0's clock
    res = _run(cmd, python_env, timeout=420, cwd=tmp_path)
    assert "[mom.train] step 3" in res.stdout, res.stdout[-3000:]
    assert (run / "model" / "model.safetensors").is_file()
    assert (run / "checkpoints" / "last.ckpt").is_file()


@pytest.mark.slow
def test_ddp_cpu_two_processes_validate_like_one(python_env, compose, train_fn, tmp_path):
    """2 gloo processes validating 3 batches each score the windows 1 process validating 6 does (the distributed
    sampler interleaves the ranks); with the same weights (lr 0): val/loss, val/ppl and val/bpb
    must be the whole set's, equal to the single process's, and Lightning must not warn about sync_dist."""
    same = ["optimizer.lr=0.0", "trainer.max_steps=1", "trainer.val_check_interval=2", "final_validate=true"]
    run = tmp_path / "ddp"
    cmd = [PYTHON, "-m", "mom.train", "trainer=ddp_cpu", "model=jamba_tiny", *small_model_overrides(),
           *[o for o in TINY_RUN if not o.startswith(("trainer.accelerator", "trainer.devices", "trainer.strategy"))],
           *same, "trainer.limit_val_batches=3", f"hydra.run.dir={run}"]
    res = _run(cmd, python_env, timeout=420, cwd=tmp_path)
    assert "[mom.train] step 1" in res.stdout, res.stdout[-3000:]
    assert (run / "model" / "model.safetensors").is_file() and (run / "checkpoints" / "last.ckpt").is_file()
    assert "sync_dist" not in res.stdout + res.stderr, res.stderr[-3000:]
    ddp = [r for r in _rows(run) if r.get("val/loss")][-1]
    single = train_fn(compose(tiny_overrides(tmp_path / "single") + same + ["trainer.limit_val_batches=6",
                                                                          "save_model=false"]))
    for key in ("val/loss", "val/ppl", "val/bpb"):
        assert float(ddp[key]) == pytest.approx(single[key], rel=1e-5), (key, ddp[key], single[key])


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
    res = _run([PYTHON, "-m", "mom.report", str(sweep)], python_env, timeout=300, cwd=tmp_path)
    assert (sweep / "report.png").is_file() and (sweep / "report.png").stat().st_size > 1000
    assert "| arm |" in res.stdout and "precision=bf16" in res.stdout and "precision=ternary" in res.stdout
    # each final model scored on the whole validation split, as mom.eval does, and cached beside it
    import json

    for r in runs:
        score = json.loads((r / "eval.json").read_text())
        assert score["tokens"] > 1000 and 0 < score["bpb"] < 20
    assert "val bpb, whole split" in res.stdout
    rows = [line.split("|") for line in res.stdout.splitlines() if line.startswith("| precision=")]
    assert len(rows) == 2 and all(float(r[10].replace(",", "")) > 0 for r in rows)  # the optimizer state, from each run's config
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


@pytest.mark.slow
def test_train_cli_log_has_one_line_per_event(python_env, tmp_path):
    """`python -m mom.train` as a user runs it (progress bar and model summary on): Lightning's lines once (not
    also through its own handler), no litlogger advert, no FLOPs of 0, no known-harmless warning, the device
    choice and a too-long warmup said once, a bar counting the run's steps."""
    run = tmp_path / "run"
    cmd = [PYTHON, "-m", "mom.train", "model=jamba_tiny", *small_model_overrides(),
           *TINY_RUN, "trainer.accelerator=auto", "trainer.precision=auto", "trainer.enable_progress_bar=true",
           "trainer.enable_model_summary=true", "trainer.max_steps=3", "scheduler.warmup_steps=5",
           f"hydra.run.dir={run}"]
    res = _run(cmd, python_env, timeout=300, cwd=tmp_path)
    out = res.stdout + res.stderr
    assert out.count("Seed set to 1337") == 1, out
    assert out.count("`Trainer.fit` stopped: `max_steps=3` reached.") == 1, out
    assert "litlogger" not in out and "FLOPs" not in out and "Flops" not in out and "LeafSpec" not in out, out
    assert "exists and is not empty" not in out, out
    assert out.count("device: cpu, precision: 32-true (trainer.accelerator=auto") == 1, out
    assert out.count("scheduler.warmup_steps=5 is not shorter than the run's 3 steps") == 1, out
    assert "Epoch 0/-2" not in out and "3/3" in out, out
    assert "Trainable params" in out  # the module table is still there


def test_fused_adamw_clips_gradients_under_bf16_mixed(compose, train_fn, tmp_path, monkeypatch):
    """AdamW is fused on CUDA, and Lightning's mixed-precision plugin refuses to clip for a fused optimizer: the
    first GPU run stopped there. Here on CPU with the same plugin (bf16-mixed) and a fused AdamW: clipping runs."""
    clip, norms = torch.nn.utils.clip_grad_norm_, []

    def spy(params, max_norm, *args, **kw):
        norms.append(max_norm)
        return clip(params, max_norm, *args, **kw)

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", spy)
    cfg = compose(tiny_overrides(tmp_path) + ["trainer.precision=bf16-mixed", "optimizer.fused=true",
                                              "trainer.fast_dev_run=1", "trainer.gradient_clip_val=1e-3"])
    metrics = train_fn(cfg)
    assert metrics["step"] == 1 and torch.isfinite(torch.tensor(metrics["train/loss"]))
    assert norms == [1e-3]


def test_adamw_is_fused_by_default_on_cpu_unless_told_not_to(compose, tmp_path):
    from mom.optim import build_optimizer
    from tests.helpers.models import build

    model = build()
    for value, fused in ((None, True), (False, None), (True, True)):
        cfg = compose(tiny_overrides(tmp_path) + [f"optimizer.fused={'null' if value is None else str(value).lower()}"])
        assert build_optimizer(model, cfg.optimizer).param_groups[0]["fused"] is fused, value


def test_a_fused_step_refreshes_the_caches_keyed_on_weight_versions():
    """torch's fused AdamW updates weights in place without bumping their version counters; after
    mom.optim.mark_fused_step (called by MoMLitModule.optimizer_step) Mamba's cached A and the engine follow."""
    from mom.infer import engine_for
    from mom.model.mamba import MambaMixer
    from mom.optim import mark_fused_step
    from tests.helpers.models import build

    model = build()
    mixer = next(m for m in model.modules() if isinstance(m, MambaMixer))
    opt = torch.optim.AdamW(model.parameters(), lr=0.1, fused=True)
    with torch.no_grad():
        stale_a, stale_engine = mixer._A(), engine_for(model, native=False)
    model(input_ids=torch.tensor([[1, 2, 3, 4]]), labels=torch.tensor([[1, 2, 3, 4]])).loss.backward()
    opt.step()  # in place, version counters unchanged (torch 2.13)
    mark_fused_step(opt)
    with torch.no_grad():
        assert torch.equal(mixer._A(), -torch.exp(mixer.A_log.float())) and not torch.equal(mixer._A(), stale_a)
        assert engine_for(model, native=False) is not stale_engine
