"""Generation benchmarks (CPU, 2 threads), printed as markdown tables.

    .venv/bin/python scripts/bench_generate.py [--only a,b,c] [--new-tokens 96] [--big-new-tokens 32]

(a) MoM converted from a transformers Jamba (hidden 256, 4 layers Mamba/Attn/Mamba/Attn, 4 experts top-2,
    intermediate 1024, vocab 4096; ``mom.convert.from_hf_jamba``) vs ``JambaForCausalLM.generate`` on the same
    weights: batch 1, prompt 16, greedy, 96 new tokens; the two token sequences are asserted equal.
(b) a ~100M-parameter MoM with attn_bf16 precision (hidden 768, 12 layers, dense SwiGLU FFN 2048: mixtures
    off), BitLinear (fp32 latent weights, ternarised on every call) vs packed (``pack_model``), batch 1.
(c) inference state bytes per sequence after prefilling 4096 tokens (``MoMCache.nbytes``, measured) for the
    (b) architecture vs an attention-only model of the same width and depth (KV in every layer), plus the
    analytic figures from the shapes.

Timing: each figure is the median of ``--repeats`` runs, from per-token timestamps taken by a streamer
(both generate APIs take one): prefill tokens/s = prompt tokens / (call start -> first new token), decode
tokens/s = (new - 1) / (first -> last new token).
Memory: the peak RSS increase over the RSS before the call, sampled every 1 ms from /proc/self/statm by a
background thread (psutil is not installed; tracemalloc cannot see torch's allocations).
Bandwidth floor: bytes of weights read per decoded token / measured copy bandwidth (read + write of a
256 MiB fp32 copy, :func:`copy_bandwidth`).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mom.model import MoMConfig, MoMForCausalLM  # noqa: E402
from mom.model.cache import MoMCache  # noqa: E402

torch.set_num_threads(2)
PAGE = os.sysconf("SC_PAGE_SIZE")


# ----------------------------------------------------------------------------------------------- helpers
def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


class PeakRSS:
    """Peak RSS increase (bytes) over the RSS at entry, sampled every 1 ms."""

    def __enter__(self):
        self.base = self.peak = rss()
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._poll, daemon=True)
        self._t.start()
        return self

    def _poll(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, rss())
            time.sleep(0.001)

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, rss())
        self.extra = self.peak - self.base


def copy_bandwidth(mib: int = 256) -> float:
    """GiB/s of read+write traffic of an fp32 copy (2 threads), median of 5."""
    n = mib * (1 << 20) // 4
    src, dst = torch.ones(n), torch.empty(n)
    dst.copy_(src)
    ts = []
    for _ in range(5):
        t0 = time.perf_counter()
        dst.copy_(src)
        ts.append(time.perf_counter() - t0)
    return 2 * mib / 1024 / statistics.median(ts)


def median_time(fn, repeats: int) -> tuple[float, object]:
    ts, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts), out


def weight_bytes_per_token(model) -> int:
    """Bytes of weights a decode step reads: every parameter/buffer except the embedding table (one row is
    read) and, for MoE layers, only top-k of the experts (approximated by the full expert set scaled by k/E).
    Packed layers count their resident kernel layout (oneDNN: 1 byte per weight) when built, else 2 bits."""
    from mom.model.packed import PackedTernaryLinear

    cfg = getattr(model, "config", None)
    total = 0
    for name, mod in model.named_modules():
        if isinstance(mod, PackedTernaryLinear):
            layout = getattr(mod, "_kernel_cache", None) or getattr(mod, "_layout_cache", None)
            n_w = mod.in_features * mod.out_features
            total += n_w if layout is not None else mod.packed_weight.numel()
            total += sum(p.numel() * p.element_size() for p in mod.parameters())
            continue
        for _, p in list(mod.named_parameters(recurse=False)) + list(mod.named_buffers(recurse=False)):
            b = p.numel() * p.element_size()
            if "embed_tokens" in name:
                b = p.shape[-1] * p.element_size()
            elif ".experts." in f"{name}." and cfg is not None and getattr(cfg, "num_experts", 1) > 1:
                b = b * cfg.num_experts_per_tok / cfg.num_experts
            total += b
    return int(total)


class Stamps:
    """A streamer for both generate APIs: records the time of every new token (transformers' streamers get
    the prompt first: ``skip_first``)."""

    def __init__(self, skip_first: bool):
        self.skip = skip_first
        self.times: list[float] = []

    def __call__(self, _tokens) -> None:  # MoM's streamer callback
        self.times.append(time.perf_counter())

    def put(self, _tokens) -> None:  # transformers' BaseStreamer
        if self.skip:
            self.skip = False
            return
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def bench_generate(gen, prompt, new_tokens: int, repeats: int, hf: bool = False):
    """(prefill tok/s, decode tok/s, peak extra RSS bytes, output ids, total s), medians over ``repeats``.

    From per-token timestamps of one run: prefill = start -> first new token (the prompt forward + picking a
    token), decode = first -> last new token over new_tokens - 1 steps.
    """
    pre, dec, tot = [], [], []
    with PeakRSS() as mem:
        for _ in range(repeats):
            st = Stamps(skip_first=hf)
            t0 = time.perf_counter()
            out = gen(prompt, new_tokens, st)
            tot.append(time.perf_counter() - t0)
            assert len(st.times) == new_tokens, (len(st.times), new_tokens)
            pre.append(st.times[0] - t0)
            dec.append(st.times[-1] - st.times[0])
    n = prompt.shape[0]
    return (prompt.shape[1] * n / statistics.median(pre), (new_tokens - 1) * n / statistics.median(dec), mem.extra,
            out, statistics.median(tot))


def fmt_bytes(b: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(b) < 1024 or unit == "GiB":
            return f"{b:.1f} {unit}" if unit != "B" else f"{int(b)} B"
        b /= 1024
    return str(b)


def table(header: list[str], rows: list[list[str]]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" if i == 0 else "---:" for i in range(len(header))) + "|"]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


# ----------------------------------------------------------------------------------------------- (a)
def bench_jamba(args, bw: float) -> None:
    from transformers import JambaConfig, JambaForCausalLM
    from transformers.utils import logging as hflog

    from mom.convert import from_hf_jamba

    hflog.set_verbosity_error()
    torch.manual_seed(0)
    jc = JambaConfig(vocab_size=4096, hidden_size=256, intermediate_size=1024, num_hidden_layers=4,
                     num_attention_heads=8, num_key_value_heads=4, attn_layer_period=2, attn_layer_offset=1,
                     expert_layer_period=2, expert_layer_offset=1, num_experts=4, num_experts_per_tok=2,
                     mamba_d_state=16, mamba_d_conv=4, mamba_expand=2, use_mamba_kernels=False,
                     max_position_embeddings=1024, tie_word_embeddings=False)
    hf = JambaForCausalLM(jc).eval()
    mom = from_hf_jamba(hf).eval()
    prompt = torch.randint(3, 4096, (1, 16), generator=torch.Generator().manual_seed(1))
    n = args.new_tokens

    @torch.no_grad()
    def hf_gen(p, k, streamer=None):
        return hf.generate(p, max_new_tokens=k, min_new_tokens=k, do_sample=False, use_cache=True, pad_token_id=0,
                           streamer=streamer)

    @torch.no_grad()
    def mom_gen(p, k, streamer=None):
        return mom.generate(p, max_new_tokens=k, do_sample=False, use_cache=True, streamer=streamer)

    hf_gen(prompt, 4)
    mom_gen(prompt, 4)  # warm-up
    rows, outs, dec = [], {}, {}
    for name, gen, model in (("transformers JambaForCausalLM", hf_gen, hf), ("MoM (from_hf_jamba)", mom_gen, mom)):
        pre, decode, mem, out, tn = bench_generate(gen, prompt, n, args.repeats, hf=gen is hf_gen)
        outs[name], dec[name] = out, decode
        wb = weight_bytes_per_token(model)
        floor = bw * 2**30 / wb  # tokens/s if a step only streamed its weights once at copy bandwidth
        rows.append([name, f"{pre:,.0f}", f"{decode:,.1f}", f"{1000 / decode:.2f}", fmt_bytes(mem),
                     fmt_bytes(wb), f"{floor:,.0f}", f"{100 * decode / floor:.1f}%"])
    same = torch.equal(outs["transformers JambaForCausalLM"], outs["MoM (from_hf_jamba)"])
    print(f"\n### (a) Jamba hidden 256, 4 layers, 4 experts top-2, vocab 4096: batch 1, prompt 16, {n} new tokens, greedy\n")
    print(table(["model", "prefill tok/s", "decode tok/s", "ms/token", "peak extra RSS", "weights read/token",
                 "bandwidth floor tok/s", "of floor"], rows))
    ratio = dec["MoM (from_hf_jamba)"] / dec["transformers JambaForCausalLM"]
    print(f"\nMoM decode = {ratio:.2f}x transformers' Jamba; greedy tokens identical: {same}")
    assert same, "MoM and transformers Jamba greedy outputs differ"


# ----------------------------------------------------------------------------------------------- (b)
def big_config(**kw) -> MoMConfig:
    from mom.model import PRECISION_PRESETS

    base = dict(vocab_size=4096, hidden_size=768, num_hidden_layers=12, num_attention_heads=12, num_key_value_heads=4,
                intermediate_size=2048, num_experts=1, num_experts_per_tok=1, mamba_d_state=16,
                max_position_embeddings=4096, precision=dict(PRECISION_PRESETS["attn_bf16"]))
    base.update(kw)
    return MoMConfig(**base)


def bench_packed(args, bw: float) -> None:
    from mom.model.packed import pack_model

    torch.manual_seed(0)
    model = MoMForCausalLM(big_config()).eval()
    n_params = model.num_parameters()
    prompt = torch.randint(3, 4096, (1, 16), generator=torch.Generator().manual_seed(2))
    n = args.big_new_tokens

    @torch.no_grad()
    def gen(p, k, m, streamer=None):
        return m.generate(p, max_new_tokens=k, do_sample=False, use_cache=True, streamer=streamer)

    results, outs = [], {}
    gen(prompt, 2, model)
    wb_unpacked = weight_bytes_per_token(model)
    r = bench_generate(lambda p, k, st: gen(p, k, model, st), prompt, n, args.repeats)
    results.append(("BitLinear (fp32 latent, ternarised per call)", r, wb_unpacked))
    outs["unpacked"] = r[3]
    with torch.no_grad():
        ref_logits = model(outs["unpacked"]).logits
    pack_model(model)
    gen(prompt, 2, model)  # builds the kernel layouts
    wb_packed = weight_bytes_per_token(model)
    r = bench_generate(lambda p, k, st: gen(p, k, model, st), prompt, n, args.repeats)
    results.append(("packed (PackedTernaryLinear, oneDNN u8 x s8)", r, wb_packed))
    outs["packed"] = r[3]
    rows = []
    for name, (pre, decode, mem, _, _), wb in results:
        floor = bw * 2**30 / wb
        rows.append([name, f"{pre:,.0f}", f"{decode:,.2f}", f"{1000 / decode:.1f}", fmt_bytes(mem), fmt_bytes(wb),
                     f"{floor:,.1f}", f"{100 * decode / floor:.1f}%"])
    print(f"\n### (b) MoM {n_params / 1e6:.1f}M params, attn_bf16 (hidden 768, 12 layers, mixtures off: dense FFN 2048), "
          f"batch 1, prompt 16, {n} new tokens, greedy\n")
    print(table(["weights", "prefill tok/s", "decode tok/s", "ms/token", "peak extra RSS", "weights read/token",
                 "bandwidth floor tok/s", "of floor"], rows))
    speed = results[1][1][1] / results[0][1][1]
    same = torch.equal(outs["unpacked"], outs["packed"])
    with torch.no_grad():
        packed_logits = model(outs["unpacked"]).logits
    rel = float((packed_logits - ref_logits).norm() / ref_logits.norm())
    top2 = ref_logits.topk(2, dim=-1).values
    margin = float((top2[..., 0] - top2[..., 1]).min())
    diverge = "" if same else (
        f", first differing position {int((outs['unpacked'] != outs['packed']).nonzero()[0, 1]) - prompt.shape[1]} of the "
        f"new tokens (random-init model: its smallest top-1/top-2 logit margin is {margin:.2e}, so fp32 rounding "
        "can flip a near-tie)")
    print(f"\npacked decode = {speed:.2f}x unpacked; greedy tokens identical: {same}{diverge}; "
          f"teacher-forced logits rel. diff {rel:.1e}")
    if args.profile:
        profile_step(model, prompt)


def profile_step(model, prompt) -> None:
    from torch.profiler import profile

    cache = MoMCache.for_config(model.config)
    with torch.no_grad():
        model(prompt, cache=cache, logits_to_keep=1)
        tok = prompt[:, -1:]
        with profile() as prof:
            for _ in range(8):
                tok = model(tok, cache=cache, logits_to_keep=1).logits[:, -1].argmax(-1, keepdim=True)
    print("\nper-token decode step, 8 steps (torch.profiler):\n")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))


# ----------------------------------------------------------------------------------------------- (c)
def analytic_state(config: MoMConfig, context: int, dtype_bytes: int = 4) -> int:
    """KV (+ validity mask) of the attention layers + conv/SSM state of the Mamba layers, per sequence."""
    total = 0
    for i in range(config.num_hidden_layers):
        if config.is_attention_layer(i):
            total += context * (2 * config.num_key_value_heads * config.head_dim * dtype_bytes + 1)
        else:
            total += config.mamba_d_inner * ((config.mamba_d_conv - 1) * dtype_bytes + config.mamba_d_state * 4)
    return total


def bench_state(args) -> None:
    ctx = args.context
    rows = []
    # the state depends on width, depth, heads and the Mamba shapes only: a shape twin with a tiny FFN and
    # vocabulary prefills 4k tokens fast and holds exactly the state of the (b) model
    for name, kw in (("MoM (b): 6 Mamba + 6 attention layers", {}),
                     ("attention-only, same width/depth (12 attention layers)",
                      {"attn_layer_period": 1, "attn_layer_offset": 0})):
        cfg = big_config(intermediate_size=64, vocab_size=256, **kw)
        model = MoMForCausalLM(cfg).eval()
        cache = MoMCache.for_config(cfg)
        ids = torch.randint(3, 256, (1, ctx), generator=torch.Generator().manual_seed(3))
        t0 = time.perf_counter()
        with torch.no_grad():
            model(ids, cache=cache, logits_to_keep=1)
        measured = cache.nbytes()
        rows.append([name, f"{measured:,}", fmt_bytes(measured), f"{analytic_state(cfg, ctx):,}",
                     f"{time.perf_counter() - t0:.1f} s"])
        del model, cache
    ratio = int(rows[1][1].replace(",", "")) / int(rows[0][1].replace(",", ""))
    print(f"\n### (c) inference state per sequence at {ctx} tokens of context (fp32)\n")
    print(table(["model", "MoMCache.nbytes (measured)", "", "analytic", "prefill time"], rows))
    print(f"\nattention-only / MoM state: {ratio:.2f}x")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", default="a,b,c")
    ap.add_argument("--new-tokens", type=int, default=96)
    ap.add_argument("--big-new-tokens", type=int, default=32)
    ap.add_argument("--context", type=int, default=4096)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2, help="torch threads (the target machine: 2)")
    ap.add_argument("--profile", action="store_true", help="profile the packed model's decode step")
    args = ap.parse_args()
    parts = set(args.only.split(","))
    torch.set_num_threads(args.threads)
    bw = copy_bandwidth()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads on {os.cpu_count()} CPUs, load average "
          f"{os.getloadavg()[0]:.2f} at start (other jobs make multi-threaded small ops stall: compare --threads 1); "
          f"copy bandwidth {bw:.1f} GiB/s (read+write); memory: peak RSS increase sampled from /proc/self/statm every 1 ms")
    if "a" in parts:
        bench_jamba(args, bw)
    if "b" in parts:
        bench_packed(args, bw)
    if "c" in parts:
        bench_state(args)
    print(f"\nload average at the end: {os.getloadavg()[0]:.2f}")
    print(f"\nprocess max RSS (getrusage): {fmt_bytes(__import__('resource').getrusage(0).ru_maxrss * 1024)}")


if __name__ == "__main__":
    main()
