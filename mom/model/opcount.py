"""Count what a region of code asks of the device: aten ops (on a GPU, about one kernel launch each) and
host synchronisations (the CPU waits for the GPU: ``.item()``, ``.tolist()``, ``bool(tensor)``,
``nonzero``, ``bincount``...). Device-independent, so CPU tests can pin the launch and sync budgets of the
CUDA paths::

    with OpCounter() as c:
        model(ids, labels=ids).loss.backward()
    c.ops, c.syncs, c.sync_calls

``.tolist()`` never reaches the dispatcher, so a ``TorchFunctionMode`` sees it; every other sync ends in
an aten op (``_local_scalar_dense`` for item/bool/int/float, or an op whose output size depends on the
data) seen by a ``TorchDispatchMode``.
"""

from __future__ import annotations

from collections import Counter

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

#: aten ops that copy a value to the host or size their output from the data (a sync on CUDA)
SYNC_OPS = frozenset({"_local_scalar_dense", "nonzero", "bincount", "unique", "_unique2", "unique_consecutive",
                      "masked_select", "nonzero_static_sync"})
#: Tensor methods that sync without an aten op of their own
SYNC_METHODS = frozenset({"tolist"})
#: ops that create no device work (views, metadata): not counted as launches
NO_LAUNCH = frozenset({"view", "_unsafe_view", "reshape", "expand", "permute", "transpose", "t", "unsqueeze",
                       "squeeze", "select", "slice", "split", "split_with_sizes", "unbind", "alias", "detach",
                       "as_strided", "chunk", "narrow", "empty", "empty_like", "empty_strided", "new_empty",
                       "lift_fresh", "_reshape_alias", "view_as", "unfold", "diagonal", "movedim",
                       "_local_scalar_dense"})


class _Dispatch(TorchDispatchMode):
    def __init__(self, owner: OpCounter):
        super().__init__()
        self.owner = owner

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        self.owner.aten[name] += 1
        return func(*args, **(kwargs or {}))


class _Function(TorchFunctionMode):
    def __init__(self, owner: OpCounter):
        super().__init__()
        self.owner = owner

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in SYNC_METHODS:
            self.owner.methods[name] += 1
        return func(*args, **(kwargs or {}))


class OpCounter:
    """Context manager counting aten ops and host syncs (see the module doc)."""

    def __init__(self):
        self.aten: Counter = Counter()
        self.methods: Counter = Counter()
        self._modes = (_Function(self), _Dispatch(self))

    def __enter__(self) -> OpCounter:
        for m in self._modes:
            m.__enter__()
        return self

    def __exit__(self, *exc):
        for m in reversed(self._modes):
            m.__exit__(*exc)

    @property
    def ops(self) -> int:
        """aten ops that launch device work (views and metadata excluded)."""
        return sum(n for name, n in self.aten.items() if name not in NO_LAUNCH)

    @property
    def sync_calls(self) -> Counter:
        """{op or method: count} of the host synchronisations."""
        out = Counter({k: v for k, v in self.aten.items() if k in SYNC_OPS})
        out.update(self.methods)
        return out

    @property
    def syncs(self) -> int:
        return sum(self.sync_calls.values())


__all__ = ["OpCounter", "SYNC_OPS", "NO_LAUNCH"]


def _selftest() -> None:  # pragma: no cover - python -m mom.model.opcount
    x = torch.arange(4)
    with OpCounter() as c:
        (x + 1).tolist()
        bool(x.any())
    print(c.ops, dict(c.sync_calls))


if __name__ == "__main__":  # pragma: no cover
    _selftest()
