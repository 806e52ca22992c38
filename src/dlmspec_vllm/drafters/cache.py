"""Per-request context a drafter keeps between steps, bounded in tokens, least recently used out.

Every drafter keeps something per request between engine steps: the diffusion drafters the
keys/values of a token prefix (PrefixKVCache), DFlash those of the target features it was shown.
TokenBudgetLRU is the bookkeeping they share: one budget of tokens over all requests, the least
recently used request's entry out first when a new one needs room.

Between two engine steps a request's context changes only at its end: vLLM appends the tokens
it accepted and the target's own next token, and the rejected part of the last draft was never
in the context. So the keys/values of the longest token prefix the new context shares with the
cached one can be reused and only the rest is computed. Which part of that prefix is safe to
reuse (all of it, whole blocks only, all but the last token) is the drafter's decision; this
module only stores, measures and evicts.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

import torch

EntryT = TypeVar("EntryT")


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


class TokenBudgetLRU(Generic[EntryT]):
    """req_id -> entry, at most ``max_tokens`` tokens (``size(entry)`` each) over all requests.

    An entry's size must not change while it is stored: take it out, change it, put it back.
    ``on_remove`` is told of every entry that leaves for good (evicted, forgotten, replaced, or
    too large to store), not of one taken out.
    """

    def __init__(
        self,
        max_tokens: int,
        size: Callable[[EntryT], int],
        on_remove: Callable[[EntryT], None] | None = None,
    ) -> None:
        self.max_tokens = max_tokens
        self._size = size
        self._on_remove = on_remove
        self._entries: OrderedDict[str, EntryT] = OrderedDict()
        self._tokens = 0

    def __contains__(self, req_id: str) -> bool:
        return req_id in self._entries

    def values(self) -> Iterator[EntryT]:
        return iter(self._entries.values())

    def get(self, req_id: str) -> EntryT | None:
        """The request's entry, marked most recently used."""
        entry = self._entries.get(req_id)
        if entry is not None:
            self._entries.move_to_end(req_id)
        return entry

    def take(self, req_id: str) -> EntryT | None:
        """The request's entry, no longer stored (nor counted) until it is put back."""
        entry = self._entries.pop(req_id, None)
        if entry is not None:
            self._tokens -= self._size(entry)
        return entry

    def put(self, req_id: str, entry: EntryT) -> None:
        """Store (or replace) a request's entry as the most recently used, evicting the least
        recently used to fit. An entry larger than the whole budget is not stored: it would
        evict everything and still not fit."""
        self.forget(req_id)
        size = self._size(entry)
        if size > self.max_tokens:
            self._removed(entry)
            return
        while self._tokens + size > self.max_tokens:
            _, evicted = self._entries.popitem(last=False)
            self._tokens -= self._size(evicted)
            self._removed(evicted)
        self._entries[req_id] = entry
        self._tokens += size

    def forget(self, req_id: str) -> None:
        entry = self.take(req_id)
        if entry is not None:
            self._removed(entry)

    def _removed(self, entry: EntryT) -> None:
        if self._on_remove is not None:
            self._on_remove(entry)

    @property
    def num_requests(self) -> int:
        return len(self._entries)

    @property
    def num_tokens(self) -> int:
        return self._tokens


class PrefixKVCache(TokenBudgetLRU[CachedPrefix]):
    """req_id -> CachedPrefix, at most ``max_tokens`` tokens over all requests."""

    def __init__(self, max_tokens: int) -> None:
        super().__init__(max_tokens, lambda entry: len(entry.tokens))

    def put(self, req_id: str, entry: CachedPrefix) -> None:
        """Store (or replace) a request's prefix; an empty one only forgets the old."""
        if not entry.tokens:
            self.forget(req_id)
            return
        super().put(req_id, entry)

    @property
    def nbytes(self) -> int:
        return sum(entry.nbytes for entry in self.values())
