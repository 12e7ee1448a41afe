"""Jamba-MoM model code: plain PyTorch, no Lightning."""

from mom.model.config import PRECISION_COMPONENTS, PRECISION_PRESETS, ConfigError, MoMConfig
from mom.model.model import MoMForCausalLM, MoMOutput, apply_precision

__all__ = ["MoMConfig", "MoMForCausalLM", "MoMOutput", "ConfigError", "PRECISION_COMPONENTS", "PRECISION_PRESETS",
           "apply_precision", "summary"]


def summary(config, **kwargs):
    from mom.model.summary import summary as _summary

    return _summary(config, **kwargs)
