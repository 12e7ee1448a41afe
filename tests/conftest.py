"""Shared fixtures: composing configs from conf/ and shrinking them to seconds-on-CPU runs.

Every test process (and the subprocesses the slow tests start) uses one session cache folder for the data
module's token and tokenizer caches (MOM_CACHE_DIR) and runs wandb offline, so nothing outside the pytest
temp folder is written and no network is needed.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
_SESSION_TMP = Path(tempfile.mkdtemp(prefix="mom-tests-"))
os.environ.setdefault("MOM_CACHE_DIR", str(_SESSION_TMP / "cache"))
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# Tests run tiny tensors: one intra-op thread spares every op a thread-pool hand-off (several times faster
# here, and steadier on a loaded machine). Subprocesses started by the slow tests keep the default.
torch.set_num_threads(1)

# The overrides that make any training config a seconds-long CPU job: jamba_tiny-sized model and vocabulary,
# 32-token windows, batches of 2, few steps, small validation, quiet trainer.
TINY_MODEL = [
    "model.vocab_size=512",
    "model.hidden_size=64",
    "model.num_hidden_layers=4",
    "model.intermediate_size=128",
    "model.mamba_d_state=8",
    "model.mamba_dt_rank=0",
    "model.max_position_embeddings=512",
]
TINY_RUN = [
    "data=shakespeare",
    "data.tokenizer.vocab_size=512",
    "data.tokenizer.name=null",
    "data.seq_len=32",
    "data.batch_size=2",
    "data.val_batch_size=4",
    "data.num_workers=0",
    "data.pin_memory=false",
    "trainer.accelerator=cpu",
    "trainer.devices=1",
    "trainer.strategy=auto",
    "trainer.precision=32-true",
    "trainer.max_time=null",
    "trainer.max_steps=4",
    "trainer.val_check_interval=2",
    "trainer.limit_val_batches=2",
    "trainer.log_every_n_steps=1",
    "trainer.num_sanity_val_steps=0",
    "trainer.enable_progress_bar=false",
    "trainer.enable_model_summary=false",
    "scheduler.warmup_steps=1",
    "callbacks.model_checkpoint.every_n_train_steps=2",
]


def small_model_overrides() -> list[str]:
    """jamba_tiny-sized overrides that keep an experiment's mixtures valid (MoA: top_k * kv = heads)."""
    heads = ["model.num_attention_heads=4", "model.num_key_value_heads=2"]
    moa = ["model.moa_num_experts=4", "model.moa_top_k=2"]
    mhmoe = ["model.mhmoe_num_heads=4"]
    attn = ["model.attn_layer_period=2", "model.attn_layer_offset=1"]
    return TINY_MODEL + heads + moa + mhmoe + attn


def tiny_overrides(run_dir: Path | str, experiment: str | None = None) -> list[str]:
    ovr = [f"experiment={experiment}"] if experiment else ["model=jamba_tiny"]
    return ovr + small_model_overrides() + TINY_RUN + [f"paths.run_dir={run_dir}"]


@pytest.fixture(scope="session")
def compose():
    """compose(overrides, config_name="train") -> DictConfig (schemas registered)."""
    from mom.config import compose as _compose

    def _c(overrides=(), config_name: str = "train"):
        return _compose(config_name, list(overrides))

    return _c


@pytest.fixture(scope="session")
def train_fn():
    """mom.train.train, imported once per session (Lightning takes ~10 s to import)."""
    from mom.train import train

    return train


@pytest.fixture
def python_env():
    """Environment for subprocess runs of the entry points (same caches, offline, 1 thread each)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env["OMP_NUM_THREADS"] = "1"
    env["HYDRA_FULL_ERROR"] = "1"
    return env


PYTHON = sys.executable
