"""Evaluate a trained model: ``python -m mom.eval run_dir=DIR [model_dir=...] [data=...] [max_seq_length=512]``.

Loss (nats per token), perplexity and bits per byte over the validation split. The model comes from
``model_dir`` (default ``<run_dir>/model``: config.json + model.safetensors + tokenizer.json, or a packed
``<run_dir>/model-packed`` from ``mom.export``); its tokenizer is always the model folder's ``tokenizer.json``
(a tokenizer whose vocabulary differs from the model's ``vocab_size`` is refused). The data is the run's own
data config (``<run_dir>/.hydra/config.yaml``) unless ``data=<group>`` is given on the command line.

The validation split is cut into the windows training validates on (``seq_len = max_seq_length``, default the
run's training context ``data.seq_len`` from its ``.hydra/config.yaml``; a longer one is allowed, with a note
that the model was not trained on it; consecutive windows share one token so every token after the first is
scored once). A progress bar of the batches goes to stderr. The model runs in eval mode, so Mixture of Depths makes its causal per-token decision. Sums are
accumulated by :class:`mom.metrics.LanguageModelMetrics`, the accumulator training validates with::

    loss = sum(nll) / tokens        perplexity = exp(loss)        bpb = sum(nll) / (ln 2 * bytes)

where ``bytes`` is the UTF-8 length of the scored target tokens. stdout gets a table and, as its last line,
one JSON object (``loss``, ``perplexity``, ``bpb``, ``tokens``, ``bytes``, ...); logs go to stderr.

With ``harness.tasks=[...]`` (config group ``harness``, :mod:`mom.harness`) the model runs those
lm-evaluation-harness tasks instead: stdout gets the harness's table, then one JSON object
``{task: {metric: value}}`` as its last line, and the results are merged into ``<run>/harness/``.
:func:`evaluate` is the whole job as a plain function (tests call it in-process).
"""

from __future__ import annotations

import json
import logging
import math
import sys
import time
from pathlib import Path
from typing import Any

import hydra
import torch
from omegaconf import DictConfig

from mom.cli import one_line_errors
from mom.config import CONF_DIR, EvalConfig, plain_options, register_configs
from mom.errors import MoMError
from mom.metrics import LanguageModelMetrics
from mom.run_folder import (
    check_vocab,
    load_model_and_tokenizer,
    resolve_model_dir,
    run_data_config,
    setup_stderr_logging,
    trained_context,
)

log = logging.getLogger("mom.eval")
register_configs()


class EvalError(MoMError, ValueError):
    """A bad evaluation request (missing folder, tokenizer/model mismatch, ...): one line for the user."""


# ----------------------------------------------------------------------------------------------- helpers
def _table(rows: list[tuple[str, str]]) -> str:
    w = max(len(k) for k, _ in rows)
    v = max(len(x) for _, x in rows)
    lines = [f"| {'metric'.ljust(w)} | {'value'.rjust(v)} |", f"|{'-' * (w + 2)}|{'-' * (v + 1)}:|"]
    lines += [f"| {k.ljust(w)} | {x.rjust(v)} |" for k, x in rows]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------- the job
@torch.no_grad()
def evaluate(cfg: Any, out=None, progress: bool = True, prepare: Any = None) -> dict[str, Any]:
    """Evaluate the model of ``cfg`` (an eval config: DictConfig or dict) on its validation data.

    Returns the metrics dict; when ``out`` (a text stream) is given, writes the table and the JSON line there.
    ``progress``: a progress bar of the batches on stderr. ``prepare``: called with the loaded model before
    scoring (``scripts/block_ablation.py`` removes blocks with it).
    """
    from mom.data.corpus import DataError
    from mom.data.datamodule import build_datamodule
    from mom.harness.run import harness_options

    cfg = plain_options(cfg, EvalConfig)
    if harness_options(cfg.get("harness"))["tasks"]:
        from mom.harness.run import evaluate as evaluate_harness

        return evaluate_harness(cfg, out=out)
    model_dir = resolve_model_dir(cfg.get("run_dir"), cfg.get("model_dir"), error=EvalError)
    model, tok = load_model_and_tokenizer(model_dir, error=EvalError)
    if prepare is not None:
        prepare(model)
    config = model.config

    data_cfg = cfg.get("data") or {}
    if not data_cfg:
        if not cfg.get("run_dir"):
            raise EvalError("no data config: give data=<data config> or a run_dir whose .hydra/config.yaml has one")
        data_cfg = run_data_config(Path(str(cfg["run_dir"])).expanduser(), error=EvalError)
    data_cfg = {k: v for k, v in dict(data_cfg).items() if k not in ("_target_", "tokenizer_dir")}
    # always the model's own tokenizer (never train one, never write one anywhere)
    data_cfg["tokenizer"] = {**dict(data_cfg.get("tokenizer") or {}), "path": str(model_dir / "tokenizer.json"),
                             "name": None}
    # the windows training validated on: the run's data.seq_len (scoring 2048-token windows of a model trained
    # on 256 costs ~16x the time for a number that measures extrapolation, not the model)
    trained = trained_context(cfg.get("run_dir"), model_dir)
    seq_len = int(cfg.get("max_seq_length") or trained or data_cfg.get("seq_len") or config.max_position_embeddings)
    if trained and seq_len > trained:
        log.warning("note: max_seq_length=%d is longer than the %d-token windows the model was trained on; "
                    "the scores measure how it extrapolates", seq_len, trained)
    if seq_len > config.max_position_embeddings:
        log.warning("max_seq_length %d > the model's max_position_embeddings %d", seq_len,
                    config.max_position_embeddings)
    batch_size = int(cfg["batch_size"])
    torch.manual_seed(int(cfg["seed"]))
    try:
        dm = build_datamodule(data_cfg, tokenizer_dir=None, seq_len=seq_len, batch_size=batch_size,
                              val_batch_size=batch_size, num_workers=0)
        dm.prepare_data()
        dm.setup("validate")
    except DataError as e:
        raise EvalError(str(e)) from None
    check_vocab(dm.tokenizer, config.vocab_size, model_dir / "tokenizer.json", error=EvalError)
    token_bytes = dm.token_bytes

    acc = LanguageModelMetrics()
    t0 = time.perf_counter()
    from tqdm import tqdm

    loader = dm.val_dataloader()
    for batch in tqdm(loader, total=len(loader), desc="mom.eval", unit="batch", file=sys.stderr, leave=False,
                      disable=not progress):
        out_ = model(batch["input_ids"], labels=batch["labels"])
        acc.update(out_.token_loss, batch["labels"], token_bytes)
    elapsed = time.perf_counter() - t0
    m = acc.compute()
    nll, tokens, nbytes = float(m["nll"]), int(m["tokens"]), int(m["bytes"])
    if tokens == 0:
        raise EvalError("the validation split produced no tokens to score")
    loss = float(m["loss"])
    metrics = {
        "loss": loss,
        "perplexity": math.exp(min(loss, 700.0)),
        "bpb": float(m["bpb"]),
        "tokens": tokens,
        "bytes": nbytes,
        "nll_sum": nll,
        "seq_len": seq_len,
        "windows": len(dm.val_dataset),
        "model_dir": str(model_dir),
        "params": model.num_parameters(),
        "seconds": round(elapsed, 3),
        "tokens_per_s": round(tokens / elapsed, 1) if elapsed > 0 else None,
    }
    if out is not None:
        rows = [("model", str(model_dir)), ("windows x seq_len", f"{metrics['windows']} x {seq_len}"),
                ("tokens scored", f"{tokens:,}"), ("bytes scored", f"{nbytes:,}"),
                ("loss (nats/token)", f"{loss:.4f}"), ("perplexity", f"{metrics['perplexity']:.3f}"),
                ("bits per byte", f"{metrics['bpb']:.4f}"), ("time", f"{elapsed:.1f} s")]
        out.write(_table(rows) + "\n")
        out.write(json.dumps(metrics) + "\n")
        out.flush()
    return metrics


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="eval")
def main(cfg: DictConfig) -> None:
    setup_stderr_logging()
    with one_line_errors():
        evaluate(cfg, out=sys.stdout)


if __name__ == "__main__":
    from mom.cli import run_cli

    run_cli(main, "eval")  # a config that does not compose: one line too
