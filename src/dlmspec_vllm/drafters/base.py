"""The one interface every diffusion drafter offers the proposer.

A drafter sees target-vocabulary token ids only (a drafter with another tokenizer bridges
internally) and returns, per request, logits over the target vocabulary for each drafted
position. Ids the target cannot emit are never part of the returned logits.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch


@dataclass
class DraftBlock:
    """Per-position drafter output for a batch of requests.

    logits: [batch, max_length, target_vocab_size]; row b is meaningful for its first
        lengths[b] positions, position j being the drafter's prediction for the token that
        follows the context plus j drafted tokens.
    lengths: how many positions were drafted for each request (0 allowed).
    """

    logits: torch.Tensor
    lengths: list[int]

    def argmax_tokens(self) -> list[list[int]]:
        best = self.logits.argmax(dim=-1).tolist()
        return [row[:n] for row, n in zip(best, self.lengths)]

    def confidences(self) -> list[list[float]]:
        """Probability the drafter gives its own top token, per drafted position."""
        top = torch.softmax(self.logits.float(), dim=-1).amax(dim=-1).tolist()
        return [row[:n] for row, n in zip(top, self.lengths)]


class Drafter(Protocol):
    """A diffusion LM that drafts a block of tokens for each request in one call."""

    target_vocab_size: int
    max_context_length: int

    def draft(self, contexts: Sequence[Sequence[int]], lengths: Sequence[int]) -> DraftBlock:
        """Draft lengths[b] tokens after contexts[b] for every request b, batched."""
        ...
