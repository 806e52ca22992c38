"""Fixed draft length: vLLM's own behaviour, kept as the baseline every adaptive rule must beat."""

from __future__ import annotations

from dlmspec_vllm.control.base import LengthController, check_int


class FixedLengthController(LengthController):
    """Always drafts k tokens (clamped to max_length)."""

    name = "fixed"

    def __init__(self, max_length: int, k: int | None = None) -> None:
        """k: tokens per step, >= 0; None means max_length, as vLLM drafts by default.

        A k above max_length is clamped rather than refused, so one setting can serve engines
        with different num_speculative_tokens.
        """
        super().__init__(max_length)
        self._k = self.max_length if k is None else check_int("k", k, 0)

    def _initial_length(self, req_id: str) -> int:
        return self._k
