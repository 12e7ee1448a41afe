"""Vectorised expert dispatch shared by MoE, MH-MoE and the mixture of attention heads.

Assignments (row, expert) are sorted by expert so each expert runs once on a contiguous slice: a Python
loop over experts (few), never over tokens. The slice sizes are the dispatch's one host synchronisation
(``torch.split`` needs them on the host); the counts themselves and every routing statistic are computed on
the device (``scatter_add``), with no ``bincount``/``nonzero``.

Every expert runs, on zero rows when no token chose it, so each of its parameters is in the autograd graph
and gets a (zero) gradient: DDP needs no ``find_unused_parameters`` even when the router collapses.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F


def expert_counts(expert_idx: torch.Tensor, num_experts: int) -> torch.Tensor:
    """How many entries of ``expert_idx`` name each expert: (num_experts,) int64, no host sync."""
    flat = expert_idx.reshape(-1)
    return torch.zeros(num_experts, dtype=torch.long, device=flat.device).scatter_add_(0, flat, torch.ones_like(flat))


class ExpertPlan(NamedTuple):
    """Rows sorted by expert (``order``) and each expert's slice size: reusable by several expert_map calls
    with the same routing (the mixture of attention heads maps its queries and outputs with one plan)."""

    order: torch.Tensor
    sizes: list[int]


def plan_experts(expert_idx: torch.Tensor, num_experts: int) -> ExpertPlan:
    order = torch.argsort(expert_idx, stable=True)
    return ExpertPlan(order, expert_counts(expert_idx, num_experts).tolist())  # the one host sync


def expert_map(x: torch.Tensor, route: torch.Tensor | ExpertPlan, experts: Sequence[Callable]) -> torch.Tensor:
    """Row i of the result is ``experts[expert_idx[i]](x[i])``. x: (M, d_in); ``route``: expert_idx (M,) or
    the :class:`ExpertPlan` of it."""
    if not isinstance(route, ExpertPlan) and x.shape[0] <= 4 and not torch.is_grad_enabled():
        # decoding: a handful of rows, sorting would cost more than it saves
        return torch.cat([experts[e](x[i : i + 1]) for i, e in enumerate(route.tolist())])
    plan = route if isinstance(route, ExpertPlan) else plan_experts(route, len(experts))
    x_sorted = x[plan.order]
    # every expert runs, on zero rows if it has none: all parameters get a gradient (see the module doc)
    y_sorted = torch.cat([experts[e](chunk) for e, chunk in enumerate(torch.split(x_sorted, plan.sizes))])
    y = y_sorted.new_empty((x.shape[0], *y_sorted.shape[1:]))
    y[plan.order] = y_sorted
    return y


def stable_top_k(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k over the last dim with ties broken towards the lower index, whatever the batch shape.

    Ternary routers produce integer-valued logits (int8 activations . ternary weights, times scales), so
    exact ties are common; ``torch.topk`` may order them differently for different batch sizes, which
    would make a token's routing depend on what else is in the batch (and cached decoding differ from the
    full forward)."""
    values, indices = torch.sort(x, dim=-1, descending=True, stable=True)
    return values[..., :k], indices[..., :k]


def top_k_routing(logits: torch.Tensor, k: int, normalize: bool):
    """Softmax router. Returns (probs (N,E) fp32, top weights (N,k) fp32, top indices (N,k)).

    ``normalize=False`` keeps the top-k softmax probabilities as they are (Jamba/Mixtral-style without
    renormalisation, what transformers' Jamba does); ``True`` renormalises them over the k chosen.
    """
    probs = F.softmax(logits.float(), dim=-1)
    top_w, top_i = stable_top_k(probs, k)
    if normalize:
        top_w = top_w / top_w.sum(-1, keepdim=True)
    return probs, top_w, top_i


def want_aux(module: torch.nn.Module) -> bool:
    """Router losses and statistics are for training: skip them when decoding or evaluating without grad."""
    return module.training or torch.is_grad_enabled()


def load_balance_loss(probs: torch.Tensor, top_i: torch.Tensor) -> torch.Tensor:
    """Switch-style balance loss E * sum_e f_e * P_e, f_e = share of assignments to expert e.

    Normalised so that a perfectly balanced router gives 1.0 whatever k is.
    """
    num_experts = probs.shape[-1]
    frac_tokens = expert_counts(top_i, num_experts).to(probs.dtype) / top_i.numel()
    frac_probs = probs.mean(0)
    return num_experts * (frac_tokens * frac_probs).sum()


def z_loss(logits: torch.Tensor) -> torch.Tensor:
    """Router z-loss (ST-MoE): mean squared logsumexp of the router logits."""
    return torch.logsumexp(logits.float(), dim=-1).pow(2).mean()


def load_max(top_i: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Most loaded expert's share times the number of experts (1.0 = perfectly balanced)."""
    counts = expert_counts(top_i, num_experts).float()
    return (counts.max() / counts.sum().clamp_min(1) * num_experts).detach()
