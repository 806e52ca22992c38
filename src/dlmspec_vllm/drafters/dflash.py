"""DFlash-style drafter: a few bidirectional layers that read the target's own hidden states.

A standalone diffusion LM must guess what the target will say from the tokens alone. A DFlash
drafter (z-lab, "Block Diffusion for Flash Speculative Decoding") is told what the target was
thinking: the target's hidden states from a few chosen layers, at every context position, are
concatenated, projected by ``fc`` and normed by ``hidden_norm``, and every drafter layer attends
to them as extra keys/values in front of the block. The block is [last token, MASK, ...] at the
positions that follow the context; attention inside it is bidirectional, and the output at each
masked position is the prediction of the token at that very position (no shift). Embeddings and
the LM head are the target's own, never stored with the drafter.

Checkpoint layout: z-lab's released DFlash drafters (``architectures: ["DFlashDraftModel"]``,
``model_type: "qwen3"``, ``dflash_config: {mask_token_id, target_layer_ids}``, ``block_size``),
tensors ``layers.N.{self_attn.{q,k,v,o}_proj, self_attn.{q,k}_norm, mlp.{gate,up,down}_proj,
input_layernorm, post_attention_layernorm}``, ``fc``, ``hidden_norm``, ``norm``. Optionally a
draft vocabulary: ``d2t`` (EAGLE-3's draft-to-target offsets) restricts drafting to a subset of
the target's vocabulary so that the LM head reads far fewer bytes per pass (on a CPU the full
head of a 49k-token vocabulary costs more than the drafter's layers). Such a checkpoint also
holds its draft-sized ``lm_head`` (the target head's rows at those ids) and says
``draft_vocab_size`` in its config: the layout vLLM's own ``dflash`` method loads.

Per request the drafter keeps the keys/values of the context features it has been shown
(``observe_step``), each at its absolute position. A step's features are not projected when they
arrive: the step is kept as it came (one tensor for the batch) and each request notes which of
its rows are its own. Projection happens for the requests that draft, just before they draft,
and for everyone once the steps kept hold PROJECT_AFTER_BYTES of features, in one pass over all
their rows; so a request that does not draft costs a list append per step, one that finishes
before that point is never projected at all, and the steps kept are bounded.
A request's keys/values are kept as chunks (views into a projection) and joined only when it
drafts or has gathered CONSOLIDATE_CHUNKS of them. Features at a position it already holds
replace the old ones and everything after them: those belonged to a draft the target rejected.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from dlmspec_vllm.drafters.base import DraftingOptions, Drafts, StepFeatures, TargetFeatures
from dlmspec_vllm.drafters.cache import TokenBudgetLRU
from dlmspec_vllm.drafters.checkpoint import (
    DrafterLoadError,
    load_network,
    read_config,
    read_named_tensors,
    read_weights,
    resolve_checkpoint_dir,
    save_network,
)
from dlmspec_vllm.drafters.qwen2_layout import Qwen2MLP
from dlmspec_vllm.drafters.shared_prefix import ROOT, SharedKVBlock, SharedPrefixStore, block_key
from dlmspec_vllm.drafters.transformer import (
    CheckpointNetwork,
    LayerKV,
    RMSNorm,
    Rope,
    RotaryEmbedding,
    grouped_query_attention,
    keys_values,
)

ARCHITECTURE = "DFlashDraftModel"
DRAFT_TO_TARGET = "d2t"
DRAFT_HEAD = "lm_head.weight"
# A request's context chunks are joined once it holds this many: a chunk is a view that keeps
# its whole projection alive, so the count bounds what a request pins.
CONSOLIDATE_CHUNKS = 16
# Bytes of features the kept steps hold at most (those of requests that finished since count
# too); then every request's pending rows are projected together and the steps' tensors let go.
# For the demo drafter (4 target layers of 576, fp32) that is 7,281 positions, 455 decode steps
# at batch 16: most requests that do not draft finish unprojected.
PROJECT_AFTER_BYTES = 64 * 2**20


def default_target_layer_ids(num_target_layers: int, num_draft_layers: int) -> tuple[int, ...]:
    """DFlash's default choice when a config names no layers: evenly spread from layer 1 to
    layer num_target_layers - 3 (the middle layer for a one-layer drafter)."""
    if num_draft_layers == 1:
        return (num_target_layers // 2,)
    first, last = 1, num_target_layers - 3
    step = (last - first) / (num_draft_layers - 1)
    return tuple(int(round(first + i * step)) for i in range(num_draft_layers))


@dataclass(frozen=True)
class DFlashConfig:
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    block_size: int
    mask_token_id: int
    target_layer_ids: tuple[int, ...]
    num_target_layers: int
    target_hidden_size: int
    vocab_size: int
    max_position_embeddings: int = 32768
    attention_bias: bool = False

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> DFlashConfig:
        dflash = raw.get("dflash_config") or {}
        hidden = int(raw["hidden_size"])
        heads = int(raw["num_attention_heads"])
        layers = int(raw["num_hidden_layers"])
        num_target_layers = int(raw.get("num_target_layers") or 0)
        layer_ids = dflash.get("target_layer_ids")
        if layer_ids is None:
            if not num_target_layers:
                raise ValueError(
                    "config names neither dflash_config.target_layer_ids nor num_target_layers"
                )
            layer_ids = default_target_layer_ids(num_target_layers, layers)
        mask = dflash.get("mask_token_id", raw.get("mask_token_id"))
        if mask is None:
            raise ValueError("config has no dflash_config.mask_token_id")
        rope = raw.get("rope_parameters") or {}
        return cls(
            hidden_size=hidden,
            intermediate_size=int(raw["intermediate_size"]),
            num_hidden_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=int(raw.get("num_key_value_heads") or heads),
            head_dim=int(raw.get("head_dim") or hidden // heads),
            rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
            rope_theta=float(raw.get("rope_theta") or rope.get("rope_theta") or 1e6),
            block_size=int(raw.get("block_size") or dflash.get("block_size") or 16),
            mask_token_id=int(mask),
            target_layer_ids=tuple(int(i) for i in layer_ids),
            num_target_layers=num_target_layers or max(layer_ids) + 1,
            target_hidden_size=int(raw.get("target_hidden_size") or hidden),
            vocab_size=int(raw["vocab_size"]),
            max_position_embeddings=int(raw.get("max_position_embeddings", 32768)),
            attention_bias=bool(raw.get("attention_bias", False)),
        )

    def to_json_dict(self) -> dict[str, Any]:
        """config.json in the layout of z-lab's released drafters."""
        return {
            "architectures": [ARCHITECTURE],
            "model_type": "qwen3",
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "max_position_embeddings": self.max_position_embeddings,
            "attention_bias": self.attention_bias,
            "attention_dropout": 0.0,
            "layer_types": ["full_attention"] * self.num_hidden_layers,
            "tie_word_embeddings": False,
            "vocab_size": self.vocab_size,
            "block_size": self.block_size,
            "num_target_layers": self.num_target_layers,
            "target_hidden_size": self.target_hidden_size,
            "dflash_config": {
                "mask_token_id": self.mask_token_id,
                "target_layer_ids": list(self.target_layer_ids),
            },
            "torch_dtype": "bfloat16",
        }


class DFlashAttention(nn.Module):
    """Qwen3's attention (per-head query and key norms) over the target context's keys and
    values, then the block's own."""

    def __init__(self, config: DFlashConfig) -> None:
        super().__init__()
        hidden, head_dim = config.hidden_size, config.head_dim
        self.num_heads, self.num_kv_heads = config.num_attention_heads, config.num_key_value_heads
        bias = config.attention_bias
        self.q_proj = nn.Linear(hidden, self.num_heads * head_dim, bias=bias)
        self.k_proj = nn.Linear(hidden, self.num_kv_heads * head_dim, bias=bias)
        self.v_proj = nn.Linear(hidden, self.num_kv_heads * head_dim, bias=bias)
        self.o_proj = nn.Linear(self.num_heads * head_dim, hidden, bias=bias)
        self.q_norm = RMSNorm(head_dim, config.rms_norm_eps)
        self.k_norm = RMSNorm(head_dim, config.rms_norm_eps)

    def keys_values(self, x: torch.Tensor, rope: Rope) -> LayerKV:
        """Keys and values of x [batch, seq, hidden]: [batch, kv_heads, seq, head_dim] each.
        Context features and block tokens go through the same projections."""
        return keys_values(
            x,
            self.k_proj,
            self.v_proj,
            num_kv_heads=self.num_kv_heads,
            rope=rope,
            k_norm=self.k_norm,
        )

    def forward(
        self, x: torch.Tensor, rope: Rope, context: LayerKV, mask: torch.Tensor
    ) -> torch.Tensor:
        """mask: bool [batch, queries, context + queries], True where a query may attend."""
        out, _ = grouped_query_attention(
            x,
            self.q_proj,
            self.k_proj,
            self.v_proj,
            self.o_proj,
            num_heads=self.num_heads,
            num_kv_heads=self.num_kv_heads,
            rope=rope,
            mask=mask[:, None],
            past=context,
            q_norm=self.q_norm,
            k_norm=self.k_norm,
        )
        return out


class DFlashLayer(nn.Module):
    def __init__(self, config: DFlashConfig) -> None:
        super().__init__()
        self.self_attn = DFlashAttention(config)
        # The same SwiGLU, under the same tensor names, as Qwen2/Qwen3 layers.
        self.mlp = Qwen2MLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x, rope, context, mask):
        x = x + self.self_attn(self.input_layernorm(x), rope, context, mask)
        return x + self.mlp(self.post_attention_layernorm(x))


class DFlashNetwork(CheckpointNetwork):
    """The drafter's own weights (no embeddings, no head), named as z-lab's checkpoints."""

    def __init__(self, config: DFlashConfig) -> None:
        super().__init__()
        self.config = config
        self.layers = nn.ModuleList(DFlashLayer(config) for _ in range(config.num_hidden_layers))
        features = len(config.target_layer_ids) * config.target_hidden_size
        self.fc = nn.Linear(features, config.hidden_size, bias=False)
        self.hidden_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary = RotaryEmbedding(config.head_dim, config.rope_theta)

    def context_keys_values(
        self, features: torch.Tensor, positions: torch.Tensor
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per layer, the keys/values that target features [batch, n, F] at positions
        [batch, n] contribute: [batch, kv_heads, n, head_dim] each."""
        context = self.hidden_norm(self.fc(features))
        rope = self.rotary(positions, context.dtype)
        layers: list[DFlashLayer] = list(self.layers)  # type: ignore[arg-type]
        return [layer.self_attn.keys_values(context, rope) for layer in layers]

    def block_hidden(
        self,
        embeds: torch.Tensor,
        positions: torch.Tensor,
        context: Sequence[tuple[torch.Tensor, torch.Tensor]],
        mask: torch.Tensor,
    ) -> torch.Tensor:
        """Final normed hidden states of block tokens (their embeddings [batch, q, hidden] at
        positions [batch, q]) attending to the context keys/values of every layer and to the
        block. mask: bool [batch, q, n_context + q], True where a query may attend."""
        rope = self.rotary(positions, embeds.dtype)
        x = embeds
        for layer, layer_context in zip(self.layers, context):
            x = layer(x, rope, layer_context, mask)
        return self.norm(x)


class _RequestContext:
    """One request's context keys/values: a head of shared blocks (positions 0 on, taken from
    the SharedPrefixStore), then its own chunks of increasing positions, joined on demand.

    While the context runs from position 0 with nothing missing (``chained``), ``chain`` holds
    the keys of its full blocks and ``open_tokens`` the tokens since the last one, so each block
    it completes can be shared."""

    __slots__ = (
        "positions",
        "keys",
        "values",
        "length",
        "last",
        "head",
        "chain",
        "open_tokens",
        "chained",
    )

    def __init__(
        self, layers: int, head: Sequence[SharedKVBlock] = (), chained: bool = True
    ) -> None:
        self.positions: list[torch.Tensor] = []  # own chunks of [n] int64
        self.keys: list[list[torch.Tensor]] = [[] for _ in range(layers)]  # [kv_heads, n, dim]
        self.values: list[list[torch.Tensor]] = [[] for _ in range(layers)]
        self.length = 0  # own positions (the head's are counted by the store)
        self.head: list[SharedKVBlock] = list(head)
        self.chain: list[int] = [block.key for block in self.head]
        self.open_tokens: list[int] = []
        self.chained = chained
        self.last = self.head[-1].start + self.head[-1].keys[0].shape[1] - 1 if head else -1

    @property
    def head_length(self) -> int:
        return sum(block.keys[0].shape[1] for block in self.head)

    def append(
        self,
        positions: torch.Tensor,
        keys: Sequence[torch.Tensor],
        values: Sequence[torch.Tensor],
        last: int,
    ) -> None:
        self.positions.append(positions)
        for held, new in zip(self.keys, keys):
            held.append(new)
        for held, new in zip(self.values, values):
            held.append(new)
        self.length += positions.numel()
        self.last = last
        if len(self.positions) >= CONSOLIDATE_CHUNKS:
            self.joined()

    def joined(self) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
        """Own positions, and per layer own keys and values, as single tensors."""
        if not self.positions:
            empty = torch.zeros(0, dtype=torch.long)
            return empty, [], []
        if len(self.positions) != 1:
            self.positions = [torch.cat(self.positions)]
            self.keys = [[torch.cat(chunks, 1)] for chunks in self.keys]
            self.values = [[torch.cat(chunks, 1)] for chunks in self.values]
        return self.positions[0], [k[0] for k in self.keys], [v[0] for v in self.values]

    def held_before(self, position: int) -> int:
        """How many held positions (head and own) lie before `position`."""
        head = self.head_length
        if position <= head:
            return position
        return head + int((self.joined()[0] < position).sum())

    def copy_into(
        self, keys: Sequence[torch.Tensor], values: Sequence[torch.Tensor], row: int, count: int
    ) -> None:
        """The first `count` held positions' keys/values into row `row` of per-layer batches
        [rows, kv_heads, n, dim]."""
        at = 0
        for block in self.head:
            size = block.keys[0].shape[1]
            for layer, (k, v) in enumerate(zip(block.keys, block.values, strict=True)):
                keys[layer][row, :, at : at + size] = k
                values[layer][row, :, at : at + size] = v
            at += size
        own = count - at
        if own > 0:
            _, held_keys, held_values = self.joined()
            for layer in range(len(keys)):
                keys[layer][row, :, at:count] = held_keys[layer][:, :own]
                values[layer][row, :, at:count] = held_values[layer][:, :own]

    def keep(self, count: int, *, last: bool = False) -> list[SharedKVBlock]:
        """Keep the first (or, with last, the most recent) count positions, and no longer share
        what is cut; returns the head blocks let go. Cutting into the head lets go of whole
        blocks (the first of the most recent may keep fewer than count)."""
        dropped: list[SharedKVBlock] = []
        head = self.head_length
        if last:
            if head + self.length > count:
                self.chained = False  # the context will no longer start at position 0
            while self.head and self.head_length + self.length > count:
                dropped.append(self.head.pop(0))
            own_count = min(count, self.length)
            cut = slice(-own_count, None) if own_count else slice(0, 0)
        else:
            while self.head and self.head_length > count:
                dropped.append(self.head.pop())
            cut = slice(0, max(0, count - head))
        positions, keys, values = self.joined()
        if positions.numel():
            self.positions = [positions[cut]]
            self.keys = [[k[:, cut]] for k in keys]
            self.values = [[v[:, cut]] for v in values]
        self.length = self.positions[0].numel() if self.positions else 0
        if self.length:
            self.last = int(self.positions[0][-1])
        elif self.head:
            self.last = self.head[-1].start + self.head[-1].keys[0].shape[1] - 1
        else:
            self.last = -1
        return dropped


class DFlashDrafter:
    """Drafts a block per request in one pass of a DFlash network over the target's features."""

    reads_target_weights = True

    def __init__(
        self,
        network: DFlashNetwork,
        *,
        embed_weight: torch.Tensor,
        head_weight: torch.Tensor,
        draft_to_target: torch.Tensor | None,
        target_vocab_size: int,
        options: DraftingOptions | None = None,
        head_is_draft_sized: bool = False,
    ) -> None:
        config = network.config
        self.network = network.eval()
        self.config = config
        self.target_layer_ids = config.target_layer_ids
        self.target_vocab_size = target_vocab_size
        self.max_context_length = config.max_position_embeddings
        self.options = options or DraftingOptions()
        self.embed_weight = embed_weight
        if draft_to_target is None:
            self.draft_ids = None
            self.head_weight = head_weight[:target_vocab_size]
        else:
            self.draft_ids = torch.arange(len(draft_to_target)) + draft_to_target.long()
            if int(self.draft_ids.max()) >= target_vocab_size:
                raise DrafterLoadError(
                    f"the drafter's {DRAFT_TO_TARGET} maps to token ids beyond the target's "
                    f"vocabulary ({target_vocab_size}): it was trained for another target"
                )
            self.draft_ids = self.draft_ids.to(head_weight.device)
            self.head_weight = (
                head_weight if head_is_draft_sized else head_weight[self.draft_ids].contiguous()
            )
        # Each request's own positions count against cache_max_tokens; its head of shared
        # blocks is the store's, let go when the request's context leaves.
        self._contexts: TokenBudgetLRU[_RequestContext] = TokenBudgetLRU(
            self.options.cache_max_tokens,
            lambda entry: entry.length,
            lambda entry: self._release(entry.head),
        )
        shared = self.options.shared_prefix_max_tokens
        self.shared_prefixes = (
            SharedPrefixStore(self.options.kv_block_tokens, shared)
            if self.options.cache_enabled and shared > 0
            else None
        )
        # Steps whose features some request has not taken in yet, by serial number: (hidden
        # [n, F] where the target computed it, positions [n] on the CPU, their tokens or None);
        # and per request its rows there, as (serial, start, end), oldest first.
        self._steps: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]] = {}
        self._pending: dict[str, list[tuple[int, int, int]]] = {}
        self._kept_bytes = 0
        self._next_serial = 0

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        *,
        target_vocab_size: int,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        options: DraftingOptions | None = None,
        target_dir: str | Path | None = None,
    ) -> DFlashDrafter:
        path = Path(path)
        try:
            config = DFlashConfig.from_dict(read_config(path))
        except (KeyError, TypeError, ValueError) as err:
            raise DrafterLoadError(f"DFlash draft_model {path}: bad config.json ({err})") from err
        if target_dir is None:
            raise DrafterLoadError(
                f"DFlash draft_model {path} shares the target's embeddings and LM head: "
                "the target's checkpoint directory is needed to load it"
            )
        state = read_weights(path)
        draft_to_target = state.pop(DRAFT_TO_TARGET, None)
        draft_head = state.pop(DRAFT_HEAD, None)
        if draft_head is not None:
            rows = len(draft_to_target) if draft_to_target is not None else target_vocab_size
            if tuple(draft_head.shape) != (rows, config.hidden_size):
                raise DrafterLoadError(
                    f"DFlash draft_model {path}: its {DRAFT_HEAD} is {list(draft_head.shape)}, "
                    f"not [{rows}, {config.hidden_size}] (one row per draft token): the "
                    "checkpoint is damaged or was written for another draft vocabulary"
                )
        network = load_network(
            lambda: DFlashNetwork(config),
            path,
            family="DFlash",
            device=device,
            dtype=dtype,
            state=state,
        )
        embed, head = target_embedding_and_head(resolve_checkpoint_dir(target_dir))
        if embed.shape[1] != config.hidden_size:
            raise DrafterLoadError(
                f"DFlash draft_model {path} has hidden size {config.hidden_size} but the target "
                f"in {target_dir} embeds in {embed.shape[1]}: it was trained for another target"
            )
        own_head = draft_head is not None and draft_to_target is not None
        kept_head = draft_head if own_head and draft_head is not None else head
        return cls(
            network,
            embed_weight=embed.to(device=device, dtype=dtype),
            head_weight=kept_head.to(device=device, dtype=dtype),
            draft_to_target=draft_to_target,
            target_vocab_size=target_vocab_size,
            options=options,
            head_is_draft_sized=own_head,
        )

    @property
    def device(self) -> torch.device:
        return self.embed_weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.embed_weight.dtype

    @property
    def num_cached_requests(self) -> int:
        """Requests whose context is held, once every pending step is taken in."""
        self._project(list(self._pending))
        return self._contexts.num_requests

    @property
    def cached_tokens(self) -> int:
        """Context positions held, once every pending step is taken in."""
        self._project(list(self._pending))
        return self._contexts.num_tokens

    def observe(self, req_id: str, features: TargetFeatures) -> None:
        """observe_step for one request."""
        self.observe_step(StepFeatures.of_requests({req_id: features}))

    def observe_step(self, features: StepFeatures) -> None:
        total = int(features.positions.numel())
        if total == 0:
            return
        expected = self.network.fc.in_features
        if features.hidden.shape != (total, expected):
            raise ValueError(
                f"target features of shape {tuple(features.hidden.shape)} for {total} "
                f"positions; this drafter reads {expected} values per position "
                f"(layers {list(self.target_layer_ids)})"
            )
        if not self.options.cache_enabled:
            return
        serial = self._next_serial
        self._next_serial += 1
        positions = features.positions.flatten()
        self._steps[serial] = (features.hidden, positions, features.token_ids)
        self._kept_bytes += features.hidden.numel() * features.hidden.element_size()
        pending = self._pending
        adopting = self.shared_prefixes is not None and features.prefix_tokens is not None
        start = 0
        for req_id, count in zip(features.req_ids, features.counts):
            rows = pending.get(req_id)
            if rows is None:
                if adopting and req_id not in self._contexts:
                    self._adopt_shared_prefix(req_id, int(positions[start]), features)
                pending[req_id] = [(serial, start, start + count)]
            else:
                rows.append((serial, start, start + count))
            start += count
        if self._kept_bytes >= PROJECT_AFTER_BYTES:
            self._project(list(pending))

    def _adopt_shared_prefix(self, req_id: str, first: int, features: StepFeatures) -> None:
        """A request new to the drafter whose features start at `first` > 0: vLLM served its
        first positions from its prefix cache, so its context starts with their shared blocks."""
        store = self.shared_prefixes
        if first == 0 or store is None or features.prefix_tokens is None:
            return
        head = store.take(features.prefix_tokens(req_id, first), first)
        entry = _RequestContext(
            self.config.num_hidden_layers,
            head,
            chained=len(head) * store.kv_block_tokens == first,
        )
        self._contexts.put(req_id, entry)

    def _release(self, blocks: Sequence[SharedKVBlock]) -> None:
        if self.shared_prefixes is not None and blocks:
            self.shared_prefixes.release(blocks)

    def _share_blocks(self, entry: _RequestContext, tokens: Sequence[int]) -> None:
        """Put every block the context completed with `tokens` (its newest positions) into the
        shared store, keyed by its whole token prefix."""
        store = self.shared_prefixes
        assert store is not None
        size = store.kv_block_tokens
        entry.open_tokens.extend(tokens)
        while len(entry.open_tokens) >= size:
            tokens_of_block = entry.open_tokens[:size]
            key = block_key(entry.chain[-1] if entry.chain else ROOT, tokens_of_block)
            start = len(entry.chain) * size
            if key not in store:
                _, own_keys, own_values = entry.joined()
                at = start - entry.head_length
                store.put(
                    key,
                    start,
                    [k[:, at : at + size] for k in own_keys],
                    [v[:, at : at + size] for v in own_values],
                )
            entry.chain.append(key)
            del entry.open_tokens[:size]

    def _rewind_chain(self, entry: _RequestContext, first: int) -> None:
        """The context was cut back to positions before `first`: so is its chain of blocks."""
        if self.shared_prefixes is None:
            return
        size = self.shared_prefixes.kv_block_tokens
        full = first // size
        if full < len(entry.chain):
            del entry.chain[full:]
            entry.open_tokens = []
            entry.chained = entry.chained and first % size == 0
        else:
            del entry.open_tokens[first - full * size :]

    @torch.inference_mode()
    def _project(self, req_ids: Sequence[str]) -> None:
        """Take in the pending rows of these requests: their keys/values in one projection,
        appended to each request's context. The steps are let go once nobody waits on them
        (observe_step sees to that once they hold PROJECT_AFTER_BYTES)."""
        wanted = [r for r in req_ids if r in self._pending]
        if not wanted:
            self._let_go_of_steps()
            return
        chunks = [self._pending.pop(r) for r in wanted]
        steps = self._steps
        # Views of only the wanted rows, joined once: a copy of what is projected, no more.
        parts = [(steps[serial], a, b) for rows in chunks for serial, a, b in rows]
        hidden = torch.cat([step[0][a:b] for step, a, b in parts])
        positions = torch.cat([step[1][a:b] for step, a, b in parts])
        token_parts = [step[2][a:b] for step, a, b in parts if step[2] is not None]
        tokens = torch.cat(token_parts).tolist() if len(token_parts) == len(parts) else None
        layer_kv = self.network.context_keys_values(
            hidden.to(device=self.device, dtype=self.dtype)[None],
            positions.to(device=self.device)[None],
        )
        keys = [k[0] for k, _ in layer_kv]
        values = [v[0] for _, v in layer_kv]
        positions_np = positions.numpy()
        start = 0
        for req_id, rows in zip(wanted, chunks):
            end = start + sum(b - a for _, a, b in rows)
            held = positions_np[start:end]
            if len(rows) == 1 or bool((held[1:] > held[:-1]).all()):
                pieces = [(start, end)]
            else:  # some step replaced positions an earlier one brought: take them in order
                pieces, at = [], start
                for _, a, b in rows:
                    pieces.append((at, at + b - a))
                    at += b - a
            for a, b in pieces:
                piece_tokens = tokens[a:b] if tokens is not None else None
                self._append(req_id, positions[a:b], piece_tokens, keys, values, a, b)
            start = end
        self._let_go_of_steps()

    def _let_go_of_steps(self) -> None:
        if not self._pending:
            self._steps.clear()
            self._kept_bytes = 0

    def _append(
        self,
        req_id: str,
        positions: torch.Tensor,
        tokens: Sequence[int] | None,
        keys: Sequence[torch.Tensor],
        values: Sequence[torch.Tensor],
        start: int,
        end: int,
    ) -> None:
        """Rows start:end of a projection (increasing positions, their tokens if known) join
        req_id's context."""
        first, last = int(positions[0]), int(positions[-1])
        entry = self._contexts.take(req_id)
        if entry is None:
            entry = _RequestContext(self.config.num_hidden_layers, chained=first == 0)
        else:
            if first <= entry.last:
                self._release(entry.keep(entry.held_before(first)))
                self._rewind_chain(entry, first)
            elif first != entry.last + 1:
                entry.chained = False  # positions are missing in between
        entry.append(
            positions, [k[:, start:end] for k in keys], [v[:, start:end] for v in values], last
        )
        if tokens is None:
            entry.chained = False
        elif entry.chained and self.shared_prefixes is not None:
            self._share_blocks(entry, tokens)
        limit = self.options.cache_max_tokens
        if entry.length > limit:
            # Only the most recent context fits the budget: attend to that window.
            self._release(entry.keep(limit, last=True))
        self._contexts.put(req_id, entry)

    def forget(self, req_id: str) -> None:
        self._pending.pop(req_id, None)
        self._let_go_of_steps()
        self._contexts.forget(req_id)

    @torch.inference_mode()
    def draft(
        self,
        contexts: Sequence[Sequence[int]],
        lengths: Sequence[int],
        *,
        req_ids: Sequence[str] | None = None,
    ) -> Drafts:
        """A block per request: it begins at the first position the target has no features for
        (the token vLLM just sampled, then any tokens drafted since) and its masks fill the rest
        of ``block_size``. A request that asks for more than the block holds gets further
        passes, each block starting after the tokens the last one drafted (its argmax)."""
        if req_ids is not None:
            self._project([r for r, n in zip(req_ids, lengths) if n > 0])
        first = self._draft_one_pass(contexts, lengths, req_ids)
        remaining = [want - got for want, got in zip(lengths, first.lengths)]
        more = [i for i, n in enumerate(remaining) if n > 0 and first.lengths[i] > 0]
        if not more:
            return first
        drafted = first.argmax_tokens()
        rest = self.draft(
            [list(contexts[i]) + drafted[i] for i in more],
            [remaining[i] for i in more],
            req_ids=[req_ids[i] for i in more] if req_ids is not None else None,
        )
        lengths_out = list(first.lengths)
        for row, i in enumerate(more):
            lengths_out[i] += rest.lengths[row]
        logits = torch.full(
            (len(lengths_out), max(lengths_out), first.logits.shape[-1]),
            float("-inf"),
            device=self.device,
        )
        logits[:, : first.logits.shape[1]] = first.logits
        for row, i in enumerate(more):
            done, extra = first.lengths[i], rest.lengths[row]
            logits[i, done : done + extra] = rest.logits[row, :extra]
        return Drafts(logits=logits, lengths=lengths_out, vocab_ids=self.draft_ids)

    def _draft_one_pass(
        self,
        contexts: Sequence[Sequence[int]],
        lengths: Sequence[int],
        req_ids: Sequence[str] | None,
    ) -> Drafts:
        if req_ids is None:
            raise ValueError(
                "a DFlash drafter drafts from the target's hidden states, which arrive per "
                "request: call draft with req_ids after observe()"
            )
        block_size = self.config.block_size
        rows = []
        for context, length, req_id in zip(contexts, lengths, req_ids):
            entry = self._contexts.get(req_id)
            known_until = len(context) - 1
            if entry is None:
                start = known_until  # no features: the block starts at the last token alone
                keep = 0
            else:
                keep = entry.held_before(known_until)
                own_kept = keep - entry.head_length
                if own_kept > 0:
                    start = int(entry.joined()[0][own_kept - 1]) + 1
                else:
                    start = entry.head_length if keep else known_until
                # Tokens drafted since the features end join the block, but at most half of
                # it: the rest must stay masks for a pass to draft anything worth its cost.
                start = max(start, len(context) - block_size // 2)
            known = list(context[start:]) if length > 0 else []
            room = block_size - len(known)
            rows.append((entry, keep, start, known, max(0, min(length, room))))
        drafted = [n for *_, n in rows]
        width = max(drafted, default=0)
        logits = torch.full(
            (len(rows), width, self.head_weight.shape[0]), float("-inf"), device=self.device
        )
        active = [i for i, n in enumerate(drafted) if n > 0]
        if not active:
            return Drafts(logits=logits, lengths=drafted, vocab_ids=self.draft_ids)
        hidden = self._block_hidden([rows[i] for i in active])
        # Every drafted position of the batch through the head in one product.
        head_in = torch.cat(
            [
                hidden[out, len(rows[i][3]) : len(rows[i][3]) + drafted[i]]
                for out, i in enumerate(active)
            ]
        )
        scores = (head_in @ self.head_weight.T).float()
        done = 0
        for i in active:
            logits[i, : drafted[i]] = scores[done : done + drafted[i]]
            done += drafted[i]
        return Drafts(logits=logits, lengths=drafted, vocab_ids=self.draft_ids)

    def _block_hidden(self, rows: list[tuple]) -> torch.Tensor:
        """Hidden states of every row's block [rows, block_size, hidden], batched with the
        contexts right-padded and masked."""
        block_size = self.config.block_size
        n_context = max(keep for _, keep, *_ in rows)
        batch = len(rows)
        ids = torch.full((batch, block_size), self.config.mask_token_id, dtype=torch.long)
        positions = torch.zeros(batch, block_size, dtype=torch.long)
        mask = torch.zeros(batch, block_size, n_context + block_size, dtype=torch.bool)
        mask[:, :, n_context:] = True
        layers = self.config.num_hidden_layers
        kv_shape = (batch, self.config.num_key_value_heads, n_context, self.config.head_dim)
        keys = [torch.zeros(kv_shape, device=self.device, dtype=self.dtype) for _ in range(layers)]
        values = [torch.zeros_like(k) for k in keys]
        for row, (entry, keep, start, known, _) in enumerate(rows):
            ids[row, : len(known)] = torch.tensor(known, dtype=torch.long)
            positions[row] = torch.arange(start, start + block_size)
            mask[row, :, :keep] = True
            if keep:
                entry.copy_into(keys, values, row, keep)
        embeds = F.embedding(ids.to(self.device), self.embed_weight)
        return self.network.block_hidden(
            embeds, positions.to(self.device), list(zip(keys, values)), mask.to(self.device)
        )


def target_embedding_and_head(target_dir: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """The target checkpoint's input embedding and LM head (the same tensor when tied), read
    alone from its safetensors files."""
    wanted = {"model.embed_tokens.weight": "embed", "lm_head.weight": "head"}
    try:
        read = read_named_tensors(target_dir, wanted)
    except DrafterLoadError as err:
        raise DrafterLoadError(f"target checkpoint for the DFlash drafter: {err}") from None
    found = {wanted[name]: tensor for name, tensor in read.items()}
    if "embed" not in found:
        raise DrafterLoadError(
            f"target checkpoint {target_dir} has no model.embed_tokens.weight for the DFlash "
            "drafter to share"
        )
    tied = json.loads((target_dir / "config.json").read_text()).get("tie_word_embeddings", False)
    head = found.get("head", found["embed"] if tied else None)
    if head is None:
        raise DrafterLoadError(f"target checkpoint {target_dir} has no lm_head.weight")
    return found["embed"], head


def save_dflash_network(
    network: DFlashNetwork,
    path: str | Path,
    *,
    draft_to_target: torch.Tensor | None = None,
    draft_head: torch.Tensor | None = None,
    dtype: torch.dtype = torch.bfloat16,
) -> None:
    """Write config.json + model.safetensors in z-lab's DFlash layout; with a draft vocabulary
    (``draft_to_target`` offsets and ``draft_head``, the target head's rows at the draft ids)
    also ``d2t``, the draft-sized ``lm_head`` and ``draft_vocab_size``, which vLLM's own
    ``dflash`` method needs to load it."""
    if (draft_to_target is None) != (draft_head is None):
        raise ValueError("a draft vocabulary needs both draft_to_target and draft_head")
    config = network.config.to_json_dict()
    vocabulary: dict[str, torch.Tensor] = {}
    if draft_to_target is not None and draft_head is not None:
        if tuple(draft_head.shape) != (len(draft_to_target), network.config.hidden_size):
            raise ValueError(
                f"draft_head is {list(draft_head.shape)}, not one row of "
                f"{network.config.hidden_size} per draft token ({len(draft_to_target)})"
            )
        vocabulary[DRAFT_TO_TARGET] = draft_to_target.long()
        vocabulary[DRAFT_HEAD] = draft_head.to(dtype)
        config["draft_vocab_size"] = len(draft_to_target)
    save_network(network, path, config, dtype=dtype, extra_tensors=vocabulary)
