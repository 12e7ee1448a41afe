"""Selective language modelling (Rho-1): token selection, reference scoring (``mom.score``), ``slm=rho``
training, the document filter, on tiny in-process runs over the noisy demo corpus (``data=noisy_shakespeare``).

The module's reference is a jamba_tiny-sized model trained for a few seconds on one *clean* play (train play 1);
the noisy corpus is train play 0 with about a third of its lines corrupted (shuffled words, boilerplate, random
characters).
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.helpers.overrides import TINY_RUN, small_model_overrides

SEQ = 32
NOISY = ["data.source.first_play=0", "data.source.plays=1", "data.source.max_docs=40"]
CLEAN_REF = ["data.source.first_play=1", "data.source.plays=1", "data.source.doc_frac=0.0", "data.source.background=0.0"]


def _run_overrides(run_dir: Path, extra: list[str]) -> list[str]:
    base = [o for o in TINY_RUN if not o.startswith("data=")]
    return (["model=jamba_tiny", "precision=bf16", "data=noisy_shakespeare", *small_model_overrides(), *base,
             "callbacks.rich_progress_bar=null", f"paths.run_dir={run_dir}"] + extra)


def _data_cfg(compose, ref_dir: Path, extra: list[str] = ()) -> dict:
    from mom.config import to_plain

    cfg = compose(_run_overrides(Path("/tmp/unused"), NOISY + [f"data.tokenizer.path={ref_dir / 'model' / 'tokenizer.json'}",
                                                          f"data.seq_len={SEQ}", *extra]))
    return to_plain(cfg.data)


# ---------------------------------------------------------------------------------------------- selection
@pytest.mark.parametrize("ratio", [0.0, 0.1, 0.6, 0.999, 1.0])
def test_select_tokens_keeps_exactly_the_share(ratio):
    from mom.slm import select_tokens

    g = torch.Generator().manual_seed(0)
    for trial in range(5):
        excess = torch.randn(4, 57, generator=g)
        valid = torch.rand(4, 57, generator=g) > 0.3  # ~30% ignore_index targets
        if trial == 0:
            excess[0, :5] = excess[0, 5]  # ties
        mask = select_tokens(excess, valid, ratio)
        n_valid = int(valid.sum())
        expect = max(1, math.floor(ratio * n_valid + 0.5)) if ratio > 0 else 0
        assert int(mask.sum()) == expect
        assert not (mask & ~valid).any()  # an ignored token is never kept
        if 0 < expect < n_valid:  # the kept ones are the largest excess losses
            assert excess[mask].min() >= excess[valid & ~mask].max()


def test_selective_loss_averages_the_kept_tokens_only():
    from mom.slm import selective_loss

    torch.manual_seed(0)
    token_loss = torch.rand(3, 20, requires_grad=True)
    ref = torch.rand(3, 20)
    valid = torch.ones(3, 20, dtype=torch.bool)
    valid[2, 10:] = False
    sel = selective_loss(token_loss, ref, valid, 0.6)
    assert int(sel.mask.sum()) == round(0.6 * 50)
    assert torch.allclose(sel.loss, token_loss[sel.mask].mean())
    sel.loss.backward()
    assert (token_loss.grad[~sel.mask] == 0).all() and (token_loss.grad[sel.mask] > 0).all()
    assert sel.stats["slm_selected_frac"].item() == pytest.approx(0.6)
    assert sel.stats["slm_excess_q10"] <= sel.stats["slm_excess_q50"] <= sel.stats["slm_excess_q90"]


# ---------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def ref_run(compose, train_fn, tmp_path_factory):
    """A tiny reference trained briefly on one clean play (its own 512-token BPE)."""
    run = tmp_path_factory.mktemp("slm") / "ref"
    cfg = compose(_run_overrides(run, CLEAN_REF + [
        "data.seq_len=64", "data.batch_size=8", "trainer.max_steps=40", "trainer.val_check_interval=40",
        "trainer.limit_val_batches=1", "trainer.log_every_n_steps=20", "optimizer.lr=3e-3", "scheduler.warmup_steps=5",
        "callbacks.model_checkpoint.every_n_train_steps=40"]))
    train_fn(cfg)
    assert (run / "model" / "tokenizer.json").is_file()
    return run


@pytest.fixture(scope="module")
def scored(compose, ref_run):
    """mom.score of the noisy documents with the reference (the train split)."""
    from mom.score import score

    return score({"ref_run": str(ref_run), "data": _data_cfg(compose, ref_run), "splits": ["train"],
                  "batch_size": 64})


def _token_cache(compose, ref_run, split="train"):
    from mom.data.datamodule import build_datamodule

    dm = build_datamodule(_data_cfg(compose, ref_run), tokenizer_dir=None)
    return dm, dm._get_cache(split)


# ---------------------------------------------------------------------------------------------- scoring
def test_score_is_aligned_with_the_cache(compose, ref_run, scored):
    from mom.data.ref_losses import document_losses
    from mom.model import MoMForCausalLM

    store = scored["train"]["store"]
    dm, cache = _token_cache(compose, ref_run)
    tokens = cache.tokens
    assert store.n_targets == cache.n_tokens - 1 and store.seq_len == SEQ
    assert store.meta["cache_key"] == cache.key
    model = MoMForCausalLM.from_pretrained(ref_run / "model").eval()
    stride = SEQ - 1
    n = cache.n_tokens
    positions = [0, 1, stride - 1, stride, 5 * stride + 7, n // 2, (n - 1) // stride * stride - 1, n - 2]
    for j in positions:  # value j = NLL of token j+1 given its window's tokens up to j
        start = (j // stride) * stride
        ids = torch.from_numpy(tokens[start : j + 2].astype(np.int64))[None]
        with torch.no_grad():
            logp = torch.log_softmax(model(ids).logits[0, -2].float(), -1)
        direct = -logp[int(tokens[j + 1])].item()
        assert float(store.losses[j]) == pytest.approx(direct, rel=2e-3, abs=2e-3), j
    docs = cache.doc_offsets
    means = document_losses(np.asarray(store.losses, dtype=np.float64), docs)
    np.testing.assert_allclose(store.doc_losses, means, rtol=1e-3)  # the doc means come from float32 losses
    d = 3
    np.testing.assert_allclose(store.doc_losses[d], np.asarray(store.losses[docs[d] - 1 : docs[d + 1] - 1],
                                                               dtype=np.float64).mean(), rtol=1e-3)


def test_score_refuses_a_different_tokenizer(compose, ref_run):
    from mom.score import score
    from mom.slm import SlmError

    data = _data_cfg(compose, ref_run, ["data.tokenizer.path=null", "data.tokenizer.vocab_size=400"])
    with pytest.raises(SlmError) as e:
        score({"ref_run": str(ref_run), "data": data, "splits": ["train"]})
    msg = str(e.value)
    assert "different tokenizer" in msg and "data.tokenizer.path=" in msg and "\n" not in msg


def test_selection_prefers_clean_tokens(compose, ref_run, scored):
    """With the clean-text reference, Rho-1 keeps corrupted tokens less often than clean ones.

    The current model is a fresh initialisation (its loss is nearly flat), so the selection mostly follows the
    reference: the test fails if the reference does not find the corrupted lines harder than the clean ones.
    """
    from mom.config import model_config
    from mom.data.noisy import noisy_documents
    from mom.model import MoMForCausalLM
    from mom.slm import select_tokens

    dm, cache = _token_cache(compose, ref_run)
    tok = dm._get_tokenizer()
    docs, spans = noisy_documents({"first_play": 0, "plays": 1, "max_docs": 40})
    corrupt = np.zeros(cache.n_tokens, dtype=bool)
    for d, (text, sp) in enumerate(zip(docs, spans, strict=True)):
        enc = tok.encode(text, add_special_tokens=False)
        start = int(cache.doc_offsets[d])
        assert np.array_equal(cache.tokens[start : start + len(enc.ids)], enc.ids)
        for t, (a, b) in enumerate(enc.offsets):
            corrupt[start + t] = any(a < e and s < b for s, e in sp)
    assert 0.2 < corrupt.mean() < 0.5

    store = scored["train"]["store"]
    cfg = compose(_run_overrides(Path("/tmp/unused"), []))
    torch.manual_seed(0)
    model = MoMForCausalLM(model_config(cfg.model, cfg.precision, vocab_size=512)).eval()
    stride = SEQ - 1
    kept = {True: 0, False: 0}
    total = {True: 0, False: 0}
    n_windows = (cache.n_tokens - 1) // stride
    for b0 in range(0, min(n_windows, 256), 16):  # 16 batches of 16 windows
        idx = torch.arange(b0, min(b0 + 16, n_windows))
        ids = torch.from_numpy(np.stack([cache.tokens[i * stride : i * stride + SEQ] for i in idx]).astype(np.int64))
        with torch.no_grad():
            cur = model(ids, labels=ids).token_loss
        ref = store.window_losses(idx, SEQ)
        mask = select_tokens(cur - ref, torch.ones_like(cur, dtype=torch.bool), 0.6).numpy()
        flags = np.stack([corrupt[i * stride + 1 : i * stride + SEQ] for i in idx.tolist()])
        for f in (True, False):
            kept[f] += int(mask[flags == f].sum())
            total[f] += int((flags == f).sum())
    rate_corrupt, rate_clean = kept[True] / total[True], kept[False] / total[False]
    print(f"\n[rho selection] clean tokens kept {rate_clean:.3f}, corrupted tokens kept {rate_corrupt:.3f}")
    assert rate_clean > rate_corrupt + 0.05, (rate_clean, rate_corrupt)


# ---------------------------------------------------------------------------------------------- training
def _rho_overrides(run, ref_run, extra=()):
    return _run_overrides(run, NOISY + [f"data.tokenizer.path={ref_run / 'model' / 'tokenizer.json'}",
                                        f"data.seq_len={SEQ}", "data.batch_size=4", "slm=rho",
                                        f"slm.ref_run={ref_run}", "save_model=false", *extra])


def test_rho_trains_and_logs_selected_frac(compose, train_fn, ref_run, scored, tmp_path):
    run = tmp_path / "rho"
    metrics = train_fn(compose(_rho_overrides(run, ref_run, ["trainer.max_steps=4"])))
    assert metrics["step"] == 4
    n_targets = 4 * (SEQ - 1)
    assert metrics["train/slm_selected_frac"] == pytest.approx(0.6, abs=1.0 / n_targets)
    assert math.isfinite(metrics["val/loss"]) and math.isfinite(metrics["val/bpb"])
    with open(run / "metrics.csv", newline="") as f:
        cols = set(next(csv.DictReader(f)))
    for col in ("train/slm_selected_frac", "train/slm_excess_mean", "train/slm_excess_q50", "train/slm_ref_loss",
                "train/slm_full_lm_loss"):
        assert col in cols, (col, sorted(cols))


def test_rho_online_matches_precomputed_reference(compose, ref_run, scored):
    """The batch's stored losses (looked up by its window index) equal the reference run on the batch."""
    from mom.config import to_plain
    from mom.data.datamodule import build_datamodule
    from mom.lit import MoMLitModule

    cfg = compose(_rho_overrides(Path("/tmp/unused"), ref_run))
    dm = build_datamodule(cfg.data, tokenizer_dir=None)
    dm.prepare_data()
    dm.setup("fit")
    lits = {}
    for mode in ("precomputed", "online"):
        slm = {**to_plain(cfg.slm), "reference": mode}
        lit = MoMLitModule(model=to_plain(cfg.model), precision=to_plain(cfg.precision),
                           optimizer=to_plain(cfg.optimizer), scheduler=to_plain(cfg.scheduler),
                           vocab_size=dm.vocab_size, slm=slm)
        lit.selection.attach(dm)
        lits[mode] = lit
    batch = next(iter(dm.train_dataloader()))
    pre, online = (lits[m].selection.reference_losses(batch) for m in ("precomputed", "online"))
    assert pre.shape == online.shape == (4, SEQ - 1)
    torch.testing.assert_close(pre, online, rtol=2e-3, atol=2e-3)
    res = lits["online"].compute_loss(batch)
    assert int(res["slm_mask"].sum()) == round(0.6 * 4 * (SEQ - 1))


def test_rho_without_scores_is_a_clear_error(compose, train_fn, ref_run, tmp_path):
    from mom.slm import SlmError

    with pytest.raises(SlmError, match="python -m mom.score"):
        train_fn(compose(_rho_overrides(tmp_path / "r", ref_run, ["data.seq_len=24", "trainer.max_steps=1"])))


def test_document_filter_keeps_the_quantile_range(compose, ref_run, scored):
    from mom.data.datamodule import build_datamodule
    from mom.data.noisy import noisy_documents

    flt = f"data.filter={{ref_run: '{ref_run}', min_quantile: 0.0, max_quantile: 0.5}}"
    dm = build_datamodule(_data_cfg(compose, ref_run, [flt]), tokenizer_dir=None)
    dm.prepare_data()
    base = scored["train"]["store"]
    kept = dm.caches["train"]
    doc_losses = base.doc_losses
    n = len(doc_losses)
    assert kept.meta["kept_docs"] == kept.n_docs and abs(kept.n_docs - n / 2) <= 1
    assert dm.caches["validation"].n_docs == 5  # validation is never filtered
    docs, spans = noisy_documents({"first_play": 0, "plays": 1, "max_docs": 40})
    noisy = np.array([sum(e - s for s, e in sp) / max(len(t), 1) for t, sp in zip(docs, spans, strict=True)])
    keep = doc_losses <= np.quantile(doc_losses, 0.5)
    assert noisy[keep].mean() < noisy[~keep].mean()  # the filter drops the noisier documents


@pytest.mark.slow
def test_score_cli_scores_and_refuses_in_one_line(ref_run, python_env, tmp_path):
    """``python -m mom.score``: scores (or reuses the stored losses) and refuses another tokenizer with one line."""
    import subprocess

    from tests.helpers import PYTHON

    base = [PYTHON, "-m", "mom.score", f"ref_run={ref_run}", "data=noisy_shakespeare", *NOISY,
            f"data.seq_len={SEQ}", "splits=[train]"]
    ok = subprocess.run(base + [f"data.tokenizer.path={ref_run / 'model' / 'tokenizer.json'}"], env=python_env,
                        cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert '"train"' in ok.stdout.strip().splitlines()[-1]
    bad = subprocess.run(base + ["data.tokenizer.vocab_size=400"], env=python_env, cwd=tmp_path,
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0
    last = bad.stderr.strip().splitlines()[-1]
    assert last.startswith("error:") and "different tokenizer" in last, bad.stderr[-2000:]
    assert "Traceback" not in bad.stderr
