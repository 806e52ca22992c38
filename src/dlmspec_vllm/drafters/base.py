"""The one interface every diffusion drafter offers the proposer, and the options it drafts with.

A drafter sees target-vocabulary token ids only (a drafter with another tokenizer bridges
internally) and returns, per request, logits over the target vocabulary for each drafted
position. Ids the target cannot emit are never part of the returned logits.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import torch


@dataclass
class Drafts:
    """Per-position drafter output for a batch of requests.

    logits: [batch, max_length, columns]; row b is meaningful for its first lengths[b]
        positions, position j being the drafter's prediction for the token that follows the
        context plus j drafted tokens.
    lengths: how many positions were drafted for each request (0 allowed).
    vocab_ids: the target token id of each logits column, for a drafter that drafts from a
        subset of the vocabulary (a DFlash draft vocabulary); None: the columns are the target
        vocabulary itself. Every token outside the subset has probability 0.
    """

    logits: torch.Tensor
    lengths: list[int]
    vocab_ids: torch.Tensor | None = None
    _top: tuple[list[list[int]], list[list[float]]] | None = field(
        default=None, init=False, repr=False, compare=False
    )

    def over_vocabulary(self, vocab_size: int) -> Drafts:
        """The same drafts with one column per target token (the lattice reads those)."""
        if self.vocab_ids is None:
            return self
        batch, width, _ = self.logits.shape
        full = self.logits.new_full((batch, width, vocab_size), float("-inf"))
        full[:, :, self.vocab_ids] = self.logits
        return Drafts(logits=full, lengths=self.lengths)

    def argmax_tokens(self) -> list[list[int]]:
        return self._top_tokens_and_confidences()[0]

    def confidences(self) -> list[list[float]]:
        """Probability the drafter gives its own top token, per drafted position."""
        return self._top_tokens_and_confidences()[1]

    def _top_tokens_and_confidences(self) -> tuple[list[list[int]], list[list[float]]]:
        """Both at once, with one transfer to the host: the top logit's exp over the sum of
        all (logsumexp, no softmax over the vocabulary materialised)."""
        if self._top is None:
            logits = self.logits.float()
            best, tokens = logits.max(dim=-1)
            confidence = torch.exp(best - torch.logsumexp(logits, dim=-1))
            if self.vocab_ids is not None:
                tokens = self.vocab_ids[tokens]
            # float64 holds every token id exactly, so one tensor carries both to the host.
            rows = torch.stack((tokens.double(), confidence.double())).cpu().tolist()
            self._top = (
                [[int(t) for t in row[:n]] for row, n in zip(rows[0], self.lengths)],
                [row[:n] for row, n in zip(rows[1], self.lengths)],
            )
        return self._top


@dataclass(frozen=True)
class DraftingOptions:
    """How a drafter denoises a block and keeps its per-request prefix cache.

    denoising_steps: forward passes per draft call at most. One pass (the default) takes every
        position's argmax at once; more passes unmask the confident positions first and let the
        others see them, the way diffusion LMs generate.
    unmask_threshold: with several passes, each pass fixes every still-masked position whose
        top probability is >= this (at least the most confident one); FailFast uses 0.05.
        None: each pass fixes an equal share of the remaining positions, most confident first.
        The last pass fixes whatever is still masked, so a call never exceeds denoising_steps.
    cache_refresh_interval: requests drafted with ``req_ids`` keep the keys/values of their
        context between calls. 0 turns the cache off. For drafters whose cache is approximate
        (bidirectional Dream, LLaDA: reused keys were computed before later tokens existed),
        a request's cache is rebuilt from scratch once it has served this many calls; an exact
        cache (Fast-dLLM v2's finished blocks) never goes stale and ignores the interval.
    cache_max_tokens: most context tokens cached over all requests; the least recently used
        requests are evicted first, so memory stays bounded whatever vLLM schedules.
    shared_prefix_max_tokens: a target-conditioned drafter's context kept per full block of
        kv_block_tokens tokens, shared by requests with the same token prefix, so a prefix
        vLLM serves from its prefix cache still reaches the drafter (drafters/shared_prefix.py);
        0 shares nothing. kv_block_tokens must divide vLLM's block size (the proposer
        uses vLLM's).
    """

    denoising_steps: int = 1
    unmask_threshold: float | None = None
    cache_refresh_interval: int = 8
    cache_max_tokens: int = 65536
    shared_prefix_max_tokens: int = 16384
    kv_block_tokens: int = 16

    def __post_init__(self) -> None:
        if not isinstance(self.denoising_steps, int) or self.denoising_steps < 1:
            raise ValueError(f"denoising_steps must be an int >= 1, got {self.denoising_steps!r}")
        threshold = self.unmask_threshold
        if threshold is not None and not 0.0 < threshold <= 1.0:
            raise ValueError(f"unmask_threshold must be in (0, 1] or None, got {threshold!r}")
        if not isinstance(self.cache_refresh_interval, int) or self.cache_refresh_interval < 0:
            raise ValueError(
                f"cache_refresh_interval must be an int >= 0, got {self.cache_refresh_interval!r}"
            )
        if not isinstance(self.cache_max_tokens, int) or self.cache_max_tokens < 0:
            raise ValueError(f"cache_max_tokens must be an int >= 0, got {self.cache_max_tokens!r}")
        shared = self.shared_prefix_max_tokens
        if not isinstance(shared, int) or shared < 0:
            raise ValueError(f"shared_prefix_max_tokens must be an int >= 0, got {shared!r}")
        if not isinstance(self.kv_block_tokens, int) or self.kv_block_tokens < 1:
            raise ValueError(f"kv_block_tokens must be an int >= 1, got {self.kv_block_tokens!r}")

    @property
    def cache_enabled(self) -> bool:
        return self.cache_refresh_interval > 0 and self.cache_max_tokens > 0


@dataclass
class TargetFeatures:
    """The target's hidden states for tokens that became part of one request's sequence.

    positions: [n] int64, the absolute positions of those tokens (increasing; a step carries
        the prompt tokens it prefilled, or the last token plus the drafts vLLM accepted).
    hidden: [n, len(target_layer_ids) * target_hidden_size], the outputs of the drafter's
        chosen target layers at those positions, concatenated in target_layer_ids order.
    """

    positions: torch.Tensor
    hidden: torch.Tensor


@dataclass
class StepFeatures:
    """TargetFeatures of every request of one engine step, as one batch: the runner gathers
    them with one index per layer, and a drafter takes them in with one projection.

    req_ids: the requests with new tokens this step; counts[i] of the flat rows are req_ids[i]'s,
        request after request in this order.
    positions: [total] int64 on the CPU, increasing within each request.
    hidden: [total, features] where the target computed them.
    """

    req_ids: list[str]
    counts: list[int]
    positions: torch.Tensor
    hidden: torch.Tensor
    # The engine's batch row of every flat row's request ([total] int64 on the CPU), where the
    # runner knows it: how the proposer finds the rows' tokens without a lookup per request.
    batch_rows: torch.Tensor | None = None
    # The token at every row's position ([total] int64 on the CPU), and a request's first
    # `count` tokens: what a drafter sharing context between requests keys it by (None: not
    # known, nothing is shared).
    token_ids: torch.Tensor | None = None
    prefix_tokens: Callable[[str, int], Sequence[int]] | None = None

    @classmethod
    def of_requests(cls, features: dict[str, TargetFeatures]) -> StepFeatures:
        """One step's batch from per-request features (callers that hold them so)."""
        items = [(r, f) for r, f in features.items() if f.positions.numel()]
        return cls(
            req_ids=[r for r, _ in items],
            counts=[f.positions.numel() for _, f in items],
            positions=torch.cat([f.positions.flatten() for _, f in items])
            if items
            else torch.zeros(0, dtype=torch.long),
            hidden=torch.cat([f.hidden for _, f in items]) if items else torch.zeros(0, 0),
        )

    def of(self, req_id: str) -> TargetFeatures:
        """One request's rows (a view)."""
        i = self.req_ids.index(req_id)
        start = sum(self.counts[:i])
        end = start + self.counts[i]
        return TargetFeatures(self.positions[start:end], self.hidden[start:end])


class Drafter(Protocol):
    """A diffusion LM that drafts a block of tokens for each request in one call."""

    target_vocab_size: int
    max_context_length: int

    def draft(
        self,
        contexts: Sequence[Sequence[int]],
        lengths: Sequence[int],
        *,
        req_ids: Sequence[str] | None = None,
    ) -> Drafts:
        """Draft lengths[b] tokens after contexts[b] for every request b, batched.

        With ``req_ids`` the drafter may reuse what it cached for a request on earlier calls
        (the keys/values of the longest token prefix the new context shares with the old).
        """
        ...

    def forget(self, req_id: str) -> None:
        """Drop everything cached for a request that finished or was preempted."""
        ...


@runtime_checkable
class TargetConditionedDrafter(Drafter, Protocol):
    """A drafter that also reads the target's hidden states (DFlash-style).

    target_layer_ids: which target layers' outputs it reads, DFlash's numbering (0 is the
        output of the first decoder layer). The proposer asks vLLM for them and hands each
        step's new ones, for the whole batch, to ``observe_step`` before drafting.
    """

    target_layer_ids: tuple[int, ...]

    def observe_step(self, features: StepFeatures) -> None:
        """Record the target's hidden states for tokens now part of each request's sequence;
        features at positions a request already holds replace the old ones (a rejected
        draft's). Called every step for every request with new tokens, drafting or not, so it
        must cost little per request."""
        ...
