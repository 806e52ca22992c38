"""Dream: a Qwen2-layout diffusion LM with bidirectional attention, and the drafter built on it.

Dream-7B (HKUNLP, Dream-org/Dream-v0-*-7B) is Qwen2.5-7B trained further as a masked diffusion
model. The network is Qwen2's (qwen2_layout.py); only two things differ from the AR model it
came from:

- attention is bidirectional, so every position, masked or not, sees the whole sequence;
- logits stay *shifted* as in the AR model: the output at index i predicts token i + 1. A drafted
  block therefore reads its first position from the last context token's output.

The checkpoint's tensor names are Qwen2's, so loading is a plain state-dict load from
``model.safetensors`` or a sharded ``model.safetensors.index.json``. No ``trust_remote_code``:
the released ``modeling_dream.py`` is never imported.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

from dlmspec_vllm.drafters.diffusion import DiffusionDrafter
from dlmspec_vllm.drafters.qwen2_layout import Qwen2LayoutConfig, Qwen2LayoutModel

DREAM_MODEL_TYPE = "Dream"
DREAM_ARCHITECTURE = "DreamModel"
# What the released checkpoints put in config.json, so our checkpoints load in their code too.
DREAM_AUTO_MAP = {
    "AutoConfig": "configuration_dream.DreamConfig",
    "AutoModel": "modeling_dream.DreamModel",
}


@dataclass(frozen=True)
class DreamConfig(Qwen2LayoutConfig):
    """The config.json fields the network needs, named as in the released DreamConfig."""

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> DreamConfig:
        """Read a Dream config.json (mask_token_id required); refuse settings this
        implementation would silently ignore."""
        return cls(**cls.read_fields(raw, family="Dream", mask_token_id=None))

    def to_json_dict(self) -> dict[str, Any]:
        """config.json contents laid out like a released Dream checkpoint's."""
        return {
            "architectures": [DREAM_ARCHITECTURE],
            "auto_map": dict(DREAM_AUTO_MAP),
            "model_type": DREAM_MODEL_TYPE,
            "hidden_act": "silu",
            "attention_dropout": 0.0,
            "rope_scaling": None,
            "use_cache": False,
            "use_sliding_window": False,
            "sliding_window": None,
            "torch_dtype": "float32",
            **asdict(self),
        }


class DreamModel(Qwen2LayoutModel):
    """Dream's network; ``forward`` gives shifted logits (index i predicts token i + 1)."""

    config: DreamConfig


class DreamDrafter(DiffusionDrafter):
    """Drafts with Dream: bidirectional attention, shifted logits, approximate prefix cache.

    Drafted position j of request b is read from the output at index ``len(context) + j - 1``.
    """

    model: DreamModel
    family = "Dream"
    config_type = DreamConfig
    network_type = DreamModel
