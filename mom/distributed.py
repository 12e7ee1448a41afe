"""Training on several processes: MoM's FSDP strategy (FSDP2 through Lightning) and the launch checks.

**FSDP.** :class:`FSDPStrategy` is Lightning's ``ModelParallelStrategy`` (PyTorch's FSDP2, ``fully_shard``) used
as plain fully sharded data parallelism: every process of every node is one data-parallel rank. Lightning's
older ``FSDPStrategy`` (FSDP1) refuses CPU accelerators and keeps one dtype per flattened unit; FSDP2 runs on
CPU processes over gloo (so the very wiring GPUs use is tested here), shards each parameter on its own
(DTensor), takes a mixed-precision policy per unit, and ``torch.nn.utils.clip_grad_norm_`` over its DTensor
gradients gives the global norm (docs/design.md "Several processes").

:func:`shard_model` applies it (``MoMLitModule.configure_model`` calls it under this strategy): one FSDP unit per
:class:`~mom.model.model.MoMBlock` (the same on CPU and GPUs), the root (embeddings, final norm, head) last;
optional activation checkpointing per block; with ``param_dtype: bf16`` the blocks compute in bf16 while the
Mamba SSM parameters (``A_log``, ``D``, ``dt_proj`` with its bias: the state dynamics, where bf16 rounding
shifts decay rates) stay fp32 in a unit of their own; gradients are reduced in fp32.

**Launch.** Lightning's launchers start the processes: its subprocess launcher reruns the command line for the
other local ranks (``ddp``, this strategy), or the processes come from outside (torchrun, SLURM: each process
then runs the same command, Lightning reads the ranks from the environment). :func:`check_launch` refuses, in one
line, the combinations that cannot work (a Hydra multirun with a strategy that reruns the command line). Data
preparation once per node (local rank 0 first, the others wait) is the DataModule's (:mod:`mom.data.datamodule`).
"""

from __future__ import annotations

import logging
import os
from typing import Any

import torch
from lightning.pytorch.strategies import ModelParallelStrategy

log = logging.getLogger("mom")

_DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
           "fp32": torch.float32, "float32": torch.float32, None: None}
# Parameters of a Mamba mixer kept fp32 under a low-precision param_dtype (module attribute names)
MAMBA_FP32 = ("A_log", "D", "dt_proj")
# The mixer's large matrices: a bf16 unit of their own so the fp32 unit above stays small
MAMBA_MATRICES = ("in_proj", "x_proj", "out_proj")


def _dtype(name: Any, key: str) -> torch.dtype | None:
    if isinstance(name, torch.dtype) or name is None:
        return name
    if str(name) not in _DTYPES:
        from mom.model.config import ConfigError

        raise ConfigError(f"trainer.strategy.{key}: {name!r} is not a dtype (bf16, fp16, fp32 or null)")
    return _DTYPES[str(name)]


def shard_model(model: torch.nn.Module, mesh: Any, *, param_dtype: Any = None, reduce_dtype: Any = "fp32",
                activation_checkpointing: bool = False, reshard_after_forward: bool = True) -> torch.nn.Module:
    """Shard a :class:`~mom.model.MoMForCausalLM` in place with FSDP2 over ``mesh`` (see the module doc).

    ``param_dtype``: the dtype units compute in (None: the parameters' own, fp32); ``reduce_dtype``: the
    dtype of the gradient reduce-scatter. Idempotent (an already sharded model is returned as is).
    """
    from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

    if isinstance(model, FSDPModule):
        return model
    low, reduce = _dtype(param_dtype, "param_dtype"), _dtype(reduce_dtype, "reduce_dtype")
    policy = MixedPrecisionPolicy(param_dtype=low, reduce_dtype=reduce)
    fp32 = MixedPrecisionPolicy(param_dtype=torch.float32, reduce_dtype=torch.float32)
    layers = model.model.layers
    if activation_checkpointing:
        from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

        for i, block in enumerate(layers):  # recompute each block's activations in backward
            layers[i] = checkpoint_wrapper(block)
    for block in layers:
        inner = getattr(block, "_checkpoint_wrapped_module", block)
        mamba = getattr(inner, "mamba", None)
        if mamba is not None and low not in (None, torch.float32):
            fully_shard([getattr(mamba, n) for n in MAMBA_MATRICES], mesh=mesh, mp_policy=policy,
                        reshard_after_forward=reshard_after_forward)
            fully_shard(mamba, mesh=mesh, mp_policy=fp32, reshard_after_forward=reshard_after_forward)
        fully_shard(block, mesh=mesh, mp_policy=policy, reshard_after_forward=reshard_after_forward)
    fully_shard(model, mesh=mesh, mp_policy=policy, reshard_after_forward=reshard_after_forward)
    return model


class FSDPStrategy(ModelParallelStrategy):
    """Fully sharded data parallel over every process of every node (FSDP2; see the module doc).

    Args:
        param_dtype: ``bf16`` to compute in bf16 (Mamba SSM parameters stay fp32), ``null`` for fp32.
        reduce_dtype: gradient reduction dtype (fp32 by default, whatever ``param_dtype`` is).
        activation_checkpointing: recompute each block's activations in backward (less memory, ~1/3 more compute).
        reshard_after_forward: free the gathered parameters after each unit's forward (ZeRO-3); False keeps them
            until backward (ZeRO-2-like: more memory, fewer all-gathers).
        save_distributed_checkpoint: False (default): ``last.ckpt`` is one full file written by rank 0 (loadable
            by one process, resumable on any world size); True: a folder of shards per checkpoint (large models).
        process_group_backend: ``gloo`` on CPU, ``nccl`` (default on CUDA).
    """

    def __init__(self, param_dtype: Any = None, reduce_dtype: Any = "fp32", activation_checkpointing: bool = False,
                 reshard_after_forward: bool = True, save_distributed_checkpoint: bool = False,
                 process_group_backend: str | None = None, **kwargs: Any) -> None:
        super().__init__(save_distributed_checkpoint=save_distributed_checkpoint,
                         process_group_backend=process_group_backend, **kwargs)
        self.shard_options = {"param_dtype": _dtype(param_dtype, "param_dtype"),
                              "reduce_dtype": _dtype(reduce_dtype, "reduce_dtype"),
                              "activation_checkpointing": bool(activation_checkpointing),
                              "reshard_after_forward": bool(reshard_after_forward)}

    def setup_environment(self) -> None:
        # pure data parallelism: every process is a data-parallel rank (no tensor parallelism)
        self._data_parallel_size = self.num_nodes * self.num_processes
        self._tensor_parallel_size = 1
        super().setup_environment()

    def shard(self, model: torch.nn.Module) -> torch.nn.Module:
        return shard_model(model, self.device_mesh["data_parallel"], **self.shard_options)


def is_fsdp(strategy: Any) -> bool:
    return isinstance(strategy, ModelParallelStrategy)


def global_grad_norm(parameters: Any) -> torch.Tensor | None:
    """The 2-norm of all gradients of ``parameters`` over every rank: sharded (DTensor) gradients are summed
    over their shards; replicated ones (DDP, one process) are already whole. None when there is no gradient."""
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return None
    from torch.distributed.tensor import DTensor

    total = torch.zeros((), dtype=torch.float32, device=grads[0].device)
    for g in grads:
        sq = g.float().pow(2).sum() if not isinstance(g, DTensor) else g.to_local().float().pow(2).sum()
        total = total + sq
    if any(isinstance(g, DTensor) for g in grads) and torch.distributed.is_initialized():
        torch.distributed.all_reduce(total)  # the shards of one tensor live on different ranks
    return total.sqrt()


def reruns_command_line(strategy: Any, devices: Any, num_nodes: int) -> bool:
    """Whether Lightning will start the other local processes by rerunning this command line."""
    if isinstance(strategy, str):
        name, start = strategy, ("spawn" if strategy.endswith("spawn") else "popen")
    else:
        name = str((strategy or {}).get("_target_", "")).rsplit(".", 1)[-1].lower()
        start = str((strategy or {}).get("start_method", "popen"))
    multi = devices not in (1, "1", None) or int(num_nodes or 1) > 1
    # "auto" on several devices is Lightning's DDP with the subprocess launcher
    return multi and any(k in name for k in ("auto", "ddp", "fsdp", "parallel")) and start == "popen"


def launched_externally() -> bool:
    """The processes were started by torchrun or SLURM (each one runs the command itself)."""
    return "TORCHELASTIC_RUN_ID" in os.environ or "SLURM_NTASKS" in os.environ or "LOCAL_RANK" in os.environ


def in_multirun() -> bool:
    """This job is one of a Hydra multirun (``-m``)."""
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN
    except Exception:  # noqa: BLE001 - no Hydra runtime (tests compose configs directly)
        return False


def _is_fsdp_config(strategy: Any) -> bool:
    target = strategy.get("_target_", "") if isinstance(strategy, dict) else str(strategy or "")
    return "fsdp" in str(target).lower() or str(target).endswith("ModelParallelStrategy")


def check_launch(trainer_cfg: Any, optimizer: Any = None) -> None:
    """ConfigError (one line) for a launch that cannot work (see the module doc), or an optimizer FSDP cannot run."""
    from mom.model.config import ConfigError

    strategy = trainer_cfg.get("strategy")
    plain = dict(strategy) if hasattr(strategy, "items") else strategy
    if _is_fsdp_config(plain) and str((optimizer or {}).get("name", "")).startswith("galore"):
        raise ConfigError("optimizer: GaLore projects whole 2-D gradients and FSDP shards them; use optimizer=adamw "
                          "with trainer=fsdp/fsdp_cpu, or GaLore with trainer=ddp")
    if in_multirun() and not launched_externally() and reruns_command_line(plain, trainer_cfg.get("devices"),
                                                                     trainer_cfg.get("num_nodes", 1)):
        raise ConfigError("trainer.strategy: a multirun (-m) cannot use a strategy whose launcher reruns the command "
                          "line for the other processes (it would rerun the whole sweep); sweep with one "
                          "process per job (trainer=default), or launch each job with torchrun or srun")
