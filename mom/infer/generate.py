"""``generate`` on the engine: ``Engine.prefill`` fills the static cache with the prompt (native: one C++
call; otherwise the reference forward copied into the static buffers), then every new token is one
``Engine.step`` (greedy decoding on the native step: one C++ call for all the tokens after the first).

Same arguments and results as ``mom.model.generation.generate`` (transformers' names), plus:

- ``native``: None (default) runs the whole step in one C++ call when the kernels are built and the model is
  fp32; False keeps the per-layer Python step (what ``compile=True`` compiles);
- ``high_precision``: "fp32" (default: logits as ``mom.model``'s fp32 forward) or "bf16": the plain (non-ternary)
  linear layers read bf16 weights, half the bytes (see ``mom.infer.engine``);
- ``compile=True``: the Python step runs under ``torch.compile``; the first call compiles it (timed apart, in
  ``stats["compile_s"]``) and later calls in the process reuse it (the engine is cached on the model);
- ``stats``: a dict filled with ``prefill_s``, ``decode_s``, ``new_tokens``, ``compile_s``, ``kernels``,
  ``native``.

``use_cache=False`` is the reference full recompute of ``mom.model.generation`` (what the engine is tested
against).
"""

from __future__ import annotations

import gc
import time
import warnings
from collections.abc import Callable

import torch

from mom.infer.engine import engine_for
from mom.model.generation import check_generation_args, choose_next
from mom.model.generation import generate as reference_generate


@torch.no_grad()
def generate(model, input_ids: torch.Tensor, max_new_tokens: int = 32, *, do_sample: bool = False,
             temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
             repetition_penalty: float = 1.0, eos_token_id: int | None = None, pad_token_id: int | None = None,
             attention_mask: torch.Tensor | None = None, use_cache: bool = True,
             generator: torch.Generator | None = None, streamer: Callable[[torch.Tensor], None] | None = None,
             compile: bool = False, use_kernels: bool | None = None, native: bool | None = None,
             high_precision: str = "fp32", stats: dict | None = None) -> torch.Tensor:
    """Returns (B, prompt + new) token ids; see ``mom.model.generation.generate`` for the arguments."""
    if not use_cache:
        return reference_generate(model, input_ids, max_new_tokens, do_sample=do_sample, temperature=temperature,
                                  top_k=top_k, top_p=top_p, repetition_penalty=repetition_penalty,
                                  eos_token_id=eos_token_id, pad_token_id=pad_token_id,
                                  attention_mask=attention_mask, use_cache=False, generator=generator,
                                  streamer=streamer)
    config = model.config
    input_ids, pad_token_id = check_generation_args(config, input_ids, attention_mask, temperature, pad_token_id)
    stats = stats if stats is not None else {}
    was_training, gc_was_on = model.training, gc.isenabled()
    model.eval()
    try:
        engine = engine_for(model, use_kernels, native, high_precision)
        B, T = input_ids.shape
        stats.update(compile_s=0.0, kernels=engine.use_kernels, native=engine.native is not None, new_tokens=0)
        if compile and engine.native is None and engine.compiled is None and not engine.compile_failed:
            engine.compile()
            try:
                stats["compile_s"] = engine.warm_up(B, T + max(max_new_tokens, 1))
            except Exception as e:  # noqa: BLE001 - Inductor needs a working C++ toolchain: fall back to eager
                engine.compiled, engine.compile_failed = None, True
                first = next((ln for ln in str(e).splitlines() if ln.strip()), type(e).__name__)
                warnings.warn(f"mom.infer: torch.compile of the decode step failed ({first[:200]}); decoding eagerly",
                              RuntimeWarning, stacklevel=2)
        cache = engine.get_cache(B, T + max(max_new_tokens, 1))
        t0 = time.perf_counter()
        logits = engine.prefill(input_ids, attention_mask, cache)
        stats["prefill_s"] = time.perf_counter() - t0
        t1 = time.perf_counter()
        gc.disable()  # a collection walks every object of the model: not between two decode steps
        # the output written in place (no torch.cat a token); padding after a sequence's eos
        tokens = torch.full((B, T + max_new_tokens), pad_token_id, dtype=input_ids.dtype, device=input_ids.device)
        tokens[:, :T] = input_ids
        n = T
        done = torch.zeros(B, dtype=torch.bool, device=input_ids.device) if eos_token_id is not None else None
        nxt = input_ids[:, -1]
        # greedy, unpenalised and unstreamed on the native step: after the first token the loop runs in C++
        native_loop = (engine.native is not None and not do_sample and repetition_penalty == 1.0
                       and streamer is None)
        for step in range(max_new_tokens):
            if step:
                logits = engine.step(nxt, cache)
            nxt = choose_next(logits, tokens[:, :n], do_sample=do_sample, temperature=temperature, top_k=top_k,
                              top_p=top_p, repetition_penalty=repetition_penalty, generator=generator)
            if done is not None:
                nxt = nxt.masked_fill(done, pad_token_id)
            tokens[:, n] = nxt
            n += 1
            stats["new_tokens"] = step + 1
            if streamer is not None:
                streamer(nxt)
            if done is not None:
                done = done | (nxt == eos_token_id)
                if bool(done.all()):
                    break
            if native_loop and max_new_tokens > 1:
                more = engine.native.greedy(nxt, cache, max_new_tokens - 1, eos_token_id, pad_token_id)
                tokens[:, n:n + more.shape[1]] = more
                n += more.shape[1]
                stats["new_tokens"] += more.shape[1]
                break
        stats["decode_s"] = time.perf_counter() - t1
        return tokens[:, :n].contiguous()
    finally:
        if gc_was_on:
            gc.enable()
        model.train(was_training)


__all__ = ["generate"]
