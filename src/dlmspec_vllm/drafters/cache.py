"""Per-request prefix key/value cache of a drafter, bounded in tokens, least recently used out.

Between two engine steps a request's context changes only at its end: vLLM appends the tokens
it accepted and the target's own next token, and the rejected part of the last draft was never
in the context. So the keys/values of the longest token prefix the new context shares with the
cached one can be reused and only the rest is computed. Which part of that prefix is safe to
reuse (all of it, whole blocks only, all but the last token) is the drafter's decision; this
module only stores, measures and evicts.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass
class CachedPrefix:
    """Keys/values of a request's first ``len(tokens)`` context tokens, per layer.

    keys[i], values[i]: [kv_heads, len(tokens), head_dim] of layer i, after RoPE.
    uses: draft calls served since the prefix was last computed from scratch.
    """

    tokens: list[int]
    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    uses: int = 0

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.keys, *self.values))


def common_prefix_length(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


class PrefixKVCache:
    """req_id -> CachedPrefix, at most ``max_tokens`` tokens over all requests."""

    def __init__(self, max_tokens: int) -> None:
        self.max_tokens = max_tokens
        self._entries: OrderedDict[str, CachedPrefix] = OrderedDict()
        self._tokens = 0

    def get(self, req_id: str) -> CachedPrefix | None:
        """The request's prefix, marked most recently used."""
        entry = self._entries.get(req_id)
        if entry is not None:
            self._entries.move_to_end(req_id)
        return entry

    def put(self, req_id: str, entry: CachedPrefix) -> None:
        """Store (or replace) a request's prefix, evicting least recently used requests to fit.

        A prefix longer than the whole budget is not stored: it would evict everything and
        still not fit.
        """
        self.forget(req_id)
        if not entry.tokens or len(entry.tokens) > self.max_tokens:
            return
        while self._tokens + len(entry.tokens) > self.max_tokens:
            _, evicted = self._entries.popitem(last=False)
            self._tokens -= len(evicted.tokens)
        self._entries[req_id] = entry
        self._tokens += len(entry.tokens)

    def forget(self, req_id: str) -> None:
        entry = self._entries.pop(req_id, None)
        if entry is not None:
            self._tokens -= len(entry.tokens)

    @property
    def num_requests(self) -> int:
        return len(self._entries)

    @property
    def num_tokens(self) -> int:
        return self._tokens

    @property
    def nbytes(self) -> int:
        return sum(entry.nbytes for entry in self._entries.values())
