"""The Qwen2 network as Dream and Fast-dLLM v2 checkpoints store it.

Both diffusion LMs are Qwen2.5 models trained further, with Qwen2's tensors under Qwen2's names:
q/k/v projections with bias, o_proj without, SwiGLU MLP, RMSNorm, RoPE, grouped-query attention.
What makes them diffusion LMs is how they attend (Dream: bidirectional; Fast-dLLM v2:
bidirectional inside 32-token blocks, causal across them) and that is the caller's mask, not
the network's, so one module tree serves both.

The file reads top to bottom like a transformers model file (config, attention, MLP, layer,
model, head); the arithmetic is shared with LLaDA in transformer.py.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import nn

from dlmspec_vllm.drafters.checkpoint import DrafterLoadError
from dlmspec_vllm.drafters.transformer import (
    DiffusionNetwork,
    LayerKV,
    RMSNorm,
    Rope,
    RotaryEmbedding,
    grouped_query_attention,
    run_layers,
    swiglu,
)


@dataclass(frozen=True)
class Qwen2LayoutConfig:
    """The config.json fields the network needs, named as in transformers' Qwen2Config."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    max_position_embeddings: int
    mask_token_id: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    tie_word_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    pad_token_id: int | None = None

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @staticmethod
    def read_fields(
        raw: Mapping[str, Any], *, family: str, mask_token_id: int | None
    ) -> dict[str, Any]:
        """This class's fields from a config.json; refuse what this network would ignore.

        mask_token_id: the family's default when config.json has none (None: it is required).
        """
        if raw.get("hidden_act", "silu") != "silu":
            raise DrafterLoadError(
                f"{family} hidden_act {raw['hidden_act']!r} is not supported (silu)"
            )
        rope_parameters = raw.get("rope_parameters") or {}
        if raw.get("rope_scaling") or rope_parameters.get("rope_type", "default") != "default":
            scaling = raw.get("rope_scaling") or rope_parameters
            raise DrafterLoadError(f"{family} RoPE scaling {scaling!r} is not supported (default)")
        if raw.get("use_sliding_window"):
            raise DrafterLoadError(f"{family} sliding-window attention is not supported")
        if raw.get("mask_token_id") is None and mask_token_id is not None:
            raw = {**raw, "mask_token_id": mask_token_id}
        missing = [name for name in _REQUIRED_FIELDS if raw.get(name) is None]
        if missing:
            raise DrafterLoadError(f"{family} config.json lacks {', '.join(missing)}")
        heads, hidden = int(raw["num_attention_heads"]), int(raw["hidden_size"])
        if raw.get("head_dim") not in (None, hidden // heads):
            raise DrafterLoadError(
                f"head_dim {raw['head_dim']} != hidden_size / heads is not supported"
            )
        if not 0 <= int(raw["mask_token_id"]) < int(raw["vocab_size"]):
            raise DrafterLoadError(
                f"{family} mask_token_id {raw['mask_token_id']} is outside its vocabulary "
                f"({raw['vocab_size']}): set mask_token_id in config.json"
            )
        # transformers 5 writes rope_theta inside rope_parameters; released files have it flat.
        rope_theta = raw.get("rope_theta") or rope_parameters.get("rope_theta")
        return {
            "vocab_size": int(raw["vocab_size"]),
            "hidden_size": hidden,
            "intermediate_size": int(raw["intermediate_size"]),
            "num_hidden_layers": int(raw["num_hidden_layers"]),
            "num_attention_heads": heads,
            "num_key_value_heads": int(raw.get("num_key_value_heads") or heads),
            "max_position_embeddings": int(raw["max_position_embeddings"]),
            "mask_token_id": int(raw["mask_token_id"]),
            "rms_norm_eps": float(raw.get("rms_norm_eps", 1e-6)),
            "rope_theta": float(rope_theta or 10000.0),
            "tie_word_embeddings": bool(raw.get("tie_word_embeddings", False)),
            "bos_token_id": raw.get("bos_token_id"),
            "eos_token_id": raw.get("eos_token_id"),
            "pad_token_id": raw.get("pad_token_id"),
        }


_REQUIRED_FIELDS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "max_position_embeddings",
    "mask_token_id",
)


class Qwen2Attention(nn.Module):
    def __init__(self, config: Qwen2LayoutConfig) -> None:
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        kv_width = self.num_kv_heads * config.head_dim
        self.q_proj = nn.Linear(config.hidden_size, self.num_heads * config.head_dim, bias=True)
        self.k_proj = nn.Linear(config.hidden_size, kv_width, bias=True)
        self.v_proj = nn.Linear(config.hidden_size, kv_width, bias=True)
        self.o_proj = nn.Linear(self.num_heads * config.head_dim, config.hidden_size, bias=False)

    def forward(
        self, x: torch.Tensor, rope: Rope, mask: torch.Tensor | None, past: LayerKV | None
    ) -> tuple[torch.Tensor, LayerKV]:
        return grouped_query_attention(
            x,
            self.q_proj,
            self.k_proj,
            self.v_proj,
            self.o_proj,
            num_heads=self.num_heads,
            num_kv_heads=self.num_kv_heads,
            rope=rope,
            mask=mask,
            past=past,
        )


class MlpSizes(Protocol):
    """What Qwen2MLP reads of a config: DFlash's layers share the MLP but not the config."""

    @property
    def hidden_size(self) -> int: ...

    @property
    def intermediate_size(self) -> int: ...


class Qwen2MLP(nn.Module):
    def __init__(self, config: MlpSizes) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return swiglu(x, self.gate_proj, self.up_proj, self.down_proj)


class Qwen2DecoderLayer(nn.Module):
    def __init__(self, config: Qwen2LayoutConfig) -> None:
        super().__init__()
        self.self_attn = Qwen2Attention(config)
        self.mlp = Qwen2MLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(
        self, x: torch.Tensor, rope: Rope, mask: torch.Tensor | None, past: LayerKV | None
    ) -> tuple[torch.Tensor, LayerKV]:
        attended, kv = self.self_attn(self.input_layernorm(x), rope, mask, past)
        x = x + attended
        return x + self.mlp(self.post_attention_layernorm(x)), kv


class Qwen2Backbone(nn.Module):
    """Embeddings, decoder layers and the final norm: the checkpoint's ``model.*`` tensors."""

    def __init__(self, config: Qwen2LayoutConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(
            Qwen2DecoderLayer(config) for _ in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(config.head_dim, config.rope_theta)

    def forward(
        self,
        input_ids: torch.Tensor,
        mask: torch.Tensor | None = None,
        positions: torch.Tensor | None = None,
        past: Sequence[LayerKV] | None = None,
        keep_kv: bool = False,
    ) -> tuple[torch.Tensor, list[LayerKV]]:
        """Hidden states and per-layer new keys/values; positions default to 0..seq-1."""
        if positions is None:
            positions = torch.arange(input_ids.shape[1], device=input_ids.device)
            positions = positions.expand_as(input_ids)
        x, present = run_layers(
            self.embed_tokens(input_ids),
            self.layers,
            self.rotary_emb,
            positions=positions,
            mask=mask,
            past=past,
            keep_kv=keep_kv,
        )
        return self.norm(x), present


class Qwen2LayoutModel(DiffusionNetwork):
    """The whole network: ``model.*`` (backbone) and ``lm_head``.

    ``forward`` and ``hidden_states`` run a right-padded batch at positions 0..seq-1 with an
    optional key mask ([batch, seq], True = real token); ``decode`` is the drafting loop's entry,
    with explicit positions, any mask and a cached prefix.
    """

    def __init__(self, config: Qwen2LayoutConfig) -> None:
        super().__init__()
        self.config = config
        self.mask_token_id = config.mask_token_id
        self.vocab_size = config.vocab_size
        self.max_positions = config.max_position_embeddings
        self.model = Qwen2Backbone(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.tie_weights()

    def tied_parameter_names(self) -> set[str]:
        return {"lm_head.weight"} if self.config.tie_word_embeddings else set()

    def tie_weights(self) -> None:
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def hidden_states(
        self, input_ids: torch.Tensor, key_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Final normed hidden states [batch, seq, hidden], for callers that need few logits."""
        return self.model(input_ids, key_mask)[0]

    def forward(
        self, input_ids: torch.Tensor, key_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        return self.lm_head(self.hidden_states(input_ids, key_mask))

    def decode(
        self,
        input_ids: torch.Tensor,
        *,
        positions: torch.Tensor,
        mask: torch.Tensor | None,
        past: Sequence[LayerKV] | None,
        keep_kv: bool = False,
    ) -> tuple[torch.Tensor, list[LayerKV]]:
        return self.model(input_ids, mask, positions, past, keep_kv)

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)
