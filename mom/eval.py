"""Evaluate a trained model: ``python -m mom.eval run_dir=DIR [model_dir=...] [data=...] [max_seq_length=512]``.

Loss (nats per token), perplexity and bits per byte over the validation split. The model comes from
``model_dir`` (default ``<run_dir>/model``: config.json + model.safetensors + tokenizer.json, or a packed
``<run_dir>/model-packed`` from ``mom.export``); its tokenizer is always the model folder's ``tokenizer.json``
(a tokenizer whose vocabulary differs from the model's ``vocab_size`` is refused). The data is the run's own
data config (``<run_dir>/.hydra/config.yaml``) unless ``data=<group>`` is given on the command line.

The validation split is cut into the windows training validates on (``seq_len = max_seq_length``, default the
model's ``max_position_embeddings``; consecutive windows share one token so every token after the first is
scored once). The model runs in eval mode, so Mixture of Depths makes its causal per-token decision. Sums are
accumulated with torchmetrics ``SumMetric``::

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
from omegaconf import DictConfig, OmegaConf

from mom.errors import fail
from mom.utils import CONF_DIR, register_configs, to_plain

log = logging.getLogger("mom.eval")
register_configs()


class EvalError(ValueError):
    """A bad evaluation request (missing folder, tokenizer/model mismatch, ...): one line for the user."""


# ----------------------------------------------------------------------------------------------- helpers
def resolve_model_dir(run_dir: Any, model_dir: Any, error: type[Exception] = EvalError) -> Path:
    """``model_dir`` when given, else ``<run_dir>/model``; checked to exist."""
    if model_dir:
        path = Path(str(model_dir)).expanduser()
        if not path.is_dir():
            raise error(f"model_dir not found: {path}")
    elif run_dir:
        run = Path(str(run_dir)).expanduser()
        if not run.is_dir():
            raise error(f"run_dir not found: {run}")
        path = run / "model"
        if not path.is_dir():
            raise error(f"{run} has no model/ folder (not a finished training run?); pass model_dir=...")
    else:
        raise error("give run_dir=<training run folder> or model_dir=<model folder>")
    for name in ("config.json", "model.safetensors"):
        if not (path / name).is_file():
            raise error(f"{path / name} is missing: not a MoM model folder")
    return path


def load_model_and_tokenizer(model_dir: Path, error: type[Exception] = EvalError):
    """The model (eval mode) and its tokenizer; refuses a tokenizer whose vocabulary size differs."""
    from mom.data.tokenizer import load_tokenizer
    from mom.model import MoMForCausalLM

    tok_path = model_dir / "tokenizer.json"
    if not tok_path.is_file():
        raise error(f"{tok_path} is missing: the model folder must hold its tokenizer")
    tok = load_tokenizer(path=tok_path)
    try:
        model = MoMForCausalLM.from_pretrained(model_dir).eval()
    except (FileNotFoundError, ValueError) as e:
        raise error(str(e)) from None
    check_vocab(tok, model.config.vocab_size, tok_path, error)
    return model, tok


def check_vocab(tok, model_vocab: int, where: Any, error: type[Exception] = EvalError) -> None:
    n = tok.get_vocab_size(with_added_tokens=True)
    if n != model_vocab:
        raise error(f"tokenizer {where} has {n} tokens but the model's vocab_size is {model_vocab}: "
                    "not the tokenizer this model was trained with")


def run_data_config(run_dir: Path) -> dict[str, Any]:
    """The ``data`` node of a training run's ``.hydra/config.yaml``, resolved."""
    path = run_dir / ".hydra" / "config.yaml"
    if not path.is_file():
        raise EvalError(f"{path} not found: give data=<data config> (e.g. data=shakespeare)")
    cfg = OmegaConf.load(path)
    if "data" not in cfg or not cfg.data:
        raise EvalError(f"{path} has no data config: give data=<data config>")
    try:
        return OmegaConf.to_container(cfg.data, resolve=True)
    except Exception as e:  # an interpolation that needs Hydra's runtime (hydra:...) or a missing env var
        raise EvalError(f"cannot resolve the data config of {path}: {e}".splitlines()[0]) from None


def plain_keys(cfg: Any, keys: tuple[str, ...]) -> dict[str, Any]:
    """Those keys of a config (DictConfig or dict) as plain values; the rest (e.g. ``paths``, which needs
    Hydra's runtime to resolve) is left alone."""
    return {k: to_plain(cfg.get(k)) for k in keys if k in cfg}


def _table(rows: list[tuple[str, str]]) -> str:
    w = max(len(k) for k, _ in rows)
    v = max(len(x) for _, x in rows)
    lines = [f"| {'metric'.ljust(w)} | {'value'.rjust(v)} |", f"|{'-' * (w + 2)}|{'-' * (v + 1)}:|"]
    lines += [f"| {k.ljust(w)} | {x.rjust(v)} |" for k, x in rows]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------- the job
@torch.no_grad()
def evaluate(cfg: Any, out=None) -> dict[str, Any]:
    """Evaluate the model of ``cfg`` (an eval config: DictConfig or dict) on its validation data.

    Returns the metrics dict; when ``out`` (a text stream) is given, writes the table and the JSON line there.
    """
    from mom.harness.run import task_list

    if task_list((plain_keys(cfg, ("harness",)).get("harness") or {}).get("tasks")):
        from mom.harness.run import evaluate as evaluate_harness

        return evaluate_harness(plain_keys(cfg, ("run_dir", "model_dir", "harness")), out=out)
    from torchmetrics.aggregation import SumMetric

    from mom.data.corpus import DataError
    from mom.data.datamodule import build_datamodule

    cfg = plain_keys(cfg, ("run_dir", "model_dir", "data", "max_seq_length", "batch_size", "seed"))
    model_dir = resolve_model_dir(cfg.get("run_dir"), cfg.get("model_dir"))
    model, tok = load_model_and_tokenizer(model_dir)
    config = model.config

    data_cfg = cfg.get("data") or {}
    if not data_cfg:
        if not cfg.get("run_dir"):
            raise EvalError("no data config: give data=<data config> or a run_dir whose .hydra/config.yaml has one")
        data_cfg = run_data_config(Path(str(cfg["run_dir"])).expanduser())
    data_cfg = {k: v for k, v in dict(data_cfg).items() if k not in ("_target_", "tokenizer_dir")}
    # always the model's own tokenizer (never train one, never write one anywhere)
    data_cfg["tokenizer"] = {**dict(data_cfg.get("tokenizer") or {}), "path": str(model_dir / "tokenizer.json"),
                             "name": None}
    seq_len = int(cfg.get("max_seq_length") or config.max_position_embeddings)
    if seq_len > config.max_position_embeddings:
        log.warning("max_seq_length %d > the model's trained context %d", seq_len, config.max_position_embeddings)
    batch_size = int(cfg.get("batch_size") or 8)
    torch.manual_seed(int(cfg.get("seed") or 0))
    try:
        dm = build_datamodule(data_cfg, tokenizer_dir=None, seq_len=seq_len, batch_size=batch_size,
                              val_batch_size=batch_size, num_workers=0)
        dm.prepare_data()
        dm.setup("validate")
    except DataError as e:
        raise EvalError(str(e)) from None
    check_vocab(dm.tokenizer, config.vocab_size, model_dir / "tokenizer.json")
    token_bytes = dm.token_bytes

    nll_sum, n_tokens, n_bytes = SumMetric(), SumMetric(), SumMetric()
    for m in (nll_sum, n_tokens, n_bytes):
        m.set_dtype(torch.float64)
    t0 = time.perf_counter()
    n_batches = 0
    for batch in dm.val_dataloader():
        ids, labels = batch["input_ids"], batch["labels"]
        out_ = model(ids, labels=labels, reduction="none")
        targets = labels[:, 1:]
        valid = targets != -100
        nll_sum.update(out_.token_loss.double()[valid].sum())
        n_tokens.update(valid.sum().double())
        n_bytes.update(token_bytes[targets.clamp_min(0)][valid].sum().double())
        n_batches += 1
    elapsed = time.perf_counter() - t0
    nll, tokens, nbytes = float(nll_sum.compute()), int(n_tokens.compute()), int(n_bytes.compute())
    if tokens == 0:
        raise EvalError("the validation split produced no tokens to score")
    loss = nll / tokens
    metrics = {
        "loss": loss,
        "perplexity": math.exp(min(loss, 700.0)),
        "bpb": nll / (math.log(2) * nbytes) if nbytes else float("nan"),
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


def setup_stderr_logging(level: int = logging.INFO) -> None:
    """Logs to stderr only (stdout is the command's output)."""
    root = logging.getLogger()
    if not any(getattr(h, "_mom_stderr", False) for h in root.handlers):
        h = logging.StreamHandler(sys.stderr)
        h.setFormatter(logging.Formatter("[%(name)s][%(levelname)s] %(message)s"))
        h._mom_stderr = True  # type: ignore[attr-defined]
        root.addHandler(h)
    root.setLevel(level)


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="eval")
def main(cfg: DictConfig) -> None:
    setup_stderr_logging()
    from mom.data.corpus import DataError
    from mom.harness import HarnessError
    from mom.model.config import ConfigError

    try:
        evaluate(cfg, out=sys.stdout)
    except (EvalError, HarnessError, DataError, ConfigError, FileNotFoundError) as e:
        fail(str(e))


if __name__ == "__main__":
    from mom.errors import run_cli

    run_cli(main, "eval")  # a config that does not compose: one line too
