"""FailFast's confidence-driven draft extension ("fail fast, win big").

A diffusion drafter drafts a block in about one pass, so a long draft costs little more than a
short one. FailFast therefore starts short (cheap when the region is hard) and, while every
drafted position is confident, asks for `increment` more positions in another pass (win big on
easy stretches), up to a cap. It keeps no history: each step decides from its own confidences.
"""

from __future__ import annotations

from collections.abc import Sequence

from dlmspec_vllm.control.base import LengthController, check_float, check_int


class FailFastController(LengthController):
    """FailFast (Pan et al., 2025) with its defaults: start 10, +10 while all conf >= 0.45, cap 60.

    What is sent once a pass shows a low-confidence position: the reference code
    (github.com/ruipeterpan/failfast, `generate_draft_tokens_arbitrary_length`) stops extending
    and verifies the whole current draft, low-confidence positions included; that is the default
    here (truncate=False), because the target often still accepts a low-confidence token and
    verifying a few more tokens is nearly free when the target step is memory-bound.
    truncate=True instead sends only the positions before the first low-confidence one, but at
    least one: the draft pass is already paid, and one token adds one verify slot while its
    chance of acceptance (about its confidence) is not zero.
    """

    name = "failfast"

    def __init__(
        self,
        max_length: int,
        *,
        start_length: int = 10,
        increment: int = 10,
        threshold: float = 0.45,
        length_cap: int = 60,
        truncate: bool = False,
    ) -> None:
        """start_length >= 1, increment >= 1, threshold in [0, 1], length_cap >= start_length."""
        super().__init__(max_length)
        self._start = check_int("start_length", start_length, 1)
        self._increment = check_int("increment", increment, 1)
        self._threshold = check_float("threshold", threshold, 0.0, 1.0)
        self._cap = min(check_int("length_cap", length_cap, self._start), self.max_length)
        if not isinstance(truncate, bool):
            raise ValueError(f"truncate must be a bool, got {truncate!r}")
        self._truncate = truncate
        self._extensions = 0
        self._low_confidence_stops = 0
        self._cap_stops = 0

    def _initial_length(self, req_id: str) -> int:
        return self._start

    def _extension(self, req_id: str, confidences: Sequence[float]) -> int:
        drafted = len(confidences)
        if drafted >= self._cap:
            self._cap_stops += 1
            return 0
        if any(c < self._threshold for c in confidences):
            self._low_confidence_stops += 1
            return 0
        self._extensions += 1
        return min(self._increment, self._cap - drafted)

    def _clip(self, req_id: str, confidences: Sequence[float]) -> int:
        if self._truncate:
            for i, c in enumerate(confidences):
                if c < self._threshold:
                    return max(1, i)
        return len(confidences)

    def _extra_stats(self) -> dict[str, float]:
        return {
            "extensions": self._extensions,
            "low_confidence_stops": self._low_confidence_stops,
            "cap_stops": self._cap_stops,
        }
