"""Batches of token windows for the trainers: endless, seeded, independent of global RNG."""

from __future__ import annotations

from collections.abc import Iterator

import torch


def random_windows(
    tokens: torch.Tensor,
    *,
    batch_size: int,
    seq_len: int | tuple[int, int],
    seed: int,
) -> Iterator[torch.Tensor]:
    """Yield [batch_size, n] windows cut at random offsets of a 1-D token stream, forever.

    ``seq_len`` is a fixed n, or an inclusive (low, high) range drawn per batch: a drafter trained
    at one context length only sees one pattern of distances to the block it drafts.
    """
    low, high = (seq_len, seq_len) if isinstance(seq_len, int) else seq_len
    if not 1 <= low <= high <= tokens.numel():
        raise ValueError(f"seq_len {seq_len} does not fit a stream of {tokens.numel()} tokens")
    generator = torch.Generator().manual_seed(seed)
    while True:
        n = int(torch.randint(low, high + 1, (), generator=generator))
        starts = torch.randint(0, tokens.numel() - n + 1, (batch_size,), generator=generator)
        yield torch.stack([tokens[s : s + n] for s in starts.tolist()])
