"""Whether a drafter checkpoint can draft for a target, checked before any engine starts.

A drafter whose token ids mean something else than the target's would not break correctness
(the target verifies every token) but would silently draft garbage, so a mismatch is an error
that names the setting and the fix.
"""

from __future__ import annotations

import logging
from pathlib import Path

from dlmspec_vllm.config import DlmConfigError
from dlmspec_vllm.drafters.loading import describe_checkpoint, resolve_checkpoint_dir

logger = logging.getLogger(__name__)


def check_drafter_pairing(
    draft_model: str,
    *,
    target_tokenizer: str,
    trust_remote_code: bool = False,
) -> Path:
    """Return the drafter's checkpoint directory once it is known to fit the target."""
    checkpoint = resolve_checkpoint_dir(draft_model)
    describe_checkpoint(checkpoint)
    check_shared_tokenizer(checkpoint, target_tokenizer, trust_remote_code=trust_remote_code)
    return checkpoint


def check_shared_tokenizer(
    drafter_dir: Path, target_tokenizer: str, *, trust_remote_code: bool = False
) -> None:
    """Every regular token of the target must have the same id in the drafter's tokenizer."""
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

    drafter_vocab = drafter_tok.get_vocab()
    added = set(target_tok.get_added_vocab())
    mismatched_regular = []
    mismatched_added = []
    for token, token_id in target_tok.get_vocab().items():
        if drafter_vocab.get(token) == token_id:
            continue
        (mismatched_added if token in added else mismatched_regular).append(token)
    if mismatched_regular:
        examples = ", ".join(repr(t) for t in sorted(mismatched_regular)[:5])
        raise DlmConfigError(
            f"tokenizer mismatch: {len(mismatched_regular)} tokens of the target's tokenizer "
            f"({target_tokenizer}) have other ids in the draft_model's tokenizer ({drafter_dir}), "
            f"e.g. {examples}. Use a draft_model trained with the target's tokenizer (Dream and "
            "Fast-dLLM v2 pair with Qwen2.5 targets)."
        )
    if mismatched_added:
        logger.warning(
            "draft_model tokenizer lacks or renumbers %d of the target's added tokens (%s); "
            "drafts that need them will be rejected by the target",
            len(mismatched_added),
            ", ".join(sorted(mismatched_added)[:5]),
        )
