"""Model speed, side by side in one process (2 threads, interleaved repeats, medians).

A. forward+backward, batch 8 x 256: MoM converted from transformers' Jamba (hidden 256, 4 layers,
   4 experts top-2, 11M parameters) vs that Jamba itself vs a Llama of the same parameter count.
B. BitLinear vs nn.Linear forward+backward.
C. `tiny` (all mixtures on) vs a dense Jamba-shaped model of the same total parameters.
D. an attention block routed by Mixture of Depths at 12.5% capacity vs the same block dense, sequence 512.
E. `make train`'s training step (experiment=tiny as composed from conf/, AdamW included): the selective scan's
   C++ loops (mom/infer/csrc/scan.cpp) vs its torch ops, and the Mamba mixer's time-major CPU form (the conv in
   C++ on in_proj's rows, the scan reading them as they are, then with its elementwise epilogues fused) vs its
   channel-major form (F.conv1d, transposing copies around the scan).

    .venv/bin/python scripts/bench_model.py [--skip-hf-jamba] [--repeats 5] [--sections abcde]
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import torch

torch.set_num_threads(2)
warnings.filterwarnings("ignore")

from mom.model import MoMConfig, MoMForCausalLM  # noqa: E402
from mom.model.bitlinear import BitLinear  # noqa: E402
from mom.model.model import MoMBlock  # noqa: E402

V = 4096


def nparams(m):
    return sum(p.numel() for p in m.parameters())


def interleaved(fns: dict, repeats: int, warmup: int = 1) -> dict:
    """Median seconds per call of each fn, calling them in turn so machine noise hits all alike."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def train_step(model, x):
    def step():
        model(input_ids=x, labels=x).loss.backward()
        model.zero_grad(set_to_none=True)
    return step


def forward_only(model, x):
    def fwd():
        with torch.no_grad():
            model(input_ids=x)
    return fwd


def table(title, rows, base):
    print(f"\n### {title}\n\n| model | params | time (s) | vs {base} |\n|---|---|---|---|")
    for name, params, t in rows:
        ref = dict((n, tt) for n, _, tt in rows)[base]
        print(f"| {name} | {params / 1e6:.2f}M | {t:.3f} | {t / ref:.2f}x |")


def section_a(repeats: int, skip_hf: bool):
    from transformers import JambaConfig, JambaForCausalLM, LlamaConfig, LlamaForCausalLM

    from mom.convert import from_hf_jamba

    torch.manual_seed(0)
    jc = JambaConfig(vocab_size=V, hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=8,
                     num_key_value_heads=4, attn_layer_period=2, attn_layer_offset=1, expert_layer_period=2,
                     expert_layer_offset=1, num_experts=4, num_experts_per_tok=2, mamba_d_state=16, mamba_d_conv=4,
                     mamba_expand=2, use_mamba_kernels=False, max_position_embeddings=1024, tie_word_embeddings=False)
    jamba = JambaForCausalLM(jc).train()
    mom = from_hf_jamba(jamba).train()
    target = nparams(jamba)
    inter = min(range(256, 8192, 64), key=lambda i: abs(2 * V * 256 + 4 * (2 * 256 * 256 + 2 * 256 * 128 + 3 * 256 * i
                                                                             + 512) + 256 - target))
    llama = LlamaForCausalLM(LlamaConfig(vocab_size=V, hidden_size=256, intermediate_size=inter, num_hidden_layers=4,
                                         num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=1024,
                                         tie_word_embeddings=False)).train()
    x = torch.randint(0, V, (8, 256))
    t = interleaved({"MoM (from_hf_jamba)": train_step(mom, x), "Llama (same params)": train_step(llama, x)}, repeats)
    rows = [("MoM (from_hf_jamba)", nparams(mom), t["MoM (from_hf_jamba)"]),
            ("Llama (same params)", nparams(llama), t["Llama (same params)"])]
    if not skip_hf:  # ~40 s a step: one warm-up, one timed step
        rows.append(("transformers Jamba", nparams(jamba), interleaved({"j": train_step(jamba, x)}, 1)["j"]))
    table("A. forward+backward, batch 8 x 256 (fp32)", rows, "Llama (same params)")


def section_b(repeats: int):
    print("\n### B. BitLinear vs nn.Linear, forward+backward, 2048 tokens\n")
    print("| shape | nn.Linear (ms) | BitLinear (ms) | ratio |\n|---|---|---|---|")
    for fin, fout in ((256, 1024), (1024, 1024), (1024, 4096)):
        x = torch.randn(2048, fin, requires_grad=True)
        lin, bit = torch.nn.Linear(fin, fout, bias=False), BitLinear(fin, fout, bias=False)

        def fb(layer, x=x):
            def run():
                layer(x).sum().backward()
            return run
        t = interleaved({"lin": fb(lin), "bit": fb(bit)}, repeats * 2)
        print(f"| {fin}->{fout} | {t['lin'] * 1e3:.2f} | {t['bit'] * 1e3:.2f} | {t['bit'] / t['lin']:.2f}x |")


def tiny_configs():
    from pathlib import Path

    import yaml

    conf = Path(__file__).resolve().parents[1] / "conf" / "model"
    tiny = yaml.safe_load((conf / "tiny.yaml").read_text())
    mixed = MoMConfig(**tiny)
    dense_kw = {**tiny, "mod_enabled": False, "moa_enabled": False, "mhmoe_enabled": False}
    total = nparams(MoMForCausalLM(mixed))
    best = min(range(64, 8192, 32), key=lambda i: abs(nparams(MoMForCausalLM(MoMConfig(**{**dense_kw,
                                                                                           "intermediate_size": i}))) - total)
               if i % 256 == 0 else 10**12)
    return mixed, MoMConfig(**{**dense_kw, "intermediate_size": best})


def section_c(repeats: int):
    mixed_cfg, dense_cfg = tiny_configs()
    torch.manual_seed(0)
    mixed, dense = MoMForCausalLM(mixed_cfg).train(), MoMForCausalLM(dense_cfg).train()
    x = torch.randint(0, V, (8, 256))
    t = interleaved({"mixed": train_step(mixed, x), "dense": train_step(dense, x)}, repeats)
    rows = [("tiny, all mixtures (train: fwd+bwd)", nparams(mixed), t["mixed"]),
            ("dense Jamba-shaped, same total (train: fwd+bwd)", nparams(dense), t["dense"])]
    table("C1. tiny vs dense of the same total parameters, forward+backward, batch 8 x 256", rows,
          "dense Jamba-shaped, same total (train: fwd+bwd)")
    mixed.eval(), dense.eval()
    t = interleaved({"mixed": forward_only(mixed, x), "dense": forward_only(dense, x)}, repeats)
    rows = [("tiny, all mixtures (eval forward)", nparams(mixed), t["mixed"]),
            ("dense Jamba-shaped, same total (eval forward)", nparams(dense), t["dense"])]
    table("C2. same, forward only (eval mode: causal MoD decisions)", rows, "dense Jamba-shaped, same total (eval forward)")


def section_d(repeats: int):
    base = dict(vocab_size=V, hidden_size=512, num_hidden_layers=1, num_attention_heads=8, num_key_value_heads=4,
                attn_layer_period=1, attn_layer_offset=0, intermediate_size=2048, num_experts=1, num_experts_per_tok=1)
    torch.manual_seed(0)
    routed = MoMBlock(MoMConfig(**base, mod_enabled=True, mod_capacity=0.125, mod_layer_period=1, mod_layer_offset=0),
                      0).train()
    dense = MoMBlock(MoMConfig(**base), 0).train()
    x = torch.randn(8, 512, 512, requires_grad=True)

    def fb(block):
        def run():
            y, _, _ = block(x)
            y.sum().backward()
        return run
    t = interleaved({"routed": fb(routed), "dense": fb(dense)}, repeats)
    print("\n### D. attention block (hidden 512, MLP 2048), batch 8 x 512, forward+backward\n")
    print("| block | time (s) | vs dense |\n|---|---|---|")
    print(f"| dense | {t['dense']:.3f} | 1.00x |")
    print(f"| MoD, capacity 12.5% | {t['routed']:.3f} | {t['routed'] / t['dense']:.2f}x |")


def section_e(repeats: int):
    from mom.config import compose, to_plain
    from mom.lit import MoMLitModule
    from mom.model import kernels, mamba, scan

    if kernels.cpu_ops() is None:
        print("\n### E. skipped: the C++ kernels are not built here")
        return
    cfg = compose("train", ["experiment=tiny"])
    lit = MoMLitModule(model=to_plain(cfg.model), precision=to_plain(cfg.precision),
                       optimizer=to_plain(cfg.optimizer), scheduler=to_plain(cfg.scheduler))
    model, B, T = lit.model, cfg.data.batch_size, cfg.data.seq_len
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = torch.randint(0, cfg.model.vocab_size, (B, T), generator=torch.Generator().manual_seed(0))
    cpp, conv, fused = scan._cpu_scan_ops, mamba._cpu_conv, scan._channels_last
    off = lambda *a: None  # noqa: E731

    def step(use_cpp, time_major, fuse):
        def run():
            scan._cpu_scan_ops = cpp if use_cpp else off
            mamba._cpu_conv = conv if time_major else off
            scan._channels_last = fused if fuse else (lambda *a: False)
            try:
                model(input_ids=x, labels=x).loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
            finally:
                scan._cpu_scan_ops, mamba._cpu_conv, scan._channels_last = cpp, conv, fused
        return run

    arms = {"torch": step(False, False, False), "cpp": step(True, False, False),
            "time_major": step(True, True, False), "fused": step(True, True, True)}
    t = interleaved(arms, max(repeats, 8), warmup=2)
    print(f"\n### E. experiment=tiny training step ({B} x {T} tokens, vocabulary {cfg.model.vocab_size}, AdamW)\n")
    print("| Mamba mixer on the CPU | step (s) | tokens/s | vs torch ops | vs channel-major C++ |\n|---|---|---|---|---|")
    for name, key in (("scan in torch ops, channel-major (F.conv1d, transposing copies)", "torch"),
                      ("scan in C++ loops, channel-major", "cpp"),
                      ("time-major: C++ conv, the scan reading in_proj's rows as they are", "time_major"),
                      ("time-major, softplus / D / z gate in the scan's own passes (the default)", "fused")):
        print(f"| {name} | {t[key]:.3f} | {B * T / t[key]:,.0f} | {t['torch'] / t[key]:.2f}x | "
              f"{t['cpp'] / t[key]:.2f}x |")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--skip-hf-jamba", action="store_true", help="skip transformers' Jamba (~90 s)")
    ap.add_argument("--sections", default="abcde")
    args = ap.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    if "a" in args.sections:
        section_a(args.repeats, args.skip_hf_jamba)
    if "b" in args.sections:
        section_b(args.repeats)
    if "c" in args.sections:
        section_c(args.repeats)
    if "d" in args.sections:
        section_d(args.repeats)
    if "e" in args.sections:
        section_e(args.repeats)


if __name__ == "__main__":
    main()
