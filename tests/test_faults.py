"""Crash safety: exact resume (in-process and after SIGKILL), atomic weights-only checkpoints, non-finite losses.

See docs/reliability.md. The training runs are the seconds-long CPU configs of conftest.
"""

from __future__ import annotations

import os
import pickle
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mom.checkpoint import (
    SafeCheckpointIO,
    load_checkpoint_file,
    resolve_ckpt_path,
    save_checkpoint_file,
    to_safe,
)
from mom.errors import CheckpointError, NonFiniteLossError
from mom.files import atomic_write
from tests.helpers import PYTHON, REPO
from tests.helpers.overrides import tiny_overrides

# a short fixed schedule (so a run stopped at N and one going to 2N share it), epochs of 3 batches (the resume
# crosses an epoch boundary), attention dropout (the resumed steps must draw the same random numbers)
EXACT = ["scheduler.total_steps=8", "trainer.limit_train_batches=3", "model.attention_dropout=0.2",
         "final_validate=false"]


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "model" / "model.safetensors"))


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


# ------------------------------------------------------------------------------------------- exact resume
# fused: torch's fused AdamW (CUDA's default) bumps no version counter; without mom.optim.mark_fused_step the
# uninterrupted run validated with a stale cached Mamba A (the resumed one recomputes it): the histories differed
@pytest.mark.parametrize("fused", [False, True])
def test_exact_resume_n_plus_n_equals_2n(compose, train_fn, tmp_path, fused):
    full, part = tmp_path / "full", tmp_path / "part"
    exact = EXACT + [f"optimizer.fused={str(fused).lower()}"]
    train_fn(compose(tiny_overrides(full) + exact + ["trainer.max_steps=8"]))
    train_fn(compose(tiny_overrides(part) + exact + ["trainer.max_steps=4"]))
    first_half = _weights(part)
    # the same run folder, `ckpt_path=last`: <run>/checkpoints/last.ckpt (step 4)
    assert torch.load(part / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 4
    metrics = train_fn(compose(tiny_overrides(part) + exact + ["trainer.max_steps=8", "ckpt_path=last"]))
    assert metrics["step"] == 8
    diff = _max_diff(_weights(full), _weights(part))
    assert diff <= 1e-6, diff
    assert _max_diff(_weights(full), first_half) > 1e-3  # the second half did train
    # one metrics.csv with the whole history: the rows of steps 0-3 kept, 4-7 appended, none twice
    assert _history(part) == _history(full)


def _history(run: Path) -> list[tuple]:
    import csv

    with open(run / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    return [(int(r["step"]), r.get("train/loss"), r.get("train/tokens"), r.get("val/loss")) for r in rows
            if r.get("train/loss") or r.get("val/loss")]


def test_a_resumed_run_continues_its_wandb_and_tensorboard_runs(compose, tmp_path):
    from mom.loggers import previous_wandb_id
    from mom.train import _instantiate_all

    run = tmp_path / "run"
    for name in ("offline-run-20261129_080000-aaaa1111", "run-20261129_090000-bbbb2222"):
        (run / "wandb" / name).mkdir(parents=True)
    assert previous_wandb_id(run) == "bbbb2222"
    cfg = compose(tiny_overrides(run) + ["logger=wandb"])
    resumed = {type(lg).__name__: lg for lg in _instantiate_all(cfg.logger, run, "train", resume_step=6)}
    assert resumed["WandbLogger"].version == "bbbb2222"
    assert resumed["WandbLogger"]._wandb_init.get("resume") == "allow"
    fresh = {type(lg).__name__: lg for lg in _instantiate_all(cfg.logger, run, "train")}
    assert fresh["WandbLogger"].version != "bbbb2222"
    tb = compose(tiny_overrides(run) + ["logger=tensorboard"])
    tensorboard = {type(lg).__name__: lg for lg in _instantiate_all(tb.logger, run, "train", resume_step=6)}
    assert Path(tensorboard["TensorBoardLogger"].log_dir) == run / "tensorboard"  # the same folder
    assert tensorboard["TensorBoardLogger"]._kwargs.get("purge_step") == 6  # events after the checkpoint dropped


def test_the_last_step_is_checkpointed_and_a_finished_run_resumes_at_its_end(compose, train_fn, tmp_path, caplog):
    run = tmp_path / "run"
    ovr = tiny_overrides(run) + ["trainer.max_steps=5", "callbacks.model_checkpoint.every_n_train_steps=2",
                                 "final_validate=false"]
    train_fn(compose(ovr))
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 5
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["last.ckpt", "step0000005.ckpt"]
    rows = _history(run)
    with caplog.at_level("INFO", logger="mom"):
        metrics = train_fn(compose(ovr + ["ckpt_path=last"]))
    assert metrics["step"] == 5  # nothing retrained
    assert f"resuming from step 5 ({run / 'checkpoints' / 'last.ckpt'})" in caplog.text
    assert _history(run) == rows


def test_ckpt_path_last_without_checkpoint_starts_fresh(tmp_path):
    assert resolve_ckpt_path("last", tmp_path / "checkpoints") is None
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "last.ckpt").write_bytes(b"x")
    assert resolve_ckpt_path("last", tmp_path / "checkpoints") == str(tmp_path / "checkpoints" / "last.ckpt")
    assert resolve_ckpt_path(None, tmp_path) is None
    with pytest.raises(CheckpointError, match="ckpt_path: checkpoint not found: .*nope.ckpt"):
        resolve_ckpt_path(str(tmp_path / "nope.ckpt"), tmp_path)


@pytest.mark.slow
def test_sigkill_between_checkpoints_then_resume(python_env, tmp_path):
    """A training process killed with SIGKILL resumes from last.ckpt to the weights of an uninterrupted run."""
    steps = 40
    common = [*tiny_overrides("unused"), f"trainer.max_steps={steps}", "final_validate=false",
              "trainer.val_check_interval=1000", "model.attention_dropout=0.2",
              "callbacks.model_checkpoint.every_n_train_steps=2"]
    common = [o for o in common if not o.startswith("paths.run_dir")]
    env = {k: v for k, v in python_env.items() if k != "HYDRA_FULL_ERROR"}

    def cmd(run: Path, *extra: str) -> list[str]:
        return [PYTHON, "-m", "mom.train", *common, f"hydra.run.dir={run}", *extra]

    killed = tmp_path / "killed"
    log = open(tmp_path / "killed.log", "w")
    proc = subprocess.Popen(cmd(killed), env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    last = killed / "checkpoints" / "last.ckpt"
    deadline = time.monotonic() + 120
    try:
        while not last.is_file():
            assert proc.poll() is None, (tmp_path / "killed.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "no checkpoint after 120 s"
            time.sleep(0.05)
        time.sleep(0.3)  # somewhere between two checkpoints (or in the middle of writing one)
        assert proc.poll() is None, "the run finished before it could be killed"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
        log.close()
    assert proc.returncode == -signal.SIGKILL
    killed_at = load_checkpoint_file(last)["global_step"]
    assert 2 <= killed_at < steps and not (killed / "model").exists()

    full = tmp_path / "full"
    for run, extra in ((killed, ["ckpt_path=last"]), (full, [])):
        res = subprocess.run(cmd(run, *extra), env=env, cwd=REPO, capture_output=True, text=True, timeout=180)
        assert res.returncode == 0, res.stderr[-4000:]
        assert f"[mom.train] step {steps}" in res.stdout
        if run == killed:
            assert f"resuming from step {killed_at} ({last})" in res.stdout + res.stderr
    diff = _max_diff(_weights(full), _weights(killed))
    assert diff <= 1e-6, (killed_at, diff)
    # the metrics of every checkpointed step were on disk before the kill: one whole history after the resume
    assert _history(killed) == _history(full), killed_at


# ------------------------------------------------------------------------------------------- checkpoint files
def _tiny_ckpt() -> dict:
    return {"state_dict": {"w": torch.arange(6.0).view(2, 3)}, "global_step": 3, "loops": {"a": [1, 2.0, None]}}


def test_truncated_and_corrupt_checkpoints_name_the_file(tmp_path):
    good = save_checkpoint_file(_tiny_ckpt(), tmp_path / "good.ckpt")
    assert load_checkpoint_file(good)["global_step"] == 3
    data = good.read_bytes()
    cases = {"truncated.ckpt": data[: len(data) // 2], "garbage.ckpt": os.urandom(4096),
             "empty.ckpt": b"", "zeroed.ckpt": data[:100] + bytes(len(data) - 100)}
    for name, content in cases.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(CheckpointError) as e:
            load_checkpoint_file(tmp_path / name)
        msg = str(e.value)
        assert str(tmp_path / name) in msg and "\n" not in msg, msg
        assert "corrupt" in msg or "empty file" in msg, msg
    (tmp_path / "notckpt.ckpt").write_bytes(b"")
    torch.save({"just": torch.ones(2)}, tmp_path / "notckpt.ckpt")
    with pytest.raises(CheckpointError, match="not a Lightning training checkpoint"):
        load_checkpoint_file(tmp_path / "notckpt.ckpt")


class _Payload:
    def __reduce__(self):
        return (os.system, (f"touch {_Payload.marker}",))


@pytest.mark.parametrize("fmt", ["torch_zip", "raw_pickle"])
def test_malicious_pickle_is_refused(tmp_path, fmt):
    _Payload.marker = tmp_path / "pwned"
    bad = tmp_path / "evil.ckpt"
    ckpt = {**_tiny_ckpt(), "hyper_parameters": {"x": _Payload()}}
    if fmt == "torch_zip":
        torch.save(ckpt, bad)
    else:
        bad.write_bytes(pickle.dumps(ckpt))
    for load in (load_checkpoint_file, SafeCheckpointIO().load_checkpoint):
        with pytest.raises(CheckpointError) as e:
            load(bad)
        msg = str(e.value)
        assert str(bad) in msg and "refused" in msg and "\n" not in msg, msg
    assert not _Payload.marker.exists()


def test_to_safe_plain_containers_only(tmp_path):
    from omegaconf import OmegaConf

    hp = OmegaConf.create({"model": {"hidden_size": 64, "betas": [0.9, 0.95]}, "path": "x"})
    safe = to_safe({"state_dict": {}, "hyper_parameters": hp, "p": Path("/a/b")})
    assert type(safe["hyper_parameters"]) is dict and safe["hyper_parameters"]["model"]["betas"] == [0.9, 0.95]
    assert safe["p"] == "/a/b"
    with pytest.raises(CheckpointError, match=r"checkpoint\['hyper_parameters'\]\['obj'\].*_Payload"):
        to_safe({"hyper_parameters": {"obj": _Payload()}})


def test_galore_state_round_trips_weights_only(tmp_path):
    galore_torch = pytest.importorskip("galore_torch")
    torch.manual_seed(0)
    lin = torch.nn.Linear(32, 32, bias=False)
    groups = [{"params": [lin.weight], "rank": 4, "update_proj_gap": 10, "scale": 0.25, "proj_type": "std"}]
    opt = galore_torch.GaLoreAdamW(groups, lr=1e-2, no_deprecation_warning=True)
    x = torch.randn(8, 32)
    for _ in range(2):
        lin(x).square().mean().backward()
        opt.step()
        opt.zero_grad()
    path = save_checkpoint_file({"state_dict": lin.state_dict(), "optimizer_states": [opt.state_dict()]},
                                tmp_path / "g.ckpt")
    torch.load(path, weights_only=True)  # nothing but tensors and plain containers
    loaded = load_checkpoint_file(path)
    lin2 = torch.nn.Linear(32, 32, bias=False)
    lin2.load_state_dict(loaded["state_dict"])
    opt2 = galore_torch.GaLoreAdamW([{**groups[0], "params": [lin2.weight]}], lr=1e-2, no_deprecation_warning=True)
    opt2.load_state_dict(loaded["optimizer_states"][0])
    for model, o in ((lin, opt), (lin2, opt2)):
        model(x).square().mean().backward()
        o.step()
    assert torch.equal(lin.weight, lin2.weight)


def test_atomic_write_keeps_the_old_file(tmp_path):
    target = save_checkpoint_file(_tiny_ckpt(), tmp_path / "last.ckpt")
    before = target.read_bytes()

    def half_then_crash(f):
        f.write(b"PK\x03\x04 half a checkpoint")
        raise KeyboardInterrupt  # any interruption, even not an Exception

    with pytest.raises(KeyboardInterrupt):
        atomic_write(target, half_then_crash)
    assert target.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]  # no temporary file left


def test_nonfinite_weights_are_never_saved(tmp_path):
    io = SafeCheckpointIO()
    target = tmp_path / "last.ckpt"
    io.save_checkpoint(_tiny_ckpt(), target)
    before = target.read_bytes()
    bad = _tiny_ckpt()
    bad["state_dict"]["w"][0, 1] = float("nan")
    with pytest.raises(NonFiniteLossError, match="non-finite weights in w"):
        io.save_checkpoint(bad, target)
    assert target.read_bytes() == before


# ------------------------------------------------------------------------------------------- non-finite losses
def _inject_nan(monkeypatch, at_step: int, term: str) -> None:
    from mom.lit import MoMLitModule

    orig = MoMLitModule.compute_loss

    def compute_loss(self, batch):
        res = orig(self, batch)
        if self.trainer.global_step == at_step:
            nan = torch.tensor(float("nan"))
            if term == "lm_loss":
                res["lm_loss"] = res["lm_loss"] * nan
            else:
                res["aux_losses"][term] = res["aux_losses"][term] * nan
            res["loss"] = res["lm_loss"] + sum(res["aux_losses"].values())
        return res

    monkeypatch.setattr(MoMLitModule, "compute_loss", compute_loss)


@pytest.mark.parametrize("term", ["lm_loss", "moe_balance"])
def test_nonfinite_loss_stops_and_keeps_the_last_good_checkpoint(compose, train_fn, tmp_path, monkeypatch, term):
    _inject_nan(monkeypatch, at_step=3, term=term)
    run = tmp_path / "run"
    with pytest.raises(NonFiniteLossError) as e:
        train_fn(compose(tiny_overrides(run) + ["trainer.max_steps=6"]))
    msg = str(e.value)
    name = "LM loss (lm_loss)" if term == "lm_loss" else f"aux loss {term}"
    assert "step 4" in msg and name in msg and "last.ckpt" in msg and "\n" not in msg, msg
    ckpt = load_checkpoint_file(run / "checkpoints" / "last.ckpt")
    assert ckpt["global_step"] == 2
    assert all(torch.isfinite(v).all() for v in ckpt["state_dict"].values() if v.is_floating_point())
    assert not (run / "model").exists()


def test_nonfinite_stop_is_caught_at_the_checkpoint_without_a_sync_per_step(compose, train_fn, tmp_path,
                                                                             monkeypatch):
    """stop records non-finite steps on the device; with a check interval longer than the run, the check
    before the step-4 checkpoint is what stops it (and that checkpoint is not written)."""
    _inject_nan(monkeypatch, at_step=2, term="lm_loss")
    run = tmp_path / "run"
    with pytest.raises(NonFiniteLossError, match="step 3: non-finite LM loss \\(lm_loss\\) = nan") as e:
        train_fn(compose(tiny_overrides(run) + ["trainer.max_steps=6", "callbacks.nonfinite.check_every_n_steps=100"]))
    assert "last.ckpt" in str(e.value)
    assert load_checkpoint_file(run / "checkpoints" / "last.ckpt")["global_step"] == 2


def test_nonfinite_stop_costs_no_host_sync_per_step():
    from types import SimpleNamespace

    from mom.callbacks import NonFiniteGuard, handle_nonfinite
    from mom.model.opcount import OpCounter

    guard = NonFiniteGuard("stop")
    trainer = SimpleNamespace(callbacks=[guard], global_step=0, world_size=1, log_every_n_steps=50)
    module = SimpleNamespace(_trainer=trainer)
    ok = {"lm_loss": torch.tensor(2.0), "aux_losses": {"moe_balance": torch.tensor(1.0)}, "loss": torch.tensor(3.0)}
    bad = {**ok, "aux_losses": {"moe_balance": torch.tensor(float("inf"))}, "loss": torch.tensor(float("inf"))}
    with OpCounter() as c:
        for step, res in enumerate([ok, ok, bad, ok]):
            trainer.global_step = step
            assert handle_nonfinite(module, res) is False
    assert c.syncs == 0, c.sync_calls
    with pytest.raises(NonFiniteLossError, match="step 3: non-finite aux loss moe_balance = inf"):
        guard.on_train_end(trainer, module)


def test_nonfinite_loss_skip(compose, train_fn, tmp_path, monkeypatch, caplog):
    _inject_nan(monkeypatch, at_step=2, term="lm_loss")
    run = tmp_path / "run"
    # also: checkpoints by time (a zero interval: every step) besides the step trigger
    metrics = train_fn(compose(tiny_overrides(run) + [
        "trainer.max_steps=4", "callbacks.nonfinite.action=skip", "final_validate=false",
        "callbacks.model_checkpoint.every_n_train_steps=100", "callbacks.model_checkpoint.train_time_interval=0",
        "callbacks.model_checkpoint.save_top_k=-1"]))
    assert metrics["step"] == 4
    w = _weights(run)
    assert all(torch.isfinite(v).all() for v in w.values())
    assert any("non-finite LM loss (lm_loss) = nan; batch skipped" in r.getMessage() for r in caplog.records)
    assert load_checkpoint_file(run / "checkpoints" / "last.ckpt")["callbacks"]["NonFiniteGuard"]["skipped"] == 1
    steps = sorted(p.name for p in (run / "checkpoints").glob("step*.ckpt"))
    assert steps == [f"step000000{i}.ckpt" for i in (1, 2, 3, 4)], steps  # the time trigger, every step
