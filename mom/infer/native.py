"""The whole decode step in one native call: ``csrc/step.cpp``'s ``Program`` described from a ``MoMForCausalLM``.

``build_program(model)`` walks the network once and hands the C++ side every weight it needs (referenced,
not copied; ``BitLinear`` layers are ternarised and packed to 2 bits here, once), in the order of
``mom.model``. ``NativeStep(model)`` then runs rows of tokens against a ``StaticCache``:

- ``decode(tokens, cache)``: one new token per sequence (all at ``cache.length``);
- ``greedy(first, cache, steps, eos, pad)``: greedy decoding with no Python between tokens;
- ``decode_tokens(tokens, cache)``: known tokens (n, B), one decode call each, in one native loop;
- ``prefill(input_ids, attention_mask, cache)``: a left-padded prompt batch; padding is never computed (its
  keys are marked invalid, its Mamba state stays zero, which is what the reference's masking amounts to).

What the program cannot express (a layer type it does not know, a ternary layer with fewer than 8 inputs
whose RMSNorm torch sums in another order, non-fp32 norms) makes ``build_program`` return the reason
instead, and the engine keeps its per-op path.
"""

from __future__ import annotations

import torch
from torch import nn

from mom.infer import kernels
from mom.infer.cache import StaticAttention, StaticCache
from mom.model.attention import MixtureOfAttention
from mom.model.bitlinear import BitLinear
from mom.model.moe import ACTIVATIONS, MLP, MultiHeadMoE, SparseMoE
from mom.model.packed import PackedTernaryLinear, pack_ternary

_F32, _BF16, _TERNARY, _INT8 = 0, 1, 2, 3
_ACTS = {"silu": 0, "gelu": 1, "relu": 2}  # mom.model.moe.ACTIVATIONS names -> csrc/step.cpp's Act


class Unsupported(Exception):
    """The model has something the native step does not run; the message says what."""


class _Builder:
    def __init__(self, program, high_precision: str):
        self.p = program
        self.high_precision = high_precision
        self.ids: dict[int, int] = {}

    def linear(self, m: nn.Module) -> int:
        if id(m) in self.ids:
            return self.ids[id(m)]
        with torch.no_grad():
            if isinstance(m, PackedTernaryLinear) or isinstance(m, BitLinear):
                if m.in_features < 8:
                    raise Unsupported(f"ternary layer with {m.in_features} inputs (< 8)")
                if isinstance(m, PackedTernaryLinear):
                    packed, gamma = m.packed_weight, float(m.weight_scale)
                else:
                    if m.weight.dtype != torch.float32:
                        raise Unsupported(f"BitLinear weights in {m.weight.dtype}")
                    t, g = m.quantized_weight()
                    packed, gamma = pack_ternary(t), float(g)
                gain = m.norm.weight.detach()
                if gain.dtype != torch.float32:
                    raise Unsupported("non-fp32 BitLinear norm")
                bias = m.bias.detach() if m.bias is not None else None
                i = self.p.add_linear(_TERNARY, m.in_features, packed, bias, gain, m.norm.eps, gamma)
            elif type(m) is nn.Linear:
                w, scale = m.weight.detach(), None
                bias = m.bias.detach().float() if m.bias is not None else None
                if self.high_precision == "int8" and w.dtype == torch.float32:
                    w, scale = kernels.quantize_rows_int8(w)  # one fp32 scale per row, passed as the "gain"
                elif self.high_precision == "bf16" and w.dtype == torch.float32:
                    w = w.to(torch.bfloat16)
                kind = {torch.float32: _F32, torch.bfloat16: _BF16, torch.int8: _INT8}.get(w.dtype)
                if kind is None:
                    raise Unsupported(f"linear weights in {w.dtype}")
                i = self.p.add_linear(kind, m.in_features, w, bias, scale, 0.0, 1.0)
            else:
                raise Unsupported(f"layer type {type(m).__name__}")
        self.ids[id(m)] = i
        return i

    def norm(self, m: nn.Module) -> int:
        if m.weight.dtype != torch.float32:
            raise Unsupported("non-fp32 RMSNorm")
        return self.p.add_norm(m.weight.detach(), m.eps)

    def mamba(self, m) -> int:
        ids = [self.linear(m.in_proj), self.linear(m.x_proj), self.linear(m.dt_proj), self.linear(m.out_proj),
               self.norm(m.dt_layernorm), self.norm(m.b_layernorm), self.norm(m.c_layernorm)]
        with torch.no_grad():
            conv_b = m.conv1d.bias.detach().float() if m.conv1d.bias is not None else None
            return self.p.add_mamba(ids, m.conv1d.weight.detach()[:, 0].float(), conv_b, m._A().float(),
                                    m.D.detach().float(), m.dt_rank, m.d_state)

    def attention(self, a) -> int:
        if isinstance(a, MixtureOfAttention):
            return self.p.add_attention([self.linear(q) for q in a.q_proj], [self.linear(o) for o in a.o_proj],
                                        self.linear(a.k_proj), self.linear(a.v_proj), self.linear(a.router),
                                        a.top_k, a.top_k * a.num_kv_heads, a.num_kv_heads, a.head_dim)
        return self.p.add_attention([self.linear(a.q_proj)], [self.linear(a.o_proj)], self.linear(a.k_proj),
                                    self.linear(a.v_proj), -1, 1, a.num_heads, a.num_kv_heads, a.head_dim)

    def experts(self, experts) -> tuple[list[int], list[int], list[int], int]:
        acts = {_act_name(e) for e in experts}
        if len(acts) != 1:
            raise Unsupported(f"expert activations {acts}")
        return ([self.linear(e.gate_proj) for e in experts], [self.linear(e.up_proj) for e in experts],
                [self.linear(e.down_proj) for e in experts], _ACTS[acts.pop()])

    def ffn(self, f) -> int:
        if isinstance(f, MLP):
            g, u, d, act = self.experts([f])
            return self.p.add_ffn(0, g, u, d, act, -1, 1, False, -1, -1, 0)
        if isinstance(f, SparseMoE):
            g, u, d, act = self.experts(f.experts)
            return self.p.add_ffn(1, g, u, d, act, self.linear(f.router), f.top_k, False, -1, -1, 0)
        if isinstance(f, MultiHeadMoE):
            g, u, d, act = self.experts(f.experts)
            return self.p.add_ffn(2, g, u, d, act, self.linear(f.router), f.top_k, f.normalize_gates,
                                  self.linear(f.head_proj),
                                  self.linear(f.merge_proj), f.sub_dim)
        raise Unsupported(f"feed-forward {type(f).__name__}")


def _act_name(mlp: MLP) -> str:
    name = next((n for n, fn in ACTIVATIONS.items() if mlp.act is fn), None)
    if name not in _ACTS:
        raise Unsupported(f"activation {mlp.act}")
    return name


def build_program(model, high_precision: str = "fp32"):
    """The C++ ``Program`` for ``model`` (fp32 on CPU, kernels built), or a string saying why not.
    ``high_precision="bf16"`` / ``"int8"`` keeps the plain (non-ternary) linear weights in bf16 / int8 with a
    scale per row (see ``Engine``)."""
    emb = model.model.embed_tokens.weight
    if emb.dtype != torch.float32 or emb.device.type != "cpu":
        return f"the native step runs fp32 models on CPU ({emb.dtype} on {emb.device.type} here)"
    try:
        b = _Builder(torch.classes.mom_infer.Program(), high_precision)
        for layer in model.model.layers:
            mixer = b.attention(layer.self_attn) if layer.is_attention else b.mamba(layer.mamba)
            router = b.linear(layer.mod_router.proj) if layer.mod_router is not None else -1
            raw = layer.mod_router is not None and layer.mod_router.update_scale == "router"
            b.p.add_block(layer.is_attention, mixer, b.ffn(layer.feed_forward), b.norm(layer.input_layernorm),
                          b.norm(layer.pre_ff_layernorm), router, raw)
        b.p.set_output(emb.detach(), b.norm(model.model.final_layernorm), b.linear(model.lm_head))
    except Unsupported as e:
        return str(e)
    return b.p


def _state(cache: StaticCache) -> list[torch.Tensor]:
    out = []
    for st in cache.layers:
        out += [st.k, st.v, st.valid] if isinstance(st, StaticAttention) else [st.conv, st.ssm]
    return out


class NativeStep:
    """The model's ``Program`` and the calls that feed it rows (see the module docstring)."""

    def __init__(self, program):
        self.program = program
        self._bound = None  # the cache whose tensors the program holds (they are updated in place)

    def _bind(self, cache: StaticCache) -> None:
        if self._bound is not cache:
            self.program.bind(_state(cache))
            self._bound = cache

    def decode(self, tokens: torch.Tensor, cache: StaticCache) -> torch.Tensor:
        self._bind(cache)
        logits = self.program.decode(tokens, cache.length)
        cache.length += 1
        return logits

    def decode_tokens(self, tokens: torch.Tensor, cache: StaticCache) -> torch.Tensor:
        """Known tokens (n, B) through n decode calls in one native loop; the logits (B, V) after the last."""
        if cache.length + tokens.shape[0] > cache.max_len:
            raise ValueError(f"the static cache is full ({cache.max_len} tokens)")
        self._bind(cache)
        logits = self.program.decode_tokens(tokens, cache.length)
        cache.length += tokens.shape[0]
        return logits

    def greedy(self, first: torch.Tensor, cache: StaticCache, steps: int, eos_token_id: int | None,
               pad_token_id: int) -> torch.Tensor:
        """Up to ``steps`` greedy tokens after ``first`` (B,), all in C++ (argmax, eos, padding as in
        ``mom.infer.generate``'s loop); returns (B, k) and advances the cache by k."""
        if cache.length + steps > cache.max_len:
            raise ValueError(f"the static cache is full ({cache.max_len} tokens)")
        self._bind(cache)
        out = self.program.greedy(first, cache.length, steps, -1 if eos_token_id is None else eos_token_id,
                                  pad_token_id)
        cache.length += out.shape[1]
        return out

    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, cache: StaticCache) -> torch.Tensor:
        """Left-padded prompts (B, T) into a reset cache; returns the logits (B, V) after each prompt."""
        B, T = input_ids.shape
        cache.reset()
        mask = torch.ones(B, T, dtype=torch.bool) if attention_mask is None else attention_mask.bool().cpu()
        for st in cache.layers:
            if isinstance(st, StaticAttention):
                st.valid[:, :T] = mask
        seq, pos = mask.nonzero(as_tuple=True)  # row-major: each sequence's tokens in order
        tokens = input_ids.cpu()[seq, pos]
        last = (pos == T - 1).nonzero().squeeze(1)  # each sequence's last token, in sequence order
        if last.numel() != B:
            raise ValueError("prompts must be left-padded: the attention mask's last column must be all ones")
        self._bind(cache)
        logits = self.program.step(tokens, seq, pos, last)
        cache.length = T
        return logits


__all__ = ["NativeStep", "build_program", "Unsupported"]
