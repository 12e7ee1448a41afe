"""Train a MoM model: ``python -m mom.train [experiment=tiny] [key=value ...]`` (Hydra; config in ``conf/``).

The run directory is Hydra's output directory (``hydra.run.dir=...`` to choose it; default
``outputs/<date>/<time>``, sweeps under ``multirun/``). It ends up holding ``.hydra/config.yaml`` (Hydra),
``metrics.csv`` (CSV logger), ``checkpoints/{last,step*}.ckpt``, ``tokenizer/`` (from the data module) and
``model/`` (``MoMForCausalLM.save_pretrained`` + ``tokenizer.json``: what ``mom.eval`` and ``mom.generate``
load). Resume with ``ckpt_path=<old run>/checkpoints/last.ckpt`` (the step count continues), or rerun with
the same ``hydra.run.dir`` and ``ckpt_path=last`` (its ``checkpoints/last.ckpt`` when there is one, else a
fresh start). A resumed run continues exactly: data order, RNG streams, optimizer and scheduler state come from
the checkpoint (docs/reliability.md). Checkpoints are written atomically and loaded weights-only
(:mod:`mom.checkpoint`); bad inputs end with one ``error: ...`` line on stderr and exit code 1 (:mod:`mom.cli`).

:func:`train` is the whole job as a plain function of a composed config, so tests run it in-process
(``mom.config.compose`` + ``paths.run_dir=<tmp>``); :func:`main` is the Hydra wrapper that also finishes a
wandb run whatever happens, so the jobs of a multirun never merge into one wandb run.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

import hydra
import torch
from omegaconf import DictConfig

from mom.config import CONF_DIR, model_config, register_configs, to_plain, wandb_mode_offline
from mom.files import atomic_write
from mom.model.config import ConfigError

log = logging.getLogger("mom")
register_configs()


def resolve_accelerator(accelerator: str) -> str:
    """The device type ``trainer.accelerator`` means on this machine (auto: cuda when available)."""
    if accelerator in ("auto", "gpu"):
        return "cuda" if torch.cuda.is_available() else ("cpu" if accelerator == "auto" else "cuda")
    return accelerator


def resolve_precision(precision: Any, accelerator: str) -> Any:
    """``auto``: bf16-mixed on a CUDA GPU that supports it, fp32 elsewhere."""
    if precision != "auto":
        return precision
    if accelerator == "cuda" and torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return "bf16-mixed"
    return "32-true"


def check_accelerator(accelerator: str) -> None:
    """A GPU asked for on a machine without one: one line, before any data or model work (Lightning would
    end in a long MisconfigurationException traceback after the tokenizer is trained)."""
    if accelerator == "cuda" and not torch.cuda.is_available():
        from mom.model.config import ConfigError

        raise ConfigError("trainer.accelerator: a GPU was asked for but torch sees no CUDA device on this machine; "
                          "use trainer.accelerator=auto (or cpu), and a single-device trainer (not trainer=ddp/fsdp)")


def log_device_choice(given: dict[str, Any], accelerator: str, precision: Any) -> None:
    """One line saying what ``auto`` chose (rank zero only)."""
    from lightning.pytorch.utilities.rank_zero import rank_zero_only

    if rank_zero_only.rank != 0 or "auto" not in (given.get("accelerator"), given.get("precision")):
        return
    gpu = torch.cuda.get_device_name(0) if accelerator == "cuda" else None
    why = (f"{gpu}, bf16 {'supported' if precision == 'bf16-mixed' else 'not supported'}" if gpu
           else "no CUDA GPU")
    log.info("device: %s, precision: %s (trainer.accelerator=%s, trainer.precision=%s; %s)", accelerator,
             precision, given.get("accelerator"), given.get("precision"), why)


def checkpoint_step(ckpt_path: str | None) -> int | None:
    """The ``global_step`` of a checkpoint file, read without loading its tensors (memory-mapped); None for
    no checkpoint (a fresh start) or one that cannot be read here (Lightning reports it when it loads it)."""
    if not ckpt_path or "://" in str(ckpt_path):
        return None
    try:
        return int(torch.load(ckpt_path, map_location="cpu", weights_only=True, mmap=True).get("global_step", 0))
    except Exception:  # noqa: BLE001 - a bad checkpoint gets its one-line error from SafeCheckpointIO
        return None


def _instantiate_all(group: Any, run_dir: Path, task_name: str, resume_step: int | None = None) -> list[Any]:
    """Instantiate each ``_target_`` entry of a logger/callbacks dict (null entries are dropped). When the run
    resumes from a checkpoint of step ``resume_step``, a wandb logger continues the run folder's previous wandb
    run (same id) and TensorBoard drops the events logged after that step (``purge_step``)."""
    from hydra.utils import instantiate

    objs = []
    for name, node in (group or {}).items():
        if node is None:
            continue
        if not (isinstance(node, DictConfig) and "_target_" in node):
            raise ConfigError(f"{name}: expected a mapping with _target_, got {node!r}")
        kwargs: dict[str, Any] = {}
        if str(node._target_).endswith("WandbLogger"):
            if node.get("offline") is None:
                kwargs["offline"] = wandb_mode_offline()
            if node.get("name") is None:
                kwargs["name"] = f"{task_name}-{run_dir.parent.name}-{run_dir.name}"
            if resume_step is not None and node.get("id") is None:
                from mom.loggers import previous_wandb_id

                if (previous := previous_wandb_id(node.get("save_dir") or run_dir)) is not None:
                    kwargs.update(id=previous, resume="allow")
        if str(node._target_).endswith("TensorBoardLogger") and resume_step is not None:
            kwargs.setdefault("purge_step", resume_step)  # steps the crashed run logged past its checkpoint
        objs.append(instantiate(node, **kwargs))
    return objs


def build_trainer(cfg: DictConfig, run_dir: Path, resume_step: int | None = None, **extra: Any):
    """A ``lightning.Trainer`` from ``cfg.trainer`` plus the logger and callbacks groups (``resume_step``: the
    step of the checkpoint the run continues from, for the loggers)."""
    import lightning as L
    from hydra.utils import instantiate
    from lightning.pytorch.callbacks import ModelSummary, ProgressBar

    targs = to_plain(cfg.trainer)
    peak = targs.pop("peak_flops", "auto")  # MoM's, not a Trainer argument
    given = dict(targs)
    accelerator = resolve_accelerator(targs["accelerator"])
    targs["precision"] = resolve_precision(targs["precision"], accelerator)
    if targs["accelerator"] == "auto":
        targs["accelerator"] = accelerator  # what we resolved (Lightning's own auto would also pick e.g. MPS)
    log_device_choice(given, accelerator, targs["precision"])
    if isinstance(targs["strategy"], dict):
        targs["strategy"] = instantiate(cfg.trainer.strategy)
    loggers = _instantiate_all(cfg.logger, run_dir, cfg.task_name, resume_step=resume_step)
    callbacks = _instantiate_all(cfg.callbacks, run_dir, cfg.task_name)
    if targs.get("enable_progress_bar") is False:
        callbacks = [c for c in callbacks if not isinstance(c, ProgressBar)]
    if targs.get("enable_model_summary") is False:
        callbacks = [c for c in callbacks if not isinstance(c, ModelSummary)]
    from mom.callbacks import RNGState
    from mom.checkpoint import SafeCheckpointIO
    from mom.loggers import MetricsHistory

    callbacks.append(RNGState())  # RNG states in checkpoints (exact resume)
    from mom.throughput import ThroughputMonitor, resolve_peak_flops

    callbacks.append(ThroughputMonitor(*resolve_peak_flops(peak, "cuda" if accelerator == "cuda" else "cpu")))
    callbacks.append(MetricsHistory())  # metrics.csv kept whole over resumes, flushed with checkpoints
    if not any(isinstance(p, SafeCheckpointIO) for p in extra.get("plugins") or []):
        extra["plugins"] = [*(extra.get("plugins") or []), SafeCheckpointIO()]  # atomic, weights-only
    targs.update(extra)
    return L.Trainer(logger=loggers or False, callbacks=callbacks, default_root_dir=str(run_dir), **targs)


def _save_model(trainer: Any, lit: Any, dm: Any, model_dir: Path) -> None:
    """``<run>/model/``: save_pretrained of the plain (uncompiled, gathered) module + tokenizer.json."""
    from mom.distributed import is_fsdp

    model = lit.model
    if is_fsdp(trainer.strategy):  # gather the full state dict (a collective: every rank)
        state = trainer.strategy.lightning_module_state_dict()
        if not trainer.is_global_zero:
            return
        from mom.model import MoMForCausalLM

        model = MoMForCausalLM(lit.config)
        model.load_state_dict({k.removeprefix("model.").replace("._checkpoint_wrapped_module", ""): v
                               for k, v in state.items() if k.startswith("model.")})
    if not trainer.is_global_zero:
        return
    model.save_pretrained(model_dir)
    dm.tokenizer.save(str(model_dir / "tokenizer.json"))


def train(cfg: DictConfig) -> dict[str, float]:
    """Run one training job described by a composed ``train`` config; returns the final metrics."""
    import lightning as L  # before setup_train_logging: Lightning sets its logging up when imported

    from mom.data.datamodule import build_datamodule
    from mom.distributed import check_launch
    from mom.lit import MoMLitModule, parameter_summary
    from mom.optim import check_optimizer
    from mom.run_folder import setup_train_logging

    setup_train_logging()  # one line per event; the advert and known-harmless warnings filtered
    run_dir = Path(cfg.paths.run_dir).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    accelerator = resolve_accelerator(cfg.trainer.accelerator)
    check_accelerator(accelerator)
    check_optimizer(cfg.optimizer, accelerator)  # before any data or model work
    check_launch(cfg.trainer, cfg.optimizer)  # e.g. a multirun with a launcher that reruns the command line
    model_config(cfg.model, cfg.precision)  # ConfigError naming the key, before the tokenizer is trained
    from mom.harness.run import harness_options

    harness = harness_options((cfg.get("eval") or {}).get("harness"))
    if harness["tasks"]:
        from mom.harness.run import require_lm_eval

        require_lm_eval()  # not after an hour of training
    if accelerator == "cuda":
        torch.set_float32_matmul_precision("high")
    L.seed_everything(cfg.seed, workers=True)

    dm = build_datamodule(cfg.data, tokenizer_dir=run_dir / "tokenizer")
    dm.prepare_data()  # local rank 0 of each node tokenises; under torchrun/SLURM the others wait for it
    dm.setup("fit")
    lit = MoMLitModule(model=to_plain(cfg.model), precision=to_plain(cfg.precision),
                       optimizer=to_plain(cfg.optimizer), scheduler=to_plain(cfg.scheduler),
                       vocab_size=int(dm.vocab_size), token_bytes=getattr(dm, "token_bytes", None),
                       compile=bool(cfg.compile), slm=to_plain(cfg.slm))
    from mom.checkpoint import SafeCheckpointIO, resolve_ckpt_path

    ckpt_dir = (cfg.get("callbacks") or {}).get("model_checkpoint") or {}
    ckpt_path = resolve_ckpt_path(cfg.ckpt_path, ckpt_dir.get("dirpath") or run_dir / "checkpoints")
    expected = {k: tuple(v.shape) for k, v in lit.state_dict().items()}  # a resumed checkpoint must match
    from lightning.fabric.utilities.exceptions import MisconfigurationException

    from mom.model.config import ConfigError

    try:
        trainer = build_trainer(cfg, run_dir, resume_step=checkpoint_step(ckpt_path),
                                plugins=[SafeCheckpointIO(expected_shapes=expected)])
    except MisconfigurationException as e:  # Lightning's refusal of a trainer setting: one line, not a traceback
        raise ConfigError(f"trainer: {e}") from None
    if trainer.is_global_zero:
        (run_dir / "param_summary.json").write_text(json.dumps(parameter_summary(lit.model), indent=2, default=str))

    # weights-only: SafeCheckpointIO stores GaLore projectors as tagged dicts and never unpickles objects
    trainer.fit(lit, datamodule=dm, ckpt_path=ckpt_path, weights_only=True)
    metrics = _scalars(trainer.callback_metrics)
    if cfg.final_validate and not trainer.fast_dev_run and trainer.limit_val_batches != 0 and not trainer.interrupted:
        trainer.validate(lit, datamodule=dm, verbose=False)
        metrics.update(_scalars(trainer.callback_metrics))
    if cfg.save_model and not trainer.fast_dev_run:
        _save_model(trainer, lit, dm, run_dir / "model")
    if harness.get("tasks") and not trainer.fast_dev_run:  # lm-evaluation-harness tasks (mom/harness/run.py)
        from mom.harness.run import after_training

        metrics.update(after_training(harness, run_dir, trainer))

    metrics["step"] = float(trainer.global_step)
    from mom.throughput import ThroughputMonitor

    if trainer.is_global_zero:
        shown = "  ".join(f"{k} {metrics[k]:.4f}" for k in ("val/loss", "val/ppl", "val/bpb") if k in metrics)
        print(f"[mom.train] step {trainer.global_step}  {shown or 'no validation metrics'}")
        monitor = next((c for c in trainer.callbacks if isinstance(c, ThroughputMonitor)), None)
        if monitor is not None:
            print(f"[mom.train] {monitor.summary_line()}")
            metrics.update({f"run/{k}": v for k, v in monitor.summary().items()})
        metrics["train/tokens"] = float(lit._tokens_seen)
        # what mom.report reads beside metrics.csv and param_summary.json (written last: a run that has it ended)
        summary = json.dumps(metrics, indent=2, sort_keys=True)
        atomic_write(run_dir / "run_summary.json", lambda f: f.write(summary), mode="w")
        print(f"[mom.train] run dir: {run_dir}")
    return metrics


def _scalars(metrics: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items() if torch.is_tensor(v) and v.numel() == 1}


def _uses_wandb(cfg: DictConfig) -> bool:
    return any(node is not None and str(node.get("_target_", "")).endswith("WandbLogger")
               for node in (cfg.get("logger") or {}).values())


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="train")
def main(cfg: DictConfig) -> float | None:
    from mom.cli import one_line_errors

    try:
        with one_line_errors():  # bad input: one line on stderr, exit code 1, no traceback
            metrics = train(cfg)
    finally:
        if _uses_wandb(cfg):
            import wandb

            wandb.finish()
    loss = metrics.get("val/loss")
    return None if loss is None or math.isnan(loss) else loss  # the objective for a Hydra sweeper


if __name__ == "__main__":
    from mom.cli import run_cli

    run_cli(main, "train")  # a config that does not compose: one line too
