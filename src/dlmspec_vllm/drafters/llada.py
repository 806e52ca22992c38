"""LLaDA: a LLaMA-like masked diffusion LM with unshifted logits, and the drafter built on it.

LLaDA-8B (GSAI-ML/LLaDA-8B-Base, -Instruct) was trained from scratch as a masked diffusion model,
so unlike Dream its logits are *not* shifted: the output at a masked position predicts the token
at that same position. Its network is LLaMA's (RMSNorm, RoPE, SwiGLU, no biases) with
bidirectional attention, stored under OLMo-style names that this file's modules mirror:

    model.transformer.wte.weight                      token embeddings (embedding_size rows)
    model.transformer.blocks.{i}.attn_norm.weight     RMSNorm before attention
    model.transformer.blocks.{i}.{q,k,v}_proj.weight  attention projections
    model.transformer.blocks.{i}.attn_out.weight      attention output projection
    model.transformer.blocks.{i}.ff_norm.weight       RMSNorm before the MLP
    model.transformer.blocks.{i}.ff_proj.weight       SwiGLU gate (through SiLU)
    model.transformer.blocks.{i}.up_proj.weight       SwiGLU up
    model.transformer.blocks.{i}.ff_out.weight        SwiGLU down
    model.transformer.ln_f.weight                     final RMSNorm
    model.transformer.ff_out.weight                   output head (absent with weight_tying)

config.json names follow LLaDA's own configuration_llada.py (d_model, n_heads, n_layers, ...).
The mask id is config.json's ``mask_token_id``, 126336 (``<|mdm_mask|>``) when absent. LLaDA
has its own tokenizer (126464 ids), so it drafts for a Qwen or Llama target through the
vocabulary bridge (bridge.py). The released modeling_llada.py is never imported.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn

from dlmspec_vllm.drafters.checkpoint import (
    DrafterLoadError,
)
from dlmspec_vllm.drafters.diffusion import DiffusionDrafter
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

LLADA_MODEL_TYPE = "llada"
LLADA_ARCHITECTURE = "LLaDAModelLM"
LLADA_MASK_TOKEN_ID = 126336
LLADA_AUTO_MAP = {
    "AutoConfig": "configuration_llada.LLaDAConfig",
    "AutoModel": "modeling_llada.LLaDAModelLM",
    "AutoModelForCausalLM": "modeling_llada.LLaDAModelLM",
}
# Settings of LLaDA's configuration class that select code paths other than LLaDA-8B's; a
# checkpoint that sets one is refused rather than run with the wrong arithmetic.
_REQUIRED_SETTINGS: dict[str, Any] = {
    "block_type": "llama",
    "activation_type": "silu",
    "layer_norm_type": "rms",
    "rope": True,
    "alibi": False,
    "attention_layer_norm": False,
    "input_emb_norm": False,
    "scale_logits": False,
    "include_bias": False,
    "layer_norm_with_affine": True,
    "bias_for_layer_norm": False,
}


@dataclass(frozen=True)
class LLaDAConfig:
    """The config.json fields the network needs, named as in LLaDA's configuration_llada.py."""

    d_model: int
    n_heads: int
    n_kv_heads: int
    n_layers: int
    mlp_hidden_size: int
    vocab_size: int
    embedding_size: int
    max_sequence_length: int
    mask_token_id: int = LLADA_MASK_TOKEN_ID
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    weight_tying: bool = False
    include_qkv_bias: bool = False
    eos_token_id: int | None = None
    pad_token_id: int | None = None

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> LLaDAConfig:
        """Read a LLaDA config.json; refuse settings this implementation would silently ignore."""
        for name, wanted in _REQUIRED_SETTINGS.items():
            if name in raw and raw[name] is not None and raw[name] != wanted:
                raise DrafterLoadError(
                    f"LLaDA {name}={raw[name]!r} is not supported (only {wanted!r}, as LLaDA-8B)"
                )
        missing = [
            name for name in ("d_model", "n_heads", "n_layers", "vocab_size") if name not in raw
        ]
        if missing:
            raise DrafterLoadError(f"LLaDA config.json lacks {', '.join(missing)}")
        d_model, heads = int(raw["d_model"]), int(raw["n_heads"])
        kv_heads = raw.get("n_kv_heads") or (1 if raw.get("multi_query_attention") else heads)
        vocab = int(raw["vocab_size"])
        mask = int(raw.get("mask_token_id") or LLADA_MASK_TOKEN_ID)
        rows = int(raw.get("embedding_size") or vocab)
        if not 0 <= mask < vocab <= rows:
            raise DrafterLoadError(
                f"LLaDA mask_token_id {mask}, vocab_size {vocab} and embedding_size {rows} do not "
                "fit: need mask_token_id < vocab_size <= embedding_size"
            )
        return cls(
            d_model=d_model,
            n_heads=heads,
            n_kv_heads=int(kv_heads),
            n_layers=int(raw["n_layers"]),
            mlp_hidden_size=int(raw.get("mlp_hidden_size") or raw.get("mlp_ratio", 4) * d_model),
            vocab_size=vocab,
            embedding_size=rows,
            max_sequence_length=int(raw.get("max_sequence_length", 4096)),
            mask_token_id=mask,
            rope_theta=float(raw.get("rope_theta", 10000.0)),
            rms_norm_eps=float(raw.get("rms_norm_eps", 1e-5)),
            weight_tying=bool(raw.get("weight_tying", False)),
            include_qkv_bias=bool(raw.get("include_qkv_bias", False)),
            eos_token_id=raw.get("eos_token_id"),
            pad_token_id=raw.get("pad_token_id"),
        )

    def to_json_dict(self) -> dict[str, Any]:
        """config.json contents laid out like a released LLaDA checkpoint's."""
        return {
            "architectures": [LLADA_ARCHITECTURE],
            "auto_map": dict(LLADA_AUTO_MAP),
            "model_type": LLADA_MODEL_TYPE,
            **_REQUIRED_SETTINGS,
            "flash_attention": False,
            "multi_query_attention": None,
            "rope_full_precision": True,
            "use_cache": False,
            "torch_dtype": "float32",
            **asdict(self),
        }


class LLaDALayer(nn.Module):
    """One decoder layer (a "block" in LLaDA's checkpoints); attention and MLP projections sit
    directly on it, as stored."""

    def __init__(self, config: LLaDAConfig) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads = config.n_heads, config.n_kv_heads
        kv_width = config.n_kv_heads * config.head_dim
        bias = config.include_qkv_bias
        self.attn_norm = RMSNorm(config.d_model, config.rms_norm_eps)
        self.q_proj = nn.Linear(config.d_model, config.d_model, bias=bias)
        self.k_proj = nn.Linear(config.d_model, kv_width, bias=bias)
        self.v_proj = nn.Linear(config.d_model, kv_width, bias=bias)
        self.attn_out = nn.Linear(config.d_model, config.d_model, bias=False)
        self.ff_norm = RMSNorm(config.d_model, config.rms_norm_eps)
        self.ff_proj = nn.Linear(config.d_model, config.mlp_hidden_size, bias=False)
        self.up_proj = nn.Linear(config.d_model, config.mlp_hidden_size, bias=False)
        self.ff_out = nn.Linear(config.mlp_hidden_size, config.d_model, bias=False)

    def forward(
        self, x: torch.Tensor, rope: Rope, mask: torch.Tensor | None, past: LayerKV | None
    ) -> tuple[torch.Tensor, LayerKV]:
        attended, kv = grouped_query_attention(
            self.attn_norm(x),
            self.q_proj,
            self.k_proj,
            self.v_proj,
            self.attn_out,
            num_heads=self.num_heads,
            num_kv_heads=self.num_kv_heads,
            rope=rope,
            mask=mask,
            past=past,
        )
        x = x + attended
        return x + swiglu(self.ff_norm(x), self.ff_proj, self.up_proj, self.ff_out), kv


class LLaDABackbone(nn.Module):
    """The checkpoint's ``model.*``: a ``transformer`` dict of embeddings, blocks, norm, head."""

    def __init__(self, config: LLaDAConfig) -> None:
        super().__init__()
        modules: dict[str, nn.Module] = {
            "wte": nn.Embedding(config.embedding_size, config.d_model),
            "blocks": nn.ModuleList(LLaDALayer(config) for _ in range(config.n_layers)),
            "ln_f": RMSNorm(config.d_model, config.rms_norm_eps),
        }
        if not config.weight_tying:
            modules["ff_out"] = nn.Linear(config.d_model, config.embedding_size, bias=False)
        self.transformer = nn.ModuleDict(modules)
        self.rotary_emb = RotaryEmbedding(config.head_dim, config.rope_theta)

    def forward(
        self,
        input_ids: torch.Tensor,
        mask: torch.Tensor | None,
        positions: torch.Tensor,
        past: Sequence[LayerKV] | None,
        keep_kv: bool,
    ) -> tuple[torch.Tensor, list[LayerKV]]:
        x, present = run_layers(
            self.transformer["wte"](input_ids),
            cast(nn.ModuleList, self.transformer["blocks"]),
            self.rotary_emb,
            positions=positions,
            mask=mask,
            past=past,
            keep_kv=keep_kv,
        )
        return self.transformer["ln_f"](x), present


class LLaDAModel(DiffusionNetwork):
    """LLaDA's whole network (LLaDAModelLM in the released code); unshifted logits."""

    def __init__(self, config: LLaDAConfig) -> None:
        super().__init__()
        self.config = config
        self.mask_token_id = config.mask_token_id
        self.vocab_size = config.vocab_size
        self.max_positions = config.max_sequence_length
        self.model = LLaDABackbone(config)

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
        transformer = self.model.transformer
        if self.config.weight_tying:
            return F.linear(hidden, cast(nn.Embedding, transformer["wte"]).weight)
        return transformer["ff_out"](hidden)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Logits of a whole unpadded batch at positions 0..seq-1, bidirectionally."""
        positions = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
        return self.head(self.decode(input_ids, positions=positions, mask=None, past=None)[0])


class LLaDADrafter(DiffusionDrafter):
    """Drafts with LLaDA: bidirectional attention, unshifted logits (drafted position j is read
    at index ``len(context) + j``), approximate prefix cache."""

    shifted_logits = False
    model: LLaDAModel
    family = "LLaDA"
    config_type = LLaDAConfig
    network_type = LLaDAModel
