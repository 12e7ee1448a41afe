"""Which windows each process reads, in which order, and how a run resumes mid-epoch.

Training (:class:`EpochSampler`): one permutation of all windows per (seed, epoch), cut to a multiple of the
world size; rank ``r`` of ``W`` reads positions ``r, r + W, r + 2W, ...`` of it. The ranks' windows are
disjoint, every rank gets the same count (so they step in lockstep), and the order depends only on the seed,
the epoch and the world size. DataLoader workers split a rank's batches between them (the sampler runs in the
loader's main process), so no two workers read the same window either.

Validation (:class:`EvalSampler`): rank ``r`` reads windows ``r, r + W, ...`` in order, with no padding, so
summed over ranks every window is scored exactly once (Lightning's own ``DistributedSampler`` repeats windows
to even out the ranks).

Both subclass ``torch.utils.data.DistributedSampler``, so Lightning keeps them as they are rather than wrapping
them in its ``DistributedSamplerWrapper`` (which would lose the resume state). :class:`ResumableDataLoader`
carries ``state_dict``/``load_state_dict``, which Lightning saves in checkpoints.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch.utils.data import DataLoader, DistributedSampler


class EpochSampler(DistributedSampler):
    """This rank's indices of a (seed, epoch)-seeded permutation of 0..n-1 (or 0..n-1 in order).

    ``set_epoch`` (Lightning calls it every epoch) picks the permutation; ``skip`` drops the first k of this
    rank's indices of the next iteration only when that iteration is the given epoch (mid-epoch resume).
    """

    def __init__(self, n: int, seed: int = 0, shuffle: bool = True, rank: int = 0, world_size: int = 1):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world_size {world_size}")
        self.n, self.seed, self.shuffle = int(n), int(seed), bool(shuffle)
        self.rank, self.num_replicas = int(rank), int(world_size)
        self.drop_last = True
        self.epoch = 0
        self._skip: tuple[int, int] | None = None  # (epoch, n_indices)

    @property
    def world_size(self) -> int:
        return self.num_replicas

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def skip(self, epoch: int, n_indices: int) -> None:
        self._skip = (int(epoch), int(n_indices))

    def global_order(self, epoch: int | None = None) -> torch.Tensor:
        epoch = self.epoch if epoch is None else epoch
        if not self.shuffle:
            return torch.arange(self.n)
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.n, generator=g)

    def order(self, epoch: int | None = None) -> torch.Tensor:
        """This rank's indices for ``epoch`` (default: the current one)."""
        full = self.global_order(epoch)[: len(self) * self.num_replicas]
        return full[self.rank :: self.num_replicas]

    def __iter__(self) -> Iterator[int]:
        start = 0
        if self._skip is not None:
            if self._skip[0] == self.epoch:
                start = self._skip[1]
            self._skip = None
        for chunk in self.order()[start:].split(4096):  # not one Python int per window at once
            yield from chunk.tolist()

    def __len__(self) -> int:
        return self.n // self.num_replicas


class EvalSampler(DistributedSampler):
    """Windows ``rank, rank + W, ...`` in order, unpadded: every window once over all ranks."""

    def __init__(self, n: int, rank: int = 0, world_size: int = 1):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world_size {world_size}")
        self.n, self.rank, self.num_replicas = int(n), int(rank), int(world_size)
        self.shuffle, self.drop_last, self.epoch, self.seed = False, False, 0, 0

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, self.n, self.num_replicas))

    def __len__(self) -> int:
        return len(range(self.rank, self.n, self.num_replicas))


class ResumableDataLoader(DataLoader):
    """A DataLoader with ``state_dict``/``load_state_dict`` (Lightning checkpoints them).

    The state is (epoch, batches consumed) with consumed = yielded - ``prefetch``. Lightning (2.6) does
    not prefetch from a loader that has a length, so 0 is right there; a consumer that pulls k batches
    ahead passes k. Resuming skips indices in the :class:`EpochSampler`, so skipped windows are never
    read. Every rank consumes the same number of batches, so rank 0's state (the one Lightning saves) is
    every rank's. Checked against Lightning: a fit resumed from a mid-epoch checkpoint sees the same
    batches as the uninterrupted fit.
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


__all__ = ["EpochSampler", "EvalSampler", "ResumableDataLoader"]
