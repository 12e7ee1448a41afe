"""Autoregressive generation with transformers' argument names.

With ``use_cache=True`` the prompt is prefilled in one parallel pass that leaves a ``MoMCache`` (KV for
attention layers, conv + SSM state for Mamba layers), then each new token advances that state by one
step. ``use_cache=False`` recomputes the full forward every step: the reference the cached path is tested
against. Both run the model in eval mode, where Mixture of Depths decides per token (causal).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from mom.errors import MoMError
from mom.model.cache import MoMCache


class GenerationError(MoMError, ValueError):
    """Bad generation input (empty prompt, prompt longer than the trained context, ...)."""


def process_logits(logits: torch.Tensor, generated: torch.Tensor, *, temperature: float = 1.0, top_k: int | None = None,
                   top_p: float | None = None, repetition_penalty: float = 1.0) -> torch.Tensor:
    """logits: (B, V) fp32 for the next token; generated: (B, L) ids seen so far."""
    if repetition_penalty != 1.0:
        seen = torch.gather(logits, 1, generated)
        seen = torch.where(seen < 0, seen * repetition_penalty, seen / repetition_penalty)
        logits = logits.scatter(1, generated, seen)
    if temperature != 1.0:
        logits = logits / temperature
    if top_k:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        probs = torch.softmax(sorted_logits, dim=-1)
        drop = probs.cumsum(-1) - probs > top_p  # keep the smallest set reaching top_p
        logits = logits.masked_fill(drop.scatter(1, order, drop), float("-inf"))
    return logits


def choose_next(logits: torch.Tensor, tokens: torch.Tensor, *, do_sample: bool, temperature: float,
                top_k: int | None, top_p: float | None, repetition_penalty: float,
                generator: torch.Generator | None) -> torch.Tensor:
    """(B,) next tokens from the last position's (B, V) logits: sampled, or greedy (only the repetition
    penalty applies then)."""
    scores = process_logits(logits.float(), tokens, temperature=temperature if do_sample else 1.0,
                            top_k=top_k if do_sample else None, top_p=top_p if do_sample else None,
                            repetition_penalty=repetition_penalty)
    if do_sample:
        return torch.multinomial(torch.softmax(scores, -1), 1, generator=generator).squeeze(1)
    return scores.argmax(-1)


def check_generation_args(config, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                          temperature: float, pad_token_id: int | None) -> tuple[torch.Tensor, int]:
    """The checks every decoder makes before its first step: (B, T) ids and the padding token to use."""
    if input_ids.dim() == 1:
        input_ids = input_ids.unsqueeze(0)
    if input_ids.numel() == 0 or input_ids.shape[1] == 0:
        raise GenerationError("empty prompt: give at least one token")
    prompt_len = int(attention_mask.sum(1).max()) if attention_mask is not None else input_ids.shape[1]
    if prompt_len > config.max_position_embeddings:
        raise GenerationError(f"prompt of {prompt_len} tokens is longer than the model's trained context "
                              f"(max_position_embeddings={config.max_position_embeddings})")
    if temperature <= 0:
        raise GenerationError(f"temperature must be > 0, got {temperature} (use do_sample=False for greedy)")
    if pad_token_id is None:
        pad_token_id = config.pad_token_id if config.pad_token_id is not None else 0
    return input_ids, pad_token_id


@torch.no_grad()
def generate(model, input_ids: torch.Tensor, max_new_tokens: int = 32, *, do_sample: bool = False,
             temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
             repetition_penalty: float = 1.0, eos_token_id: int | None = None, pad_token_id: int | None = None,
             attention_mask: torch.Tensor | None = None, use_cache: bool = True,
             generator: torch.Generator | None = None,
             streamer: Callable[[torch.Tensor], None] | None = None) -> torch.Tensor:
    """Returns (B, prompt + new) token ids. Prompts of different lengths come left-padded with an
    ``attention_mask`` (1 = token, 0 = padding). ``streamer`` gets each step's new tokens (B,)."""
    config = model.config
    input_ids, pad_token_id = check_generation_args(config, input_ids, attention_mask, temperature, pad_token_id)
    was_training = model.training
    model.eval()
    try:
        B = input_ids.shape[0]
        tokens = input_ids
        mask = attention_mask
        done = torch.zeros(B, dtype=torch.bool, device=input_ids.device)
        cache = MoMCache.for_config(config) if use_cache else None
        step_input = input_ids
        for step in range(max_new_tokens):
            if use_cache:
                out = model(step_input, attention_mask=mask if step == 0 else None, cache=cache, logits_to_keep=1)
            else:
                out = model(tokens, attention_mask=mask, logits_to_keep=1)
            nxt = choose_next(out.logits[:, -1], tokens, do_sample=do_sample, temperature=temperature, top_k=top_k,
                              top_p=top_p, repetition_penalty=repetition_penalty, generator=generator)
            nxt = torch.where(done, torch.full_like(nxt, pad_token_id), nxt)
            tokens = torch.cat([tokens, nxt[:, None]], dim=1)
            if mask is not None:
                mask = torch.cat([mask, (~done).to(mask.dtype)[:, None]], dim=1)
            if streamer is not None:
                streamer(nxt)
            if eos_token_id is not None:
                done = done | (nxt == eos_token_id)
                if bool(done.all()):
                    break
            step_input = nxt[:, None]
        return tokens
    finally:
        model.train(was_training)
