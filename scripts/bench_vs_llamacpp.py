"""MoM's inference engine vs llama.cpp on the same Jamba weights (CPU, batch 1, greedy), one table.

    .venv/bin/python scripts/bench_vs_llamacpp.py [--sizes small,big] [--threads 2] [--new-tokens 64]
                                                  [--no-compile] [--rows LABELS] [--cache DIR]

1. Builds llama.cpp once into ``--cache`` (default ``~/.cache/mom/llamacpp``) from the PyPI sdist of
   llama-cpp-python 0.3.36 (``pip download --no-binary``), which vendors llama.cpp with the Jamba architecture
   and the TQ1_0/TQ2_0 ternary types: cmake + ninja, only ``llama-bench``, ``llama-quantize`` and
   ``llama-batched-bench`` (about 12 minutes on 2 idle cores; later runs reuse it).
2. Writes a transformers ``JambaForCausalLM`` with random weights in the per-expert layout that llama.cpp's
   converter expects (transformers 5 fuses the experts into ``gate_up_proj``), with a byte-fallback BPE
   tokenizer.json, converts it with the vendored ``convert_hf_to_gguf.py`` (and its ``gguf-py``) to F32 GGUF
   and quantises it to TQ2_0 with ``llama-quantize``.
3. Runs ``llama-bench -t THREADS -p PROMPT -n NEW`` on both files, and MoM on the same weights
   (``mom.convert.from_hf_jamba``): fp32, and the ``ternary`` preset packed to 2 bits (``pack_model``), each
   through the native step (the whole network in one C++ call), the per-layer Python step and the latter
   under ``compile=True`` (``--no-compile`` skips it), prefill and decode tokens/s from ``mom.infer.generate``
   (a greedy generation: the decode loop with its sampling); and the rows "as llama-bench", measured the way
   llama-bench measures (``test_prompt``/``test_gen``: forward calls from an empty cache, random tokens, no
   sampling), the like-for-like ratio.

Each row's "of floor" = its decode tokens/s over the bandwidth floor: read bandwidth (a 256 MiB fp32 sum,
measured in this process) / bytes of weights a decoded token reads (active experts only; 2 bits a ternary
weight; llama.cpp's TQ2_0 rows use the GGUF file's bytes per weight). Not part of ``make test``.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import statistics
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

LLAMA_CPP_PYTHON = "0.3.36"
TARGETS = ["llama-bench", "llama-quantize", "llama-batched-bench"]
SIZES = {  # name -> transformers JambaConfig overrides (vocab 4096, 4 experts top-2 every other layer)
    "small": dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=8,
                  num_key_value_heads=4),
    "big": dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12,
                num_key_value_heads=4),
}


def sh(cmd, **kw):
    print("+", " ".join(str(c) for c in cmd), file=sys.stderr, flush=True)
    return subprocess.run([str(c) for c in cmd], check=True, **kw)


# ----------------------------------------------------------------------------------------------- llama.cpp
def build_llamacpp(cache: Path) -> tuple[Path, Path]:
    """(bin dir, vendored llama.cpp source dir); builds once."""
    src = cache / f"llama_cpp_python-{LLAMA_CPP_PYTHON}" / "vendor" / "llama.cpp"
    build = cache / "build"
    bins = build / "bin"
    if all((bins / t).exists() for t in TARGETS):
        return bins, src
    cache.mkdir(parents=True, exist_ok=True)
    sdist = cache / f"llama_cpp_python-{LLAMA_CPP_PYTHON}.tar.gz"
    if not sdist.exists():
        sh([sys.executable, "-m", "pip", "download", f"llama-cpp-python=={LLAMA_CPP_PYTHON}", "--no-deps",
            "--no-binary", ":all:", "-d", cache])
    if not src.exists():
        with tarfile.open(sdist) as tar:
            tar.extractall(cache, filter="data")
    for tool in ("cmake", "ninja", "c++"):
        if shutil.which(tool) is None:
            sys.exit(f"bench_vs_llamacpp: {tool} not found (needed to build llama.cpp)")
    sh(["cmake", "-S", src, "-B", build, "-G", "Ninja", "-DCMAKE_BUILD_TYPE=Release", "-DGGML_NATIVE=ON",
        "-DLLAMA_CURL=OFF", "-DLLAMA_OPENSSL=OFF", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF",
        "-DLLAMA_BUILD_SERVER=OFF", "-DLLAMA_BUILD_TOOLS=ON", "-DBUILD_SHARED_LIBS=OFF", "-DGGML_OPENMP=ON"])
    sh(["nice", "-n", "10", "cmake", "--build", build, "-j", str(os.cpu_count() or 2), "--target", *TARGETS])
    return bins, src


# ----------------------------------------------------------------------------------------------- weights
def write_tokenizer(path: Path, vocab_size: int) -> None:
    """A Llama-style BPE tokenizer.json with byte fallback (what the converter's Jamba vocab reader takes):
    specials, the 256 byte tokens, then filler pieces up to ``vocab_size``."""
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for b in range(256):
        vocab[f"<0x{b:02X}>"] = len(vocab)
    i = 0
    while len(vocab) < vocab_size:
        vocab[f"\u2581t{i}"] = len(vocab)
        i += 1
    tok = {
        "version": "1.0", "truncation": None, "padding": None,
        "added_tokens": [{"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
                          "normalized": False, "special": True} for t, i in list(vocab.items())[:3]],
        "normalizer": {"type": "Sequence", "normalizers": [{"type": "Prepend", "prepend": "\u2581"},
                                                          {"type": "Replace", "pattern": {"String": " "},
                                                           "content": "\u2581"}]},
        "pre_tokenizer": None, "post_processor": None,
        "decoder": {"type": "Sequence", "decoders": [
            {"type": "Replace", "pattern": {"String": "\u2581"}, "content": " "}, {"type": "ByteFallback"},
            {"type": "Fuse"}, {"type": "Strip", "content": " ", "start": 1, "stop": 0}]},
        "model": {"type": "BPE", "dropout": None, "unk_token": "<unk>", "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": True, "byte_fallback": True, "ignore_merges": False,
                  "vocab": vocab, "merges": []},
    }
    (path / "tokenizer.json").write_text(json.dumps(tok))
    (path / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
        "add_bos_token": True, "add_eos_token": False}))


def make_jamba(size: str, out: Path):
    """A random transformers Jamba saved for llama.cpp's converter; returns the transformers model."""
    from safetensors.torch import save_file
    from transformers import JambaConfig, JambaForCausalLM

    from mom.convert import config_from_hf_jamba, convert_hf_jamba_state_dict

    torch.manual_seed(0)
    cfg = JambaConfig(vocab_size=4096, attn_layer_period=2, attn_layer_offset=1, expert_layer_period=2,
                      expert_layer_offset=1, num_experts=4, num_experts_per_tok=2, mamba_d_state=16, mamba_d_conv=4,
                      mamba_expand=2, use_mamba_kernels=False, max_position_embeddings=4096,
                      tie_word_embeddings=False, pad_token_id=0, bos_token_id=1, eos_token_id=2, **SIZES[size])
    hf = JambaForCausalLM(cfg).eval()
    if not (out / "model.safetensors").exists():
        out.mkdir(parents=True, exist_ok=True)
        # per-expert names (experts.E.{gate,up,down}_proj.weight): the layout the converter merges itself
        state = convert_hf_jamba_state_dict(hf.state_dict(), config_from_hf_jamba(cfg))
        save_file({k: v.contiguous() for k, v in state.items()}, str(out / "model.safetensors"),
                  metadata={"format": "pt"})
        d = cfg.to_dict()
        d["architectures"] = ["JambaForCausalLM"]
        (out / "config.json").write_text(json.dumps(d, indent=1))
        write_tokenizer(out, cfg.vocab_size)
    return hf


def to_gguf(hf_dir: Path, src: Path, bins: Path) -> tuple[Path, Path]:
    f32, tq2 = hf_dir / "model-f32.gguf", hf_dir / "model-tq2_0.gguf"
    if not f32.exists():
        env = {**os.environ, "PYTHONPATH": str(src / "gguf-py"), "NO_LOCAL_GGUF": ""}
        sh([sys.executable, src / "convert_hf_to_gguf.py", hf_dir, "--outtype", "f32", "--outfile", f32], env=env)
    if not tq2.exists():
        sh([bins / "llama-quantize", f32, tq2, "TQ2_0", "2"], stdout=subprocess.DEVNULL)
    return f32, tq2


def llama_bench(bins: Path, gguf: Path, threads: int, prompt: int, new: int, reps: int) -> tuple[float, float]:
    """(prefill tok/s, decode tok/s) from llama-bench's JSON."""
    res = subprocess.run([str(bins / "llama-bench"), "-m", str(gguf), "-t", str(threads), "-p", str(prompt),
                          "-n", str(new), "-r", str(reps), "-o", "json"], check=True, capture_output=True, text=True)
    rows = json.loads(res.stdout)
    pp = next(r["avg_ts"] for r in rows if r["n_prompt"] > 0 and r["n_gen"] == 0)
    tg = next(r["avg_ts"] for r in rows if r["n_gen"] > 0 and r["n_prompt"] == 0)
    return pp, tg


def llama_batched(bins: Path, gguf: Path, threads: int, prompt: int, new: int, batch: int) -> float:
    """Decode tokens/s of ``batch`` sequences together (llama-batched-bench, separate prompts)."""
    ctx = max(2048, batch * (prompt + new) + 64)  # smaller contexts print no result row
    res = subprocess.run([str(bins / "llama-batched-bench"), "-m", str(gguf), "-t", str(threads), "-tb", str(threads),
                          "-c", str(ctx), "-npp", str(prompt), "-ntg", str(new), "-npl", str(batch),
                          "--output-format", "jsonl"], check=True, capture_output=True, text=True)
    row = json.loads([ln for ln in res.stdout.splitlines() if ln.startswith("{")][-1])
    return row["speed_tg"]


# ----------------------------------------------------------------------------------------------- MoM
def read_bandwidth() -> float:
    """Bytes/s of a plain read (sum of a 256 MiB fp32 tensor), best of 5."""
    x = torch.ones(64 << 20)
    x.sum()
    best = min(_timed(lambda: x.sum()) for _ in range(5))
    return x.numel() * 4 / best


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def active_weight_bytes(model) -> int:
    """Bytes of weights one decoded token reads: every linear layer but the unchosen experts' (top-k of E),
    2 bits a packed ternary weight, plus one embedding row."""
    from torch import nn

    from mom.model.packed import PackedTernaryLinear

    cfg = model.config
    total = 0
    for name, m in model.named_modules():
        if isinstance(m, PackedTernaryLinear):
            b = m.packed_weight.numel()
        elif isinstance(m, nn.Linear):
            b = m.weight.numel() * (4 if m.weight.dtype == torch.float32 else 2)
        else:
            continue
        if ".experts." in name:
            b = b * cfg.num_experts_per_tok / cfg.num_experts
        total += b
    return int(total + cfg.hidden_size * 4)


# MoM's engine rows: the whole step in one native call, the per-layer Python step, the latter compiled
VARIANTS = {"native step": dict(native=None), "per-layer step": dict(native=False),
            "per-layer step, compiled": dict(native=False, compile=True)}


def mom_bench(model, prompt: torch.Tensor, new: int, variant: dict) -> tuple[float, float, float]:
    """(prefill tok/s, decode tok/s, compile seconds) of one generate call on the engine (B = prompt rows:
    decode tok/s counts every sequence's tokens)."""
    from mom.infer import generate

    st: dict = {}
    generate(model, prompt[:, :4], 2, stats=st, **variant)  # warm-up (and compilation, timed apart)
    if variant.get("native") is None and not st["native"]:
        raise SystemExit("the native step is not in use (C++ kernels unavailable?)")
    comp = st["compile_s"]
    generate(model, prompt, new, stats=st, **variant)
    B, T = prompt.shape
    return B * T / st["prefill_s"], B * (st["new_tokens"] - 1) / st["decode_s"], comp


def step_bench(model, prompt: torch.Tensor, new: int, variant: dict) -> tuple[float, float]:
    """(prefill tok/s, decode tok/s) measured as llama-bench measures: prompt processing into an empty cache,
    and ``new`` single-token decode calls from an empty cache with random tokens and no sampling, in one native
    loop (``NativeStep.decode_tokens``; llama-bench's ``test_gen`` is a C++ loop of ``llama_decode`` calls fed
    ``rand() % n_vocab``), after one warm-up pass of each. Random tokens route like llama-bench's; greedy
    decoding of a random model repeats tokens, so it reuses the same experts' weights more often."""
    from mom.infer.engine import Engine

    eng = Engine(model, native=variant.get("native"), high_precision=variant.get("high_precision", "fp32"))
    if eng.native is None:
        raise SystemExit(f"the native step is not in use: {eng.native_why}")
    cache = eng.get_cache(1, max(prompt.shape[1], new) + 1)
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(3, model.config.vocab_size, (new, 1), generator=gen)
    times = []
    for _ in range(2):  # warm-up, then the timed pass
        t0 = time.perf_counter()
        eng.prefill(prompt, None, cache)
        t1 = time.perf_counter()
        cache.reset()
        eng.native.decode_tokens(tokens, cache)
        times = [t1 - t0, time.perf_counter() - t1]
    return prompt.shape[1] / times[0], new / times[1]


def ref_bench(model, prompt: torch.Tensor, new: int) -> tuple[float, float]:
    """(prefill tok/s, decode tok/s) of the reference cached decoding (mom.model.generation), per-token times
    from its streamer."""
    from mom.model.generation import generate as reference_generate

    reference_generate(model, prompt, 4)
    stamps = []
    t0 = time.perf_counter()
    reference_generate(model, prompt, new, streamer=lambda _t, s=stamps: s.append(time.perf_counter()))
    return prompt.shape[1] / (stamps[0] - t0), (len(stamps) - 1) / (stamps[-1] - stamps[0])


def table(header, rows) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" if i == 0 else "---:" for i in range(len(header))) + "|"]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="small,big")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--reps", type=int, default=3, help="rounds; each round runs every engine once (medians)")
    ap.add_argument("--batch", default="", help="also decode B sequences together, e.g. 8,32 (llama-batched-bench)")
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile rows")
    ap.add_argument("--skip-llamacpp", action="store_true",
                    help="MoM only: the engine against the reference cached decoding (mom.model.generation)")
    ap.add_argument("--rows", default="", help="only the MoM rows whose label contains one of these (separated by ;), "
                    "e.g. 'fp32, native step as llama-bench'; their baselines always run")
    ap.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "mom" / "llamacpp")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from mom.convert import from_hf_jamba
    from mom.model import PRECISION_PRESETS
    from mom.model.model import apply_precision
    from mom.model.packed import pack_model

    bins, src = (None, None) if args.skip_llamacpp else build_llamacpp(args.cache)
    bw = read_bandwidth()
    rows, batched_rows = [], []
    gen = torch.Generator().manual_seed(1)
    prompt = torch.randint(3, 4096, (1, args.prompt), generator=gen)
    variants = [v for v in VARIANTS if not (args.no_compile and "compiled" in v)]
    for size in args.sizes.split(","):
        hf_dir = args.cache / "models" / f"jamba-{size}"
        hf = make_jamba(size, hf_dir)
        model = from_hf_jamba(hf).eval()
        del hf
        n_params = model.num_parameters() / 1e6
        name = f"{size} ({n_params:.1f}M)"
        packed = pack_model(apply_precision(copy.deepcopy(model), PRECISION_PRESETS["ternary"]))
        fp32_bytes, packed_bytes = active_weight_bytes(model), active_weight_bytes(packed)
        head = model.lm_head.weight.numel()
        bf16_bytes = packed_bytes - head * 2  # the packed model with its fp32 head read as bf16
        int8_bytes = packed_bytes - head * 3 + 4 * model.lm_head.out_features  # ... as int8 rows and their scales

        # every engine of this size: label -> (run once -> (prefill, decode), bytes/token, baseline label)
        engines: dict = {}
        if args.skip_llamacpp:
            engines["MoM reference (mom.model.generation)"] = (lambda m=model: ref_bench(m, prompt, args.new_tokens),
                                                               fp32_bytes, None)
            engines["MoM ternary packed, reference"] = (lambda m=packed: ref_bench(m, prompt, args.new_tokens),
                                                        packed_bytes, None)
            base32, base2 = "MoM reference (mom.model.generation)", "MoM ternary packed, reference"
        else:
            f32, tq2 = to_gguf(hf_dir, src, bins)
            tq2_bytes = fp32_bytes * tq2.stat().st_size / f32.stat().st_size
            engines["llama.cpp F32"] = (lambda f=f32: llama_bench(bins, f, args.threads, args.prompt, args.new_tokens, 1),
                                        fp32_bytes, None)
            engines["llama.cpp TQ2_0"] = (lambda f=tq2: llama_bench(bins, f, args.threads, args.prompt, args.new_tokens,
                                                                     1), tq2_bytes, None)
            base32, base2 = "llama.cpp F32", "llama.cpp TQ2_0"
        for v in variants:
            engines[f"MoM fp32, {v}"] = (lambda v=v, m=model: mom_bench(m, prompt, args.new_tokens, VARIANTS[v])[:2],
                                         fp32_bytes, base32)
        for v in variants:
            engines[f"MoM ternary packed, {v}"] = (
                lambda v=v, m=packed: mom_bench(m, prompt, args.new_tokens, VARIANTS[v])[:2], packed_bytes, base2)
        for hp, nbytes in (("bf16", bf16_bytes), ("int8", int8_bytes)):
            engines[f"MoM ternary packed, native step, {hp} head"] = (
                lambda m=packed, hp=hp: mom_bench(m, prompt, args.new_tokens, dict(high_precision=hp))[:2], nbytes,
                base2)
        if not args.skip_llamacpp:  # the same measurement as llama-bench's: forward calls only, no sampling loop
            engines["MoM fp32, native step as llama-bench"] = (
                lambda m=model: step_bench(m, prompt, args.new_tokens, {}), fp32_bytes, base32)
            engines["MoM ternary packed, native step as llama-bench"] = (
                lambda m=packed: step_bench(m, prompt, args.new_tokens, {}), packed_bytes, base2)
            for hp, nbytes in (("bf16", bf16_bytes), ("int8", int8_bytes)):
                engines[f"MoM ternary packed, native step as llama-bench, {hp} head"] = (
                    lambda m=packed, hp=hp: step_bench(m, prompt, args.new_tokens, dict(high_precision=hp)), nbytes,
                    base2)

        if args.rows:  # only the rows asked for, and the baselines they are compared with
            keep = {k for k, v in engines.items() if v[2] and any(s.strip() in k for s in args.rows.split(";"))}
            if not keep:
                raise SystemExit(f"--rows {args.rows!r} matches no MoM row; the rows: "
                                 + "; ".join(k for k, v in engines.items() if v[2]))
            keep |= {engines[k][2] for k in keep}
            engines = {k: v for k, v in engines.items() if k in keep}
        results: dict = {k: [] for k in engines}
        for _ in range(args.reps):  # rounds: a slow spell of this shared machine hits every engine alike
            for label, (fn, _b, _base) in engines.items():
                results[label].append(fn())
        med = {k: (statistics.median(p for p, _ in r), statistics.median(d for _, d in r)) for k, r in results.items()}
        for label, (_fn, nbytes, base) in engines.items():
            pre, dec = med[label]
            floor = bw / nbytes
            ratio = ""
            if base:  # each round's own ratio (the two engines seconds apart), their median and range
                per_round = sorted(d / b for (_, d), (_, b) in zip(results[label], results[base]))
                ratio = (f"{statistics.median(per_round):.2f}x {base} "
                         f"({per_round[0]:.2f}-{per_round[-1]:.2f})")
            rows.append([name, label, f"{pre:,.0f}", f"{dec:,.1f}", f"{nbytes / 2**20:,.1f}", f"{floor:,.0f}",
                         f"{100 * dec / floor:.0f}%", ratio])

        for B in [int(b) for b in args.batch.split(",") if b]:  # several sequences decoded together
            prompts = torch.randint(3, 4096, (B, args.prompt), generator=gen)
            pairs = [("F32", model, dict()), ("TQ2_0", packed, dict())]
            for kind, m, variant in pairs:
                mine, theirs = [], []
                for _ in range(args.reps):
                    mine.append(mom_bench(m, prompts, args.new_tokens, variant)[1])
                    if not args.skip_llamacpp:
                        f = to_gguf(hf_dir, src, bins)[0 if kind == "F32" else 1]
                        theirs.append(llama_batched(bins, f, args.threads, args.prompt, args.new_tokens, B))
                mom_tps = statistics.median(mine)
                ll = statistics.median(theirs) if theirs else float("nan")
                batched_rows.append([name, B, "fp32" if kind == "F32" else "ternary packed", f"{mom_tps:,.1f}",
                                     f"{ll:,.1f}", f"{mom_tps / ll:.2f}x"])
    print(f"\n### MoM vs llama.cpp, batch 1, {args.threads} threads, prompt {args.prompt}, {args.new_tokens} new tokens, "
          f"median of {args.reps} interleaved rounds (read bandwidth {bw / 1e9:.1f} GB/s); MoM / baseline: the median "
          f"of the rounds' own ratios (their range)\n")
    print(table(["model", "engine", "prefill tok/s", "decode tok/s", "weights read/token (MiB)", "floor tok/s",
                 "of floor", "MoM / baseline"], rows))
    if batched_rows:
        print(f"\n### Batched decoding: B sequences of {args.prompt} prompt tokens, {args.new_tokens} new tokens each, "
              f"decode tokens/s of all sequences (llama.cpp: llama-batched-bench)\n")
        print(table(["model", "B", "MoM weights", "MoM tok/s", "llama.cpp tok/s", "MoM / llama.cpp"], batched_rows))


if __name__ == "__main__":
    main()
