"""Drafts copied from the request's own context: which suffix and which occurrence win."""

from __future__ import annotations

import numpy as np
import pytest

from dlmspec_vllm.drafters.context_lookup import context_continuation


def lookup(context, length, min_ngram=2, max_ngram=4):
    return context_continuation(context, length, min_ngram=min_ngram, max_ngram=max_ngram)


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
