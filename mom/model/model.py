"""Jamba-MoM: the hybrid Mamba/attention decoder with its mixtures, in plain PyTorch."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from mom.files import atomic_write
from mom.model.attention import build_attention
from mom.model.bitlinear import BitLinear, make_linear
from mom.model.cache import MoMCache
from mom.model.config import ConfigError, MoMConfig
from mom.model.mamba import MambaMixer
from mom.model.mod import DepthRouter
from mom.model.moe import build_ffn
from mom.model.norm import RMSNorm

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"

# aux loss name -> config field holding its weight
AUX_COEFS = {
    "moe_balance": "router_aux_loss_coef",
    "moa_balance": "moa_aux_loss_coef",
    "moa_z": "moa_z_loss_coef",
    "mod_bce": "mod_aux_loss_coef",
}


@dataclass
class MoMOutput:
    logits: torch.Tensor
    loss: torch.Tensor | None = None
    lm_loss: torch.Tensor | None = None
    token_loss: torch.Tensor | None = None  # (B, T-1) per-token NLL (0 at ignored targets), given labels
    aux_losses: dict = field(default_factory=dict)  # weighted
    stats: dict = field(default_factory=dict)  # detached router statistics
    cache: MoMCache | None = None


def _merge(into: dict, new: dict) -> None:
    for name, value in new.items():
        into.setdefault(name, []).append(value)


class MoMBlock(nn.Module):
    """Pre-norm residual block: mixer (attention or Mamba) then feed-forward (dense, MoE or MH-MoE),
    optionally routed by Mixture of Depths (see mom.model.mod for what is routed)."""

    def __init__(self, config: MoMConfig, layer_idx: int):
        super().__init__()
        self.is_attention = config.is_attention_layer(layer_idx)
        self.input_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        if self.is_attention:
            self.self_attn = build_attention(config)
        else:
            self.mamba = MambaMixer(config)
        self.pre_ff_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.feed_forward = build_ffn(config, layer_idx)
        self.mod_router = DepthRouter(config) if config.is_mod_layer(layer_idx) else None

    def _mix(self, x, token_mask, state, aux, stats):
        if self.is_attention:
            y, a, s = self.self_attn(self.input_layernorm(x), token_mask, state)
            _merge(aux, a)
            _merge(stats, s)
            return y
        return self.mamba(self.input_layernorm(x), token_mask, state)

    def _ffn(self, h, aux, stats):
        out = self.feed_forward(self.pre_ff_layernorm(h))
        if isinstance(out, tuple):
            out, a, s = out
            _merge(aux, a)
            _merge(stats, s)
        return out

    def forward(self, x, token_mask=None, state=None):
        aux, stats = {}, {}
        if self.mod_router is None:
            h = x + self._mix(x, token_mask, state, aux, stats)
            return h + self._ffn(h, aux, stats), aux, stats

        router = self.mod_router
        if not self.is_attention:  # Mamba block: the mixer sees every token, MoD routes the feed-forward
            h = x + self._mix(x, token_mask, state, aux, stats)
            if self.training:  # the top-k tokens, gathered by index as in attention blocks (no host sync)
                idx, weight, bce, selected = router.top_k(h, token_mask)
                aux["mod_bce"] = [bce]
                gather = idx.unsqueeze(-1).expand(-1, -1, h.shape[-1])
                upd = self._ffn(h.gather(1, gather), aux, stats)
                # in the residual's dtype: under autocast the update is bf16, the stream fp32, and scatter_add
                # (unlike +) does not promote
                upd = upd.to(h.dtype) * weight.gather(1, idx).unsqueeze(-1).to(h.dtype)
                stats["mod_selected_frac"] = [selected.float().mean().detach()]
                return h.scatter_add(1, gather, upd), aux, stats
            selected, weight = router.threshold(h, token_mask)
            flat_h = h.reshape(-1, h.shape[-1])
            out = self._routed_update(h, selected, weight, lambda rows: self._ffn(flat_h[rows], aux, stats))
            stats["mod_selected_frac"] = [selected.float().mean().detach()]
            return out, aux, stats

        if self.training and state is None:  # attention block, training: compact the top-k tokens
            idx, weight, bce, selected = router.top_k(x, token_mask)
            aux["mod_bce"] = [bce]
            gather = idx.unsqueeze(-1).expand(-1, -1, x.shape[-1])
            xs = x.gather(1, gather)
            valid = token_mask.gather(1, idx) if token_mask is not None else None
            hs = xs + self._mix(xs, valid, None, aux, stats)
            delta = hs - xs + self._ffn(hs, aux, stats)
            delta = delta.to(x.dtype) * weight.gather(1, idx).unsqueeze(-1).to(x.dtype)
            stats["mod_selected_frac"] = [selected.float().mean().detach()]
            return x.scatter_add(1, gather, delta), aux, stats

        # attention block, eval/decoding: causal per-token decision; skipped tokens are not keys
        selected, weight = router.threshold(x, token_mask)
        h = x + self._mix(x, selected, state, aux, stats)
        flat_x, flat_h = x.reshape(-1, x.shape[-1]), h.reshape(-1, h.shape[-1])
        out = self._routed_update(
            x, selected, weight, lambda rows: flat_h[rows] - flat_x[rows] + self._ffn(flat_h[rows], aux, stats))
        stats["mod_selected_frac"] = [selected.float().mean().detach()]
        return out, aux, stats

    @staticmethod
    def _routed_update(base, selected, weight, update):
        """base + weight * update(rows) on the selected tokens (rows of the flattened batch), the others
        unchanged."""
        flat = base.reshape(-1, base.shape[-1])
        rows = selected.reshape(-1).nonzero().squeeze(1)
        if rows.numel() == 0:
            return base
        upd = update(rows)
        upd = upd.to(base.dtype) * weight.reshape(-1)[rows].unsqueeze(-1).to(base.dtype)  # index_add: one dtype
        return flat.index_add(0, rows, upd).view_as(base)


class MoMModel(nn.Module):
    def __init__(self, config: MoMConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(MoMBlock(config, i) for i in range(config.num_hidden_layers))
        self.final_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(self, input_ids, attention_mask=None, cache: MoMCache | None = None):
        token_mask = attention_mask.bool() if attention_mask is not None else None
        if token_mask is not None and bool(token_mask.all()):
            token_mask = None
        x = self.embed_tokens(input_ids)
        aux, stats = {}, {}
        for i, layer in enumerate(self.layers):
            x, a, s = layer(x, token_mask, cache.layers[i] if cache is not None else None)
            for name, values in a.items():
                aux.setdefault(name, []).extend(values)
            for name, values in s.items():
                stats.setdefault(name, []).extend(values)
        return self.final_layernorm(x), aux, stats


class MoMForCausalLM(nn.Module):
    def __init__(self, config: MoMConfig):
        super().__init__()
        self.config = config
        self.model = MoMModel(config)
        self.lm_head = make_linear(config.hidden_size, config.vocab_size, bias=False, kind=config.precision["lm_head"])
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.apply(self._init_weights)
        for module in self.modules():
            if isinstance(module, MambaMixer):
                module.reset_dt()

    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):  # BitLinear included
            nn.init.normal_(module.weight, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=std)

    # ------------------------------------------------------------------ forward
    def forward(self, input_ids, labels=None, attention_mask=None, cache: MoMCache | None = None,
                logits_to_keep: int = 0) -> MoMOutput:
        hidden, aux, stats = self.model(input_ids, attention_mask, cache)
        if logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]
        logits = self.lm_head(hidden)
        out = MoMOutput(logits=logits, cache=cache)
        out.stats = {name: torch.stack(v).float().mean() for name, v in stats.items()}
        out.aux_losses = {
            name: getattr(self.config, AUX_COEFS[name]) * torch.stack(v).float().mean() for name, v in aux.items()
        }
        if labels is not None:
            flat = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                                   ignore_index=-100, reduction="none").view(labels.shape[0], -1)
            valid = (labels[:, 1:] != -100).float()
            out.token_loss = flat
            out.lm_loss = (flat * valid).sum() / valid.sum().clamp_min(1)
            out.loss = out.lm_loss + sum(out.aux_losses.values(), torch.zeros((), device=logits.device))
        return out

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    # ------------------------------------------------------------------ generation
    @torch.no_grad()
    def generate(self, input_ids, max_new_tokens: int = 32, **kwargs) -> torch.Tensor:
        """Decoding on the engine (``mom.infer.generate``: static cache, C++ kernels, ``compile=True``);
        ``use_cache=False`` is the reference full recompute."""
        from mom.infer.generate import generate

        return generate(self, input_ids, max_new_tokens=max_new_tokens, **kwargs)

    # ------------------------------------------------------------------ persistence
    def save_pretrained(self, directory: str | os.PathLike) -> Path:
        """config.json + model.safetensors, each written atomically (:func:`mom.files.atomic_write`)."""
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        if self.config.tie_word_embeddings:
            state.pop("lm_head.weight", None)
        atomic_write(directory / WEIGHTS_NAME, lambda f: save_file(state, f.name, metadata={"format": "pt"}))
        atomic_write(directory / CONFIG_NAME, lambda f: f.write(json.dumps(self.config.to_dict(), indent=2,
                                                                           sort_keys=True)), mode="w")
        return directory

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, map_location: str | torch.device = "cpu") -> MoMForCausalLM:
        """Load a model directory. Weights come from safetensors only: nothing is unpickled."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        directory = Path(directory)
        if not directory.is_dir():
            raise FileNotFoundError(f"model directory not found: {directory}")
        for name in (CONFIG_NAME, WEIGHTS_NAME):
            if not (directory / name).is_file():
                raise FileNotFoundError(f"{directory / name} is missing: not a MoM model directory")
        config = MoMConfig.load(directory / CONFIG_NAME)
        try:
            state = load_file(str(directory / WEIGHTS_NAME), device=str(map_location))
        except (SafetensorError, OSError, ValueError) as e:
            raise ValueError(f"{directory / WEIGHTS_NAME} is corrupt or truncated: {e}") from None
        with torch.device("meta"):
            model = cls(config)
        from mom.model.packed import packed_module_names, replace_with_packed

        packed = packed_module_names(state)
        if packed:
            replace_with_packed(model, packed)
        if config.tie_word_embeddings:
            state["lm_head.weight"] = state["model.embed_tokens.weight"]
        missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
        if missing or unexpected:
            raise ValueError(f"{directory / WEIGHTS_NAME} does not match {directory / CONFIG_NAME}: "
                             f"missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}")
        if config.tie_word_embeddings:
            model.lm_head.weight = model.model.embed_tokens.weight
        model._materialize_buffers(map_location)
        return model.eval()

    def _materialize_buffers(self, device) -> None:
        """Non-persistent buffers were created on the meta device: rebuild them on ``device``."""
        for module in self.modules():
            if hasattr(module, "rebuild_buffers"):
                module.rebuild_buffers(device)
        for name, buf in self.named_buffers():
            if buf.is_meta:
                raise ConfigError(f"buffer {name} was not loaded")


def apply_precision(model: nn.Module, precision: dict[str, str]) -> nn.Module:
    """Re-express an existing model's linear layers with another per-component precision (a converter:
    modules are swapped by component, weights kept)."""
    from mom.model.bitlinear import convert_linear

    config: MoMConfig = model.config
    new = {**config.precision, **precision}
    MoMConfig(**{**config.to_dict(), "precision": new})  # validates
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, nn.Linear):
                comp = component_of(f"{name}.{child_name}" if name else child_name)
                if comp is not None:
                    setattr(module, child_name, convert_linear(child, new[comp]))
    config.precision = new
    return model


def component_of(qualified_name: str) -> str | None:
    """Which precision component a linear layer belongs to, from its module path."""
    parts = qualified_name.split(".")
    leaf = parts[-1]
    if qualified_name == "lm_head":
        return "lm_head"
    if "mod_router" in parts:
        return "mod_router"
    if "self_attn" in parts:
        return "moa_router" if leaf == "router" else "attention"
    if "mamba" in parts:
        return "mamba"
    if "feed_forward" in parts:
        return "moe_router" if leaf == "router" else "ffn"
    return None


__all__ = ["MoMBlock", "MoMModel", "MoMForCausalLM", "MoMOutput", "apply_precision", "component_of", "BitLinear"]
