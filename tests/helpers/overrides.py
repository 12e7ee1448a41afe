"""Command-line overrides that make any training config a seconds-long CPU job.

``debug=fast`` (conf/debug/fast.yaml) holds the run settings (embedded Shakespeare, 32-token windows, batches
of 2, 4 steps, small validation, quiet trainer); the model is shrunk here to jamba_tiny size while keeping an
experiment's mixtures valid.
"""

from __future__ import annotations

from pathlib import Path

TINY_MODEL = [
    "model.vocab_size=512",
    "model.hidden_size=64",
    "model.num_hidden_layers=4",
    "model.intermediate_size=128",
    "model.mamba_d_state=8",
    "model.mamba_dt_rank=0",
    "model.max_position_embeddings=512",
]
TINY_RUN = ["debug=fast"]


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
