"""Training drafters (`dlmspec train-drafter`, training/command.py): a Dream drafter from an AR
target's weights with masked-diffusion steps, or a DFlash drafter on the target's answers and
hidden states (training/dflash.py, the answer store in training/answers.py). The package exports
the Dream pieces the test fixtures use."""

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
