"""A drafter's context keys/values per full KV-cache block of tokens, shared between requests.

vLLM's prefix cache serves a prompt prefix another request already computed (a shared system
prompt, the earlier turns of a chat) without running the target over it again, so the target's
hidden states for that prefix never reach a drafter that reads them. This store keeps what such
a drafter derived from them, its context keys and values, per full block of `kv_block_tokens`
tokens (vLLM's KV-cache blocks; "block" means nothing else in this module), keyed the way vLLM
keys its own blocks: by the content of the whole token prefix up to the block's end (a chain of
hashes, each block's over its parent's and its own tokens). A request whose first features
start after a prefix vLLM had cached takes that prefix's blocks from here as the head of its
context. Blocks are shared, not copied, and immutable; a block is
evicted, least recently used first, only when no request holds it and the token budget needs
room. A prefix the store lacks in part (a block evicted while vLLM kept its own) is a miss: the
request drafts from the context it has, and the miss is counted.

`kv_block_tokens` must divide vLLM's block size, so every prefix vLLM serves from its cache
ends on one of our block boundaries.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import torch

ROOT = 0  # the parent key of a sequence's first block


def block_key(parent: int, tokens: Sequence[int]) -> int:
    """The key of a block of `tokens` following the prefix keyed `parent`."""
    return hash((parent, tuple(tokens)))


@dataclass(eq=False)
class SharedKVBlock:
    """Keys and values of one block's positions, per drafter layer: [kv_heads, block, dim]."""

    key: int
    start: int
    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    holders: int = 0


@dataclass
class SharedPrefixStats:
    registered_blocks: int = 0
    reused_blocks: int = 0
    evicted_blocks: int = 0
    # Requests whose prefix vLLM served from its cache but this store held only in part, and
    # the positions they drafted without.
    missed_requests: int = 0
    missed_tokens: int = 0
    full_store_skips: int = 0  # blocks not kept: every held block was in use

    def as_dict(self) -> dict[str, int]:
        return {
            "shared_prefix_registered_blocks": self.registered_blocks,
            "shared_prefix_reused_blocks": self.reused_blocks,
            "shared_prefix_evicted_blocks": self.evicted_blocks,
            "shared_prefix_missed_requests": self.missed_requests,
            "shared_prefix_missed_tokens": self.missed_tokens,
            "shared_prefix_full_store_skips": self.full_store_skips,
        }


class SharedPrefixStore:
    """key -> SharedKVBlock, at most `max_tokens` positions in all."""

    def __init__(self, kv_block_tokens: int, max_tokens: int) -> None:
        if kv_block_tokens < 1:
            raise ValueError(f"kv_block_tokens must be >= 1, got {kv_block_tokens}")
        self.kv_block_tokens = kv_block_tokens
        self.max_tokens = max_tokens
        self._blocks: OrderedDict[int, SharedKVBlock] = OrderedDict()
        self.stats = SharedPrefixStats()

    @property
    def num_tokens(self) -> int:
        return len(self._blocks) * self.kv_block_tokens

    @property
    def num_held(self) -> int:
        """Blocks some request holds."""
        return sum(1 for block in self._blocks.values() if block.holders)

    def __contains__(self, key: int) -> bool:
        return key in self._blocks

    def take(self, tokens: Sequence[int], wanted: int) -> list[SharedKVBlock]:
        """The blocks of the longest stored prefix of `tokens`, up to `wanted` positions (the
        prefix vLLM served from its cache), each now held once more; counts a miss when they
        cover less than `wanted`."""
        size = self.kv_block_tokens
        taken: list[SharedKVBlock] = []
        parent = ROOT
        for start in range(0, wanted - wanted % size, size):
            key = block_key(parent, tokens[start : start + size])
            block = self._blocks.get(key)
            if block is None:
                break
            self._blocks.move_to_end(key)
            block.holders += 1
            taken.append(block)
            parent = key
        covered = len(taken) * size
        self.stats.reused_blocks += len(taken)
        if covered < wanted:
            self.stats.missed_requests += 1
            self.stats.missed_tokens += wanted - covered
        return taken

    def release(self, blocks: Sequence[SharedKVBlock]) -> None:
        for block in blocks:
            block.holders -= 1

    def put(
        self, key: int, start: int, keys: Sequence[torch.Tensor], values: Sequence[torch.Tensor]
    ) -> None:
        """Keep a block (copies of its keys/values), unless it is already here; make room by
        evicting unheld blocks, least recently used first."""
        if key in self._blocks:
            self._blocks.move_to_end(key)
            return
        if self.num_tokens + self.kv_block_tokens > self.max_tokens:
            for old_key in [k for k, b in self._blocks.items() if not b.holders]:
                del self._blocks[old_key]
                self.stats.evicted_blocks += 1
                if self.num_tokens + self.kv_block_tokens <= self.max_tokens:
                    break
        if self.num_tokens + self.kv_block_tokens > self.max_tokens:
            self.stats.full_store_skips += 1
            return
        self._blocks[key] = SharedKVBlock(
            key, start, [k.clone() for k in keys], [v.clone() for v in values]
        )
        self.stats.registered_blocks += 1
