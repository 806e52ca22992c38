"""Turn a drafter's block into the tokens each request sends: the argmax, or a CPS path.

Holds the per-request state CPS needs (each request's online n-gram over its own prompt and
output), fed incrementally with the tokens that arrived since the request's last step.
"""

from __future__ import annotations

from collections.abc import Sequence

from dlmspec_vllm.config import LatticeSettings
from dlmspec_vllm.drafters.base import Drafts
from dlmspec_vllm.lattice.scorers import ArpaNgramScorer, CausalScorer, OnlineNgramScorer
from dlmspec_vllm.lattice.search import select_paths


class PathChooser:
    def __init__(self, settings: LatticeSettings, *, vocab_size: int, eos_id: int | None) -> None:
        self.settings = settings
        self.vocab_size = vocab_size
        self.eos_id = eos_id
        self._shared: CausalScorer | None = None
        if settings.enabled and settings.scorer == "arpa":
            assert settings.arpa_path is not None
            self._shared = ArpaNgramScorer.from_file(settings.arpa_path, eos_id=eos_id)
        # req_id -> (scorer over the request's tokens, how many of its tokens it has seen)
        self._online: dict[str, tuple[OnlineNgramScorer, int]] = {}

    @property
    def num_tracked(self) -> int:
        return len(self._online)

    def forget(self, req_id: str) -> None:
        self._online.pop(req_id, None)

    def choose(
        self, block: Drafts, histories: Sequence[list[int]], req_ids: Sequence[str]
    ) -> list[list[int]]:
        """One draft per request: at most lengths[b] tokens, ending at its first EOS if any."""
        settings = self.settings
        if settings.enabled:
            block = block.over_vocabulary(self.vocab_size)
        if not settings.enabled or settings.scorer == "none":
            scorers = None
        elif settings.scorer == "arpa":
            scorers = [self._shared] * len(req_ids)
        else:
            scorers = [self._online[r][0] if r in self._online else None for r in req_ids]
        return select_paths(
            block,
            histories,
            tau=settings.tau,
            m_max=settings.m_max,
            lam=settings.lam if settings.enabled else 1.0,
            eos_id=self.eos_id,
            scorers=scorers,
            beam_width=settings.beam_width,
            method=settings.search,
        )

    def observe_context(self, req_id: str, context: list[int]) -> None:
        """Feed the request's verified tokens (prompt + output) to its online n-gram; drafted,
        unverified tokens never enter it."""
        settings = self.settings
        if not (settings.enabled and settings.scorer == "online"):
            return
        scorer, seen = self._online.get(req_id, (None, 0))
        if scorer is None or seen > len(context):
            scorer, seen = OnlineNgramScorer(self.vocab_size, order=settings.ngram_order), 0
        scorer.extend(context[seen:])
        self._online[req_id] = (scorer, len(context))
