"""Pick and load the drafter class that a ``draft_model`` checkpoint directory holds.

The checkpoint's config.json says what it is (``model_type``, ``architectures``); this module maps
that to a drafter class and turns every way a directory can be wrong into one DrafterLoadError
whose message names the ``draft_model`` setting and the fix. Drafter modules are imported only
when chosen, so supporting a family costs nothing to users of the others.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from dlmspec_vllm.drafters.base import Drafter, DraftingOptions
from dlmspec_vllm.drafters.checkpoint import (
    DrafterLoadError,
    read_config,
    safetensors_files,
)

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


@dataclass(frozen=True)
class DrafterFamily:
    """How to recognise one diffusion LM family's config.json, and its drafter class."""

    model_type: str  # as config.json spells it; matched case-insensitively ("" = never)
    architectures: tuple[str, ...]
    drafter: str  # "module:Class" with a from_pretrained classmethod


DRAFTER_FAMILIES: tuple[DrafterFamily, ...] = (
    DrafterFamily("Dream", ("DreamModel",), "dlmspec_vllm.drafters.dream:DreamDrafter"),
    DrafterFamily("llada", ("LLaDAModelLM",), "dlmspec_vllm.drafters.llada:LLaDADrafter"),
    DrafterFamily(
        "Fast_dLLM_Qwen",
        ("Fast_dLLM_QwenForCausalLM",),
        "dlmspec_vllm.drafters.fast_dllm_v2:FastDllmV2Drafter",
    ),
    # DFlash checkpoints say model_type "qwen3", like any Qwen3 LM: known by architecture only.
    DrafterFamily("", ("DFlashDraftModel",), "dlmspec_vllm.drafters.dflash:DFlashDrafter"),
)


def drafter_class_path(config: dict[str, Any], path: Path) -> str:
    """The "module:Class" of the drafter for this config, or why there is none."""
    model_type = str(config.get("model_type", ""))
    architectures = [str(a) for a in config.get("architectures") or []]
    for family in DRAFTER_FAMILIES:
        if set(family.architectures) & set(architectures):
            return family.drafter
        if family.model_type and family.model_type.lower() == model_type.lower():
            return family.drafter
    described = f"model_type {model_type!r}, architectures {architectures}"
    supported = ", ".join(
        f"model_type {family.model_type}" if family.model_type else family.architectures[0]
        for family in DRAFTER_FAMILIES
    )
    if any(a.endswith("ForCausalLM") for a in architectures):
        raise DrafterLoadError(
            f"draft_model {path} is an autoregressive model ({described}); method 'dlm' needs a "
            f"diffusion LM drafter: set `draft_model` to a diffusion checkpoint "
            f"(supported: {supported})"
        )
    raise DrafterLoadError(
        f"draft_model {path} is not a supported diffusion drafter ({described}); "
        f"supported: {supported}"
    )


def load_drafter(
    path: str | Path,
    *,
    target_vocab_size: int,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    options: DraftingOptions | None = None,
    target_tokenizer: str | Path | PreTrainedTokenizerBase | None = None,
    target_dir: str | Path | None = None,
) -> Drafter:
    """Load the diffusion drafter in ``path`` for a target with ``target_vocab_size`` token ids.

    With ``target_tokenizer`` (the target's tokenizer, or its directory or id), a drafter whose
    own tokenizer numbers the target's tokens differently is wrapped in a vocabulary bridge
    (bridge.py), after checking that text survives both tokenizers; without it, the drafter is
    assumed to share the target's vocabulary. ``target_dir`` (the target's checkpoint
    directory) is read by drafters that share the target's weights (DFlash).

    Every check that needs no weights runs before any weights are read, so a wrong setting fails
    in milliseconds, not after minutes of loading.
    """
    path = Path(path)
    if not path.is_dir():
        raise DrafterLoadError(
            f"draft_model path {path} does not exist (or is not a directory): set `draft_model` "
            "to a local checkpoint directory"
        )
    config = read_config(path)
    module_name, class_name = drafter_class_path(config, path).split(":")
    safetensors_files(path)
    drafter_cls = getattr(importlib.import_module(module_name), class_name)
    reads_target = getattr(drafter_cls, "reads_target_weights", False)
    tokenizers = None
    # A drafter built on the target's own embeddings and head has the target's ids: no bridge.
    if target_tokenizer is not None and not reads_target:
        from dlmspec_vllm.drafters.bridge import tokenizers_to_bridge

        tokenizers = tokenizers_to_bridge(target_tokenizer, path)
    shared = (
        {"target_dir": target_dir} if getattr(drafter_cls, "reads_target_weights", False) else {}
    )
    drafter: Drafter = drafter_cls.from_pretrained(
        path,
        **shared,
        # A bridged drafter drafts in its own vocabulary; the bridge maps to the target's.
        target_vocab_size=target_vocab_size if tokenizers is None else len(tokenizers[1]),
        device=device,
        dtype=dtype,
        options=options,
    )
    if tokenizers is None:
        return drafter
    from dlmspec_vllm.drafters.bridge import BridgedDrafter

    return BridgedDrafter(
        drafter,
        target_tokenizer=tokenizers[0],
        drafter_tokenizer=tokenizers[1],
        target_vocab_size=target_vocab_size,
    )


def describe_checkpoint(path: Path) -> str:
    """Run every check that needs no weights; return the drafter class ("module:Class")."""
    if not path.is_dir():
        raise DrafterLoadError(
            f"draft_model path {path} does not exist (or is not a directory): set `draft_model` "
            "to a local checkpoint directory"
        )
    drafter = drafter_class_path(read_config(path), path)
    safetensors_files(path)
    return drafter
