"""MoM as a model of EleutherAI's lm-evaluation-harness, registered under the name ``mom``.

:class:`MoMLM` is a ``TemplateLM``: the harness hands it text, it answers with the run's own tokenizer and
model, so no conversion to transformers is needed (nothing else runs MoM's mixtures).

- ``loglikelihood``: the harness splits each (context, continuation) into tokens (``TemplateLM``); the
  requests are sorted longest first, cut into batches of ``batch_size``, right-padded and scored with one
  eval-mode forward per batch. Eval mode matters: Mixture of Depths then makes its causal per-token
  decision (the one generation uses), not the training-time top-k over the whole sequence. Right padding
  needs no mask: every layer is causal, so a padded row computes its real tokens exactly as alone.
- ``loglikelihood_rolling``: each document is cut into windows of ``max_length`` tokens (the model's
  trained context by default) that share one token of context (the harness's own window rule), the first
  conditioned on EOS: every token is predicted once, as ``mom.eval`` scores its validation split.
- ``generate_until``: ``model.generate`` (MoM's cached decoding) on left-padded batches, greedy unless the
  task asks for sampling; a batch stops as soon as every row has met a stop sequence or EOS, and each text is
  cut at its first stop sequence. The context keeps its last ``max_length - max_gen_toks`` tokens.

Construct it from a folder (``run_dir=`` a training run, ``model_dir=``/``pretrained=`` a model folder,
packed or not) or, in-process, from a loaded ``model=`` and ``tokenizer=``.
"""

from __future__ import annotations

import contextlib
import json
import logging
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import normalize_gen_kwargs
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from tqdm import tqdm

from mom.harness import HarnessError

log = logging.getLogger("mom.harness")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def find_model_dir(run_dir: Any = None, model_dir: Any = None, pretrained: Any = None) -> Path:
    """The model folder named by the arguments; ``pretrained`` may be a model folder or a run folder."""
    from mom.run_folder import resolve_model_dir

    if pretrained and not (run_dir or model_dir):
        path = Path(str(pretrained)).expanduser()
        if (path / "config.json").is_file():
            model_dir = path
        else:
            run_dir = path
    return resolve_model_dir(run_dir, model_dir, error=HarnessError)


class _AllStopped(Exception):
    """Raised from generate's streamer once every row of the batch has met a stop sequence (ends decoding)."""


@register_model("mom")
class MoMLM(TemplateLM):
    """``lm_eval --model mom --model_args run_dir=DIR`` (see the module doc)."""

    backend = "causal"

    def __init__(self, run_dir: str | None = None, model_dir: str | None = None, pretrained: str | None = None, *,
                 model: Any = None, tokenizer: Any = None, batch_size: int | str | None = 8,
                 max_batch_size: int | None = None, max_length: int | None = None, max_gen_toks: int = 256,
                 device: str | None = None, dtype: str = "float32", seed: int = 1234) -> None:
        super().__init__()
        from mom.data.tokenizer import special_token_ids

        if dtype not in DTYPES:
            raise HarnessError(f"dtype={dtype!r}: expected one of {', '.join(DTYPES)}")
        self._device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if self._device.type == "cuda" and not torch.cuda.is_available():  # the harness CLI's default is cuda:0
            log.warning("device %s requested but CUDA is not available: running on the CPU", self._device)
            self._device = torch.device("cpu")
        if model is None or tokenizer is None:
            from mom.run_folder import load_model_and_tokenizer

            self.model_dir = find_model_dir(run_dir, model_dir, pretrained)
            model, tokenizer = load_model_and_tokenizer(self.model_dir, error=HarnessError, map_location=str(self._device))
        else:
            self.model_dir = None
        self.model = model.to(self._device).eval()
        self.tokenizer = tokenizer
        self.config = model.config
        # the harness passes "auto" or a number; MoM needs no search for a batch size on a CPU
        self._batch_size = int(batch_size) if str(batch_size or "").isdigit() else 8
        if max_batch_size:
            self._batch_size = min(self._batch_size, int(max_batch_size))
        self._max_length = int(max_length or self.config.max_position_embeddings)
        if self._max_length > self.config.max_position_embeddings:
            log.warning("max_length %d > the model's trained context %d", self._max_length,
                        self.config.max_position_embeddings)
        self._max_gen_toks = int(max_gen_toks)
        self._autocast_dtype = DTYPES[dtype]
        self._seed = int(seed)
        ids = special_token_ids(tokenizer)
        eos = ids["eos"] if ids["eos"] is not None else self.config.eos_token_id
        if eos is None:
            raise HarnessError("the tokenizer has no EOS token and the model config no eos_token_id")
        self._eot = int(eos)
        self._pad = int(ids["pad"] if ids["pad"] is not None else (self.config.pad_token_id or 0))

    # ------------------------------------------------------------------------------- what the harness asks
    @property
    def eot_token_id(self) -> int:
        return self._eot

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    @property
    def batch_size(self) -> int:
        return self._batch_size

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def tokenizer_name(self) -> str:
        from mom.data.tokenizer import tokenizer_hash

        return f"mom-{tokenizer_hash(self.tokenizer)[:16]}"

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, left_truncate_len: int | None = None,
                   **kwargs: Any) -> list[int]:
        # as the training token cache: no special tokens added (documents are separated by EOS there)
        ids = self.tokenizer.encode(string, add_special_tokens=bool(add_special_tokens)).ids
        return ids[-left_truncate_len:] if left_truncate_len else ids

    def tok_decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    # ------------------------------------------------------------------------------- scoring
    def _autocast(self):
        if self._autocast_dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(self._device.type, dtype=self._autocast_dtype)

    @torch.no_grad()
    def _score(self, rows: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        """(input ids, continuation ids) per row, the continuation being the last tokens the input predicts:
        (sum of log p(continuation), whether greedy decoding gives the continuation) per row."""
        width = max(len(inp) for inp, _ in rows)
        ids = torch.full((len(rows), width), self._pad, dtype=torch.long)
        for i, (inp, _) in enumerate(rows):
            ids[i, : len(inp)] = torch.tensor(inp, dtype=torch.long)
        with self._autocast():
            logits = self.model(ids.to(self._device)).logits
        out = []
        for i, (inp, cont) in enumerate(rows):
            n, c = len(inp), len(cont)
            logp = F.log_softmax(logits[i, n - c : n].float(), dim=-1)
            target = torch.tensor(cont, dtype=torch.long, device=logp.device)
            ll = logp.gather(-1, target[:, None]).sum()
            out.append((float(ll), bool((logp.argmax(-1) == target).all())))
        return out

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs: Any) -> list[tuple[float, bool]]:
        """requests: ((context, continuation) or None, context ids, continuation ids), in any order."""
        L = self._max_length

        def model_input(req) -> tuple[list[int], list[int]]:
            _, ctx, cont = req
            whole = (ctx + cont)[-(L + 1):]  # left-truncate to the context the model was trained on
            return whole[:-1], cont[-L:]

        # longest first: the first batch is the widest (a memory problem shows at once), and a batch's rows
        # have similar lengths, so little padding is computed
        order = sorted(range(len(requests)), key=lambda i: -len(requests[i][1]) - len(requests[i][2]))
        results: list[tuple[float, bool] | None] = [None] * len(requests)
        bar = tqdm(total=len(requests), disable=disable_tqdm or len(requests) < 2, desc="mom loglikelihood")
        for start in range(0, len(order), self._batch_size):
            batch = order[start : start + self._batch_size]
            for i, res in zip(batch, self._score([model_input(requests[i]) for i in batch]), strict=True):
                if requests[i][0] is not None:
                    self.cache_hook.add_partial("loglikelihood", requests[i][0], res)
                results[i] = res
            bar.update(len(batch))
        bar.close()
        return results  # type: ignore[return-value]

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        windows, owner = [], []
        for k, req in enumerate(requests):
            (text,) = req.args
            for w in get_rolling_token_windows(self.tok_encode(text), prefix_token=self._eot,
                                               max_seq_len=self._max_length, context_len=1):
                ctx, cont = make_disjoint_window(w)
                windows.append((None, ctx, cont))
                owner.append(k)
        scored = self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm)
        totals = [0.0] * len(requests)
        for k, (ll, _) in zip(owner, scored, strict=True):
            totals[k] += ll
        for req, total in zip(requests, totals, strict=True):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    # ------------------------------------------------------------------------------- generation
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        # requests with the same generation settings are batched together, longest context first
        args = [req.args for req in requests]
        groups: dict[str, list[int]] = {}
        for i, (_, gen_kwargs) in enumerate(args):
            groups.setdefault(json.dumps(gen_kwargs, sort_keys=True, default=str), []).append(i)
        results: list[str | None] = [None] * len(requests)
        bar = tqdm(total=len(requests), disable=disable_tqdm or len(requests) < 2, desc="mom generate_until")
        for members in groups.values():
            members.sort(key=lambda i: -len(args[i][0]))
            for start in range(0, len(members), self._batch_size):
                batch = members[start : start + self._batch_size]
                texts = self._generate([args[i][0] for i in batch], dict(args[batch[0]][1]))
                for i, text in zip(batch, texts, strict=True):
                    self.cache_hook.add_partial("generate_until", args[i], text)
                    results[i] = text
                bar.update(len(batch))
        bar.close()
        return results  # type: ignore[return-value]

    @torch.no_grad()
    def _generate(self, contexts: list[str], gen_kwargs: dict[str, Any]) -> list[str]:
        from mom.generate import left_pad

        kw = normalize_gen_kwargs(gen_kwargs, default_max_gen_toks=self._max_gen_toks)
        until = [s for s in kw.pop("until") if s]
        max_new = max(1, min(int(kw.pop("max_gen_toks")), self._max_length - 1))
        room = self._max_length - max_new
        prompts = [self.tok_encode(c)[-room:] or [self._eot] for c in contexts]
        ids, mask = left_pad(prompts, self._pad)
        do_sample = bool(kw.get("do_sample"))
        sampling = {}
        if do_sample:
            sampling = {"do_sample": True, "temperature": float(kw.get("temperature") or 1.0),
                        "top_k": kw.get("top_k"), "top_p": kw.get("top_p"),
                        "generator": torch.Generator(device=self._device).manual_seed(self._seed)}

        new: list[list[int]] = [[] for _ in contexts]
        stopped = [False] * len(contexts)

        def streamer(step_ids: torch.Tensor) -> None:
            for i, t in enumerate(step_ids.tolist()):
                if stopped[i]:
                    continue
                if t == self._eot:
                    stopped[i] = True
                    continue
                new[i].append(t)
                if until and any(s in self.tok_decode(new[i][-64:]) for s in until):
                    stopped[i] = True
            if all(stopped):
                raise _AllStopped

        with contextlib.suppress(_AllStopped), self._autocast():
            self.model.generate(ids.to(self._device), max_new_tokens=max_new, attention_mask=mask.to(self._device),
                                eos_token_id=self._eot, pad_token_id=self._pad, streamer=streamer, **sampling)
        texts = []
        for toks in new:
            text = self.tok_decode(toks)
            for s in until:
                text = text.split(s)[0]
            texts.append(text)
        return texts
