"""Every bad input ends in one clear line naming the key or the file (docs/reliability.md has the table).

In-process through ``mom.train.train`` / ``mom.errors.preflight`` / the eval-generate-export functions; three
cases through the real command lines (stderr is one line, the exit code non-zero, no traceback).
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from mom.cli import preflight
from mom.data.corpus import DataError
from mom.errors import CheckpointError
from mom.model.config import ConfigError
from tests.helpers import PYTHON, REPO
from tests.helpers.overrides import tiny_overrides


@pytest.fixture(scope="module")
def trained_run(compose, train_fn, tmp_path_factory) -> Path:
    """A finished 2-step tiny run: checkpoints/last.ckpt and model/ (with tokenizer.json)."""
    run = tmp_path_factory.mktemp("trained") / "run"
    train_fn(compose(tiny_overrides(run) + ["trainer.max_steps=2", "final_validate=false"]))
    return run


def _one_line(msg: str) -> str:
    assert msg and "\n" not in msg and "Traceback" not in msg, msg
    return msg


# ------------------------------------------------------------------------------------ configs (composed)
@pytest.mark.parametrize("override,expected", [
    ("experiment=nope", "experiment=nope: unknown experiment option (no conf/experiment/nope.yaml); available: "),
    ("precision=fp8", "precision=fp8: unknown precision option (no conf/precision/fp8.yaml); available: "),
    ("precision.attention=int8", "precision.attention: Invalid value 'int8', expected one of [bf16, ternary]"),
    ("precision.foo=bf16", "precision.foo: Key 'foo' not in 'PrecisionSchema'"),
    ("model.hiden_size=3", "model.hiden_size: Key 'hiden_size' not in 'ModelSchema'"),
    ("model.hidden_size=abc", "model.hidden_size: Value 'abc' of type 'str' could not be converted to Integer"),
])
def test_config_that_does_not_compose_is_one_line(override, expected):
    msg = _one_line(preflight("train", [override, "hydra.run.dir=/tmp/x"]))
    assert msg.startswith(expected), msg


def test_good_config_passes_preflight():
    assert preflight("train", ["experiment=tiny", "hydra.run.dir=/tmp/x", "trainer.max_steps=3"]) is None


# ------------------------------------------------------------------------------------ configs (values)
BAD_VALUES = [
    (["model.mod_capacity=1.5"], ConfigError, "model.mod_capacity: must be in (0, 1], got 1.5"),
    (["model.mod_capacity=0"], ConfigError, "model.mod_capacity: must be in (0, 1], got 0.0"),
    (["model.num_experts_per_tok=8"], ConfigError, "model.num_experts_per_tok: top-k 8 > num_experts 4"),
    (["model.num_attention_heads=5"], ConfigError, "model.num_attention_heads: 5 heads do not divide hidden_size 64"),
    (["model.scan_impl=magic"], ConfigError, "model.scan_impl: unknown scan implementation 'magic'"),
    (["optimizer.name=sgd"], ConfigError, "optimizer.name: unknown optimizer 'sgd'"),
    (["data.seq_len=100000000"], DataError, "too few for 2 sequences of seq_len 100000000"),
    (["ckpt_path=/nonexistent/last.ckpt"], CheckpointError, "ckpt_path: checkpoint not found: /nonexistent/last.ckpt"),
    (["callbacks.nonfinite.action=maybe"], ConfigError, "callbacks.nonfinite.action: must be 'stop' or 'skip'"),
]


@pytest.mark.parametrize("overrides,exc,expected", BAD_VALUES, ids=[v[0][0] for v in BAD_VALUES])
def test_bad_config_value_names_the_key(compose, train_fn, tmp_path, overrides, exc, expected):
    with pytest.raises(exc) as e:
        train_fn(compose(tiny_overrides(tmp_path / "run") + ["trainer.max_steps=1"] + overrides))
    assert expected in _one_line(str(e.value)), str(e.value)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU error path")
def test_8bit_optimizer_without_cuda(compose, train_fn, tmp_path):
    with pytest.raises(ConfigError) as e:
        train_fn(compose(tiny_overrides(tmp_path) + ["optimizer=galore_adamw8bit"]))
    assert _one_line(str(e.value)).startswith("optimizer: galore_adamw8bit needs a CUDA GPU")


# ------------------------------------------------------------------------------------ data and files
def test_empty_corpus_and_missing_files(compose, train_fn, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    cases = [([f"data.source.paths=[{empty}]"], f"no text in {empty}"),
             ([f"data.source.paths=[{tmp_path / 'missing.txt'}]"], f"data file not found: {tmp_path / 'missing.txt'}"),
             ([f"data.source.paths=[{tmp_path}/*.nope]"], f"no files match {tmp_path}/*.nope")]
    for extra, expected in cases:
        cfg = compose(tiny_overrides(tmp_path / "run") + ["data=text", "data.tokenizer.vocab_size=512"] + extra)
        with pytest.raises(DataError) as e:
            train_fn(cfg)
        assert expected in _one_line(str(e.value)), str(e.value)


def test_resume_from_a_foreign_or_truncated_checkpoint(compose, train_fn, trained_run, tmp_path):
    last = trained_run / "checkpoints" / "last.ckpt"
    foreign = ["model.hidden_size=32", "model.num_attention_heads=2", "model.num_key_value_heads=1"]
    with pytest.raises(CheckpointError) as e:
        train_fn(compose(tiny_overrides(tmp_path / "a") + foreign + ["trainer.max_steps=3", f"ckpt_path={last}"]))
    msg = _one_line(str(e.value))
    assert msg.startswith(f"{last} does not match this model: ") and "64)" in msg and "32)" in msg, msg
    trunc = tmp_path / "trunc.ckpt"
    trunc.write_bytes(last.read_bytes()[:5000])
    with pytest.raises(CheckpointError) as e:
        train_fn(compose(tiny_overrides(tmp_path / "b") + ["trainer.max_steps=3", f"ckpt_path={trunc}"]))
    assert _one_line(str(e.value)).startswith(f"{trunc}: corrupt or truncated checkpoint"), str(e.value)


def _model_copy(trained_run: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "model"
    shutil.copytree(trained_run / "model", dst)
    return dst


def test_generate_and_eval_bad_inputs(trained_run, tmp_path):
    from mom.data.tokenizer import train_bpe
    from mom.eval import EvalError, evaluate
    from mom.export import ExportError, export
    from mom.generate import generate_text
    from mom.model.generation import GenerationError

    no_model = tmp_path / "run_without_model"
    no_model.mkdir()
    ctx = 512  # model.max_position_embeddings of the tiny config
    cases = [
        (generate_text, {"run_dir": str(no_model), "prompt": "Hi"}, GenerationError,
         f"{no_model} has no model/ folder (not a finished training run?); pass model_dir=..."),
        (evaluate, {"run_dir": str(no_model)}, EvalError, f"{no_model} has no model/ folder"),
        (export, {"run_dir": str(no_model)}, ExportError, f"{no_model} has no model/ folder"),
        (generate_text, {"run_dir": str(tmp_path / "nope"), "prompt": "Hi"}, GenerationError,
         f"run_dir not found: {tmp_path / 'nope'}"),
        (generate_text, {"run_dir": str(trained_run), "prompt": ""}, GenerationError,
         "empty prompt: give at least one character of text"),
        (generate_text, {"run_dir": str(trained_run), "prompt": "To be or not to be, " * 400}, GenerationError,
         f"more than the model's trained context (max_position_embeddings={ctx})"),
        (generate_text, {"run_dir": str(trained_run), "prompt": "Hi", "high_precision": "fp16"}, GenerationError,
         "high_precision must be one of ['fp32', 'bf16', 'int8'], got 'fp16'"),
    ]
    # a tokenizer whose vocabulary differs from the model's
    other_tok = _model_copy(trained_run, tmp_path / "t")
    train_bpe(["the quick brown fox jumps over the lazy dog " * 50], 300).save(str(other_tok / "tokenizer.json"))
    cases.append((generate_text, {"model_dir": str(other_tok), "prompt": "Hi"}, GenerationError,
                  "tokens but the model's vocab_size is 512: not the tokenizer this model was trained with"))
    # a truncated model.safetensors
    trunc = _model_copy(trained_run, tmp_path / "s")
    w = trunc / "model.safetensors"
    w.write_bytes(w.read_bytes()[:1000])
    cases.append((generate_text, {"model_dir": str(trunc), "prompt": "Hi"}, GenerationError,
                  f"{w} is corrupt or truncated"))
    for fn, cfg, exc, expected in cases:
        kwargs = {"out": None}
        with pytest.raises(exc) as e:
            fn(cfg, **kwargs)
        assert expected in _one_line(str(e.value)), (cfg, str(e.value))


# ------------------------------------------------------------------------------------ real command lines
def _cli(module: str, args: list[str], env: dict, cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in env.items() if k != "HYDRA_FULL_ERROR"}
    return subprocess.run([PYTHON, "-m", module, *args], env=env, cwd=cwd, capture_output=True, text=True,
                          timeout=120)


@pytest.mark.slow
def test_cli_errors_are_one_line(python_env, trained_run, tmp_path):
    cases = [
        ("mom.train", ["experiment=nope"], 1, "error: experiment=nope: unknown experiment option"),
        ("mom.train", ["model=jamba_tiny", "model.num_attention_heads=5", "trainer.accelerator=cpu",
                       f"hydra.run.dir={tmp_path / 'r'}"], 1,
         "error: model.num_attention_heads: 5 heads do not divide hidden_size 64"),
        ("mom.generate", [f"run_dir={trained_run}", "prompt=''"], None, "error: empty prompt"),
    ]
    for module, args, code, expected in cases:
        res = _cli(module, args, python_env, REPO)
        lines = res.stderr.strip().splitlines()
        assert res.returncode != 0 and (code is None or res.returncode == code), (res.returncode, res.stderr)
        assert len(lines) == 1 and lines[0].startswith(expected), res.stderr
