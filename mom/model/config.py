"""MoMConfig: one serialisable dataclass describing a Jamba-MoM network.

Field names follow transformers' JambaConfig where the concept is the same, so a Jamba config maps 1:1
(see ``mom.convert``). Everything is a plain int/float/str/bool/dict so ``to_dict``/``from_dict`` round-trip
through JSON and Hydra.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mom.errors import MoMError

# The components whose linear layers can be switched between high precision and ternary.
PRECISION_COMPONENTS = ("attention", "mamba", "ffn", "moe_router", "moa_router", "mod_router", "lm_head")
PRECISION_KINDS = ("bf16", "ternary")

# The precision presets: the one place they are written down. ``mom.config`` registers each as an option of
# the Hydra ``precision`` group (``precision=ternary``); a YAML in conf/precision/ adds one of your own.
# "bf16" means an ordinary nn.Linear whose compute dtype comes from autocast; "ternary" means BitLinear b1.58.
PRECISION_PRESETS: dict[str, dict[str, str]] = {
    # every linear layer high precision
    "bf16": {c: "bf16" for c in PRECISION_COMPONENTS},
    # BitNet b1.58 everywhere except the LM head
    "ternary": {**{c: "ternary" for c in PRECISION_COMPONENTS}, "lm_head": "bf16"},
    # ternary everywhere except attention and the LM head (the MoMv4 recipe)
    "attn_bf16": {**{c: "ternary" for c in PRECISION_COMPONENTS}, "attention": "bf16", "lm_head": "bf16"},
    # ternary FFN/experts and routers; attention, Mamba and the LM head high precision
    "mamba_attn_bf16": {
        **{c: "ternary" for c in PRECISION_COMPONENTS},
        "attention": "bf16",
        "mamba": "bf16",
        "lm_head": "bf16",
    },
}


class ConfigError(MoMError, ValueError):
    """A bad configuration value; the message names the key."""


@dataclass
class MoMConfig:
    # --- vocabulary and trunk
    vocab_size: int = 4096
    hidden_size: int = 256
    num_hidden_layers: int = 4
    rms_norm_eps: float = 1e-6
    initializer_range: float = 0.02
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 2048  # the trained context; longer prompts are refused by generate
    pad_token_id: int | None = 0
    bos_token_id: int | None = 1
    eos_token_id: int | None = 2

    # --- attention (no positional embedding, as in Jamba)
    num_attention_heads: int = 8
    num_key_value_heads: int = 4
    attn_layer_period: int = 2
    attn_layer_offset: int = 1
    attention_dropout: float = 0.0

    # --- feed-forward: dense SwiGLU MLP or top-k MoE every `expert_layer_period` layers
    intermediate_size: int = 512
    hidden_act: str = "silu"
    num_experts: int = 4
    num_experts_per_tok: int = 2
    expert_layer_period: int = 2
    expert_layer_offset: int = 1
    router_aux_loss_coef: float = 0.001

    # --- Mamba mixer
    mamba_d_state: int = 16
    mamba_d_conv: int = 4
    mamba_expand: int = 2
    mamba_dt_rank: int = 0  # 0 = ceil(hidden_size / 16), as Jamba's "auto"
    mamba_conv_bias: bool = True
    mamba_proj_bias: bool = False
    scan_impl: str = "auto"  # auto | reference | fast | cuda

    # --- per-component precision: component -> "bf16" | "ternary"
    precision: dict[str, str] = field(default_factory=lambda: dict(PRECISION_PRESETS["bf16"]))

    # --- Mixture of Depths: a scalar router per routed block, top-k by capacity in training,
    # a causal sigmoid(r) > 0.5 decision in eval/decoding (trained by an auxiliary BCE).
    mod_enabled: bool = False
    mod_capacity: float = 0.125
    mod_layer_period: int = 2
    mod_layer_offset: int = 1
    mod_aux_loss_coef: float = 0.01
    # what multiplies a routed block's update: "sigmoid" of the router logit (MoM's default: bounded in (0, 1),
    # and the eval-time decision sigmoid > 0.5 reads the same quantity) or "router", the raw router weight as
    # in the paper (2404.02258, eq. 1)
    mod_update_scale: str = "sigmoid"

    # --- mixture of attention heads (MoA / JetMoE): per-expert Q and O, shared K/V
    moa_enabled: bool = False
    moa_num_experts: int = 8
    moa_top_k: int = 2
    moa_aux_loss_coef: float = 0.01
    moa_z_loss_coef: float = 0.001

    # --- multi-head MoE (MH-MoE): tokens split into `mhmoe_num_heads` sub-tokens for the expert layers
    mhmoe_enabled: bool = False
    mhmoe_num_heads: int = 4
    # renormalise each sub-token's top-k gate weights to sum to 1 (MoM's default); the authors' TopkGate does
    # not (normalize_gate_prob_before_dropping=False): False keeps the raw softmax probabilities
    mhmoe_normalize_gates: bool = True
    # a bias on the head and merge projections (the authors' code has one; MoM's default: none, as its other
    # projections)
    mhmoe_proj_bias: bool = False
    # the balance loss counts every top-k choice ("topk", MoM's default) or each sub-token's first choice only
    # ("top1", as the authors' top-2 gate)
    mhmoe_balance: str = "topk"

    def __post_init__(self) -> None:
        if not self.mamba_dt_rank:
            self.mamba_dt_rank = math.ceil(self.hidden_size / 16)
        self.precision = {**PRECISION_PRESETS["bf16"], **dict(self.precision)}
        self.validate()

    # ----------------------------------------------------------------- schedule
    def is_attention_layer(self, i: int) -> bool:
        return i % self.attn_layer_period == self.attn_layer_offset

    def is_expert_layer(self, i: int) -> bool:
        return self.num_experts > 1 and i % self.expert_layer_period == self.expert_layer_offset

    def is_mod_layer(self, i: int) -> bool:
        return self.mod_enabled and i % self.mod_layer_period == self.mod_layer_offset

    @property
    def mamba_d_inner(self) -> int:
        return self.mamba_expand * self.hidden_size

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    # ----------------------------------------------------------------- checks
    def validate(self) -> None:
        def bad(key: str, why: str) -> None:
            raise ConfigError(f"model.{key}: {why}")

        for key in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                    "num_key_value_heads", "intermediate_size", "num_experts", "num_experts_per_tok",
                    "attn_layer_period", "expert_layer_period", "mod_layer_period", "mamba_d_state",
                    "mamba_d_conv", "mamba_expand", "moa_num_experts", "moa_top_k", "mhmoe_num_heads"):
            if int(getattr(self, key)) < 1:
                bad(key, f"must be >= 1, got {getattr(self, key)}")
        if self.hidden_size % self.num_attention_heads:
            bad("num_attention_heads", f"{self.num_attention_heads} heads do not divide hidden_size {self.hidden_size}")
        if self.num_attention_heads % self.num_key_value_heads:
            bad("num_key_value_heads",
                f"{self.num_key_value_heads} KV heads do not divide {self.num_attention_heads} attention heads")
        if self.num_experts_per_tok > self.num_experts:
            bad("num_experts_per_tok", f"top-k {self.num_experts_per_tok} > num_experts {self.num_experts}")
        if self.moa_enabled:
            if self.moa_top_k > self.moa_num_experts:
                bad("moa_top_k", f"top-k {self.moa_top_k} > moa_num_experts {self.moa_num_experts}")
            # each expert owns num_kv_heads query heads of head_dim, so top_k experts give top_k*kv heads
            if self.num_key_value_heads * self.moa_top_k != self.num_attention_heads:
                bad("moa_top_k", f"moa_top_k ({self.moa_top_k}) x num_key_value_heads ({self.num_key_value_heads})"
                    f" must equal num_attention_heads ({self.num_attention_heads}): each MoA expert owns one query "
                    "head per KV head")
        if self.mhmoe_enabled and self.hidden_size % self.mhmoe_num_heads:
            bad("mhmoe_num_heads", f"{self.mhmoe_num_heads} heads do not divide hidden_size {self.hidden_size}")
        if not 0.0 < self.mod_capacity <= 1.0:
            bad("mod_capacity", f"must be in (0, 1], got {self.mod_capacity}")
        if self.mhmoe_balance not in ("topk", "top1"):
            bad("mhmoe_balance", f"must be 'topk' or 'top1', got {self.mhmoe_balance!r}")
        if self.mod_update_scale not in ("sigmoid", "router"):
            bad("mod_update_scale", f"must be 'sigmoid' or 'router', got {self.mod_update_scale!r}")
        for name, period, offset in (("attn_layer", self.attn_layer_period, self.attn_layer_offset),
                                     ("expert_layer", self.expert_layer_period, self.expert_layer_offset),
                                     ("mod_layer", self.mod_layer_period, self.mod_layer_offset)):
            if not 0 <= offset < period:
                bad(f"{name}_offset", f"must be in [0, {name}_period={period}), got {offset}")
        if self.scan_impl not in ("auto", "reference", "fast", "cuda"):
            bad("scan_impl", f"unknown scan implementation {self.scan_impl!r} (auto, reference, fast, cuda)")
        if self.hidden_act not in ("silu", "gelu", "relu"):
            bad("hidden_act", f"unknown activation {self.hidden_act!r}")
        for comp, kind in self.precision.items():
            if comp not in PRECISION_COMPONENTS:
                bad(f"precision.{comp}", f"unknown precision component (known: {', '.join(PRECISION_COMPONENTS)})")
            if kind not in PRECISION_KINDS:
                bad(f"precision.{comp}", f"unknown precision {kind!r} (bf16 or ternary)")

    # ----------------------------------------------------------------- serialisation
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> MoMConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"model: unknown key(s) {', '.join(unknown)}")
        return cls(**d)

    @classmethod
    def load(cls, path: str | Path) -> MoMConfig:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"model config not found: {path}")
        try:
            d = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: not valid JSON ({e})") from None
        return cls.from_dict(d)
