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

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view


def context_continuations(
    token_ids: np.ndarray,
    context_lengths: np.ndarray,
    lengths: np.ndarray,
    *,
    min_ngram: int,
    max_ngram: int,
) -> list[list[int]]:
    """For each row of token_ids [rows, width] (its context: the first context_lengths[row]
    tokens), up to lengths[row] tokens that followed the latest earlier occurrence of the
    context's longest matching suffix (max_ngram down to min_ngram tokens); [] when none
    occurs. The whole batch in a few array operations per suffix length."""
    if not 1 <= min_ngram <= max_ngram:
        raise ValueError(f"need 1 <= min_ngram <= max_ngram, got {min_ngram}, {max_ngram}")
    tokens = np.asarray(token_ids)
    ends = np.asarray(context_lengths, dtype=np.int64)
    wants = np.asarray(lengths, dtype=np.int64)
    rows = np.arange(len(ends))
    starts = np.full(len(ends), -1, dtype=np.int64)
    open_rows = rows[(wants > 0) & (ends - 1 >= min_ngram)]
    for n in range(max_ngram, min_ngram - 1, -1):
        rows_n = open_rows[ends[open_rows] - 1 >= n]
        if rows_n.size == 0:
            continue
        end = ends[rows_n]
        width = int(end.max()) - 1
        suffix = tokens[rows_n[:, None], end[:, None] - n + np.arange(n)]
        # Windows of the context without its last token, so every match has a continuation
        # and the suffix never matches itself; those past a row's context are masked out.
        windows = sliding_window_view(tokens[rows_n, :width], n, axis=1)
        first = np.arange(windows.shape[1])
        matches = (windows == suffix[:, None, :]).all(axis=2)
        matches &= first[None, :] <= (end - 1 - n)[:, None]
        found = matches.any(axis=1)
        whole = matches & (first[None, :] <= (end - n - wants[rows_n])[:, None])
        has_whole = whole.any(axis=1)
        last_whole = windows.shape[1] - 1 - np.argmax(whole[:, ::-1], axis=1)
        last_any = windows.shape[1] - 1 - np.argmax(matches[:, ::-1], axis=1)
        chosen = np.where(has_whole, last_whole, last_any) + n
        starts[rows_n[found]] = chosen[found]
        open_rows = np.setdiff1d(open_rows, rows_n[found], assume_unique=True)
    return [
        tokens[row, start : min(start + int(wants[row]), int(ends[row]))].tolist()
        if start >= 0
        else []
        for row, start in zip(rows, starts)
    ]
