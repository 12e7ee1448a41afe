"""Generate text: ``python -m mom.generate run_dir=DIR prompt="This is the story of" [max_new_tokens=..]``.

stdout gets exactly the prompt and its continuation, followed by a newline, written while the model decodes
(generate's ``streamer`` callback; the new tokens' bytes go through an incremental UTF-8 decoder, so a
character split over several byte-level BPE tokens is printed once it is complete). Nothing else goes to
stdout: logs and errors go to stderr, Hydra writes no run folder.

The prompt is taken exactly as typed (``prompt=What's in a name, Romeo?``; ``\\n`` is a newline), or read with
``prompt=-`` (stdin) or ``prompt_file=PATH``: the command line's prompt arguments never go through Hydra's
override grammar (:mod:`mom.prompts`). Several prompts (``prompt=a prompt=b``, a ``.jsonl`` prompt file, or
``prompts=[a,b]`` in Hydra's list syntax) are decoded as left-padded batches of ``batch_size``
with an attention mask; each greedy continuation equals the prompt decoded alone. A batch of one streams; a
batch of several is written when it is done, its texts one after the other (each followed by a newline), so
stdout then holds ``text_1\\n text_2\\n ...`` in prompt order.

Refused with one line on stderr and a non-zero exit code (no traceback): an empty prompt, a prompt longer
than the model's trained context (``max_position_embeddings``: attention has no positions, but the model has
never seen longer contexts, so it is an error rather than a silent degradation), a missing run/model folder.
``do_sample=true`` draws from a ``torch.Generator`` seeded with ``seed``: same seed, same text.
Decoding runs on ``mom.infer``'s engine (static cache; with the C++ kernels the whole step is one native
call); ``high_precision=bf16`` / ``int8`` reads the plain linear layers' weights in bf16 / int8 with a scale
a row (half / a quarter of the bytes);
``compile=true`` puts the per-layer step under ``torch.compile`` where the native one is not in use, and
logs the compile time apart from the decode speed (stderr).
:func:`generate_text` is the whole job as a plain function (tests call it in-process).
"""

from __future__ import annotations

import codecs
import logging
import sys
from typing import Any, TextIO

import hydra
import torch
from omegaconf import DictConfig

from mom.cli import one_line_errors
from mom.config import CONF_DIR, GenerateConfig, plain_options, register_configs
from mom.infer.engine import HIGH_PRECISION
from mom.model.generation import GenerationError
from mom.run_folder import load_model_and_tokenizer, resolve_model_dir, setup_stderr_logging

log = logging.getLogger("mom.generate")
register_configs()

class TextStream:
    """Turns one sequence's new token ids into text as they arrive (exact bytes for byte-level BPE)."""

    def __init__(self, tok):
        from mom.data.tokenizer import uses_byte_level

        self.tok = tok
        self.byte_level = uses_byte_level(tok)
        self.utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.ids: list[int] = []
        self.emitted = ""  # non-byte-level fallback: the text written so far

    def push(self, ids: list[int]) -> str:
        """New text completed by these ids."""
        from mom.data.tokenizer import decoded_bytes

        self.ids.extend(ids)
        if self.byte_level:
            return self.utf8.decode(decoded_bytes(self.tok, ids))
        text = self.tok.decode(self.ids)
        if text.endswith("\ufffd"):  # an incomplete character: wait for the next token
            return ""
        new = text[len(self.emitted):] if text.startswith(self.emitted) else ""
        self.emitted = text if new else self.emitted
        return new

    def finish(self) -> str:
        if self.byte_level:
            return self.utf8.decode(b"", final=True)
        text = self.tok.decode(self.ids)
        return text[len(self.emitted):] if text.startswith(self.emitted) else ""


def prompt_list(cfg: dict[str, Any]) -> list[str]:
    prompts = cfg.get("prompts")
    if prompts is None:
        prompts = cfg.get("prompt")
    if prompts is None:
        prompts = ""
    if isinstance(prompts, str):
        prompts = [prompts]
    prompts = [str(p) for p in prompts]
    if not prompts:
        raise GenerationError("no prompt given: prompt=\"...\" or prompts=[...]")
    return prompts


def encode_prompts(tok, prompts: list[str], max_len: int) -> list[list[int]]:
    encoded = []
    for i, p in enumerate(prompts):
        ids = tok.encode(p).ids
        where = f"prompt {i + 1}" if len(prompts) > 1 else "prompt"
        if not ids:
            raise GenerationError(f"empty {where}: give at least one character of text")
        if len(ids) > max_len:
            raise GenerationError(f"{where} has {len(ids)} tokens, more than the model's trained context "
                                  f"(max_position_embeddings={max_len})")
        encoded.append(ids)
    return encoded


def left_pad(batch: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask), both (B, max_len), padding on the left."""
    n = max(len(x) for x in batch)
    ids = torch.full((len(batch), n), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), n), dtype=torch.long)
    for i, x in enumerate(batch):
        ids[i, n - len(x):] = torch.tensor(x, dtype=torch.long)
        mask[i, n - len(x):] = 1
    return ids, mask


def _streamer(streams: list[TextStream], done: list[bool], pieces: list[list[str]], live: TextIO | None,
              eos_id: int | None):
    """generate's callback: each step's new ids (B,) -> text pieces per sequence (written to ``live``)."""

    def streamer(nxt: torch.Tensor) -> None:
        for i, t in enumerate(nxt.tolist()):
            if done[i]:
                continue
            if eos_id is not None and t == eos_id:
                done[i] = True
                continue
            piece = streams[i].push([t])
            if piece:
                pieces[i].append(piece)
                if live is not None:
                    live.write(piece)
                    live.flush()

    return streamer


@torch.no_grad()
def generate_text(cfg: Any, out: TextIO | None = sys.stdout, model=None, tok=None,
                  prompts: list[str] | None = None) -> list[str]:
    """Generate a continuation of every prompt of ``cfg`` (a generate config: DictConfig or dict).

    Writes prompt + continuation + newline for each prompt to ``out`` (streamed for a batch of one) and
    returns those texts (without the newline). ``model``/``tok`` skip loading (benchmarks, tests);
    ``prompts`` (the command line's, as typed) replace the config's.
    """
    from mom.data.tokenizer import special_token_ids

    cfg = plain_options(cfg, GenerateConfig)
    if model is None or tok is None:
        model_dir = resolve_model_dir(cfg.get("run_dir"), cfg.get("model_dir"), error=GenerationError)
        model, tok = load_model_and_tokenizer(model_dir, error=GenerationError)
    config = model.config
    prompts = list(prompts) if prompts else prompt_list(cfg)
    encoded = encode_prompts(tok, prompts, config.max_position_embeddings)
    max_new = int(cfg["max_new_tokens"])
    if max_new < 0:
        raise GenerationError(f"max_new_tokens must be >= 0, got {max_new}")
    if cfg["high_precision"] not in HIGH_PRECISION:
        raise GenerationError(f"high_precision must be one of {list(HIGH_PRECISION)}, got {cfg['high_precision']!r}")
    special = special_token_ids(tok)
    pad_id = special["pad"] if special["pad"] is not None else (config.pad_token_id or 0)
    eos_id = special["eos"] if cfg["stop_at_eos"] else None
    generator = torch.Generator().manual_seed(int(cfg["seed"]))
    bs = max(1, int(cfg["batch_size"]))
    texts: list[str] = []
    for start in range(0, len(encoded), bs):
        chunk, chunk_prompts = encoded[start:start + bs], prompts[start:start + bs]
        ids, mask = left_pad(chunk, pad_id)
        streams = [TextStream(tok) for _ in chunk]
        done = [False] * len(chunk)
        pieces: list[list[str]] = [[p] for p in chunk_prompts]
        live = out is not None and len(chunk) == 1
        if live:
            out.write(chunk_prompts[0])
            out.flush()

        streamer = _streamer(streams, done, pieces, out if live else None, eos_id)
        stats: dict = {}
        if max_new > 0:
            model.generate(ids, max_new_tokens=max_new, attention_mask=mask if len(chunk) > 1 else None,
                           do_sample=bool(cfg["do_sample"]), temperature=float(cfg["temperature"]),
                           top_k=cfg["top_k"], top_p=cfg["top_p"],
                           repetition_penalty=float(cfg["repetition_penalty"]), eos_token_id=eos_id,
                           pad_token_id=pad_id, use_cache=bool(cfg["use_cache"]), generator=generator,
                           streamer=streamer, compile=bool(cfg["compile"]),
                           high_precision=str(cfg["high_precision"]), stats=stats)
            if stats.get("decode_s"):
                steps = max(stats["new_tokens"] - 1, 0)
                report = log.warning if cfg["compile"] else log.info  # asked for: shown on stderr
                report("prefill %.3f s, decode %.1f tok/s (%d sequences), compile %.1f s, C++ kernels %s, %s step",
                       stats["prefill_s"], steps * len(chunk) / stats["decode_s"], len(chunk), stats["compile_s"],
                       "on" if stats["kernels"] else "off", "native" if stats.get("native") else "per-layer")
        for i, s in enumerate(streams):
            tail = s.finish()
            if tail:
                pieces[i].append(tail)
                if live:
                    out.write(tail)
        chunk_texts = ["".join(p) for p in pieces]
        if out is not None:
            if live:
                out.write("\n")
            else:
                for t in chunk_texts:
                    out.write(t + "\n")
            out.flush()
        texts.extend(chunk_texts)
    return texts


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="generate")
def main(cfg: DictConfig) -> None:
    setup_stderr_logging(logging.WARNING)
    from mom.prompts import prompts_from_args

    with one_line_errors():  # Ctrl-C too: the partly written line is ended, exit code 130
        generate_text(cfg, out=sys.stdout, prompts=prompts_from_args(_TYPED_PROMPTS) or None)


# the command line's prompt=/prompt_file= arguments, taken out of sys.argv before Hydra parses it
_TYPED_PROMPTS: list[tuple[str, str]] = []

if __name__ == "__main__":
    from mom.cli import run_cli
    from mom.prompts import take_prompt_args

    sys.argv[1:], _TYPED_PROMPTS[:] = take_prompt_args(sys.argv[1:])
    run_cli(main, "generate")  # a config that does not compose: one line too
