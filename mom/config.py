"""The configuration layer: the structured-config schemas of ``conf/``, composing a config, turning it into plain values.

The YAML tree lives in ``conf/`` next to the ``mom/`` package. ``train.yaml`` starts its defaults list with
``train_schema`` (the :class:`TrainConfig` dataclass registered in Hydra's ConfigStore by
:func:`register_configs`), so every group that MoM owns is typed: a misspelt key or a value of the wrong type
is an error that names the full key (``model.hiden_size``, ``optimizer.lr``), raised while composing, before
anything heavy is imported. The ``model`` schema is derived from :class:`mom.model.config.MoMConfig`, so the
two never drift apart. ``data`` is owned by ``mom.data`` and stays an open dict here.

Nothing in this module imports Lightning, so composing a config stays fast.
"""

# ruff: noqa: UP007, UP045  (OmegaConf reads typing.Optional in the schemas; keep it explicit)
from __future__ import annotations

import dataclasses
import enum
import logging
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from omegaconf import MISSING, DictConfig, OmegaConf

from mom.model.config import PRECISION_COMPONENTS, PRECISION_PRESETS, ConfigError, MoMConfig

log = logging.getLogger("mom")

REPO_ROOT = Path(__file__).resolve().parent.parent
CONF_DIR = REPO_ROOT / "conf"


# ----------------------------------------------------------------------------------------------- schemas
def _schema_type(hint: Any) -> Any:
    """Turn a MoMConfig annotation into one OmegaConf understands (``int | None`` -> ``Optional[int]``)."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if len(args) == 1:
            return Optional[_schema_type(args[0])]
        return Any
    return hint


def _model_schema() -> type:
    """A dataclass with exactly MoMConfig's fields minus ``precision`` (that comes from the precision group)."""
    hints = typing.get_type_hints(MoMConfig)
    fields = []
    for f in dataclasses.fields(MoMConfig):
        if f.name == "precision":
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        fields.append((f.name, _schema_type(hints[f.name]), field(default=default)))
    return dataclasses.make_dataclass("ModelSchema", fields)


ModelSchema = _model_schema()


class PrecisionKind(str, enum.Enum):
    bf16 = "bf16"
    ternary = "ternary"


PrecisionSchema = dataclasses.make_dataclass(
    "PrecisionSchema", [(c, PrecisionKind, field(default=PrecisionKind.bf16)) for c in PRECISION_COMPONENTS]
)


@dataclass
class OptimizerSchema:
    name: str = "adamw"  # adamw | galore_adamw | galore_adamw8bit
    lr: float = 1e-3
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    weight_decay: float = 0.1
    fused: Optional[bool] = None  # adamw: torch's fused kernel; null: on CUDA and CPU (not FSDP-sharded weights)
    # GaLore (ignored by adamw): 2-D weights of modules whose qualified name matches one of `target_modules`
    # (regular expressions, re.search) and whose smaller side exceeds `rank` are projected.
    rank: int = 128
    update_proj_gap: int = 200
    scale: float = 0.25
    proj_type: str = "std"  # std | reverse_std | right | left | full
    target_modules: list[str] = field(default_factory=list)


@dataclass
class SchedulerSchema:
    name: str = "cosine"  # cosine | linear | constant
    warmup_steps: int = 100  # linear warmup from 0
    min_lr_ratio: float = 0.1  # the final lr as a fraction of optimizer.lr
    total_steps: Optional[int] = None  # None: trainer.max_steps (or Lightning's estimate when that is -1)
    follow_time: bool = True  # with trainer.max_time: decay by max(step, time) progress (mom/optim.py)


@dataclass
class TrainerSchema:
    """The subset of ``lightning.Trainer`` arguments MoM exposes (each passed through unchanged), with MoM's
    defaults (``conf/trainer/default.yaml`` is these; the other trainer options change a few).

    ``precision: auto`` picks ``bf16-mixed`` on CUDA and ``32-true`` elsewhere. ``strategy`` is a Lightning
    strategy name or a dict with ``_target_`` (instantiated).
    """

    accelerator: str = "auto"  # auto: a GPU when there is one
    devices: Any = 1
    num_nodes: int = 1
    strategy: Any = "auto"
    precision: Any = "auto"
    max_steps: int = 1000
    max_epochs: Optional[int] = None
    max_time: Optional[str] = None  # "DD:HH:MM:SS"
    val_check_interval: Any = 200
    check_val_every_n_epoch: Optional[int] = None  # None: val_check_interval counts steps across epochs
    limit_train_batches: Any = None
    limit_val_batches: Any = 50
    num_sanity_val_steps: Optional[int] = None
    log_every_n_steps: int = 10
    gradient_clip_val: Optional[float] = 1.0
    gradient_clip_algorithm: Optional[str] = None
    accumulate_grad_batches: int = 1
    fast_dev_run: Any = False
    deterministic: Any = None
    peak_flops: Any = "auto"  # MoM's (mom.throughput): peak FLOP/s of one device for MFU: number, preset, auto, null
    benchmark: Optional[bool] = None
    enable_progress_bar: Optional[bool] = None
    enable_model_summary: Optional[bool] = None
    use_distributed_sampler: bool = True


@dataclass
class PathsSchema:
    root_dir: str = MISSING
    output_dir: str = MISSING  # where single runs go (outputs/<date>/<time>)
    sweep_dir: str = MISSING  # where multiruns go (multirun/<date>/<time>/<job>)
    run_dir: str = MISSING  # this run's folder: Hydra's output dir


@dataclass
class SlmSchema:
    """Selective language modelling (Rho-1, ``mom/slm.py``): ``name: none`` (plain LM) or ``rho``."""

    name: str = "none"  # none | rho
    token_ratio: float = 0.6  # share of each batch's tokens kept, by excess loss (current - reference)
    reference: str = "precomputed"  # precomputed (python -m mom.score) | online (a frozen reference per batch)
    ref_run: Optional[str] = None  # rho needs it: the reference training run folder (its model/) or model folder
    histogram_every_n_steps: int = 50  # wandb histogram of the excess losses (0: never; wandb loggers only)


@dataclass
class HarnessSchema:
    """lm-evaluation-harness tasks (``mom/harness/``): ``mom.eval``'s ``harness`` and ``mom.train``'s ``eval.harness``."""

    tasks: list[str] = field(default_factory=list)  # empty: no harness run; e.g. [shakespeare_next_line, hellaswag]
    num_fewshot: Optional[int] = None  # None: each task's default
    limit: Optional[float] = None  # examples per task (a count, or a fraction when < 1); None: all
    batch_size: int = 8
    max_length: Optional[int] = None  # context in tokens; None: the model's max_position_embeddings
    max_gen_toks: int = 256  # generate_until's default budget of new tokens
    device: Optional[str] = None  # None: cuda when available (mom.train: the trainer's device)
    dtype: str = "float32"  # float32 | bfloat16 | float16 (autocast)
    include_path: Optional[str] = None  # more task folders (os.pathsep-separated)
    bootstrap_iters: int = 1000  # bootstrap stderr of the metrics that need it (0: none)
    seed: int = 1234


@dataclass
class EndOfTrainingEvalSchema:
    harness: HarnessSchema = field(default_factory=HarnessSchema)


@dataclass
class ScoreConfig:
    """``python -m mom.score``: per-token reference losses of a data config's token caches."""

    data: dict[str, Any] = field(default_factory=dict)
    paths: PathsSchema = field(default_factory=PathsSchema)
    ref_run: Optional[str] = None  # the reference: a training run folder (its model/) or a model folder
    splits: list[str] = field(default_factory=lambda: ["train", "validation"])
    seq_len: Optional[int] = None  # scoring context; None: data.seq_len (the windows training reads)
    batch_size: int = 16
    dtype: str = "float16"  # float16 | float32
    device: str = "auto"  # auto (cuda when available) | cpu | cuda
    overwrite: bool = False  # rescore even when the stored losses exist


@dataclass
class TrainConfig:
    model: ModelSchema = field(default_factory=ModelSchema)  # type: ignore[valid-type]
    precision: PrecisionSchema = field(default_factory=PrecisionSchema)  # type: ignore[valid-type]
    optimizer: OptimizerSchema = field(default_factory=OptimizerSchema)
    scheduler: SchedulerSchema = field(default_factory=SchedulerSchema)
    data: dict[str, Any] = field(default_factory=dict)  # owned by mom.data (its own checks)
    trainer: TrainerSchema = field(default_factory=TrainerSchema)
    logger: dict[str, Any] = field(default_factory=dict)  # name -> {_target_: ...}
    callbacks: dict[str, Any] = field(default_factory=dict)  # name -> {_target_: ...} (null drops one)
    paths: PathsSchema = field(default_factory=PathsSchema)
    slm: SlmSchema = field(default_factory=SlmSchema)
    task_name: str = "train"
    seed: int = 1337
    ckpt_path: Optional[str] = None  # resume: a Lightning checkpoint (e.g. <old run>/checkpoints/last.ckpt)
    final_validate: bool = True  # run one more validation after fit so the printed metrics are final
    save_model: bool = True  # write <run>/model/ (save_pretrained + tokenizer.json)
    compile: bool = False  # torch.compile the model
    eval: EndOfTrainingEvalSchema = field(default_factory=EndOfTrainingEvalSchema)  # after training (rank 0)


@dataclass
class EvalConfig:
    data: dict[str, Any] = field(default_factory=dict)
    paths: PathsSchema = field(default_factory=PathsSchema)
    run_dir: Optional[str] = None  # a training run folder; its model/ is evaluated
    model_dir: Optional[str] = None  # a model folder directly (config.json, model.safetensors, tokenizer.json)
    max_seq_length: Optional[int] = None  # evaluation context; None: the run's training context (data.seq_len)
    batch_size: int = 8
    seed: int = 1337
    harness: HarnessSchema = field(default_factory=HarnessSchema)  # tasks given: the harness instead of bpb


@dataclass
class GenerateConfig:
    paths: PathsSchema = field(default_factory=PathsSchema)
    run_dir: Optional[str] = None  # a training run folder; its model/ is loaded
    model_dir: Optional[str] = None  # or a model folder directly (e.g. <run_dir>/model-packed)
    prompt: Any = ""  # as typed on the command line (mom/prompts.py); prompt=- stdin, prompt_file=PATH a file
    prompts: Optional[list[str]] = None  # several prompts (used instead of `prompt` when given)
    max_new_tokens: int = 128
    do_sample: bool = False
    temperature: float = 1.0
    top_k: Optional[int] = None
    top_p: Optional[float] = None
    repetition_penalty: float = 1.0
    use_cache: bool = True
    compile: bool = False  # torch.compile the engine's per-layer step (the native one needs none)
    high_precision: str = "fp32"  # "bf16" / "int8": plain (non-ternary) linear weights read in bf16 / int8 (mom/infer/engine.py)
    seed: int = 1337  # seeds the sampler (do_sample=true): the same seed gives the same text
    batch_size: int = 8  # prompts decoded together
    stop_at_eos: bool = True  # stop a sequence at the tokenizer's end-of-text token


@dataclass
class ExportConfig:
    run_dir: Optional[str] = None  # a training run folder
    model_dir: Optional[str] = None  # default <run_dir>/model
    format: str = "packed"  # packed: every ternary layer at 2 bits per weight + its scale
    output_dir: Optional[str] = None  # default <run_dir>/model-<format> (or next to model_dir)


_registered = False


def register_configs() -> None:
    """Register the schemas and OmegaConf resolvers (idempotent). Call before composing."""
    global _registered
    if _registered:
        return
    from hydra.core.config_store import ConfigStore

    cs = ConfigStore.instance()
    cs.store(name="train_schema", node=TrainConfig)
    cs.store(name="eval_schema", node=EvalConfig)
    cs.store(name="generate_schema", node=GenerateConfig)
    cs.store(name="export_schema", node=ExportConfig)
    cs.store(name="score_schema", node=ScoreConfig)
    for name, preset in PRECISION_PRESETS.items():  # the precision group's options, from their one definition
        cs.store(group="precision", name=name, node=dict(preset))
    if not OmegaConf.has_resolver("mom_root"):
        OmegaConf.register_new_resolver("mom_root", lambda: str(REPO_ROOT))
    _registered = True


# ----------------------------------------------------------------------------------------------- helpers
def compose(config_name: str = "train", overrides: list[str] | None = None, *, return_hydra_config: bool = False
            ) -> DictConfig:
    """Compose a config from ``conf/`` in-process (tests, notebooks); no run directory is created."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return hydra_compose(config_name=config_name, overrides=list(overrides or []),
                             return_hydra_config=return_hydra_config)


def to_plain(node: Any) -> Any:
    """A DictConfig/ListConfig (or anything) as plain Python containers, enums as their names, resolved."""
    if OmegaConf.is_config(node):
        return OmegaConf.to_container(node, resolve=True, enum_to_str=True)
    return node


def schema_defaults(schema: type) -> dict[str, Any]:
    """The default of every field of a schema dataclass (the one place a default is written down)."""
    out = {}
    for f in dataclasses.fields(schema):
        if f.default is not dataclasses.MISSING:
            out[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            out[f.name] = f.default_factory()  # type: ignore[misc]
    return out


def plain_options(cfg: Any, schema: type, skip: tuple[str, ...] = ("paths",)) -> dict[str, Any]:
    """A tool's options as plain values: every field of ``schema`` (e.g. :class:`EvalConfig`) from ``cfg`` (a
    composed DictConfig or a plain dict, as tests and notebooks pass), the schema's default where ``cfg`` has
    none. ``skip`` fields (``paths`` needs Hydra's runtime to resolve) are left out."""
    out = {k: v for k, v in schema_defaults(schema).items() if k not in skip}
    out.update({k: to_plain(cfg.get(k)) for k in out if k in cfg})
    return out


def model_config(model_cfg: Any, precision_cfg: Any, **changes: Any) -> MoMConfig:
    """Build a :class:`MoMConfig` from the ``model`` and ``precision`` groups (ConfigError names the key)."""
    d = dict(to_plain(model_cfg))
    d["precision"] = dict(to_plain(precision_cfg))
    d.update(changes)
    return MoMConfig.from_dict(d)


def wandb_mode_offline() -> bool:
    """wandb runs offline unless an API key is set (or WANDB_MODE says otherwise)."""
    mode = os.environ.get("WANDB_MODE")
    if mode:
        return mode in ("offline", "disabled", "dryrun")
    return not os.environ.get("WANDB_API_KEY")


__all__ = [
    "CONF_DIR", "REPO_ROOT", "ConfigError", "EvalConfig", "ExportConfig", "GenerateConfig", "ModelSchema", "OptimizerSchema", "PathsSchema", "PrecisionKind",
    "PrecisionSchema", "SchedulerSchema", "ScoreConfig", "SlmSchema", "TrainConfig", "TrainerSchema", "compose",
    "model_config", "plain_options", "register_configs", "schema_defaults", "to_plain", "wandb_mode_offline",
]
