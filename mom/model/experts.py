"""Vectorised expert dispatch shared by MoE, MH-MoE and the mixture of attention heads.

Assignments (row, expert) are sorted by expert so each expert runs once on a contiguous slice: a Python
loop over experts (few), never over tokens.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F


def expert_map(x: torch.Tensor, expert_idx: torch.Tensor, experts: Sequence[Callable]) -> torch.Tensor:
    """Row i of the result is ``experts[expert_idx[i]](x[i])``. x: (M, d_in), expert_idx: (M,)."""
    if x.shape[0] <= 4:  # decoding: a handful of rows, sorting would cost more than it saves
        return torch.cat([experts[e](x[i : i + 1]) for i, e in enumerate(expert_idx.tolist())])
    order = torch.argsort(expert_idx, stable=True)
    counts = torch.bincount(expert_idx, minlength=len(experts)).tolist()
    x_sorted = x[order]
    outs = [experts[e](chunk) for e, chunk in enumerate(torch.split(x_sorted, counts)) if counts[e]]
    y_sorted = torch.cat(outs) if outs else x_sorted.new_zeros(0)
    y = y_sorted.new_empty((x.shape[0], *y_sorted.shape[1:]))
    y[order] = y_sorted
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
    assigned = F.one_hot(top_i, num_experts).float().sum(1)  # (N, E)
    frac_tokens = assigned.mean(0) / top_i.shape[-1]
    frac_probs = probs.mean(0)
    return num_experts * (frac_tokens * frac_probs).sum()


def z_loss(logits: torch.Tensor) -> torch.Tensor:
    """Router z-loss (ST-MoE): mean squared logsumexp of the router logits."""
    return torch.logsumexp(logits.float(), dim=-1).pow(2).mean()


def load_max(top_i: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Most loaded expert's share times the number of experts (1.0 = perfectly balanced)."""
    counts = torch.bincount(top_i.flatten(), minlength=num_experts).float()
    return (counts.max() / counts.sum().clamp_min(1) * num_experts).detach()
