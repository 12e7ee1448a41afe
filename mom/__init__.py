"""MoM (Mixture of Mixtures): train a Jamba-MoM language model, then run it.

``model, tok = mom.load(run_or_model_dir)``: a trained model and its tokenizer (:func:`mom.run_folder.load`).
"""

from __future__ import annotations

import os
from typing import Any


def load(run_or_model_dir: str | os.PathLike, map_location: Any = "cpu"):
    """``(model, tokenizer)`` of a training run folder or a model folder (see :func:`mom.run_folder.load`)."""
    from mom.run_folder import load as _load

    return _load(run_or_model_dir, map_location=map_location)


__all__ = ["load"]
