"""A tiny run folder built directly (no Lightning training): what mom.eval, mom.generate and mom.export read.

``model/`` (save_pretrained + tokenizer.json) and ``.hydra/config.yaml`` (a local-text data node).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import yaml

from mom.data.tokenizer import save_tokenizer, train_bpe
from mom.model import MoMConfig, MoMForCausalLM

# subprocesses of the entry points: one thread is faster on tiny models (and does not stall a loaded machine)
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HYDRA_FULL_ERROR": "0"}


_WORDS = ("the king and his queen walked slowly through the garden while a fool sang of summer rain "
          "café naïve Ünïcödé — 日本語 and émigré words ✓ ").split()


def corpus_text(seed: int, n_words: int) -> str:
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, len(_WORDS), (n_words,), generator=g).tolist()
    lines, line = [], []
    for i in idx:
        line.append(_WORDS[i])
        if len(line) == 9:
            lines.append(" ".join(line) + ".")
            line = []
    return "\n".join(lines) + "\n"


def tiny_config(vocab_size: int, **kw) -> MoMConfig:
    base = dict(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=4, num_attention_heads=4,
                num_key_value_heads=2, intermediate_size=64, num_experts=4, num_experts_per_tok=2,
                mamba_d_state=8, max_position_embeddings=64, precision={"attention": "bf16"})
    base.update(kw)
    return MoMConfig(**base)


def make_run(root: Path, *, seed: int = 0, precision: str | dict | None = None, **model_kw) -> Path:
    """A run folder: model/ (config, weights, tokenizer) and .hydra/config.yaml with a local-text data node."""
    from mom.model import PRECISION_PRESETS

    run = root / "run"
    data = root / "text"
    data.mkdir(parents=True, exist_ok=True)
    (data / "train.txt").write_text(corpus_text(1, 1500), encoding="utf-8")
    (data / "val.txt").write_text(corpus_text(2, 400), encoding="utf-8")
    tok = train_bpe([(data / "train.txt").read_text(encoding="utf-8")], 320, min_frequency=2)
    V = tok.get_vocab_size(with_added_tokens=True)
    prec = PRECISION_PRESETS[precision] if isinstance(precision, str) else (precision or PRECISION_PRESETS["attn_bf16"])
    torch.manual_seed(seed)
    model = MoMForCausalLM(tiny_config(V, precision=prec, **model_kw))
    with torch.no_grad():  # a less uniform random model: more varied greedy continuations
        for name, p in model.named_parameters():
            if p.dim() == 2 and "router" in name:
                p.normal_(0, 0.5)
            elif "embed_tokens" in name:
                p.normal_(0, 1.0)
            elif "lm_head" in name:
                p.normal_(0, 0.2)
    model.save_pretrained(run / "model")
    save_tokenizer(tok, run / "model" / "tokenizer.json")
    (run / ".hydra").mkdir(parents=True)
    data_cfg = {"_target_": "mom.data.datamodule.MoMDataModule", "source": {"type": "text", "paths": [str(data / "train.txt")],
                                                                                 "val_paths": [str(data / "val.txt")]},
                "tokenizer": {"vocab_size": 320, "min_frequency": 2, "path": None, "name": None},
                "seq_len": 32, "batch_size": 4, "cache_dir": str(root / "cache"), "seed": 0}
    (run / ".hydra" / "config.yaml").write_text(yaml.safe_dump({"data": data_cfg, "seed": 0}))
    return run
