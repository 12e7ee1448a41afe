"""Shared fixtures: composing configs from conf/, the training function, the subprocess environment.

Every test process (and the subprocesses the slow tests start) uses one session cache folder for the data
module's token and tokenizer caches (MOM_CACHE_DIR) and runs wandb offline, so nothing outside the pytest
temp folder is written and no network is needed.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest
import torch

from tests.helpers import REPO

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


