"""mom.eval and mom.generate on a tiny run folder built directly (no Lightning training).

The run folder is what mom.train leaves: ``model/`` (save_pretrained + tokenizer.json) and ``.hydra/config.yaml``
(whose ``data`` node eval rebuilds). The model is untrained; what is checked is plumbing and exactness.
"""

from __future__ import annotations

import io
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mom.data.tokenizer import load_tokenizer, save_tokenizer, train_bpe
from mom.model import MoMConfig, MoMForCausalLM
from tests.helpers import REPO
from tests.helpers.run_folder import ENV, corpus_text, make_run


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    return make_run(tmp_path_factory.mktemp("evalgen"), mod_enabled=True)


def _model(run: Path):
    return MoMForCausalLM.from_pretrained(run / "model"), load_tokenizer(path=run / "model" / "tokenizer.json")


# ----------------------------------------------------------------------------------------------- eval
def test_eval_json_and_bpb_consistency(run):
    from mom.eval import evaluate

    buf = io.StringIO()
    m = evaluate({"run_dir": str(run), "max_seq_length": 32, "batch_size": 4}, out=buf)
    lines = buf.getvalue().strip().splitlines()
    last = json.loads(lines[-1])
    assert {"loss", "perplexity", "bpb", "tokens", "bytes"} <= set(last)
    assert "bits per byte" in buf.getvalue()
    assert last["tokens"] == m["tokens"] > 0
    assert math.isclose(last["perplexity"], math.exp(last["loss"]), rel_tol=1e-9)
    assert math.isclose(last["bpb"], last["loss"] * last["tokens"] / (math.log(2) * last["bytes"]), rel_tol=1e-9)
    # the bytes scored are the validation text's bytes of the scored windows
    val = (run.parent / "text" / "val.txt").read_text(encoding="utf-8")
    assert 0 < last["bytes"] <= len(val.encode())
    # against a direct computation on the same windows
    model, tok = _model(run)
    ids = torch.tensor(tok.encode(val).ids)
    n_win = (len(ids) - 1) // 31
    windows = torch.stack([ids[i * 31: i * 31 + 32] for i in range(n_win)])
    with torch.no_grad():
        direct = model(windows, labels=windows).lm_loss.item()
    assert abs(direct - last["loss"]) < 1e-4, (direct, last["loss"])


def test_eval_scores_at_the_training_context_by_default(run, capsys, caplog):
    """The model was trained on 32-token windows (its run's data.seq_len) with max_position_embeddings 64:
    eval scores 32-token windows unless asked for more, and then says the model never saw that context."""
    from mom.eval import evaluate
    from mom.run_folder import trained_context

    assert trained_context(run_dir=run) == trained_context(model_dir=run / "model") == 32
    m = evaluate({"run_dir": str(run), "batch_size": 4})
    assert m["seq_len"] == 32
    assert "mom.eval" in capsys.readouterr().err  # the progress bar, on stderr
    with caplog.at_level("WARNING", logger="mom.eval"):
        longer = evaluate({"run_dir": str(run), "batch_size": 4, "max_seq_length": 64}, progress=False)
    assert longer["seq_len"] == 64
    assert "longer than the 32-token windows the model was trained on" in caplog.text
    assert capsys.readouterr().err == ""


def test_eval_refuses_tokenizer_of_another_vocab(run, tmp_path):
    import shutil

    from mom.eval import EvalError, evaluate

    other = tmp_path / "model"
    shutil.copytree(run / "model", other)
    tok = train_bpe([corpus_text(3, 800)], 290, min_frequency=1)
    assert tok.get_vocab_size() != MoMConfig.load(other / "config.json").vocab_size
    save_tokenizer(tok, other / "tokenizer.json")
    with pytest.raises(EvalError, match="tokenizer .* has 2\\d\\d tokens but the model's vocab_size is"):
        evaluate({"run_dir": str(run), "model_dir": str(other), "max_seq_length": 32})


def test_block_ablation_removes_exactly_one_part(run, capsys):
    """scripts/block_ablation.py: a removed block is the model without that layer; a removed mixer and
    feed-forward leave the block adding nothing; the table has a row per (layer, part) after the full model's."""
    sys.path.insert(0, str(REPO / "scripts"))
    try:
        import block_ablation
    finally:
        sys.path.pop(0)

    model, tok = _model(run)
    ids = torch.tensor([tok.encode("ROMEO. What light through yonder window breaks").ids])
    with torch.no_grad():
        full = model(ids).logits
        block_ablation.remove(model.model.layers[1], "block")
        without_1 = model(ids).logits
        del model.model.layers[1]
        assert torch.equal(without_1, model(ids).logits)
        assert not torch.allclose(without_1, full)
        model, _ = _model(run)
        block_ablation.remove(model.model.layers[0], "mixer")
        block_ablation.remove(model.model.layers[0], "ffn")
        x = torch.randn(1, 5, model.config.hidden_size)
        assert torch.equal(model.model.layers[0](x)[0], x)
    with pytest.raises(ValueError, match="unknown part"):
        block_ablation.remove(model.model.layers[0], "router")

    assert block_ablation.main([str(run), "--parts", "block,ffn", "--layers", "0", "--batch-size", "4"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ") and "---" not in line]
    assert [r.split("|")[1].strip() for r in rows] == ["removed", "nothing", "block", "ffn"]
    full_bpb, block_bpb = float(rows[1].split("|")[3]), float(rows[2].split("|")[3])
    assert math.isfinite(full_bpb) and block_bpb != full_bpb
    assert abs(float(rows[2].split("|")[4]) - (block_bpb - full_bpb)) <= 1.5e-4  # both columns rounded
    with pytest.raises(SystemExit):  # argparse's one line for a part that does not exist
        block_ablation.main([str(run), "--parts", "router"])
    from mom.eval import EvalError

    with pytest.raises(EvalError, match="run_dir not found"):  # one line through mom.cli.one_line_errors when run as a script
        block_ablation.main([str(run.parent / "no_such_run")])


@pytest.mark.slow
def test_eval_cli_last_line_is_json(run):
    p = subprocess.run([sys.executable, "-m", "mom.eval", f"run_dir={run}", "max_seq_length=32"],
                       capture_output=True, text=True, cwd=REPO, timeout=120, env=ENV)
    assert p.returncode == 0, p.stderr
    last = json.loads(p.stdout.strip().splitlines()[-1])
    assert last["tokens"] > 0 and last["bpb"] > 0


# ----------------------------------------------------------------------------------------------- generate
def _cfg(run: Path, **kw):
    return {"run_dir": str(run), "max_new_tokens": 24, "do_sample": False, "use_cache": True, "seed": 0,
            "batch_size": 8, "stop_at_eos": True, **kw}


@pytest.mark.slow
def test_generate_cli_stdout_is_exactly_prompt_and_continuation(run, tmp_path):
    model, tok = _model(run)
    prompt = "the king café"
    ids = torch.tensor([tok.encode(prompt).ids])
    ref = model.generate(ids, max_new_tokens=24, eos_token_id=2, pad_token_id=0)
    expected = tok.decode(ref[0].tolist()) + "\n"
    assert expected.startswith(prompt)
    p = subprocess.run([sys.executable, "-m", "mom.generate", f"run_dir={run}", f"prompt='{prompt}'",
                        "max_new_tokens=24"], capture_output=True, cwd=tmp_path, timeout=120, env=ENV)
    assert p.returncode == 0, p.stderr.decode()
    assert p.stdout.decode("utf-8") == expected
    assert list(tmp_path.iterdir()) == []  # no run folder, no log file


def test_generate_streams_pieces_and_matches_model_generate(run):
    model, tok = _model(run)
    buf = io.StringIO()
    texts = generate_cfg(run, buf, prompt="a fool sang", use_cache=False, max_new_tokens=12)
    ref = model.generate(torch.tensor([tok.encode("a fool sang").ids]), max_new_tokens=12, eos_token_id=2,
                         use_cache=False)
    assert texts == [tok.decode(ref[0].tolist())]
    assert buf.getvalue() == texts[0] + "\n"


def generate_cfg(run, out, **kw):
    from mom.generate import generate_text

    return generate_text(_cfg(run, **kw), out=out)


def test_batch_with_left_padding_equals_each_prompt_alone(run):
    from mom.generate import prompt_list

    prompts = ["the king and his queen walked slowly", "日本語", "a fool sang of summer rain while"]
    buf = io.StringIO()
    batch = generate_cfg(run, buf, prompt=prompts, max_new_tokens=12)  # prompt given as a list
    assert buf.getvalue() == "".join(t + "\n" for t in batch)
    alone = [generate_cfg(run, None, prompt=p, max_new_tokens=12)[0] for p in prompts]
    assert batch == alone
    assert all(t.startswith(p) for t, p in zip(batch, prompts, strict=True))
    assert prompt_list({"prompts": prompts, "prompt": "ignored"}) == prompts


def test_sampling_is_reproducible_with_seed(run):
    kw = dict(prompt=["the garden", "rain"], do_sample=True, temperature=1.5, top_k=50, max_new_tokens=12)
    a = generate_cfg(run, None, seed=3, **kw)
    b = generate_cfg(run, None, seed=3, **kw)
    assert a == b
    c = generate_cfg(run, None, seed=4, **kw)
    assert c != a


@pytest.mark.slow
@pytest.mark.parametrize("args,message", [
    (["prompt=''"], "empty prompt"),
    (["run_dir=/nonexistent/run"], "run_dir not found"),
])
def test_generate_errors_are_one_line(run, args, message, tmp_path):
    argv = [sys.executable, "-m", "mom.generate", f"run_dir={run}", "max_new_tokens=4"] + args
    p = subprocess.run(argv, capture_output=True, text=True, cwd=tmp_path, timeout=120, env=ENV)
    assert p.returncode != 0
    assert p.stdout == ""
    err = p.stderr.strip().splitlines()
    assert len(err) == 1 and message in err[0], p.stderr
    assert "Traceback" not in p.stderr


def test_generate_errors_in_process(run, tmp_path):
    from mom.generate import generate_text
    from mom.model.generation import GenerationError

    with pytest.raises(GenerationError, match="empty prompt"):
        generate_text(_cfg(run, prompt=""), out=None)
    with pytest.raises(GenerationError, match="trained context"):
        generate_text(_cfg(run, prompt="the king " * 60), out=None)
    with pytest.raises(GenerationError, match="no model/ folder"):
        generate_text(_cfg(tmp_path, prompt="x"), out=None)
    with pytest.raises(GenerationError, match="model_dir not found"):
        generate_text(_cfg(run, model_dir=str(tmp_path / "nope"), prompt="x"), out=None)
    with pytest.raises(GenerationError, match="run_dir not found"):
        generate_text(_cfg(tmp_path / "nope", prompt="x"), out=None)


# ----------------------------------------------------------------------------------------------- prompts as typed
TYPED = ["Now is the winter of our discontent, made glorious summer", "What's in a name?",
         'He said "to be", then: x=1 [a, b] {c} ${d}', r"ROMEO:\nJULIET:", "'Hydra-quoted, still fine'"]


def test_prompt_args_are_taken_verbatim(tmp_path):
    from mom.prompts import PromptError, prompts_from_args, take_prompt_args

    rest, taken = take_prompt_args(["run_dir=r", *[f"prompt={p}" for p in TYPED], "+prompt_file=f.txt", "seed=1"])
    assert rest == ["run_dir=r", "seed=1"]
    assert [k for k, _ in taken] == ["prompt"] * len(TYPED) + ["prompt_file"]
    (tmp_path / "p.txt").write_text("line one, with a comma\nline two\n")
    (tmp_path / "p.jsonl").write_text('"first"\n{"prompt": "second, too"}\n\n{"text": "third"}\n')
    got = prompts_from_args([("prompt", p) for p in TYPED] + [("prompt_file", str(tmp_path / "p.txt")),
                                                               ("prompt_file", str(tmp_path / "p.jsonl")),
                                                               ("prompt", "-")], stdin=io.StringIO("from stdin\n"))
    assert got == [*TYPED[:3], "ROMEO:\nJULIET:", "Hydra-quoted, still fine", "line one, with a comma\nline two",
                   "first", "second, too", "third", "from stdin"]
    with pytest.raises(PromptError, match="prompt_file not found: .*nope.txt"):
        prompts_from_args([("prompt_file", str(tmp_path / "nope.txt"))])
    (tmp_path / "bad.jsonl").write_text("{oops\n")
    with pytest.raises(PromptError, match=r"bad.jsonl:1: not a JSON line"):
        prompts_from_args([("prompt_file", str(tmp_path / "bad.jsonl"))])


@pytest.mark.slow
def test_generate_cli_takes_prompts_as_typed(run, tmp_path):
    """Commas, apostrophes, quotes, colons, =, brackets, ${..} and \\n on the command line, plus a prompt file
    and stdin, all in one call: stdout is what generate_text gives for the same prompts."""
    from mom.generate import generate_text

    (tmp_path / "p.txt").write_text("the garden, at night\n")
    prompts = [*TYPED[:3], "ROMEO:\nJULIET:", "the garden, at night", "from stdin"]
    expected = generate_text(_cfg(run, max_new_tokens=3), out=None, prompts=prompts)
    work = tmp_path / "cwd"
    work.mkdir()
    argv = [sys.executable, "-m", "mom.generate", f"run_dir={run}", "max_new_tokens=3",
            *[f"prompt={p}" for p in TYPED[:4]], f"prompt_file={tmp_path / 'p.txt'}", "prompt=-"]
    p = subprocess.run(argv, input="from stdin\n", capture_output=True, text=True, cwd=work, timeout=120, env=ENV)
    assert p.returncode == 0, p.stderr
    assert p.stdout == "".join(t + "\n" for t in expected)
    assert all(t.startswith(q) for t, q in zip(expected, prompts, strict=True))
