"""The arithmetic every drafter network shares: RMSNorm, RoPE, attention, SwiGLU, the layer loop.

Dream and Fast-dLLM v2 (Qwen2's tensor names), LLaDA (OLMo-style names) and DFlash (Qwen3's,
with per-head query and key norms) are the same kind of transformer: pre-norm decoder layers
with RMSNorm, rotary positions, grouped-query attention and a SwiGLU MLP. Each architecture file
keeps its own module tree, named as its checkpoint's tensors so loading is a plain state-dict
load, and calls the functions here for the math, so a fix to the attention or the cache handling
is made once for every drafter.

Attention here is never causal by itself: the caller passes the mask (none, a key mask for
right padding, or Fast-dLLM v2's block-causal pattern) and, for a cached prefix (or DFlash's
target context), the prefix's keys and values, which every query may attend to as the mask
allows.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

# Keys and values of one layer, after RoPE: [batch, kv_heads, seq, head_dim] each.
LayerKV = tuple[torch.Tensor, torch.Tensor]
Rope = tuple[torch.Tensor, torch.Tensor]


class RMSNorm(nn.Module):
    """RMSNorm computed in fp32 whatever the weights' dtype, as Qwen2 and LLaDA both do."""

    def __init__(self, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def rope_inverse_frequencies(head_dim: int, theta: float) -> torch.Tensor:
    return 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))


class RotaryEmbedding(nn.Module):
    """Default RoPE (rotate-half layout); inv_freq is not persistent, so it is absent from
    checkpoints and is recomputed wherever the weights are loaded (see checkpoint.py)."""

    inv_freq: torch.Tensor

    def __init__(self, head_dim: int, theta: float) -> None:
        super().__init__()
        self.head_dim = head_dim
        self.theta = theta
        self.register_buffer(
            "inv_freq", rope_inverse_frequencies(head_dim, theta), persistent=False
        )

    def reset(self, device: torch.device | str) -> None:
        self.inv_freq = rope_inverse_frequencies(self.head_dim, self.theta).to(device)

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> Rope:
        """cos, sin of shape [batch, seq, head_dim] for integer positions [batch, seq]."""
        freqs = positions.float()[..., None] * self.inv_freq.float()
        angles = torch.cat((freqs, freqs), dim=-1)
        return angles.cos().to(dtype), angles.sin().to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


def apply_rope(x: torch.Tensor, rope: Rope) -> torch.Tensor:
    """x: [batch, heads, seq, head_dim]; cos, sin: [batch, seq, head_dim]."""
    cos, sin = rope
    return x * cos[:, None] + _rotate_half(x) * sin[:, None]


def _heads(x: torch.Tensor, proj: nn.Linear, heads: int, norm: nn.Module | None) -> torch.Tensor:
    """proj(x) [batch, seq, heads * head_dim] as [batch, heads, seq, head_dim], each head normed
    first where the architecture norms it (Qwen3's q_norm and k_norm)."""
    batch, seq, _ = x.shape
    out = proj(x).view(batch, seq, heads, proj.out_features // heads)
    return (out if norm is None else norm(out)).transpose(1, 2)


def keys_values(
    x: torch.Tensor,
    k_proj: nn.Linear,
    v_proj: nn.Linear,
    *,
    num_kv_heads: int,
    rope: Rope,
    k_norm: nn.Module | None = None,
) -> LayerKV:
    """x's keys (normed where the architecture does, after RoPE) and values: [batch, kv_heads,
    seq, head_dim] each, as attention computes them and a prefix cache stores them."""
    k = apply_rope(_heads(x, k_proj, num_kv_heads, k_norm), rope)
    return k, _heads(x, v_proj, num_kv_heads, None)


def grouped_query_attention(
    x: torch.Tensor,
    q_proj: nn.Linear,
    k_proj: nn.Linear,
    v_proj: nn.Linear,
    o_proj: nn.Linear,
    *,
    num_heads: int,
    num_kv_heads: int,
    rope: Rope,
    mask: torch.Tensor | None,
    past: LayerKV | None,
    q_norm: nn.Module | None = None,
    k_norm: nn.Module | None = None,
) -> tuple[torch.Tensor, LayerKV]:
    """Attention of x's tokens over [past keys, x's own keys]; returns the output and x's keys and
    values (after RoPE), which is what a prefix cache stores.

    mask: bool [batch, 1, queries or 1, keys], True where a query may attend; None = everywhere.
    q_norm, k_norm: per-head norms of queries and keys before RoPE, where the architecture has
    them.
    """
    batch, seq, _ = x.shape
    q = apply_rope(_heads(x, q_proj, num_heads, q_norm), rope)
    k, v = keys_values(x, k_proj, v_proj, num_kv_heads=num_kv_heads, rope=rope, k_norm=k_norm)
    keys, values = (k, v)
    if past is not None:
        keys, values = torch.cat((past[0], k), 2), torch.cat((past[1], v), 2)
    out = F.scaled_dot_product_attention(
        q, keys, values, attn_mask=mask, is_causal=False, enable_gqa=num_heads != num_kv_heads
    )
    return o_proj(out.transpose(1, 2).reshape(batch, seq, -1)), (k, v)


def swiglu(x: torch.Tensor, gate: nn.Linear, up: nn.Linear, down: nn.Linear) -> torch.Tensor:
    return down(F.silu(gate(x)) * up(x))


def run_layers(
    x: torch.Tensor,
    layers: Iterable[nn.Module],
    rotary: RotaryEmbedding,
    *,
    positions: torch.Tensor,
    mask: torch.Tensor | None,
    past: Sequence[LayerKV] | None,
    keep_kv: bool,
) -> tuple[torch.Tensor, list[LayerKV]]:
    """Run every decoder layer; each is called as ``layer(x, rope, mask, past_kv)`` and returns
    ``(x, (k, v))``. mask: None, a key mask [batch, keys] or a full mask [batch, queries, keys].

    The layers' new keys/values are returned only with ``keep_kv``: holding every layer's at
    once costs memory that a pass whose keys/values are not cached should not pay.
    """
    rope = rotary(positions, x.dtype)
    if mask is not None:
        mask = mask[:, None, None, :] if mask.dim() == 2 else mask[:, None]
    present = []
    for index, layer in enumerate(layers):
        x, kv = layer(x, rope, mask, None if past is None else past[index])
        if keep_kv:
            present.append(kv)
    return x, present


class CheckpointNetwork(nn.Module):
    """A network whose module tree is named as its checkpoint's tensors, built from a config
    that writes its config.json (``config.to_json_dict()``): what checkpoint.py loads and
    saves."""

    config: Any

    def tied_parameter_names(self) -> set[str]:
        """State-dict names that alias another tensor and are absent from the checkpoint."""
        return set()

    def tie_weights(self) -> None:
        """Re-point aliased parameters after a state-dict load replaced their targets."""


class DiffusionNetwork(CheckpointNetwork, ABC):
    """What the drafting loop needs of a network, whatever its checkpoint's tensor names."""

    mask_token_id: int
    vocab_size: int  # logit rows that are real tokens (the head may have padding rows after)
    max_positions: int

    @abstractmethod
    def decode(
        self,
        input_ids: torch.Tensor,
        *,
        positions: torch.Tensor,
        mask: torch.Tensor | None,
        past: Sequence[LayerKV] | None,
        keep_kv: bool = False,
    ) -> tuple[torch.Tensor, list[LayerKV]]:
        """Final normed hidden states of input_ids [batch, seq] and (with keep_kv) each layer's
        new keys and values, given a cached prefix (``past``) of every row's first positions."""

    @abstractmethod
    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits of hidden states (all of the head's rows, padding included)."""
