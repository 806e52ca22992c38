"""Drafting with a masked-diffusion LM: the loop every drafter family shares.

Per request the drafter's input is its context followed by ``lengths[b]`` mask tokens. All
requests go through each forward pass together, right-padded, with padded keys masked out, so a
request's logits do not depend on what else is in the batch. A family differs from another in
three facts only, which subclasses set:

- ``shifted_logits``: the output at index i predicts token i + 1 (Dream, Fast-dLLM v2, as the AR
  models they were adapted from), so drafted position j is read from index len(context) + j - 1;
  unshifted (LLaDA), position j is read at its own index;
- ``block_size``: None for bidirectional attention over the whole sequence (Dream, LLaDA); a
  block length for Fast-dLLM v2, whose tokens see every earlier block and their own block both
  ways, never a later block (blocks are aligned at position 0);
- ``sub_block_size``: with several denoising passes, only the earliest sub-block that still has
  masks may be unmasked in a pass (Fast-dLLM v2 decodes its 8-token sub-blocks in order).

Denoising (DraftingOptions): each pass fixes some masked positions to their argmax, and the
returned logits of a position are those of the pass that fixed it, so the confidences of Drafts
are what the drafter believed when it committed.

Prefix cache (DraftingOptions, with ``req_ids``): a request's context keys/values are kept
between calls and the longest shared token prefix is reused. With block-causal attention the
keys/values of finished blocks are exactly what a full pass computes, so the cache is exact;
with bidirectional attention a cached key was computed before later tokens existed, which a full
pass would have let it see, so the cache is an approximation that ``cache_refresh_interval``
bounds by rebuilding a request's cache every so many calls. Inside one call, later passes reuse
the first pass's context keys/values under the same rule (always for an exact cache, only when
caching is on otherwise), so they compute little more than the drafted block.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Protocol, Self

import torch

from dlmspec_vllm.drafters.base import DraftingOptions, Drafts
from dlmspec_vllm.drafters.cache import CachedPrefix, PrefixKVCache, common_prefix_length
from dlmspec_vllm.drafters.checkpoint import load_network, read_config
from dlmspec_vllm.drafters.transformer import DiffusionNetwork, LayerKV

NEG_INF = float("-inf")


class NetworkConfig(Protocol):
    """An architecture's config: read from a checkpoint's config.json, and written back."""

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> Self: ...

    def to_json_dict(self) -> dict[str, Any]: ...


@dataclass
class _Row:
    """One request's draft while it is being denoised.

    Positions before ``start`` come from ``past`` (per-layer keys, values [kv_heads, start,
    head_dim]); the forward pass computes context[start:] + block.
    """

    index: int
    req_id: str | None
    context: list[int]
    block: list[int]
    start: int
    past: list[LayerKV] | None
    uses: int

    def segment(self) -> list[int]:
        return self.context[self.start :] + self.block


class DiffusionDrafter:
    """Drafts a block per request with one or a few forward passes of a diffusion LM.

    Returned logits cover ids ``< target_vocab_size``; the mask token and ids past the drafter's
    own vocabulary are -inf so they are never drafted.
    """

    shifted_logits: ClassVar[bool] = True
    block_size: int | None = None
    sub_block_size: int | None = None
    # What an architecture file declares besides the facts above: its name in messages, its
    # config, and the network built from that config (loading and saving are checkpoint.py's).
    family: ClassVar[str]
    config_type: ClassVar[type[NetworkConfig]]
    network_type: ClassVar[type[DiffusionNetwork]]

    def __init__(
        self,
        model: DiffusionNetwork,
        *,
        target_vocab_size: int,
        options: DraftingOptions | None = None,
    ) -> None:
        self.model = model
        self.target_vocab_size = target_vocab_size
        self.options = options or DraftingOptions()
        self.mask_token_id = model.mask_token_id
        # Context and drafted block share the drafter's position range; longer contexts keep
        # only their last tokens (see draft).
        self.max_context_length = model.max_positions
        self.cache = PrefixKVCache(self.options.cache_max_tokens)
        self._keep = min(model.vocab_size, target_vocab_size)
        self._device = next(model.parameters()).device

    @classmethod
    def load_network(
        cls, path: str | Path, *, device: torch.device | str, dtype: torch.dtype
    ) -> DiffusionNetwork:
        """The family's network read from a checkpoint directory."""
        config = cls.config_type.from_dict(read_config(Path(path)))
        return load_network(
            lambda: cls.network_type(config), path, family=cls.family, device=device, dtype=dtype
        )

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        *,
        target_vocab_size: int,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        options: DraftingOptions | None = None,
    ) -> DiffusionDrafter:
        network = cls.load_network(path, device=device, dtype=dtype)
        return cls(network, target_vocab_size=target_vocab_size, options=options)

    @property
    def exact_cache(self) -> bool:
        return self.block_size is not None

    @property
    def num_cached_requests(self) -> int:
        return self.cache.num_requests

    @property
    def cached_tokens(self) -> int:
        return self.cache.num_tokens

    @property
    def cache_bytes(self) -> int:
        return self.cache.nbytes

    def forget(self, req_id: str) -> None:
        self.cache.forget(req_id)

    @torch.inference_mode()
    def draft(
        self,
        contexts: Sequence[Sequence[int]],
        lengths: Sequence[int],
        *,
        req_ids: Sequence[str] | None = None,
    ) -> Drafts:
        """Draft lengths[b] tokens after contexts[b] for every request b.

        Requests with length 0 are left out of the forward passes. A context longer than
        ``max_context_length - lengths[b]`` keeps only its last tokens: the drafter was trained
        on bounded positions, and the most recent tokens are what predict the next ones.
        Rows past lengths[b] are -inf.
        """
        if len(contexts) != len(lengths):
            raise ValueError(f"{len(contexts)} contexts but {len(lengths)} lengths")
        if req_ids is not None and len(req_ids) != len(lengths):
            raise ValueError(f"{len(req_ids)} req_ids for {len(lengths)} requests")
        lengths = [int(n) for n in lengths]
        out = torch.full(
            (len(lengths), max(lengths, default=0), self.target_vocab_size),
            NEG_INF,
            device=self._device,
        )
        rows = [
            self._start_row(b, contexts[b], n, None if req_ids is None else req_ids[b])
            for b, n in enumerate(lengths)
            if n > 0
        ]
        steps = self.options.denoising_steps
        for step in range(steps):
            live = [row for row in rows if self.mask_token_id in row.block]
            if not live:
                break
            caching = step == 0 and any(self._caches(row) for row in live)
            advancing = step == 0 and steps > 1 and (self.exact_cache or self.options.cache_enabled)
            logits, present = self._forward(live, keep_kv=caching or advancing)
            self._unmask(live, logits, out, steps_left=steps - step)
            if caching:
                self._store(live, present)
            if advancing:
                self._advance(live, present)
        return Drafts(logits=out, lengths=lengths)

    def _caches(self, row: _Row) -> bool:
        return row.req_id is not None and self.options.cache_enabled

    def _start_row(
        self, index: int, context: Sequence[int], length: int, req_id: str | None
    ) -> _Row:
        """Trim the context to fit, then pick up what the cache holds for it."""
        room = self.max_context_length - length
        if room < 1:
            raise ValueError(
                f"draft length {length} leaves no room for context in the drafter's "
                f"{self.max_context_length} positions"
            )
        kept = list(context)[-room:]
        if not kept and self.shifted_logits:
            raise ValueError(
                "cannot draft after an empty context: this drafter reads its first drafted "
                "token from the last context position"
            )
        if kept and max(kept) >= self.model.vocab_size:
            raise ValueError(
                f"context token id {max(kept)} is outside the drafter's vocabulary "
                f"({self.model.vocab_size} ids): a drafter with its own tokenizer needs the "
                "vocabulary bridge (load_drafter(..., target_tokenizer=...))"
            )
        row = _Row(index, req_id, kept, [self.mask_token_id] * length, 0, None, 0)
        entry = self.cache.get(req_id) if req_id is not None and self._caches(row) else None
        if entry is not None and (
            self.exact_cache or entry.uses < self.options.cache_refresh_interval
        ):
            row.start = self._reusable(common_prefix_length(entry.tokens, kept), len(kept))
            if row.start > 0:
                row.past = [
                    (k[:, : row.start], v[:, : row.start]) for k, v in zip(entry.keys, entry.values)
                ]
                row.uses = entry.uses + 1
        return row

    def _reusable(self, shared: int, context_length: int) -> int:
        """How many leading positions may come from cached keys/values, given that the cached
        and the new context share their first ``shared`` tokens."""
        # A shifted model reads the first drafted token at the last context position, so that
        # position is always computed.
        limit = min(shared, context_length - 1 if self.shifted_logits else context_length)
        if self.block_size is not None:
            # A block's keys depend on the whole block: only blocks before the first changed
            # (or still open) one are reusable.
            limit = limit // self.block_size * self.block_size
        return max(limit, 0)

    def _storable(self, context_length: int) -> int:
        """How many leading context positions the cache keeps after a call: the whole context,
        or with block-causal attention its finished blocks, whose keys are final."""
        if self.block_size is None:
            return context_length
        return context_length // self.block_size * self.block_size

    def _forward(self, rows: list[_Row], *, keep_kv: bool) -> tuple[torch.Tensor, list[LayerKV]]:
        """One pass over every row's segment; the restricted logits of every drafted position
        [rows, max_length, kept vocabulary] (mask id -inf) and the segments' keys/values."""
        device = self._device
        segments = [row.segment() for row in rows]
        queries = max(len(s) for s in segments)
        past_len = max((row.start for row in rows if row.past is not None), default=0)
        input_ids = torch.full((len(rows), queries), self.mask_token_id, dtype=torch.long)
        query_valid = torch.zeros((len(rows), queries), dtype=torch.bool)
        starts = torch.tensor([row.start for row in rows])
        for a, segment in enumerate(segments):
            input_ids[a, : len(segment)] = torch.tensor(segment)
            query_valid[a, : len(segment)] = True
        positions = starts[:, None] + torch.arange(queries)
        key_positions = torch.cat((torch.arange(past_len).expand(len(rows), -1), positions), 1)
        key_valid = torch.cat((torch.arange(past_len) < starts[:, None], query_valid), 1)

        mask: torch.Tensor | None
        if self.block_size is not None:
            blocks_before = key_positions[:, None, :] // self.block_size
            mask = key_valid[:, None, :] & (
                blocks_before <= positions[:, :, None] // self.block_size
            )
        else:
            # Without padding, no mask at all lets SDPA pick its fastest kernel.
            mask = None if bool(key_valid.all()) else key_valid
        past = self._stack_past(rows, past_len) if past_len else None
        hidden, present = self.model.decode(
            input_ids.to(device),
            positions=positions.to(device),
            mask=None if mask is None else mask.to(device),
            past=past,
            keep_kv=keep_kv,
        )

        max_length = max(len(row.block) for row in rows)
        shift = 1 if self.shifted_logits else 0
        read_at = torch.zeros((len(rows), max_length), dtype=torch.long)
        for a, row in enumerate(rows):
            first = len(row.context) - shift - row.start
            read_at[a, : len(row.block)] = torch.arange(first, first + len(row.block))
        read_at = read_at.to(device)
        picked = hidden.gather(1, read_at[..., None].expand(-1, -1, hidden.shape[-1]))
        logits = self.model.head(picked)[..., : self._keep].float()
        if self.mask_token_id < self._keep:
            logits[..., self.mask_token_id] = NEG_INF
        return logits, present

    def _stack_past(self, rows: list[_Row], past_len: int) -> list[LayerKV]:
        """Every row's cached prefix, right-padded with zeros to past_len, per layer."""
        template = next(row.past for row in rows if row.past is not None)
        stacked = []
        for layer, (k0, _) in enumerate(template):
            shape = (len(rows), k0.shape[0], past_len, k0.shape[2])
            keys, values = k0.new_zeros(shape), k0.new_zeros(shape)
            for a, row in enumerate(rows):
                if row.past is not None:
                    keys[a, :, : row.start], values[a, :, : row.start] = row.past[layer]
            stacked.append((keys, values))
        return stacked

    def _unmask(
        self, rows: list[_Row], logits: torch.Tensor, out: torch.Tensor, *, steps_left: int
    ) -> None:
        """Fix this pass's chosen positions: their tokens into the rows, their logits into out."""
        masked = torch.zeros(logits.shape[:2], dtype=torch.bool)
        for a, row in enumerate(rows):
            masked[a, : len(row.block)] = torch.tensor(row.block) == self.mask_token_id
        masked = masked.to(logits.device)
        best, tokens = logits.max(dim=-1)
        # Top probability without materialising a softmax over the whole vocabulary.
        confidence = (best - logits.logsumexp(dim=-1)).exp()
        if steps_left == 1:
            chosen = masked
        else:
            chosen = self._choose(rows, masked, confidence, steps_left)

        index = torch.tensor([row.index for row in rows], device=out.device)
        rows_chosen, positions_chosen = chosen.nonzero(as_tuple=True)
        out[index[rows_chosen], positions_chosen, : self._keep] = logits[
            rows_chosen, positions_chosen
        ]
        chosen_tokens = torch.where(chosen, tokens, -1).tolist()
        for row, picks in zip(rows, chosen_tokens, strict=True):
            for j in range(len(row.block)):
                if picks[j] >= 0:
                    row.block[j] = picks[j]

    def _choose(
        self, rows: list[_Row], masked: torch.Tensor, confidence: torch.Tensor, steps_left: int
    ) -> torch.Tensor:
        """Which masked positions this (not last) pass fixes: every candidate at or above the
        threshold, at least the most confident one; without a threshold an equal share of the
        remaining positions, most confident first."""
        candidates = masked & self._window(rows, masked)
        score = confidence.masked_fill(~candidates, -1.0)
        threshold = self.options.unmask_threshold
        if threshold is not None:
            chosen = candidates & (confidence >= threshold)
            best = score.argmax(dim=1, keepdim=True)
            return chosen | (torch.zeros_like(chosen).scatter_(1, best, True) & candidates)
        share = torch.ceil(masked.sum(dim=1, keepdim=True) / steps_left)
        order = score.argsort(dim=1, descending=True)
        ranks = torch.empty_like(order).scatter_(
            1, order, torch.arange(score.shape[1], device=score.device).expand_as(order)
        )
        return candidates & (ranks < share)

    def _window(self, rows: list[_Row], masked: torch.Tensor) -> torch.Tensor:
        """Positions a pass may unmask: all, or the earliest sub-block that still has masks."""
        if self.sub_block_size is None:
            return torch.ones_like(masked)
        first = torch.tensor([len(row.context) for row in rows], device=masked.device)
        positions = first[:, None] + torch.arange(masked.shape[1], device=masked.device)
        sub_blocks = positions // self.sub_block_size
        earliest = sub_blocks.masked_fill(~masked, torch.iinfo(torch.long).max).amin(dim=1)
        return sub_blocks == earliest[:, None]

    def _store(self, rows: list[_Row], present: list[LayerKV]) -> None:
        """Cache each row's context keys/values: what it reused plus what this pass computed."""
        for a, row in enumerate(rows):
            if not self._caches(row) or row.req_id is None:
                continue
            end = self._storable(len(row.context))
            layers = self._extended_past(row, present, a, end)
            self.cache.put(
                row.req_id,
                CachedPrefix(
                    tokens=row.context[:end],
                    keys=[k for k, _ in layers],
                    values=[v for _, v in layers],
                    uses=row.uses,
                ),
            )

    def _advance(self, rows: list[_Row], present: list[LayerKV]) -> None:
        """Later passes of this call reuse this pass's context keys/values (see module doc)."""
        for a, row in enumerate(rows):
            start = self._reusable(len(row.context), len(row.context))
            if start > row.start and self.mask_token_id in row.block:
                row.past = self._extended_past(row, present, a, start)
                row.start = start

    def _extended_past(self, row: _Row, present: list[LayerKV], a: int, end: int) -> list[LayerKV]:
        """Per layer, the keys/values of the row's first ``end`` positions: its past, then the
        first ``end - start`` of this pass's (copied, so the batch's tensors can be freed)."""
        fresh = end - row.start
        layers = []
        for layer, (k, v) in enumerate(present):
            if row.past is None:
                layers.append((k[a, :, :fresh].clone(), v[a, :, :fresh].clone()))
            else:
                past_k, past_v = row.past[layer]
                layers.append(
                    (
                        torch.cat((past_k, k[a, :, :fresh]), 1),
                        torch.cat((past_v, v[a, :, :fresh]), 1),
                    )
                )
        return layers
