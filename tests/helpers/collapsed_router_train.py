"""``python tests/helpers/collapsed_router_train.py <mom.train overrides>``: mom.train with every MoE router collapsed
(all logits tied, so the lowest-index experts take every token and the others none). A script file, not
``-c``: Lightning's DDP launcher restarts it for the other ranks, which then get the same patch."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import mom.model.moe as moe  # noqa: E402

_route = moe.top_k_routing


def _collapsed(logits, k, normalize):
    return _route(logits * 0, k, normalize)  # still in the graph: the router gets a (zero) gradient


moe.top_k_routing = _collapsed

if __name__ == "__main__":
    from mom.train import main

    main()
