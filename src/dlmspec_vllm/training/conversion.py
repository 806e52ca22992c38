"""Start a Dream drafter from an autoregressive target's weights.

Dream-7B began as Qwen2.5-7B: same tensors, same names, attention made bidirectional and the
logits left shifted. Doing the same for any Qwen2 or Llama target gives a drafter that already
predicts the next token from the last context position, which is what a drafter's first position
needs; masked-diffusion training then teaches it the later positions. docs/design.md, Facts records
that a drafter trained this way reached ~0.9 first-token acceptance where one trained without the
shift reached 0.29.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from dlmspec_vllm.drafters.dream import DreamConfig, DreamModel

SUPPORTED_SOURCE_MODEL_TYPES = ("qwen2", "llama")


def dream_config_from_causal_lm(source: Mapping[str, Any], *, mask_token_id: int) -> DreamConfig:
    """The Dream config of a drafter with the AR model's shapes (``source``: its config.json)."""
    model_type = source.get("model_type")
    if model_type not in SUPPORTED_SOURCE_MODEL_TYPES:
        raise ValueError(
            f"cannot start a Dream drafter from model_type {model_type!r}: "
            f"supported {SUPPORTED_SOURCE_MODEL_TYPES}"
        )
    if source.get("mlp_bias") or (model_type == "llama" and source.get("attention_bias")):
        raise ValueError("Llama checkpoints with mlp_bias or attention_bias have no Dream layout")
    if not 0 <= mask_token_id < int(source["vocab_size"]):
        raise ValueError(
            f"mask_token_id {mask_token_id} is outside the vocabulary ({source['vocab_size']}); "
            "add the mask token to the tokenizer within the model's embedding rows"
        )
    return DreamConfig.from_dict({**source, "mask_token_id": mask_token_id})


def dream_from_causal_lm(
    source_config: Mapping[str, Any],
    source_state: Mapping[str, torch.Tensor],
    *,
    mask_token_id: int,
) -> DreamModel:
    """A fp32 Dream model holding a copy of a Qwen2/Llama causal LM's weights.

    The checkpoints share tensor names; Llama lacks the q/k/v biases Dream has, which start at
    zero so the converted model computes exactly what the AR model does on a causal input.
    """
    config = dream_config_from_causal_lm(source_config, mask_token_id=mask_token_id)
    model = DreamModel(config)
    state = {name: tensor.detach().float().clone() for name, tensor in source_state.items()}
    for name, tensor in model.state_dict().items():
        if name.endswith(("q_proj.bias", "k_proj.bias", "v_proj.bias")) and name not in state:
            state[name] = torch.zeros_like(tensor)
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [
        name for name in missing if not (config.tie_word_embeddings and name == "lm_head.weight")
    ]
    if missing or unexpected:
        raise ValueError(
            f"weights do not map onto Dream: missing {missing}, unexpected {unexpected}"
        )
    return model
