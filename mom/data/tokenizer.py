"""Tokenizers: train a byte-level BPE on a corpus, or load one; bytes per token for bits per byte.

A trained tokenizer has the special tokens ``<pad>``=0, ``<bos>``=1, ``<eos>``=2 (MoMConfig's
pad/bos/eos defaults), a ByteLevel pre-tokenizer without a prefix space and the ByteLevel decoder, so
``decode(encode(text).ids) == text`` for any text, and no post-processor: ``encode`` adds no BOS/EOS
(the token cache puts EOS between documents itself).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from mom.data.corpus import DataError, take_bytes
from mom.files import atomic_write

PAD, BOS, EOS = "<pad>", "<bos>", "<eos>"
SPECIAL_TOKENS = (PAD, BOS, EOS)
# Bump when train_bpe changes what it produces (invalidates cached tokenizers).
TRAINER_VERSION = 2

# EOS spellings of common Hub tokenizers, tried in order when ours is absent.
_EOS_NAMES = (EOS, "</s>", "<|endoftext|>", "<|end_of_text|>", "<|eot_id|>", "[SEP]")
_BOS_NAMES = (BOS, "<s>", "<|begin_of_text|>", "<|startoftext|>", "[CLS]")
_PAD_NAMES = (PAD, "<|pad|>", "[PAD]", "<unk>")


def train_bpe(
    texts: Iterable[str],
    vocab_size: int,
    *,
    min_frequency: int = 2,
    max_bytes: int | None = None,
) -> Tokenizer:
    """A byte-level BPE of ``vocab_size`` tokens (3 special + 256 bytes + merges) trained on ``texts``.

    ``max_bytes`` trains on the first documents only, up to about that many UTF-8 bytes (the last one
    may be cut short).
    """
    n_min = len(SPECIAL_TOKENS) + 256
    if vocab_size < n_min:
        raise DataError(f"tokenizer vocab_size {vocab_size} is below {n_min} (3 special tokens + 256 bytes)")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(take_bytes(texts, max_bytes), trainer=trainer)
    for i, t in enumerate(SPECIAL_TOKENS):
        assert tok.token_to_id(t) == i, (t, tok.token_to_id(t))
    return tok


def save_tokenizer(tok: Tokenizer, path: str | os.PathLike) -> Path:
    """Write ``tokenizer.json`` atomically (:func:`mom.files.atomic_write`)."""
    return atomic_write(path, lambda f: tok.save(f.name))


def load_tokenizer(path: str | os.PathLike | None = None, name: str | None = None) -> Tokenizer:
    """A tokenizer from a ``tokenizer.json`` file (or a folder holding one), or from a Hub name."""
    if path is not None:
        p = Path(os.path.expanduser(str(path)))
        if p.is_dir():
            p = p / "tokenizer.json"
        if not p.is_file():
            raise DataError(f"tokenizer file not found: {p}")
        try:
            return Tokenizer.from_file(str(p))
        except Exception as e:
            raise DataError(f"cannot read tokenizer {p}: {e}") from None
    if name:
        try:
            return Tokenizer.from_pretrained(name)
        except Exception as e:
            raise DataError(f"cannot load tokenizer {name!r} from the Hub: {e.__class__.__name__}") from e
    raise DataError("a tokenizer needs a path, a Hub name, or a corpus to train on")


def tokenizer_hash(tok: Tokenizer) -> str:
    """sha256 of the tokenizer's JSON: identical for a trained tokenizer and the same one reloaded."""
    return hashlib.sha256(tok.to_str().encode()).hexdigest()


def special_token_ids(tok: Tokenizer) -> dict[str, int | None]:
    """{"pad", "bos", "eos"} ids: ours if present, else common Hub spellings, else None."""

    def find(names):
        for n in names:
            i = tok.token_to_id(n)
            if i is not None:
                return i
        return None

    return {"pad": find(_PAD_NAMES), "bos": find(_BOS_NAMES), "eos": find(_EOS_NAMES)}


def _special_ids(tok: Tokenizer) -> set[int]:
    try:
        return {i for i, t in tok.get_added_tokens_decoder().items() if t.special}
    except AttributeError:  # older tokenizers
        return {i for i in (tok.token_to_id(t) for t in SPECIAL_TOKENS) if i is not None}


def _byte_level_table() -> dict[str, int]:
    """The GPT-2 byte-to-printable-character map, inverted: char -> byte."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    chars = {b: b for b in keep}
    n = 0
    for b in range(256):
        if b not in chars:
            chars[b] = 256 + n
            n += 1
    return {chr(c): b for b, c in chars.items()}


def uses_byte_level(tok: Tokenizer) -> bool:
    dec = json.loads(tok.to_str()).get("decoder") or {}
    if dec.get("type") == "ByteLevel":
        return True
    return any(d.get("type") == "ByteLevel" for d in dec.get("decoders", []) or [])


def token_bytes(tok: Tokenizer) -> torch.Tensor:
    """LongTensor (V,): how many UTF-8 bytes each token stands for; 0 for special tokens.

    Exact for byte-level BPE (each token character is one byte). For other tokenizers (Hub names) an
    estimate: byte-fallback tokens ``<0xNN>`` count 1, ``▁`` counts as a space, the rest by the UTF-8
    length of the token string.
    """
    V = tok.get_vocab_size(with_added_tokens=True)
    out = torch.zeros(V, dtype=torch.long)
    special = _special_ids(tok)
    byte_level = uses_byte_level(tok)
    table = _byte_level_table() if byte_level else None
    for t, i in tok.get_vocab(with_added_tokens=True).items():
        if i in special or i >= V:
            continue
        if byte_level and all(c in table for c in t):
            out[i] = len(t)
        elif len(t) == 6 and t.startswith("<0x") and t.endswith(">"):
            out[i] = 1
        else:
            out[i] = len(t.replace("\u2581", " ").encode("utf-8"))
    return out


def decoded_bytes(tok: Tokenizer, ids: Iterable[int]) -> bytes:
    """The exact bytes a byte-level token sequence decodes to (specials skipped)."""
    table = _byte_level_table()
    special = _special_ids(tok)
    return bytes(table[c] for i in ids if i not in special for c in tok.id_to_token(i))
