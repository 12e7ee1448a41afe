"""Optimizers and learning-rate schedules (the ``optimizer`` and ``scheduler`` config groups).

- ``adamw``: ``torch.optim.AdamW`` (its fused kernel on CUDA and CPU) with two groups: decayed (matrices of
  linear layers) and not decayed (norms, biases, embeddings, Mamba ``A_log`` and ``D``: decided by module type,
  parameter name and ndim, as nanoGPT and the Mamba reference code do; decaying ``A_log`` would pull the state
  decay rates toward 1).
- ``galore_adamw``: galore-torch's AdamW. 2-D weights of modules whose qualified name matches one of
  ``target_modules`` (regexes, ``re.search``) and whose smaller side is larger than ``rank`` form the GaLore
  group (their gradients are projected to rank ``rank``, so Adam keeps rank x n moments instead of m x n);
  everything else is plain AdamW in the same optimizer.
- ``galore_adamw8bit``: the same with bitsandbytes 8-bit states; CUDA only.

Schedules are :class:`torch.optim.lr_scheduler.LambdaLR` stepped every optimizer step: linear warmup from 0,
then cosine or linear decay to ``min_lr_ratio`` x lr at ``total_steps``, or constant. With
``follow_time`` (the default) and a ``trainer.max_time`` budget, the decay's progress is the larger of the
steps done and the time spent (fractions of their budgets): a run that the clock stops before ``max_steps``
still ends its schedule, so arms of different speeds compare at equal wall-clock, each fully decayed.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

from mom.model.config import ConfigError

log = logging.getLogger("mom")

OPTIMIZERS = ("adamw", "galore_adamw", "galore_adamw8bit")
SCHEDULERS = ("cosine", "linear", "constant")
GALORE_PROJ_TYPES = ("std", "reverse_std", "right", "left", "full")
_NO_DECAY_SUFFIXES = ("bias", "A_log", ".D")


def _get(cfg: Any, key: str, default: Any = None) -> Any:
    if isinstance(cfg, Mapping):
        return cfg.get(key, default)
    return getattr(cfg, key, default)


def _no_decay_names(model: nn.Module) -> set[str]:
    """Names of parameters that get no weight decay."""
    names: set[str] = set()
    for mod_name, module in model.named_modules():
        is_embedding = isinstance(module, nn.Embedding)
        is_norm = "norm" in type(module).__name__.lower()
        for p_name, p in module.named_parameters(recurse=False):
            full = f"{mod_name}.{p_name}" if mod_name else p_name
            if (is_embedding or is_norm or p.ndim < 2 or full == "D" or full.endswith(_NO_DECAY_SUFFIXES)
                    or "norm" in p_name.lower()):
                names.add(full)
    return names


def _galore_names(model: nn.Module, patterns: Iterable[str], rank: int) -> set[str]:
    """Names of the 2-D weights GaLore projects: target modules, not embeddings, smaller side > rank."""
    regexes = [re.compile(p) for p in patterns]
    names: set[str] = set()
    for mod_name, module in model.named_modules():
        if isinstance(module, nn.Embedding) or not any(r.search(mod_name) for r in regexes):
            continue
        for p_name, p in module.named_parameters(recurse=False):
            full = f"{mod_name}.{p_name}" if mod_name else p_name
            if p.ndim == 2 and min(p.shape) > rank and not full.endswith(_NO_DECAY_SUFFIXES):
                names.add(full)
    return names


def param_groups(model: nn.Module, cfg: Any) -> list[dict[str, Any]]:
    """AdamW parameter groups (and the GaLore group for the galore optimizers); empty groups dropped."""
    name = _get(cfg, "name", "adamw")
    wd = float(_get(cfg, "weight_decay", 0.0))
    no_decay = _no_decay_names(model)
    galore: set[str] = set()
    if name.startswith("galore"):
        galore = _galore_names(model, _get(cfg, "target_modules", None) or [], int(_get(cfg, "rank", 128)))
    decay_p, no_decay_p, galore_p = [], [], []
    for n, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if n in galore:
            galore_p.append(p)
        elif n in no_decay:
            no_decay_p.append(p)
        else:
            decay_p.append(p)
    groups = [
        {"params": decay_p, "weight_decay": wd, "name": "decay"},
        {"params": no_decay_p, "weight_decay": 0.0, "name": "no_decay"},
    ]
    if galore_p:
        groups.append({
            "params": galore_p, "weight_decay": wd, "name": "galore",
            "rank": int(_get(cfg, "rank")), "update_proj_gap": int(_get(cfg, "update_proj_gap")),
            "scale": float(_get(cfg, "scale")), "proj_type": str(_get(cfg, "proj_type")),
        })
    return [g for g in groups if g["params"]]


def check_optimizer(cfg: Any, accelerator: str) -> None:
    """Fail early (before data and model are built) on an optimizer this machine cannot run."""
    name = _get(cfg, "name")
    if name not in OPTIMIZERS:
        raise ConfigError(f"optimizer.name: unknown optimizer {name!r} (one of {', '.join(OPTIMIZERS)})")
    if name.startswith("galore") and _get(cfg, "proj_type") not in GALORE_PROJ_TYPES:
        raise ConfigError(f"optimizer.proj_type: {_get(cfg, 'proj_type')!r} is not one of {', '.join(GALORE_PROJ_TYPES)}")
    if name == "galore_adamw8bit" and (accelerator != "cuda" or not torch.cuda.is_available()):
        raise ConfigError("optimizer: galore_adamw8bit needs a CUDA GPU (bitsandbytes 8-bit states); "
                          f"this run is on {accelerator}: use optimizer=galore_adamw or optimizer=adamw")


def mark_fused_step(optimizer: Any) -> None:
    """Bump the version counters of the parameters a fused optimizer step has just updated. torch's fused AdamW
    writes them in place without bumping them (the for-loop and foreach steps do), so caches keyed on
    ``tensor._version`` (Mamba's A = -exp(A_log), the inference engine cached on the model) would keep serving
    the weights of before the step: validation during training, or generation after it in the same process."""
    opt = getattr(optimizer, "optimizer", optimizer)  # Lightning's LightningOptimizer wraps the torch optimizer
    params = [p for group in opt.param_groups if group.get("fused") for p in group["params"]]
    if params:
        torch.autograd.graph.increment_version(params)


def _sharded(model: nn.Module) -> bool:
    """Whether FSDP has sharded the parameters (DTensors: left to torch's default implementation)."""
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())


def build_optimizer(model: nn.Module, cfg: Any) -> torch.optim.Optimizer:
    """The optimizer named by ``cfg.name`` over ``model``'s parameters."""
    name = _get(cfg, "name", "adamw")
    device = next(model.parameters()).device
    check_optimizer(cfg, device.type)
    groups = param_groups(model, cfg)
    kw = {"lr": float(_get(cfg, "lr")), "betas": tuple(float(b) for b in _get(cfg, "betas")),
          "eps": float(_get(cfg, "eps"))}
    if name == "adamw":
        fused = _get(cfg, "fused", None)
        if fused is None:  # one kernel a parameter instead of ~10 ops: 17.9 -> 4.7 ms a step for `tiny` on CPU
            fused = device.type in ("cuda", "cpu") and not _sharded(model)
        return torch.optim.AdamW(groups, fused=bool(fused) or None, **kw)  # None: torch's default (foreach)
    if name == "galore_adamw":
        from galore_torch import GaLoreAdamW

        return GaLoreAdamW(groups, no_deprecation_warning=True, **kw)
    from galore_torch import GaLoreAdamW8bit

    return GaLoreAdamW8bit(groups, **kw)


class WarmupDecay:
    """lr multiplier at optimizer step ``s`` (a callable object, so LambdaLR can checkpoint it)."""

    def __init__(self, name: str, warmup_steps: int, total_steps: int, min_lr_ratio: float):
        if name not in SCHEDULERS:
            raise ConfigError(f"scheduler.name: unknown schedule {name!r} (one of {', '.join(SCHEDULERS)})")
        if warmup_steps < 0:
            raise ConfigError(f"scheduler.warmup_steps: must be >= 0, got {warmup_steps}")
        if not 0.0 <= min_lr_ratio <= 1.0:
            raise ConfigError(f"scheduler.min_lr_ratio: must be in [0, 1], got {min_lr_ratio}")
        self.name, self.warmup_steps, self.min_lr_ratio = name, int(warmup_steps), float(min_lr_ratio)
        self.total_steps = max(int(total_steps), self.warmup_steps + 1)
        self.time_fraction = 0.0  # of trainer.max_time spent; set each step by the LightningModule (a float:
        # LambdaLR checkpoints this object's __dict__)

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        if self.name == "constant":
            return 1.0
        t = min(1.0, max((step - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps),
                         self.time_fraction))
        shape = 0.5 * (1.0 + math.cos(math.pi * t)) if self.name == "cosine" else 1.0 - t
        return self.min_lr_ratio + (1.0 - self.min_lr_ratio) * shape


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: Any, total_steps: int
                    ) -> torch.optim.lr_scheduler.LambdaLR:
    warmup, total = int(_get(cfg, "warmup_steps", 0)), int(_get(cfg, "total_steps") or total_steps)
    if 0 < total <= warmup:
        log.warning("scheduler.warmup_steps=%d is not shorter than the run's %d steps: the learning rate never "
                    "reaches optimizer.lr (lower scheduler.warmup_steps)", warmup, total)
    fn = WarmupDecay(_get(cfg, "name", "cosine"), warmup, total, float(_get(cfg, "min_lr_ratio", 0.0)))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, fn)


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes held in the optimizer state: moment tensors plus GaLore projection matrices."""
    total = 0

    def add(x: Any) -> None:
        nonlocal total
        if torch.is_tensor(x):
            total += x.numel() * x.element_size()
        elif isinstance(x, (list, tuple)):
            for y in x:
                add(y)
        elif isinstance(x, dict):
            for y in x.values():
                add(y)
        elif hasattr(x, "ortho_matrix"):  # galore_torch's GaLoreProjector
            add(x.ortho_matrix)

    for state in optimizer.state.values():
        add(state)
    return total


def expected_state_bytes(model: nn.Module, cfg: Any) -> int:
    """Optimizer-state bytes once every parameter has taken a step, from the parameters' shapes alone (so it
    runs on the meta device for models too big to train here). ``torch.optim.AdamW``: two moments per
    parameter plus a 0-d ``step`` tensor per tensor. GaLore-AdamW (galore-torch, ``proj_type=std``): a GaLore
    weight (m, n) keeps the moments of its rank-r projection (r x max(m, n)) and the projector
    (r x min(m, n)); the other parameters two moments (its ``step`` is a Python int)."""
    name = _get(cfg, "name", "adamw")
    if name.startswith("galore") and _get(cfg, "proj_type") != "std":
        raise ConfigError(f"optimizer.proj_type: the state count knows proj_type=std, not {_get(cfg, 'proj_type')!r}")
    total = 0
    for group in param_groups(model, cfg):
        for p in group["params"]:
            size = torch.empty((), dtype=p.dtype).element_size()
            if group["name"] == "galore":
                m, n = p.shape
                total += size * group["rank"] * (2 * max(m, n) + min(m, n))
            else:
                total += 2 * size * p.numel() + (4 if name == "adamw" else 0)
    return total


def config_state_bytes(cfg: Any) -> tuple[int, int]:
    """(parameters, optimizer-state bytes) of a composed training config's model and optimizer, counted on the
    meta device (:func:`expected_state_bytes`): nothing is allocated, whatever the model's size."""
    from mom.config import model_config
    from mom.model import MoMForCausalLM

    with torch.device("meta"):
        meta = MoMForCausalLM(model_config(cfg.model, cfg.precision))
    return sum(p.numel() for p in meta.parameters()), expected_state_bytes(meta, cfg.optimizer)


def _main(argv: list[str] | None = None) -> None:
    """``python -m mom.optim [MODEL ...] [key=value ...]``: optimizer-state bytes of adamw vs galore_adamw on
    models of conf/model (default jamba_mini), all high precision: counted from the shapes
    (:func:`expected_state_bytes`, meta device) and, for models under 50M parameters, measured after 3 steps
    (batch 2 x 32) to show the count is right."""
    import sys

    from mom.config import compose, model_config
    from mom.model import MoMForCausalLM

    args = list(sys.argv[1:] if argv is None else argv)
    names = [a for a in args if "=" not in a] or ["jamba_mini"]
    overrides = [a for a in args if "=" in a]
    print("| model | optimizer | params | state (count) | per parameter | state (measured) |")
    print("|---|---|---:|---:|---:|---:|")
    for model_name in names:
        for opt_name in ("adamw", "galore_adamw"):
            cfg = compose("train", [f"model={model_name}", "precision=bf16", f"optimizer={opt_name}", *overrides,
                                    "paths.run_dir=/tmp/mom-optim"])
            n, count = config_state_bytes(cfg)
            measured = ""
            if n < 50e6:
                torch.manual_seed(0)
                model = MoMForCausalLM(model_config(cfg.model, cfg.precision))
                opt = build_optimizer(model, cfg.optimizer)
                ids = torch.randint(0, cfg.model.vocab_size, (2, 32))
                for _ in range(3):
                    model(ids, labels=ids).loss.backward()
                    opt.step()
                    opt.zero_grad(set_to_none=True)
                measured = f"{optimizer_state_bytes(opt) / 2**20:.2f} MiB"
            label = opt_name if opt_name == "adamw" else f"galore_adamw, rank {cfg.optimizer.rank}"
            print(f"| `{model_name}` | {label} | {n / 1e6:.2f}M | {count / 2**20:.2f} MiB | {count / n:.2f} B | "
                  f"{measured} |")


if __name__ == "__main__":
    _main()
