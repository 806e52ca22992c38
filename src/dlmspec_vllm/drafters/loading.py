"""Pick and load the drafter class that a ``draft_model`` checkpoint directory holds.

The checkpoint's config.json says what it is (``model_type``, ``architectures``); this module maps
that to a drafter class and turns every way a directory can be wrong into one DrafterLoadError
whose message names the ``draft_model`` setting and the fix. Drafter modules are imported only
when chosen, so supporting a family costs nothing to users of the others.

``plan_pairing`` is the one place that decides how a drafter drafts for a target (in the target's
token ids, or through the vocabulary bridge), or that it cannot: the front end (pairing.py) refuses
a setting by its plan before any engine starts, and ``load_drafter`` loads the drafter by the same
plan in the worker, so the two cannot disagree.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from enum import StrEnum
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


class DraftVocabulary(StrEnum):
    """Whose token ids a drafter drafts in, and why."""

    # It embeds and scores with the target's own weights (DFlash): its ids are the target's.
    TARGET_WEIGHTS = "target weights"
    # Its tokenizer gives every regular target token the target's id (Dream, Fast-dLLM v2).
    SHARED_TOKENIZER = "shared tokenizer"
    # Its own ids (LLaDA), but text survives both tokenizers: the vocabulary bridge carries it.
    BRIDGED = "bridged"
    # Neither: it cannot draft for this target (``PairingPlan.refusal`` says why and the fix).
    UNPAIRABLE = "unpairable"


@dataclass(frozen=True)
class PairingPlan:
    """How the drafter in ``checkpoint`` drafts for one target, as ``plan_pairing`` decides it."""

    checkpoint: Path
    drafter_class: str  # "module:Class"
    vocabulary: DraftVocabulary
    # Only when UNPAIRABLE: the error, naming `draft_model` and the fix.
    refusal: str | None = None
    # With a shared tokenizer: the target's added tokens (chat markers) the drafter's tokenizer
    # lacks or numbers otherwise; drafts that need them are rejected, which costs acceptance.
    mismatched_added_tokens: tuple[str, ...] = ()
    # Only when BRIDGED: the (target, drafter) tokenizers, loaded once, for the bridge.
    bridge_tokenizers: tuple[PreTrainedTokenizerBase, PreTrainedTokenizerBase] | None = field(
        default=None, compare=False, repr=False
    )


def plan_pairing(
    path: Path,
    target_tokenizer: str | Path | PreTrainedTokenizerBase,
    *,
    trust_remote_code: bool = False,
) -> PairingPlan:
    """Decide how the drafter checkpoint in ``path`` drafts for the target whose tokenizer is
    ``target_tokenizer`` (the tokenizer, or its directory or id; ``trust_remote_code`` as the
    target's model config says, for the target's tokenizer only: a drafter's code never runs).

    A directory that holds no usable drafter raises DrafterLoadError; a drafter that cannot
    draft for this target gives an UNPAIRABLE plan, which each caller raises in its own terms.
    No weights are read.
    """
    drafter_class = describe_checkpoint(path)
    if getattr(_import_drafter_class(drafter_class), "reads_target_weights", False):
        return PairingPlan(path, drafter_class, DraftVocabulary.TARGET_WEIGHTS)
    from dlmspec_vllm.drafters.bridge import (
        BridgePairingError,
        check_bridge_pairing,
        load_tokenizer,
        mismatched_added_tokens,
        shares_vocabulary,
    )

    try:
        # The drafter config's auto_map names remote modeling code we never run.
        drafter = load_tokenizer(path)
    except (OSError, ValueError) as err:
        return PairingPlan(
            path,
            drafter_class,
            DraftVocabulary.UNPAIRABLE,
            refusal=(
                f"draft_model {str(path)!r} has no loadable tokenizer ({err}); the drafter "
                "checkpoint must ship its tokenizer files so that dlm can check it shares the "
                "target's vocabulary."
            ),
        )
    target = load_tokenizer(target_tokenizer, trust_remote_code=trust_remote_code)
    if shares_vocabulary(target, drafter):
        return PairingPlan(
            path,
            drafter_class,
            DraftVocabulary.SHARED_TOKENIZER,
            mismatched_added_tokens=tuple(mismatched_added_tokens(target, drafter)),
        )
    try:
        check_bridge_pairing(target, drafter)
    except BridgePairingError as err:
        return PairingPlan(
            path,
            drafter_class,
            DraftVocabulary.UNPAIRABLE,
            refusal=f"{err} (target tokenizer {target.name_or_path}, draft_model {path})",
        )
    return PairingPlan(
        path, drafter_class, DraftVocabulary.BRIDGED, bridge_tokenizers=(target, drafter)
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
    trust_remote_code: bool = False,
) -> Drafter:
    """Load the diffusion drafter in ``path`` for a target with ``target_vocab_size`` token ids.

    With ``target_tokenizer`` (the target's tokenizer, or its directory or id, and the target's
    ``trust_remote_code``), the drafter is loaded by ``plan_pairing``'s plan, the one the front
    end checked: wrapped in the vocabulary bridge (bridge.py) when it needs it, refused when it
    cannot pair. Without it, the drafter is assumed to share the target's vocabulary.
    ``target_dir`` (the target's checkpoint directory) is read by drafters that share the
    target's weights (DFlash).

    Every check that needs no weights runs before any weights are read, so a wrong setting fails
    in milliseconds, not after minutes of loading.
    """
    path = Path(path)
    plan = (
        None
        if target_tokenizer is None
        else plan_pairing(path, target_tokenizer, trust_remote_code=trust_remote_code)
    )
    if plan is None:
        drafter_cls = _import_drafter_class(describe_checkpoint(path))
        bridge_tokenizers = None
    elif plan.refusal is not None:
        raise DrafterLoadError(plan.refusal)
    else:
        drafter_cls = _import_drafter_class(plan.drafter_class)
        bridge_tokenizers = plan.bridge_tokenizers
    shared = (
        {"target_dir": target_dir} if getattr(drafter_cls, "reads_target_weights", False) else {}
    )
    drafter: Drafter = drafter_cls.from_pretrained(
        path,
        **shared,
        # A bridged drafter drafts in its own vocabulary; the bridge maps to the target's.
        target_vocab_size=(
            target_vocab_size if bridge_tokenizers is None else len(bridge_tokenizers[1])
        ),
        device=device,
        dtype=dtype,
        options=options,
    )
    if bridge_tokenizers is None:
        return drafter
    from dlmspec_vllm.drafters.bridge import BridgedDrafter
    from dlmspec_vllm.drafters.diffusion import DiffusionDrafter

    if not isinstance(drafter, DiffusionDrafter):
        raise DrafterLoadError(
            f"drafter {path} ({type(drafter).__name__}) tokenizes differently from the target, "
            "and only diffusion drafters (Dream, LLaDA, Fast-dLLM v2) can draft through a "
            "vocabulary bridge: train this drafter on the target's tokenizer"
        )

    return BridgedDrafter(
        drafter,
        target_tokenizer=bridge_tokenizers[0],
        drafter_tokenizer=bridge_tokenizers[1],
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


def _import_drafter_class(class_path: str) -> Any:
    module_name, class_name = class_path.split(":")
    return getattr(importlib.import_module(module_name), class_name)
