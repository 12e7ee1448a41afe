"""lm-evaluation-harness: the ``mom`` harness model, the offline tasks, mom.eval's and mom.train's ``harness``.

Everything runs the real harness (lm_eval.simple_evaluate, its task loader and metrics) on a tiny model that
mom.train trained for two steps, which also ran ``eval.harness`` at its end. Offline only: the tasks are built
from the embedded corpus and loaded from local JSON-lines files.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import pytest
import torch

from tests.helpers.overrides import tiny_overrides

pytest.importorskip("lm_eval")

from lm_eval.api.instance import Instance  # noqa: E402

from mom.harness import HarnessError  # noqa: E402
from mom.harness.lm import MoMLM  # noqa: E402
from mom.harness.tasks import CHOICES, CONTEXT_LINES, next_line_questions, offline_task_dir  # noqa: E402


@pytest.fixture(scope="module")
def trained_run(compose, train_fn, tmp_path_factory) -> Path:
    """A two-step tiny run whose training ended with ``eval.harness`` on 4 multiple-choice questions."""
    run = tmp_path_factory.mktemp("harness") / "run"
    train_fn(compose(tiny_overrides(run) + ["trainer.max_steps=2", "final_validate=false",
                                           "eval.harness.tasks=[shakespeare_next_line]", "eval.harness.limit=4"]))
    return run


@pytest.fixture(scope="module")
def lm(trained_run) -> MoMLM:
    return MoMLM(run_dir=str(trained_run), batch_size=3)


def _req(kind: str, *args) -> Instance:
    return Instance(request_type=kind, doc={}, arguments=tuple(args), idx=0)


# ------------------------------------------------------------------------------------------ offline tasks
def test_next_line_questions_are_well_formed():
    text = "\n".join(f"line number {i} of this little play" if i % 3 else "SPEAKER" for i in range(200)) + "\n"
    qs = next_line_questions("demo", text, n=20)
    assert len(qs) == 20 and qs == next_line_questions("demo", text, n=20)  # deterministic
    lines = text.split("\n")
    for q in qs:
        truth = lines[q["line"]]
        assert q["choices"][q["label"]] == truth and len(set(q["choices"])) == CHOICES
        assert q["context"] == "\n".join(lines[q["line"] - CONTEXT_LINES : q["line"]]) + "\n"
        assert not any(c in q["context"].split("\n") for c in q["choices"])  # no distractor from the context
    assert len({q["label"] for q in qs}) > 1  # the answer is not always in one place


def test_offline_tasks_built_once(trained_run):
    d = offline_task_dir()  # built by the training run's eval.harness
    stamp = (d / "shakespeare_next_line.yaml").stat().st_mtime_ns
    assert offline_task_dir() == d and (d / "shakespeare_next_line.yaml").stat().st_mtime_ns == stamp
    assert not [p for p in d.parent.iterdir() if p.name.startswith(".tasks-")]  # no temporary folder left
    rows = [json.loads(x) for x in (d / "shakespeare_ppl.jsonl").read_text().splitlines()]
    assert len(rows) == 5 and rows[0]["play"].endswith("a-midsummer-night-s-dream")
    assert len((d / "shakespeare_next_line.jsonl").read_text().splitlines()) == 1000


# ------------------------------------------------------------------------------------------ the harness model
def test_loglikelihood_batched_equals_one_by_one(trained_run, lm):
    reqs = [_req("loglikelihood", "HAMLET\nTo be, or not to be:", " that is the question"),
            _req("loglikelihood", "Now, fair Hippolyta,", " our nuptial hour"),
            _req("loglikelihood", "", "Draws on apace; four happy days bring in"),
            _req("loglikelihood", "O", "!"),
            _req("loglikelihood", "A much longer context that spans a good many tokens of text " * 3, " and ends")]
    batched = lm.loglikelihood(reqs, disable_tqdm=True)
    single = MoMLM(run_dir=str(trained_run), batch_size=1).loglikelihood(reqs, disable_tqdm=True)
    for (a, ga), (b, gb) in zip(batched, single, strict=True):
        assert a < 0 and a == pytest.approx(b, rel=1e-5, abs=1e-5) and ga == gb


def test_loglikelihood_is_the_eval_mode_forward(lm):
    ctx, cont = "Now, fair Hippolyta,", " our nuptial hour"
    (ll, greedy), = lm.loglikelihood([_req("loglikelihood", ctx, cont)], disable_tqdm=True)
    whole, c = lm.tok_encode(ctx + cont), len(lm.tok_encode(ctx))
    with torch.no_grad():
        logp = torch.log_softmax(lm.model(torch.tensor([whole])).logits[0].float(), -1)
    ref = sum(float(logp[i - 1, whole[i]]) for i in range(c, len(whole)))
    assert ll == pytest.approx(ref, abs=1e-4)
    assert not lm.model.training


def test_rolling_scores_every_token_once(trained_run, lm):
    text = "Four days will quickly steep themselves in night;\nFour nights will quickly dream away the time;\n"
    toks = lm.tok_encode(text)
    with torch.no_grad():  # one window: EOS then the text, every token predicted
        ids = torch.tensor([[lm.eot_token_id] + toks])
        logp = torch.log_softmax(lm.model(ids).logits[0].float(), -1)
    full = sum(float(logp[i, t]) for i, t in enumerate(toks))
    assert lm.loglikelihood_rolling([_req("loglikelihood_rolling", text)], disable_tqdm=True)[0] == pytest.approx(full, abs=1e-4)
    # windows of 8 tokens: the same tokens scored with less context (worse, and finite)
    short = MoMLM(run_dir=str(trained_run), max_length=8).loglikelihood_rolling([_req("loglikelihood_rolling", text)],
                                                                                disable_tqdm=True)[0]
    assert len(toks) > 16 and short != pytest.approx(full, abs=1e-3) and short < 0


def test_generate_until_stops_at_the_stop_sequence(lm):
    prompt = "HERMIA\nI do entreat your grace to pardon me.\n"
    ids = torch.tensor([lm.tok_encode(prompt)])
    ref_ids = lm.model.generate(ids, max_new_tokens=12, eos_token_id=lm.eot_token_id)[0, ids.shape[1]:].tolist()
    ref = lm.tok_decode([t for t in ref_ids if t != lm.eot_token_id])
    assert len(ref) > 4
    stop = ref[len(ref) // 2 : len(ref) // 2 + 2]
    out = lm.generate_until([_req("generate_until", prompt, {"until": [stop], "max_gen_toks": 12, "do_sample": False}),
                             _req("generate_until", prompt, {"until": ["\x00"], "max_gen_toks": 3})], disable_tqdm=True)
    assert out[0] == ref.split(stop)[0] and stop not in out[0]
    assert out[1] == lm.tok_decode(ref_ids[:3])  # the token budget


def test_packed_model_scores_like_the_trained_one(trained_run, lm):
    pytest.importorskip("mom.model.packed")
    from mom.export import export

    export({"run_dir": str(trained_run), "format": "packed"}, out=io.StringIO())
    packed = MoMLM(pretrained=str(trained_run / "model-packed"))
    reqs = [_req("loglikelihood", "To be, or not to be:", " that is the question")]
    assert packed.loglikelihood(reqs, disable_tqdm=True)[0][0] == pytest.approx(
        lm.loglikelihood(reqs, disable_tqdm=True)[0][0], rel=1e-3)


def test_bad_model_args_are_one_line(tmp_path):
    with pytest.raises(HarnessError, match="run_dir not found"):
        MoMLM(run_dir=str(tmp_path / "nope"))
    with pytest.raises(HarnessError, match="give run_dir"):
        MoMLM()


# ------------------------------------------------------------------------------------------ entry points
def test_training_ran_the_harness_and_logged_it(trained_run):
    saved = json.loads((trained_run / "harness" / "model.json").read_text())
    entry = saved["tasks"]["shakespeare_next_line"]
    assert entry["n-samples"]["effective"] == 4 and 0.0 <= entry["metrics"]["acc"] <= 1.0
    with open(trained_run / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("harness/shakespeare_next_line/acc")]
    assert len(rows) == 1 and float(rows[0]["harness/shakespeare_next_line/acc"]) == entry["metrics"]["acc"]
    assert rows[0]["step"] == "2"


def test_mom_eval_prints_the_table_then_json_and_saves(compose, trained_run):
    from mom.eval import evaluate

    cfg = compose(["run_dir=" + str(trained_run), "harness=shakespeare", "harness.limit=2"], config_name="eval")
    assert list(cfg.harness.tasks) == ["shakespeare_next_line", "shakespeare_ppl"]  # the preset
    cfg.harness.tasks = ["shakespeare_next_line"]
    out = io.StringIO()
    summary = evaluate(cfg, out=out)
    lines = out.getvalue().rstrip("\n").split("\n")
    assert lines[0].startswith("|") and "Tasks" in lines[0] and "Metric" in lines[0]
    assert any(line.startswith("|shakespeare_next_line") for line in lines)
    assert json.loads(lines[-1]) == summary
    assert set(summary) == {"shakespeare_next_line"} and set(summary["shakespeare_next_line"]) >= {"acc", "acc_norm"}
    saved = json.loads((trained_run / "harness" / "model.json").read_text())["tasks"]
    assert saved["shakespeare_next_line"]["n-samples"]["effective"] == 2  # replaced by the newer run
    assert saved["shakespeare_next_line"]["metrics"] == summary["shakespeare_next_line"]


def test_ppl_bits_per_byte_agree_with_mom_eval(compose, trained_run, tmp_path):
    """The same play through the harness (rolling windows of 64 tokens) and through mom.eval (windows of 65).

    Identical windows except the ends: the harness conditions the first token on EOS and scores the tail,
    mom.eval leaves the first token unscored and drops the last partial window."""
    from mom.eval import evaluate

    play = json.loads((offline_task_dir() / "shakespeare_ppl.jsonl").read_text().splitlines()[0])["text"]
    (tmp_path / "play.txt").write_text(play, encoding="utf-8")
    harness = evaluate(compose(["run_dir=" + str(trained_run), "harness.tasks=[shakespeare_ppl]", "harness.limit=1",
                                "harness.max_length=64", "harness.batch_size=32"], config_name="eval"))
    ours = evaluate(compose(["run_dir=" + str(trained_run), "data=text", f"data.source.paths=[{tmp_path / 'play.txt'}]",
                             f"data.source.val_paths=[{tmp_path / 'play.txt'}]", "max_seq_length=65", "batch_size=32"],
                            config_name="eval"))
    assert set(harness["shakespeare_ppl"]) == {"word_perplexity", "byte_perplexity", "bits_per_byte"}
    bpb = harness["shakespeare_ppl"]["bits_per_byte"]
    assert bpb == pytest.approx(ours["bpb"], rel=0.01)
    assert harness["shakespeare_ppl"]["byte_perplexity"] == pytest.approx(2 ** bpb, rel=1e-6)
    assert ours["bytes"] == pytest.approx(len(play.encode()), rel=0.01)
