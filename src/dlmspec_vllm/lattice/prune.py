"""Candidate pruning: a drafter's per-position logits become a small, padded token lattice.

Per drafted position we keep the smallest set of tokens, by descending drafter probability, whose
cumulative probability reaches ``tau`` (the nucleus), at most ``m_max`` of them, and the EOS id is
always a candidate. The lattice is what the path search walks; keeping it small (CPS uses
tau 0.8, m_max 15) is what makes exact search over it cheap.

Ordering rule, shared bit for bit by the Triton kernel in ``kernels/prune.py``: candidates are
sorted by descending logit (the same order as descending probability, but free of softmax
rounding), ties broken by the lower token id first. Candidate 0 is therefore exactly
``logits.argmax(-1)`` (torch returns the first maximal index), which is what makes the
lam = 1 path equal the plain argmax draft.

This module is the torch twin (the definition of correct); ``prune`` dispatches to the Triton
kernel for CUDA tensors.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from dlmspec_vllm.lattice.types import PAD_ID, Lattice, check_prune_args


def _top_sorted(rows: torch.Tensor, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The m best entries of each row ordered by (value desc, index asc).

    topk alone leaves the order of equal values unspecified, both inside the kept set and at its
    boundary; the kept set is re-sorted stably by index, and the rare rows where ties straddle
    the boundary fall back to a full stable sort so the lowest ids win there too.
    """
    vals, ids = rows.topk(m, dim=-1, sorted=True)
    ids, by_id = ids.sort(dim=-1)
    vals = vals.gather(-1, by_id)
    vals, order = vals.sort(dim=-1, descending=True, stable=True)
    ids = ids.gather(-1, order)
    straddle = (rows >= vals[:, -1:]).sum(-1) > m
    if bool(straddle.any()):
        full_vals, full_ids = rows[straddle].sort(dim=-1, descending=True, stable=True)
        vals[straddle] = full_vals[:, :m]
        ids[straddle] = full_ids[:, :m]
    return vals, ids


def prune_reference(
    logits: torch.Tensor,
    lengths: Sequence[int] | torch.Tensor,
    *,
    tau: float,
    m_max: int,
    eos_id: int | None,
) -> Lattice:
    """Torch twin of the pruning kernel: softmax, nucleus of mass >= tau capped at m_max, EOS.

    Candidate r (0-based, in the order above) is kept when r == 0 or the probability mass of
    candidates 0..r-1 is still below tau, and r < m_max. If EOS is not kept it is appended after
    the kept candidates, or replaces the last one when m_max slots are full; either way the
    order stays sorted, since an EOS outside the nucleus ranks below every kept candidate.
    Rows must have a finite maximum logit (an all -inf row has no distribution).
    """
    lengths_t, width = check_prune_args(logits, lengths, tau, m_max, eos_id)
    batch, max_len, _ = logits.shape
    device = logits.device
    token_ids = torch.full((batch, max_len, width), PAD_ID, dtype=torch.int64, device=device)
    log_probs = torch.full((batch, max_len, width), float("-inf"), device=device)
    num_candidates = torch.zeros((batch, max_len), dtype=torch.int32, device=device)
    valid = torch.arange(max_len, device=device)[None, :] < lengths_t[:, None]
    if bool(valid.any()):
        rows = logits[valid].float()
        lse = torch.logsumexp(rows, dim=-1, keepdim=True)
        vals, ids = _top_sorted(rows, width)
        lq = vals - lse
        probs = lq.exp()
        mass_before = torch.cat([torch.zeros_like(probs[:, :1]), probs.cumsum(-1)[:, :-1]], -1)
        keep = mass_before < tau
        keep[:, 0] = True
        count = keep.sum(-1)
        if eos_id is not None:
            need = ~((ids == eos_id) & keep).any(-1)
            rows_idx = need.nonzero().squeeze(-1)
            slot = torch.clamp(count[rows_idx], max=width - 1)
            ids[rows_idx, slot] = eos_id
            lq[rows_idx, slot] = rows[rows_idx, eos_id] - lse[rows_idx, 0]
            keep[rows_idx, slot] = True
            count = keep.sum(-1)
        token_ids[valid] = torch.where(keep, ids, PAD_ID)
        log_probs[valid] = torch.where(keep, lq, float("-inf"))
        num_candidates[valid] = count.to(torch.int32)
    return Lattice(token_ids, log_probs, num_candidates, lengths_t)


def prune(
    logits: torch.Tensor,
    lengths: Sequence[int] | torch.Tensor,
    *,
    tau: float,
    m_max: int,
    eos_id: int | None,
) -> Lattice:
    """Prune with the Triton kernel for CUDA tensors and the torch twin otherwise."""
    if logits.is_cuda:
        from dlmspec_vllm.kernels.prune import prune_triton

        return prune_triton(logits, lengths, tau=tau, m_max=m_max, eos_id=eos_id)
    return prune_reference(logits, lengths, tau=tau, m_max=m_max, eos_id=eos_id)
