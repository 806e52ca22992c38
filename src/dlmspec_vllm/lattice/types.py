"""The token lattice's types and the checks on pruning's inputs: what the torch twin
(lattice/prune.py) and the Triton kernel (kernels/prune.py) share, apart from both."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

PAD_ID = -1
"""Token id stored in unused candidate slots (and positions past a request's length)."""


@dataclass
class Lattice:
    """Pruned candidates for a batch of drafted blocks, padded to rectangular tensors.

    token_ids: [B, K, M] int64; slot j of position i holds the j-th best candidate, PAD_ID in
        slots >= num_candidates[b, i].
    log_probs: [B, K, M] float32; natural log of the drafter's full-softmax probability of
        that candidate (not renormalised over the kept set), -inf in unused slots.
    num_candidates: [B, K] int32; 0 at positions >= lengths[b].
    lengths: [B] int64; drafted positions per request (copied from the Drafts).
    """

    token_ids: torch.Tensor
    log_probs: torch.Tensor
    num_candidates: torch.Tensor
    lengths: torch.Tensor


def check_prune_args(
    logits: torch.Tensor,
    lengths: Sequence[int] | torch.Tensor,
    tau: float,
    m_max: int,
    eos_id: int | None,
) -> tuple[torch.Tensor, int]:
    """Validate pruning inputs (shared with the Triton launcher).

    Returns the lengths as an int64 tensor on the logits' device and the lattice width
    M = min(m_max, vocab).
    """
    if logits.dim() != 3:
        raise ValueError(f"logits must be [batch, max_len, vocab], got shape {tuple(logits.shape)}")
    if not logits.is_floating_point():
        raise ValueError(f"logits must be a floating dtype, got {logits.dtype}")
    batch, max_len, vocab = logits.shape
    if vocab == 0:
        raise ValueError("logits have an empty vocabulary dimension")
    lengths_t = torch.as_tensor(lengths, dtype=torch.int64).to(logits.device)
    if lengths_t.shape != (batch,):
        raise ValueError(f"lengths must have one entry per request ({batch}), got {len(lengths_t)}")
    if batch and (int(lengths_t.min()) < 0 or int(lengths_t.max()) > max_len):
        raise ValueError(f"lengths must lie in [0, {max_len}], got {lengths_t.tolist()}")
    if m_max < 1:
        raise ValueError(f"m_max must be >= 1, got {m_max}")
    if tau != tau:
        raise ValueError("tau must not be NaN")
    if eos_id is not None and not 0 <= eos_id < vocab:
        raise ValueError(f"eos_id {eos_id} is outside the vocabulary [0, {vocab})")
    return lengths_t, min(m_max, vocab)
