"""``MoMLitModule``: the LightningModule that trains a :class:`mom.model.MoMForCausalLM`.

Logged (Lightning's logger names):

- ``train/loss`` (LM + weighted aux losses), ``train/lm_loss``, ``train/<aux>`` for each entry of
  ``out.aux_losses`` (``moe_balance``, ``moa_balance``, ``moa_z``, ``mod_bce``...), ``train/<stat>`` for each
  router statistic of ``out.stats`` (``mod_selected_frac``, ``moe_load_max``...), ``train/lr``,
  ``train/grad_norm`` (before clipping; the global norm under FSDP), ``train/tokens`` (all processes); the
  throughput figures (``train/tokens_per_s``, ``train/samples_per_s``, ``train/tflops_per_s``, ``train/mfu``)
  come from :class:`mom.throughput.ThroughputMonitor`.
- ``val/loss`` (mean next-token NLL over target tokens), ``val/ppl`` = exp(val/loss) and ``val/bpb`` = bits
  per UTF-8 byte = sum NLL / (ln 2 * sum token_bytes[target]) where targets are ``labels[:, 1:]``; the sums
  go through :class:`mom.metrics.LanguageModelMetrics` (the accumulator of ``mom.eval`` too), exact over
  processes and batches.

``training_step`` calls :meth:`compute_loss`, the one place a selective-LM objective (Rho-1) plugs in:
with ``slm.name: rho`` a :class:`mom.slm.Rho1Selection` keeps the top ``slm.token_ratio`` of each batch's tokens by excess loss (current -
reference, :mod:`mom.slm`) and also logs ``train/slm_selected_frac``, ``train/slm_excess_mean``,
``train/slm_excess_q10/q50/q90``, ``train/slm_excess_threshold``, ``train/slm_ref_loss`` and
``train/slm_full_lm_loss`` (the plain LM loss over all tokens), plus a wandb histogram of the excess losses.
Validation is always the plain full LM loss.
"""

from __future__ import annotations

import logging
from typing import Any

import lightning as L
import torch

from mom.config import model_config
from mom.metrics import IGNORE_INDEX, LanguageModelMetrics
from mom.optim import build_optimizer, build_scheduler, mark_fused_step

log = logging.getLogger("mom")


def parameter_summary(model: torch.nn.Module) -> dict[str, Any]:
    """``mom.model.summary(config)`` when it exists, else plain parameter counts."""
    try:
        from mom.model.summary import summary

        s = summary(model.config)
        if isinstance(s, dict):
            return s
    except Exception as e:  # noqa: BLE001 - the summary is informative only
        log.debug("mom.model.summary unavailable (%s); counting parameters", e)
    total = sum(p.numel() for p in model.parameters())
    return {"total": total, "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad)}


def _flat_numbers(d: dict[str, Any], prefix: str = "") -> dict[str, float]:
    out: dict[str, float] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flat_numbers(v, key + "/"))
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            out[key] = float(v)
    return out


class MoMLitModule(L.LightningModule):
    """Args are the resolved config groups as plain dicts (they are stored as the checkpoint hparams).

    ``vocab_size`` (the tokenizer's) replaces the model's vocab_size when they differ; ``token_bytes`` (V,) is the
    UTF-8 byte length of each token, for ``val/bpb`` (without it bpb is not logged).
    """

    def __init__(self, model: dict, precision: dict, optimizer: dict, scheduler: dict,
                 vocab_size: int | None = None, token_bytes: torch.Tensor | None = None,
                 compile: bool = False, slm: dict | None = None) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["token_bytes"])
        model = dict(model)
        if vocab_size is not None and vocab_size != model.get("vocab_size"):
            # the model is saved with its tokenizer, and eval/generate refuse a pair whose sizes differ:
            # a BPE trained on a small corpus can end below the configured size, so follow the tokenizer
            log.warning("model.vocab_size %s != tokenizer vocabulary %s: using %s",
                        model.get("vocab_size"), vocab_size, vocab_size)
            model["vocab_size"] = int(vocab_size)
        from mom.model import MoMForCausalLM

        self.config = model_config(model, precision)
        self.model = MoMForCausalLM(self.config)
        # not a registered submodule, so the state dict has no "_orig_mod." duplicates
        object.__setattr__(self, "_compiled", torch.compile(self.model) if compile else None)
        if token_bytes is not None:
            token_bytes = torch.as_tensor(token_bytes, dtype=torch.long)
        self.register_buffer("token_bytes", token_bytes, persistent=False)
        self.val_metrics = LanguageModelMetrics()
        self._tokens_seen = 0
        from mom.slm import Rho1Selection

        # the selective-LM objective (Rho-1) or None (plain LM); holds its reference, never saved with the model
        self.selection = Rho1Selection.from_config(slm)

    # ------------------------------------------------------------------ forward and loss
    def forward(self, input_ids: torch.Tensor, **kwargs: Any) -> Any:
        return (self._compiled or self.model)(input_ids, **kwargs)

    def compute_loss(self, batch: dict[str, torch.Tensor]) -> dict[str, Any]:
        """The training objective of one batch: {"loss", "lm_loss", "aux_losses", "stats", "output"}.

        Plain next-token LM (every non-ignored target counts), or with ``slm.name: rho`` the Rho-1 objective:
        the LM loss averaged over the kept tokens only (aux losses unchanged).
        """
        out = self(batch["input_ids"], labels=batch["labels"])
        if self.selection is None:
            return {"loss": out.loss, "lm_loss": out.lm_loss, "aux_losses": dict(out.aux_losses or {}),
                    "stats": dict(out.stats or {}), "output": out}
        sel = self.selection(out.token_loss, batch)
        aux = dict(out.aux_losses or {})
        loss = sel.loss + sum(aux.values(), torch.zeros((), device=sel.loss.device))
        self._log_excess_histogram(sel.excess[batch["labels"][:, 1:] != IGNORE_INDEX])
        return {"loss": loss, "lm_loss": sel.loss, "aux_losses": aux,
                "stats": {**dict(out.stats or {}), **sel.stats}, "output": out, "slm_mask": sel.mask}

    def setup(self, stage: str) -> None:
        if self.selection is not None and stage == "fit" and not self.selection.attached:
            self.selection.attach(getattr(self.trainer, "datamodule", None))

    def _log_excess_histogram(self, excess: torch.Tensor) -> None:
        every = self.selection.histogram_every_n_steps
        if every <= 0 or self._trainer is None or not self.training or self.global_step % every:
            return
        try:
            from lightning.pytorch.loggers import WandbLogger
        except ImportError:  # pragma: no cover
            return
        for lg in self.loggers:
            if isinstance(lg, WandbLogger) and self.trainer.is_global_zero:
                import wandb

                lg.experiment.log({"train/slm_excess_hist": wandb.Histogram(excess.detach().float().cpu().numpy()),
                                   "trainer/global_step": self.global_step})

    # ------------------------------------------------------------------ training
    def on_fit_start(self) -> None:
        summary = parameter_summary(self.model)
        flat = _flat_numbers(summary)
        if self.trainer.is_global_zero:
            log.info("parameters: %s", ", ".join(f"{k}={v:,.0f}" if v >= 100 else f"{k}={v:.3g}"
                                                  for k, v in flat.items()))
            if self.device.type == "cuda":  # which Mamba kernels this run uses (README: "Mamba kernels")
                from mom.model import kernels

                log.info("CUDA kernels: %s", ", ".join(f"{k}: {v}" for k, v in kernels.status(self.device).items()))
        if self.device.type == "cpu":  # built (~40 s on a fresh 2-core machine) before trainer.max_time's clock starts
            from mom.infer import kernels as cpu_kernels
            from mom.model import kernels

            ready = kernels.cpu_ops() is not None
            if self.trainer.is_global_zero:
                log.info("CPU kernels: %s", "C++ (mom.infer.kernels)" if ready else
                         f"torch ops ({cpu_kernels.why_unavailable()})")
        for logger in self.loggers:
            logger.log_hyperparams({f"params/{k}": v for k, v in flat.items()})

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["mom_tokens_seen"] = int(self._tokens_seen)  # train/tokens continues after a resume

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self._tokens_seen = int(checkpoint.get("mom_tokens_seen", 0))

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor | None:
        res = self.compute_loss(batch)
        from mom.callbacks import handle_nonfinite

        if handle_nonfinite(self, res):  # NaN/inf: raises (callbacks.nonfinite.action=stop) or skips the batch
            return None
        bs = batch["input_ids"].shape[0]
        self.log("train/loss", res["loss"], prog_bar=True, batch_size=bs)
        self.log("train/lm_loss", res["lm_loss"], batch_size=bs)
        for name, value in res["aux_losses"].items():
            self.log(f"train/{name}", value, batch_size=bs)
        for name, value in res["stats"].items():
            if isinstance(value, (list, tuple)):
                value = torch.stack([torch.as_tensor(v, dtype=torch.float32) for v in value]).mean()
            if torch.is_tensor(value) and value.numel() != 1:
                value = value.float().mean()
            self.log(f"train/{name}", value, batch_size=bs)
        return res["loss"]

    def on_train_batch_start(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        # counted here, before the step's checkpoint (callbacks' on_train_batch_end) stores the count
        self._tokens_seen += batch["input_ids"].numel() * self.trainer.world_size

    def on_train_batch_end(self, outputs: Any, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        # tokens/s, samples/s and MFU: mom.throughput.ThroughputMonitor
        self.log("train/tokens", float(self._tokens_seen))
        opt = self.optimizers()
        if not isinstance(opt, list):
            self.log("train/lr", opt.param_groups[0]["lr"])
        timer = self._budget_timer()
        if timer is not None:  # the schedule follows the wall-clock budget (WarmupDecay.time_fraction)
            elapsed, left = timer.time_elapsed("train"), timer.time_remaining("train")
            fraction = min(1.0, elapsed / (elapsed + left)) if elapsed + left > 0 else 0.0
            if self.trainer.world_size > 1:  # rank 0's clock for all: replicas must step with the same lr
                fraction = self.trainer.strategy.broadcast(fraction, src=0)
            for config in self.trainer.lr_scheduler_configs:
                for fn in getattr(config.scheduler, "lr_lambdas", ()):
                    if hasattr(fn, "time_fraction"):
                        fn.time_fraction = fraction

    def _budget_timer(self):
        """Lightning's Timer of ``trainer.max_time`` when the schedule follows it, else None."""
        if not self.hparams.scheduler.get("follow_time", True):
            return None
        from lightning.pytorch.callbacks import Timer

        return next((c for c in self.trainer.callbacks if isinstance(c, Timer)), None)

    def optimizer_step(self, epoch: int, batch_idx: int, optimizer: Any, optimizer_closure: Any = None) -> None:
        super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        mark_fused_step(optimizer)  # a fused step leaves version-keyed caches stale (validation, generation)

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        from mom.distributed import global_grad_norm

        norm = global_grad_norm(self.parameters())  # over every rank's shard under FSDP
        if norm is not None:
            self.log("train/grad_norm", norm)

    # ------------------------------------------------------------------ several processes
    def configure_model(self) -> None:
        """Under :class:`mom.distributed.FSDPStrategy`: shard the model, one FSDP unit per block."""
        from mom.distributed import FSDPStrategy

        if self._trainer is not None and isinstance(self.trainer.strategy, FSDPStrategy):
            self.trainer.strategy.shard(self.model)

    def configure_gradient_clipping(self, optimizer: torch.optim.Optimizer, gradient_clip_val: float | None = None,
                                    gradient_clip_algorithm: str | None = None) -> None:
        """Clip here where Lightning refuses to: by the global norm under FSDP (``clip_grad_norm_`` over the DTensor
        gradients reduces the norm over the shards; Lightning's FSDP precision plugins refuse clipping by norm), and
        with a fused optimizer (AdamW, CUDA or CPU), which Lightning's mixed-precision plugin refuses because such an
        optimizer may unscale fp16 gradients inside its step: with a grad scaler they are unscaled first."""
        from mom.distributed import is_fsdp

        algorithm = gradient_clip_algorithm or "norm"
        fused = getattr(optimizer, "_step_supports_amp_scaling", False)
        if not gradient_clip_val or not (fused or (algorithm == "norm" and is_fsdp(self.trainer.strategy))):
            self.clip_gradients(optimizer, gradient_clip_val, gradient_clip_algorithm)
            return
        scaler = getattr(self.trainer.precision_plugin, "scaler", None)
        if fused and scaler is not None:  # 16-mixed: clip the true gradients; the step then skips its unscaling
            scaler.unscale_(optimizer)
        params = [p for p in self.parameters() if p.grad is not None]
        if algorithm == "norm":
            torch.nn.utils.clip_grad_norm_(params, gradient_clip_val)
        else:
            torch.nn.utils.clip_grad_value_(params, gradient_clip_val)

    # ------------------------------------------------------------------ validation
    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        out = self(batch["input_ids"], labels=batch["labels"])
        self.val_metrics.update(out.token_loss, batch["labels"], self.token_bytes)

    def on_validation_epoch_end(self) -> None:
        m = self.val_metrics.compute()
        self.val_metrics.reset()
        if m["tokens"] <= 0:
            return
        # compute() already summed over every process (torchmetrics' sync on compute), so each rank holds the
        # whole validation set's value; sync_dist=True averages those equal values and tells Lightning so
        loss = m["loss"].float()
        self.log("val/loss", loss, prog_bar=True, sync_dist=True)
        self.log("val/ppl", torch.exp(loss.clamp_max(50.0)), sync_dist=True)
        if m["bytes"] > 0:
            self.log("val/bpb", m["bpb"].float(), prog_bar=True, sync_dist=True)

    # ------------------------------------------------------------------ optimizers
    def configure_optimizers(self) -> dict[str, Any]:
        optimizer = build_optimizer(self.model, self.hparams.optimizer)
        total = self.hparams.scheduler.get("total_steps") or self.trainer.max_steps
        if (not total or total < 0) and self._budget_timer() is not None:
            total = 2**31 - 1  # no step budget: the time budget alone drives the decay
        elif not total or total < 0:
            total = int(self.trainer.estimated_stepping_batches)
        scheduler = build_scheduler(optimizer, self.hparams.scheduler, total)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
