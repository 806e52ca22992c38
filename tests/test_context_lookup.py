"""Drafts copied from the request's own context: which suffix and which occurrence win."""

from __future__ import annotations

import numpy as np
import pytest

from dlmspec_vllm.drafters.context_lookup import context_continuations


def lookup(context, length, min_ngram=2, max_ngram=4):
    """One request's continuation, from a batch row padded with tokens past its context."""
    row = np.asarray(list(context) + [3, 1, 2, 3, 4], dtype=np.int64)[None]
    return context_continuations(
        row, np.array([len(context)]), np.array([length]), min_ngram=min_ngram, max_ngram=max_ngram
    )[0]


def test_what_followed_the_earlier_occurrence_of_the_suffix_is_the_draft():
    assert lookup([1, 2, 3, 4, 5, 1, 2, 3], 3) == [4, 5, 1]
    assert lookup(np.array([1, 2, 3, 4, 5, 1, 2, 3]), 2) == [4, 5]


def test_the_longest_suffix_wins_over_a_more_recent_shorter_one():
    # "8 1 2" occurred once (followed by 7); "1 2" alone occurred later (followed by 9).
    assert lookup([8, 1, 2, 7, 5, 1, 2, 9, 6, 8, 1, 2], 1) == [7]
    assert lookup([8, 1, 2, 7, 5, 1, 2, 9, 6, 8, 1, 2], 1, max_ngram=2) == [9]


def test_the_latest_occurrence_with_a_whole_continuation_is_preferred():
    assert lookup([1, 2, 9, 1, 2, 8, 1, 2], 2) == [8, 1]
    # The latest "7 7" is followed by one token only; the one before by two.
    assert lookup([7, 7, 7, 7, 7], 2, max_ngram=2) == [7, 7]


def test_nothing_when_no_suffix_recurs_or_nothing_is_asked():
    assert lookup([1, 2, 3, 4], 3) == []
    assert lookup([5], 3) == []
    assert lookup([1, 2, 1, 2], 0) == []
    # A suffix shorter than min_ngram never counts.
    assert lookup([1, 2, 3, 1], 3, min_ngram=2) == []
    assert lookup([1, 2, 3, 1], 3, min_ngram=1) == [2, 3, 1]


def test_an_empty_ngram_range_is_refused():
    with pytest.raises(ValueError, match="min_ngram <= max_ngram"):
        lookup([1, 2, 1, 2], 2, min_ngram=3, max_ngram=2)


def test_a_batch_gives_each_row_what_it_would_get_alone():
    rng = np.random.default_rng(0)
    width = 120
    # Small alphabets repeat often, so suffixes of every length recur; rows differ in length
    # and in how much they ask for, and what lies past a row's context must not matter.
    batch = rng.integers(0, 4, size=(24, width))
    ends = rng.integers(1, width + 1, size=24)
    wants = rng.integers(0, 7, size=24)
    got = context_continuations(batch, ends, wants, min_ngram=1, max_ngram=4)
    for row in range(24):
        context, want = batch[row, : ends[row]].tolist(), int(wants[row])
        assert got[row] == lookup(context, want, 1, 4) == plain_lookup(context, want, 1, 4)
    assert any(got) and not all(got)


def plain_lookup(context: list[int], length: int, min_ngram: int, max_ngram: int) -> list[int]:
    """The rule in plain Python: longest suffix first, latest occurrence with a whole
    continuation, else the latest."""
    if length <= 0:
        return []
    for n in range(min(max_ngram, len(context) - 1), min_ngram - 1, -1):
        suffix = context[-n:]
        starts = [j + n for j in range(len(context) - n) if context[j : j + n] == suffix]
        if starts:
            whole = [s for s in starts if s + length <= len(context)]
            start = (whole or starts)[-1]
            return context[start : start + length]
    return []
