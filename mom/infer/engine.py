"""The decode engine: a one-token step over a static cache, with the C++ kernels for every linear layer.

``Engine(model)`` reads the weights of a ``MoMForCausalLM`` (never changes it) and prepares each linear
layer once for its fastest kernel:

- ``nn.Linear`` with fp32 weights -> ``mom_infer::linear_f32`` (bf16 weights -> ``linear_bf16w``);
- ``BitLinear`` -> ternarised and packed to 2 bits once, then ``mom_infer::ternary_linear`` (RMSNorm and int8
  quantisation fused; bit-identical to BitLinear);
- ``PackedTernaryLinear`` -> its own 2-bit weights through the same kernel.

With the kernels built and an fp32 model, the whole step is one native call (``mom.infer.native``: the C++
``Program`` in ``csrc/step.cpp``), prefill included; otherwise the step below runs layer by layer from Python,
each linear layer on its kernel, and without the kernels (no compiler, non-x86 CPU, non-fp32 model) each
layer is called as it is (eager). ``step(tokens, cache)`` advances B sequences by one token and returns the
next-token logits (B, V). Both paths mirror ``mom.model`` (the reference every fast path is tested against)
with what decoding allows: a token that Mixture of Depths skips costs no block compute, MoE / MH-MoE / MoA
read only the chosen experts' weights, and the mixer's K/V land in preallocated buffers.

``high_precision="bf16"`` keeps the plain (non-ternary) linear layers, the presets' "bf16" components such
as ``lm_head``, in bf16: half their bytes, and the weight rounding bf16-mixed training computes them with,
but not the fp32 reference forward (logits differ by ~1e-3). ``high_precision="int8"`` reads them as int8 with one
fp32 scale per output row (a quarter of the bytes; llama.cpp's ternary files keep their head in a 6-bit type):
weight-only, the activations stay fp32, logits differ from the fp32 forward by ~1e-2. Both need the C++ kernels
(without them the weights are read as they are). The default "fp32" reads the checkpoint as is.
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F
from torch import nn

from mom.infer import kernels
from mom.infer.cache import StaticAttention, StaticCache
from mom.infer.native import NativeStep, build_program
from mom.model import kernels as mamba_kernels
from mom.model.attention import MixtureOfAttention
from mom.model.bitlinear import BitLinear
from mom.model.cache import MoMCache
from mom.model.experts import stable_top_k, top_k_routing
from mom.model.moe import MLP, MultiHeadMoE, SparseMoE
from mom.model.packed import PackedTernaryLinear, pack_ternary

HIGH_PRECISION = ("fp32", "bf16", "int8")
_MIN_K = 8  # below 8 inputs torch's norm takes another summation order than the kernel reproduces


def _fast_linear(module: nn.Module, use_kernels: bool, high_precision: str = "fp32"):
    """A callable (M, in) -> (M, out) for one linear layer (plain fp32 weights read as ``high_precision``)."""
    if not use_kernels:
        return module
    ops = torch.ops.mom_infer
    if isinstance(module, PackedTernaryLinear):
        if module.in_features < _MIN_K:
            return module
        packed, gain, eps, gamma, bias = (module.packed_weight, module.norm.weight, module.norm.eps,
                                          module.weight_scale, module.bias)
    elif isinstance(module, BitLinear):
        if module.in_features < _MIN_K or module.weight.dtype != torch.float32:
            return module
        with torch.no_grad():
            t, gamma = module.quantized_weight()
            packed = pack_ternary(t)
        gain, eps = module.norm.weight.detach(), module.norm.eps
        bias = module.bias.detach() if module.bias is not None else None
    elif type(module) is nn.Linear:
        w = module.weight.detach()
        b = module.bias.detach() if module.bias is not None else None
        if high_precision == "int8" and w.dtype == torch.float32:
            q, scale = kernels.quantize_rows_int8(w)
            return lambda x: ops.linear_i8w(x, q, scale, b)
        w = w.to(torch.bfloat16) if high_precision == "bf16" and w.dtype == torch.float32 else w
        if w.dtype == torch.float32:
            return lambda x: ops.linear_f32(x, w, b)
        if w.dtype == torch.bfloat16 and (b is None or b.dtype == torch.float32):
            return lambda x: ops.linear_bf16w(x, w, b)
        return module
    else:
        return module
    if gain.dtype != torch.float32:
        return module
    return lambda x: ops.ternary_linear(x, packed, gain, eps, gamma, bias)


class Engine:
    """Decode-step engine for one model (see the module docstring)."""

    def __init__(self, model, use_kernels: bool | None = None, native: bool | None = None,
                 high_precision: str = "fp32"):
        self.model = model
        self.config = model.config
        dtype = model.model.embed_tokens.weight.dtype
        if use_kernels is None:
            use_kernels = dtype == torch.float32 and model.model.embed_tokens.weight.device.type == "cpu"
            use_kernels = use_kernels and kernels.available()
        if high_precision not in HIGH_PRECISION:
            raise ValueError(f"high_precision must be one of {HIGH_PRECISION}, got {high_precision!r}")
        self.use_kernels = use_kernels
        self.high_precision = high_precision
        plain = high_precision if use_kernels else "fp32"  # how plain fp32 weights are read
        self.dtype = dtype
        self.native: NativeStep | None = None
        self.native_why = "the C++ kernels are not in use"
        if use_kernels and native is not False:
            program = build_program(model, high_precision)
            if isinstance(program, str):
                self.native_why = program
            else:
                self.native, self.native_why = NativeStep(program), ""
        # the per-layer step's kernels: only when it is the step in use (the native one prepared its own)
        self._lin: dict[int, object] = {}
        self._f32: dict[int, torch.Tensor] = {}  # plain fp32 weights without bias: can share one kernel call
        for module in model.modules() if self.native is None else ():
            if isinstance(module, (nn.Linear, PackedTernaryLinear)):
                self._lin[id(module)] = _fast_linear(module, use_kernels, plain)
                if (use_kernels and plain == "fp32" and type(module) is nn.Linear and module.bias is None
                        and module.weight.dtype == torch.float32 and module.weight.is_contiguous()):
                    self._f32[id(module)] = module.weight.detach()
        self.cache: StaticCache | None = None
        self.compiled = None
        self.compile_failed = False
        self.compile_seconds = 0.0

    # ------------------------------------------------------------------ building blocks
    def lin(self, module, x):
        return self._lin[id(module)](x)

    def lins(self, modules, x) -> list:
        """Several linear layers on the same input; plain fp32 ones share one kernel call."""
        ws = [self._f32.get(id(m)) for m in modules]
        if all(w is not None for w in ws):
            return torch.ops.mom_infer.linear_multi_f32(x, ws)
        return [self.lin(m, x) for m in modules]

    def norm(self, module, x):
        if self.use_kernels and x.dtype == torch.float32 and module.weight.dtype == torch.float32:
            return torch.ops.mom_infer.rms_norm(x, module.weight, module.eps)
        return module(x)

    def get_cache(self, batch: int, max_len: int) -> StaticCache:
        if self.cache is None or not self.cache.fits(batch, max_len, self.dtype):
            dev = self.model.model.embed_tokens.weight.device
            self.cache = StaticCache(self.config, batch, max_len, self.dtype, dev)
        return self.cache

    def _mlp(self, mlp: MLP, x):
        gate, up = self.lins((mlp.gate_proj, mlp.up_proj), x)
        return self.lin(mlp.down_proj, mlp.act(gate) * up)

    def _experts(self, experts, x, idx: list[int]):
        """Row i -> experts[idx[i]](x[i]); rows grouped by expert so each chosen expert's weights are read once."""
        if len(idx) <= 4:
            return torch.cat([self._mlp(experts[e], x[i:i + 1]) for i, e in enumerate(idx)])
        out = x.new_empty((len(idx), x.shape[-1]))
        groups: dict[int, list[int]] = {}
        for i, e in enumerate(idx):
            groups.setdefault(e, []).append(i)
        for e, rows in groups.items():
            r = torch.tensor(rows, device=x.device)
            out[r] = self._mlp(experts[e], x[r])
        return out

    def _ffn(self, ffn, x):
        if isinstance(ffn, MLP):
            return self._mlp(ffn, x)
        if isinstance(ffn, SparseMoE):
            _, top_w, top_i = top_k_routing(self.lin(ffn.router, x), ffn.top_k, normalize=False)
            y = self._experts(ffn.experts, x.repeat_interleave(ffn.top_k, 0), top_i.flatten().tolist())
            return (y.view(-1, ffn.top_k, x.shape[-1]) * top_w.unsqueeze(-1).to(y.dtype)).sum(1)
        if isinstance(ffn, MultiHeadMoE):
            sub = self.lin(ffn.head_proj, x).reshape(-1, ffn.sub_dim)
            _, top_w, top_i = top_k_routing(self.lin(ffn.router, sub), ffn.top_k, normalize=ffn.normalize_gates)
            y = self._experts(ffn.experts, sub.repeat_interleave(ffn.top_k, 0), top_i.flatten().tolist())
            y = (y.view(-1, ffn.top_k, ffn.sub_dim) * top_w.unsqueeze(-1).to(y.dtype)).sum(1)
            return self.lin(ffn.merge_proj, y.reshape(x.shape))
        return ffn(x)

    def _attend(self, q, st: StaticAttention, pos: int, B: int):
        """q: (B, Hq, 1, hd) against the cached keys 0..pos (the newest one written)."""
        k, v = st.k[:, :, : pos + 1], st.v[:, :, : pos + 1]
        gqa = q.shape[1] != k.shape[1]
        if st.all_valid:
            return F.scaled_dot_product_attention(q, k, v, enable_gqa=gqa)
        mask = st.valid[:, : pos + 1].clone()
        mask[:, pos] = True  # a query whose own key is invalid sees itself (its output is discarded)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None, None, :], enable_gqa=gqa)

    def _write_kv(self, st: StaticAttention, k, v, pos: int, valid):
        st.k[:, :, pos] = k
        st.v[:, :, pos] = v
        if valid is not None:
            st.valid[:, pos] = valid
            st.all_valid = st.all_valid and bool(valid.all())
        else:
            st.valid[:, pos] = True

    def _attention(self, attn, x, st: StaticAttention, pos: int, valid):
        B = x.shape[0]
        hd = attn.head_dim
        if isinstance(attn, MixtureOfAttention):
            logits = self.lin(attn.router, x).float()
            top_logits, top_i = stable_top_k(logits, attn.top_k)
            gates = F.softmax(top_logits, dim=-1)
            idx = top_i.flatten().tolist()
            xr = x.repeat_interleave(attn.top_k, 0)
            q = torch.cat([self.lin(attn.q_proj[e], xr[i:i + 1]) for i, e in enumerate(idx)])
            Hkv, kk = attn.num_kv_heads, attn.top_k
            q = q.view(B, kk, Hkv, 1, hd).transpose(1, 2).reshape(B, Hkv * kk, 1, hd)
            k, v = self.lins((attn.k_proj, attn.v_proj), x)
            self._write_kv(st, k.view(B, Hkv, hd), v.view(B, Hkv, hd), pos, valid)
            o = self._attend(q, st, pos, B)
            o = o.view(B, Hkv, kk, 1, hd).transpose(1, 2).reshape(B * kk, Hkv * hd)
            y = torch.cat([self.lin(attn.o_proj[e], o[i:i + 1]) for i, e in enumerate(idx)])
            return (y.view(B, kk, -1) * gates.unsqueeze(-1).to(y.dtype)).sum(1)
        q, k, v = self.lins((attn.q_proj, attn.k_proj, attn.v_proj), x)
        q = q.view(B, -1, 1, hd)
        self._write_kv(st, k.view(B, -1, hd), v.view(B, -1, hd), pos, valid)
        o = self._attend(q, st, pos, B)
        return self.lin(attn.o_proj, o.reshape(B, -1))

    def _mamba(self, m, x, st):
        # mamba-ssm's kernels (CUDA) when this device has them, or no C++ kernels: the reference step itself
        if (not self.use_kernels or x.dtype != torch.float32 or st.conv.dtype != torch.float32
                or mamba_kernels.get("selective_state_update", x.device) is not None):
            return m.step(x, st)
        ops = torch.ops.mom_infer
        xz = self.lin(m.in_proj, x)
        u = ops.mamba_conv_step(xz, st.conv, m.conv1d.weight.view(m.d_inner, -1), m.conv1d.bias)
        dt, Bm, Cm = torch.split(self.lin(m.x_proj, u), [m.dt_rank, m.d_state, m.d_state], dim=-1)
        dt = self.lin(m.dt_proj, self.norm(m.dt_layernorm, dt))
        y = ops.mamba_ssm_step(st.ssm, u, dt, m._A(), self.norm(m.b_layernorm, Bm), self.norm(m.c_layernorm, Cm),
                               m.D, xz)
        return self.lin(m.out_proj, y)

    def _block(self, layer, x, st, pos: int):
        router = layer.mod_router
        if router is None:
            if layer.is_attention:
                h = x + self._attention(layer.self_attn, self.norm(layer.input_layernorm, x), st, pos, None)
            else:
                h = x + self._mamba(layer.mamba, self.norm(layer.input_layernorm, x), st)
            return h + self._ffn(layer.feed_forward, self.norm(layer.pre_ff_layernorm, h))
        if layer.is_attention:  # routed whole: a skipped token is not a key and costs nothing else
            logits = self.lin(router.proj, x).squeeze(-1).float()
            selected, weight = logits > 0, router.scale(logits)
            if x.shape[0] == 1 and not bool(selected[0]):
                self._write_kv(st, 0.0, 0.0, pos, selected)
                return x
            h = x + self._attention(layer.self_attn, self.norm(layer.input_layernorm, x), st, pos, selected)
            rows = selected.nonzero().squeeze(1)
            if rows.numel() == 0:
                return x
            hr, xr = h[rows], x[rows]
            upd = hr - xr + self._ffn(layer.feed_forward, self.norm(layer.pre_ff_layernorm, hr))
        else:  # Mamba block: the mixer sees every token, MoD routes the feed-forward
            x = x + self._mamba(layer.mamba, self.norm(layer.input_layernorm, x), st)
            logits = self.lin(router.proj, x).squeeze(-1).float()
            selected, weight = logits > 0, router.scale(logits)
            rows = selected.nonzero().squeeze(1)
            if rows.numel() == 0:
                return x
            upd = self._ffn(layer.feed_forward, self.norm(layer.pre_ff_layernorm, x[rows]))
        upd = upd * weight[rows].unsqueeze(-1).to(upd.dtype)
        return x.index_add(0, rows, upd)

    # ------------------------------------------------------------------ the step
    def _step(self, tokens: torch.Tensor, cache: StaticCache) -> torch.Tensor:
        pos = cache.length
        x = self.model.model.embed_tokens.weight[tokens]
        for layer, st in zip(self.model.model.layers, cache.layers, strict=True):
            x = self._block(layer, x, st, pos)
        cache.length = pos + 1
        return self.lin(self.model.lm_head, self.norm(self.model.model.final_layernorm, x))

    @torch.no_grad()
    def step(self, tokens: torch.Tensor, cache: StaticCache) -> torch.Tensor:
        """tokens: (B,) ids at position ``cache.length``; returns the logits (B, V) of the next token."""
        if cache.length >= cache.max_len:
            raise ValueError(f"the static cache is full ({cache.max_len} tokens)")
        if self.native is not None:
            return self.native.decode(tokens, cache)
        fn = self.compiled if self.compiled is not None else self._step
        return fn(tokens, cache)

    @torch.no_grad()
    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, cache: StaticCache) -> torch.Tensor:
        """Left-padded prompts (B, T) into ``cache``; returns the logits (B, V) of each prompt's next token.
        Native: the prompt's tokens as rows of one call. Otherwise the reference forward (one parallel pass
        leaving a ``MoMCache``) copied into the static buffers."""
        T = input_ids.shape[1]
        if T > cache.max_len:
            raise ValueError(f"prompt of {T} tokens does not fit a cache of {cache.max_len}")
        if self.native is not None:
            return self.native.prefill(input_ids, attention_mask, cache)
        ref = MoMCache.for_config(self.config)
        logits = self.model(input_ids, attention_mask=attention_mask, cache=ref, logits_to_keep=1).logits[:, -1]
        cache.load(ref, T)
        return logits

    def compile(self) -> float:
        """Wrap the step in ``torch.compile`` (once); returns the seconds the first compilation took, which the
        first call of ``step`` pays (see ``warm_up``). The native step is compiled code already: nothing to do."""
        if self.native is not None:
            return 0.0
        if self.compiled is None:
            self.compiled = torch.compile(self._step, dynamic=True)
        return self.compile_seconds

    def warm_up(self, batch: int, max_len: int) -> float:
        """Run (and so compile) the step once on a scratch cache; returns the seconds it took."""
        t0 = time.perf_counter()
        scratch = StaticCache(self.config, batch, max(max_len, 4), self.dtype,
                              self.model.model.embed_tokens.weight.device)
        tokens = torch.zeros(batch, dtype=torch.long, device=self.model.model.embed_tokens.weight.device)
        for _ in range(2):  # two positions: the second call checks the graph is reused
            self.step(tokens, scratch)
        self.compile_seconds = time.perf_counter() - t0
        return self.compile_seconds


def engine_for(model, use_kernels: bool | None = None, native: bool | None = None,
               high_precision: str = "fp32") -> Engine:
    """The engine cached on ``model``, rebuilt when a weight changed (address or in-place version)."""
    key = tuple((t.data_ptr(), t._version) for t in model.state_dict().values()) + (use_kernels, native,
                                                                                       high_precision)
    eng = getattr(model, "_mom_engine", None)
    if eng is None or eng[0] != key:
        eng = (key, Engine(model, use_kernels, native, high_precision))
        object.__setattr__(model, "_mom_engine", eng)
    return eng[1]


__all__ = ["Engine", "engine_for"]
