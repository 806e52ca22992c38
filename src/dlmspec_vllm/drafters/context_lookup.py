"""Drafts copied from the request's own context (prompt lookup), for steps where it repeats itself.

Generated code, arithmetic and lists repeat names, numbers and whole lines of their prompt and of
what was generated before. Where the context's last n tokens occurred earlier, what followed them
then is a draft that costs nothing to make. The proposer takes it where it exists and runs the
diffusion drafter only for the requests it does not cover.

The longest suffix between ``max_ngram`` and ``min_ngram`` tokens wins, and of its occurrences the
most recent that is followed by ``length`` tokens (else the most recent): the text being written
now resembles the text written last, and in a repeating run the latest occurrence is followed by
a single token.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view


def context_continuation(
    context: Sequence[int] | np.ndarray, length: int, *, min_ngram: int, max_ngram: int
) -> list[int]:
    """Up to ``length`` tokens that followed the latest earlier occurrence of the context's
    longest matching suffix (``max_ngram`` down to ``min_ngram`` tokens); [] when none occurs."""
    if not 1 <= min_ngram <= max_ngram:
        raise ValueError(f"need 1 <= min_ngram <= max_ngram, got {min_ngram}, {max_ngram}")
    tokens = np.asarray(context, dtype=np.int64)
    if length <= 0:
        return []
    for n in range(min(max_ngram, len(tokens) - 1), min_ngram - 1, -1):
        # Windows of tokens[:-1] end before the last token, so every match has a continuation
        # and the suffix never matches itself.
        windows = sliding_window_view(tokens[:-1], n)
        matches = np.flatnonzero((windows == tokens[-n:]).all(axis=1))
        if matches.size:
            starts = matches + n
            whole = starts[starts + length <= len(tokens)]
            start = int(whole[-1] if whole.size else starts[-1])
            return tokens[start : start + length].tolist()
    return []
