"""Fast-dLLM v2: Qwen2.5 adapted to block diffusion, and the drafter built on it.

Fast-dLLM v2 (NVlabs; Efficient-Large-Model/Fast_dLLM_v2_1.5B and _7B) keeps Qwen2.5's network
and tensor names (qwen2_layout.py) and changes how it attends: the sequence is cut into blocks of
``bd_size`` (32) tokens from position 0; a token sees its own block both ways and every earlier
block, never a later one. Its logits stay shifted like the AR model's (the output at i predicts
token i + 1). Released generation decodes a block in sub-blocks of 8 tokens, left to right.

Because no token sees a later block, the keys/values of a finished block never change: this
drafter's prefix cache holds whole finished blocks of the context and is exact.

config.json: model_type "Fast_dLLM_Qwen", architectures ["Fast_dLLM_QwenForCausalLM"], Qwen2's
fields plus ``bd_size``. The released config has no mask id (its generation code defaults to
151665, the ``|<MASK>|`` token its tokenizer adds), so ``mask_token_id`` is read when present
and 151665 otherwise.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

from dlmspec_vllm.drafters.base import DraftingOptions
from dlmspec_vllm.drafters.checkpoint import DrafterLoadError
from dlmspec_vllm.drafters.diffusion import DiffusionDrafter
from dlmspec_vllm.drafters.qwen2_layout import Qwen2LayoutConfig, Qwen2LayoutModel

FAST_DLLM_MODEL_TYPE = "Fast_dLLM_Qwen"
FAST_DLLM_ARCHITECTURE = "Fast_dLLM_QwenForCausalLM"
FAST_DLLM_MASK_TOKEN_ID = 151665
FAST_DLLM_SUB_BLOCK_SIZE = 8
FAST_DLLM_AUTO_MAP = {
    "AutoConfig": "configuration.Fast_dLLM_QwenConfig",
    "AutoModel": "modeling.Fast_dLLM_QwenModel",
    "AutoModelForCausalLM": "modeling.Fast_dLLM_QwenForCausalLM",
}


@dataclass(frozen=True)
class FastDllmV2Config(Qwen2LayoutConfig):
    """Qwen2's config.json fields plus the block size of block-causal attention."""

    bd_size: int = 32

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> FastDllmV2Config:
        fields = cls.read_fields(raw, family="Fast-dLLM v2", mask_token_id=FAST_DLLM_MASK_TOKEN_ID)
        bd_size = int(raw.get("bd_size") or 32)
        if bd_size % FAST_DLLM_SUB_BLOCK_SIZE:
            raise DrafterLoadError(
                f"Fast-dLLM v2 bd_size {bd_size} is not a multiple of its "
                f"{FAST_DLLM_SUB_BLOCK_SIZE}-token sub-blocks"
            )
        return cls(**fields, bd_size=bd_size)

    def to_json_dict(self) -> dict[str, Any]:
        """config.json contents laid out like a released Fast-dLLM v2 checkpoint's."""
        return {
            "architectures": [FAST_DLLM_ARCHITECTURE],
            "auto_map": dict(FAST_DLLM_AUTO_MAP),
            "model_type": FAST_DLLM_MODEL_TYPE,
            "hidden_act": "silu",
            "attention_dropout": 0.0,
            "rope_scaling": None,
            "use_cache": True,
            "use_sliding_window": False,
            "sliding_window": None,
            "max_window_layers": self.num_hidden_layers,
            "layer_types": ["full_attention"] * self.num_hidden_layers,
            "torch_dtype": "float32",
            **asdict(self),
        }


class FastDllmV2Drafter(DiffusionDrafter):
    """Drafts with Fast-dLLM v2: block-causal attention, shifted logits, sub-blocks of 8
    unmasked in order, exact prefix cache of finished blocks."""

    sub_block_size = FAST_DLLM_SUB_BLOCK_SIZE
    family = "Fast-dLLM v2"
    config_type = FastDllmV2Config
    network_type = Qwen2LayoutModel

    def __init__(
        self,
        model: Qwen2LayoutModel,
        *,
        target_vocab_size: int,
        options: DraftingOptions | None = None,
    ) -> None:
        if not isinstance(model.config, FastDllmV2Config):
            raise TypeError("FastDllmV2Drafter needs a network built from a FastDllmV2Config")
        super().__init__(model, target_vocab_size=target_vocab_size, options=options)
        self.block_size = model.config.bd_size
