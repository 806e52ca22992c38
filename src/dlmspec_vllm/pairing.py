"""Whether a drafter checkpoint can draft for a target, checked before any engine starts.

A drafter whose token ids mean something else than the target's would not break correctness
(the target verifies every token) but would silently draft garbage, so a mismatch is an error
that names the setting and the fix.

The decision is ``drafters.loading.plan_pairing``'s, the one the worker loads the drafter by:
this module refuses an unpairable plan as a setting error and logs what a working one costs.
"""

from __future__ import annotations

import logging
from pathlib import Path

from dlmspec_vllm.config import DlmConfigError
from dlmspec_vllm.drafters.checkpoint import resolve_checkpoint_dir
from dlmspec_vllm.drafters.loading import DraftVocabulary, plan_pairing

logger = logging.getLogger(__name__)


def check_drafter_pairing(
    draft_model: str,
    *,
    target_tokenizer: str,
    trust_remote_code: bool = False,
) -> Path:
    """Return the drafter's checkpoint directory once it is known to fit the target."""
    checkpoint = resolve_checkpoint_dir(draft_model)
    plan = plan_pairing(checkpoint, target_tokenizer, trust_remote_code=trust_remote_code)
    if plan.refusal is not None:
        raise DlmConfigError(plan.refusal)
    if plan.vocabulary is DraftVocabulary.BRIDGED:
        logger.warning(
            "draft_model %s has its own tokenizer: drafting for %s through the vocabulary "
            "bridge (detokenize, retokenize), which costs acceptance",
            checkpoint,
            target_tokenizer,
        )
    elif plan.mismatched_added_tokens:
        logger.warning(
            "draft_model tokenizer lacks or renumbers %d of the target's added tokens (%s); "
            "drafts that need them will be rejected by the target",
            len(plan.mismatched_added_tokens),
            ", ".join(plan.mismatched_added_tokens[:5]),
        )
    return checkpoint
