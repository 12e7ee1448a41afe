"""mom.data at scale: sharded parallel tokenisation (same shards for any worker count), resume after a kill,
distributed reading (disjoint ranks, exact resume, every validation window once), bounded memory."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from mom.data.cache import ShardedTokens
from mom.data.datamodule import MoMDataModule
from mom.data.plays import synthetic_corpus
from mom.data.prepare import prepare_shards
from mom.data.sampling import EpochSampler, EvalSampler, ResumableDataLoader
from mom.data.sources import build_corpus
from mom.data.tokenizer import train_bpe

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("synthetic")
    synthetic_corpus(d, 600_000, n_files=3, seed=1)
    return d


@pytest.fixture(scope="module")
def tok(corpus_dir):
    docs = build_corpus({"type": "jsonl", "paths": str(corpus_dir)}).documents("train")
    return train_bpe(docs, 300, max_bytes=100_000)


def _stream(corpus_dir):
    return build_corpus({"type": "jsonl", "paths": str(corpus_dir)}, val_fraction=0.05, seed=0).stream


def _shard_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*-*.*"))}


def test_shards_same_for_any_worker_count_and_read_as_one_stream(corpus_dir, tok, tmp_path):
    kw = dict(eos_id=2, shard_bytes=150_000, task_bytes=20_000)
    one = prepare_shards(_stream(corpus_dir), tok, tmp_path / "p1", num_proc=0, **kw)
    two = prepare_shards(_stream(corpus_dir), tok, tmp_path / "p2", num_proc=2, **kw)
    assert len(one["train"]["shards"]) >= 3 and len(one["validation"]["shards"]) >= 1
    assert {s: {k: v for k, v in m.items() if k != "folder"} for s, m in one.items()} == \
        {s: {k: v for k, v in m.items() if k != "folder"} for s, m in two.items()}
    assert _shard_bytes(tmp_path / "p1") == _shard_bytes(tmp_path / "p2")
    # the shards of a split read as one token stream: documents joined by EOS, in stream order
    docs = [t for s, t in _stream(corpus_dir)() if s == "train"]
    ref = []
    for i, enc in enumerate(tok.encode_batch(docs, add_special_tokens=False)):
        ref += ([2] if i else []) + enc.ids
    meta = one["train"]
    stream = ShardedTokens([tmp_path / "p1" / s["file"] for s in meta["shards"]],
                           [s["n_tokens"] for s in meta["shards"]], meta["dtype"])
    assert len(stream) == len(ref) == meta["n_tokens"] and meta["n_docs"] == len(docs)
    assert np.array_equal(np.asarray(stream, dtype=np.int64), np.asarray(ref))
    b = int(stream.starts[1])  # a slice across a shard boundary, and single items
    assert stream[b - 5 : b + 5].tolist() == ref[b - 5 : b + 5] and int(stream[b]) == ref[b]


KILLER = textwrap.dedent("""
    import os, signal, sys
    from tokenizers import Tokenizer
    from mom.data.prepare import prepare_shards
    from mom.data.sources import build_corpus

    corpus_dir, tok_path, out, kill_after = sys.argv[1:5]
    stream = build_corpus({"type": "jsonl", "paths": corpus_dir}, val_fraction=0.05, seed=0).stream

    def dying():
        for i, item in enumerate(stream()):
            if i == int(kill_after):
                os.kill(os.getpid(), signal.SIGKILL)  # no clean-up of any kind
            yield item

    prepare_shards(dying, Tokenizer.from_file(tok_path), out, eos_id=2, shard_bytes=150_000, task_bytes=20_000)
""")


@pytest.mark.slow
def test_preparation_killed_halfway_resumes_to_the_same_shards(corpus_dir, tok, tmp_path):
    tok_path = tmp_path / "tok.json"
    tok.save(str(tok_path))
    n_docs = sum(1 for _ in _stream(corpus_dir)())
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", KILLER, str(corpus_dir), str(tok_path), str(tmp_path / "k"),
                           str(n_docs * 2 // 3)], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -9, proc.stderr
    progress = json.loads((tmp_path / "k" / "progress.json").read_text())
    assert 0 < progress["consumed"] < n_docs and progress["segments"] >= 2
    assert list((tmp_path / "k").glob(".*.tmp"))  # it died with a shard half written

    seen = []

    def counting():
        for item in _stream(corpus_dir)():
            seen.append(item)
            yield item

    kw = dict(eos_id=2, shard_bytes=150_000, task_bytes=20_000)
    resumed = prepare_shards(counting, tok, tmp_path / "k", **kw)
    fresh = prepare_shards(_stream(corpus_dir), tok, tmp_path / "f", **kw)
    assert len(seen) == n_docs  # re-read to skip, but only the rest was tokenised:
    assert resumed["train"]["n_tokens"] == fresh["train"]["n_tokens"]
    assert _shard_bytes(tmp_path / "k") == _shard_bytes(tmp_path / "f")


def test_datamodule_with_workers_and_shards_matches_in_process(corpus_dir, tmp_path):
    kw = dict(source={"type": "jsonl", "paths": str(corpus_dir)}, val_fraction=0.05,
              tokenizer={"vocab_size": 300, "max_train_bytes": 100_000}, seq_len=64, batch_size=4,
              shard_bytes=200_000)
    a = MoMDataModule(cache_dir=tmp_path / "a", num_proc=0, **kw)
    a.setup()
    b = MoMDataModule(cache_dir=tmp_path / "b", num_proc=2, **kw)
    b.setup()
    assert len(a.caches["train"].meta["shards"]) >= 2
    assert {s: c.key for s, c in a.caches.items()} == {s: c.key for s, c in b.caches.items()}
    for split in ("train", "validation"):
        ta, tb = a.caches[split].tokens, b.caches[split].tokens
        assert np.array_equal(np.asarray(ta), np.asarray(tb))
        assert np.array_equal(a.caches[split].doc_offsets, b.caches[split].doc_offsets)
    assert not list((tmp_path / "a" / "tokens").glob("*/progress.json"))
    c = MoMDataModule(cache_dir=tmp_path / "a", num_proc=2, **kw)  # the worker count is not in the key
    c.setup()
    assert not c.corpus.loaded and not any(x.built for x in c.caches.values())
    # windows that cross a shard boundary read the same as from one array
    ds, toks = a.train_dataset, np.asarray(a.caches["train"].tokens, dtype=np.int64)
    for i in (0, len(ds) // 2, len(ds) - 1):
        assert ds[i]["input_ids"].tolist() == toks[i * 63 : i * 63 + 64].tolist()


# ------------------------------------------------------------------------------------------ ranks
def test_ranks_read_disjoint_windows_in_lockstep_and_resume_exactly():
    n, world, bs = 103, 2, 4
    data = torch.arange(n)

    def loader(rank, seed=5):
        return ResumableDataLoader(data, batch_size=bs, drop_last=True,
                                   sampler=EpochSampler(n, seed=seed, rank=rank, world_size=world))

    for epoch in (0, 1):
        per_rank = []
        for rank in range(world):
            ld = loader(rank)
            ld.sampler.set_epoch(epoch)
            per_rank.append([b.tolist() for b in ld])
        a, b = ([i for batch in r for i in batch] for r in per_rank)
        assert len(per_rank[0]) == len(per_rank[1]) == (n // world) // bs  # lockstep
        assert not set(a) & set(b) and len(set(a)) == len(a)  # disjoint, no repeats
        # the same order for a given seed and world size; another seed, another order
        assert per_rank[0] == [x.tolist() for x in loader(0) if epoch == 0] or epoch == 1
    full = EpochSampler(n, seed=5).global_order(0).tolist()
    assert list(EpochSampler(n, seed=5, rank=1, world_size=2)) == full[: n - n % 2][1::2]
    assert list(EpochSampler(n, seed=6, rank=0, world_size=2)) != list(EpochSampler(n, seed=5, rank=0, world_size=2))
    # exact mid-epoch resume on every rank from the state rank 0 saves
    ref = {r: [b.tolist() for b in loader(r)] for r in range(world)}
    first = loader(0)
    it = iter(first)
    for _ in range(3):
        next(it)
    state = first.state_dict()
    for r in range(world):
        resumed = loader(r)
        resumed.load_state_dict(state)
        assert [b.tolist() for b in resumed] == ref[r][3:]
    with pytest.raises(ValueError, match="rank 2 outside world_size 2"):
        EpochSampler(n, rank=2, world_size=2)


def test_validation_windows_counted_exactly_once_across_ranks():
    n = 11
    for world in (1, 2, 3, 4):
        seen = [i for r in range(world) for i in EvalSampler(n, rank=r, world_size=world)]
        assert sorted(seen) == list(range(n))  # no window padded in twice, none missing
        assert sum(len(EvalSampler(n, rank=r, world_size=world)) for r in range(world)) == n


@pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")
def test_lightning_keeps_our_samplers_under_ddp(corpus_dir, tmp_path):
    """Lightning wraps a plain sampler in DistributedSamplerWrapper (losing its resume state) and pads
    validation; ours are DistributedSamplers, so it keeps them, and the module shards by the Trainer's rank."""
    import lightning as L
    from lightning.pytorch.strategies import DDPStrategy
    from lightning.pytorch.trainer.states import RunningStage

    trainer = L.Trainer(accelerator="cpu", devices=2, strategy=DDPStrategy(process_group_backend="gloo"),
                        logger=False, enable_checkpointing=False)
    dm = MoMDataModule(source={"type": "jsonl", "paths": str(corpus_dir)}, val_fraction=0.05,
                       tokenizer={"vocab_size": 300, "max_train_bytes": 100_000}, seq_len=64, batch_size=4,
                       cache_dir=tmp_path, num_proc=0)
    dm.setup()
    dm.trainer = trainer
    trainer.strategy.cluster_environment.set_global_rank(1)  # as rank 1 sees it (no process group needed)
    train, val = dm.train_dataloader(), dm.val_dataloader()
    assert (train.sampler.rank, train.sampler.num_replicas) == (1, 2) and (val.sampler.rank, val.sampler.num_replicas) == (1, 2)
    connector = trainer._data_connector
    assert connector._prepare_dataloader(train, shuffle=True, mode=RunningStage.TRAINING) is train
    assert connector._prepare_dataloader(val, shuffle=False, mode=RunningStage.VALIDATING) is val
    assert len(list(val.sampler)) == len(dm.val_dataset) // 2


# ------------------------------------------------------------------------------------------ memory
BOUNDED = textwrap.dedent("""
    import os, resource, sys, time
    import lightning as L, torch
    from mom.data.datamodule import MoMDataModule

    big, small, cache, budget = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])

    class Bigram(L.LightningModule):
        def __init__(self, vocab):
            super().__init__()
            self.emb = torch.nn.Embedding(vocab, vocab)
        def training_step(self, batch, i):
            x = batch["input_ids"]
            return torch.nn.functional.cross_entropy(self.emb(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten())
        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    def fit(paths, steps):
        dm = MoMDataModule(source={"type": "jsonl", "paths": paths}, val_fraction=0.01, num_proc=0,
                           tokenizer={"path": cache + "/tok.json"}, seq_len=256, batch_size=2,
                           shard_bytes=1_000_000, cache_dir=cache)
        dm.prepare_data(); dm.setup()
        L.Trainer(accelerator="cpu", max_steps=steps, logger=False, enable_checkpointing=False,
                  enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0).fit(
                      Bigram(dm.vocab_size), datamodule=dm)
        return dm

    fit(small, 2)  # warm up: every library, thread and allocator pool in place
    vm_data = int(next(l.split()[1] for l in open("/proc/self/status") if l.startswith("VmData"))) * 1024
    resource.setrlimit(resource.RLIMIT_DATA, (vm_data + budget, vm_data + budget))
    dm = fit(big, 3)
    print("TEXT_BYTES", dm.train_bytes + dm.val_bytes, "BUDGET", budget, "SHARDS", len(dm.caches["train"].meta["shards"]))
""")


@pytest.mark.slow
def test_corpus_larger_than_the_memory_budget_prepares_and_trains(tmp_path):
    """RLIMIT_DATA (heap and other private writable memory; the memory-mapped shards are not counted) set to
    the warmed-up process plus 12 MB, then a 13.4 MB corpus is tokenised and trained on. The code this replaced
    held ~7 bytes per byte of text."""
    synthetic_corpus(tmp_path / "big", 14_000_000, n_files=4, seed=2)  # ~13.4 MB of text once JSON-decoded
    small = synthetic_corpus(tmp_path / "small", 50_000, n_files=1, seed=3)
    tok = train_bpe((json.loads(line)["text"] for line in open(small[0])), 300)
    (tmp_path / "cache").mkdir()
    tok.save(str(tmp_path / "cache" / "tok.json"))
    budget = 12 << 20
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TOKENIZERS_PARALLELISM": "false", "MALLOC_ARENA_MAX": "1"}
    proc = subprocess.run([sys.executable, "-c", BOUNDED, str(tmp_path / "big"), str(tmp_path / "small"),
                           str(tmp_path / "cache"), str(budget)], env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    fields = proc.stdout.split()
    text_bytes, shards = int(fields[fields.index("TEXT_BYTES") + 1]), int(fields[fields.index("SHARDS") + 1])
    assert text_bytes > budget and shards >= 5


# ------------------------------------------------------------------------------------------ rank-0 preparation
def test_only_local_rank_0_prepares_the_others_wait(tmp_path, monkeypatch):
    import threading

    import mom.data.datamodule as dmod

    ranks = {}  # thread -> local rank it plays
    monkeypatch.setattr(dmod, "local_rank", lambda: ranks.get(threading.current_thread().name, 0))
    synthetic_corpus(tmp_path / "c", 100_000, n_files=1, seed=4)
    kw = dict(source={"type": "jsonl", "paths": str(tmp_path / "c")}, val_fraction=0.05,
              tokenizer={"vocab_size": 300, "max_train_bytes": 100_000}, seq_len=64, batch_size=4,
              cache_dir=tmp_path / "cache", num_proc=0)
    other = MoMDataModule(**kw)
    ranks["rank1"] = 1
    t = threading.Thread(target=other.setup, name="rank1")
    t.start()
    t.join(timeout=1.0)
    assert t.is_alive() and not other.corpus.loaded  # waiting for rank 0, reading nothing
    zero = MoMDataModule(**kw)
    zero.setup()
    t.join(timeout=60)
    assert not t.is_alive()
    assert not other.corpus.loaded and {s: c.key for s, c in other.caches.items()} == \
        {s: c.key for s, c in zero.caches.items()}
    assert len(other.train_dataset) == len(zero.train_dataset)
    monkeypatch.setattr(dmod, "local_rank", lambda: 1)
    lonely = MoMDataModule(**{**kw, "cache_dir": tmp_path / "empty"})
    monkeypatch.setenv("MOM_DATA_WAIT_S", "0.2")
    with pytest.raises(dmod.DataError, match="waiting for local rank 0 to prepare the tokenizer"):
        lonely.prepare_data()
