"""Whether a drafter checkpoint can draft for a target, checked before any engine starts.

A drafter whose token ids mean something else than the target's would not break correctness
(the target verifies every token) but would silently draft garbage, so a mismatch is an error
that names the setting and the fix.
"""

from __future__ import annotations

import logging
from pathlib import Path

from dlmspec_vllm.config import DlmConfigError
from dlmspec_vllm.drafters.bridge import (
    BridgePairingError,
    check_bridge_pairing,
    shares_vocabulary,
)
from dlmspec_vllm.drafters.checkpoint import resolve_checkpoint_dir
from dlmspec_vllm.drafters.loading import describe_checkpoint

logger = logging.getLogger(__name__)

# Drafters that share the target's embeddings and LM head, so carry no tokenizer of their own.
TARGET_VOCABULARY_DRAFTER = "dlmspec_vllm.drafters.dflash:DFlashDrafter"


def check_drafter_pairing(
    draft_model: str,
    *,
    target_tokenizer: str,
    trust_remote_code: bool = False,
) -> Path:
    """Return the drafter's checkpoint directory once it is known to fit the target."""
    checkpoint = resolve_checkpoint_dir(draft_model)
    if describe_checkpoint(checkpoint) == TARGET_VOCABULARY_DRAFTER:
        # It embeds and scores with the target's own weights: its ids are the target's.
        return checkpoint
    check_tokenizer_pairing(checkpoint, target_tokenizer, trust_remote_code=trust_remote_code)
    return checkpoint


def check_tokenizer_pairing(
    drafter_dir: Path, target_tokenizer: str, *, trust_remote_code: bool = False
) -> None:
    """The drafter shares the target's token ids, or text round-trips between the two
    tokenizers so that the vocabulary bridge can carry contexts and drafts."""
    from transformers import AutoTokenizer

    try:
        # The drafter config's auto_map names remote modeling code we never run.
        drafter_tok = AutoTokenizer.from_pretrained(str(drafter_dir), trust_remote_code=False)
    except (OSError, ValueError) as err:
        raise DlmConfigError(
            f"draft_model {str(drafter_dir)!r} has no loadable tokenizer ({err}); the drafter "
            "checkpoint must ship its tokenizer files so that dlm can check it shares the "
            "target's vocabulary."
        ) from None
    target_tok = AutoTokenizer.from_pretrained(
        target_tokenizer, trust_remote_code=trust_remote_code
    )

    if not shares_vocabulary(target_tok, drafter_tok):
        try:
            check_bridge_pairing(target_tok, drafter_tok)
        except BridgePairingError as err:
            raise DlmConfigError(
                f"{err} (target tokenizer {target_tokenizer}, draft_model {drafter_dir})"
            ) from None
        logger.warning(
            "draft_model %s has its own tokenizer: drafting for %s through the vocabulary "
            "bridge (detokenize, retokenize), which costs acceptance",
            drafter_dir,
            target_tokenizer,
        )
        return
    drafter_vocab = drafter_tok.get_vocab()
    added = set(target_tok.get_added_vocab())
    mismatched_added = [
        token
        for token, token_id in target_tok.get_vocab().items()
        if token in added and drafter_vocab.get(token) != token_id
    ]
    if mismatched_added:
        logger.warning(
            "draft_model tokenizer lacks or renumbers %d of the target's added tokens (%s); "
            "drafts that need them will be rejected by the target",
            len(mismatched_added),
            ", ".join(sorted(mismatched_added)[:5]),
        )
