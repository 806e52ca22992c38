"""Training drafters: Dream from an AR target's weights, then masked-diffusion steps.

Grows into the `dlmspec train-drafter` command; the test fixtures use the same functions.
"""

from dlmspec_vllm.training.conversion import dream_config_from_causal_lm, dream_from_causal_lm
from dlmspec_vllm.training.data import random_windows
from dlmspec_vllm.training.trainers import (
    deterministic_algorithms,
    masked_diffusion_loss,
    optimize,
    train_causal_lm,
    train_masked_diffusion,
)

__all__ = [
    "deterministic_algorithms",
    "dream_config_from_causal_lm",
    "dream_from_causal_lm",
    "masked_diffusion_loss",
    "optimize",
    "random_windows",
    "train_causal_lm",
    "train_masked_diffusion",
]
