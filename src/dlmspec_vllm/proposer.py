"""The vLLM-facing proposer of the `dlm` method: vLLM's batch in, per-request drafts out.

vLLM constructs it through its `custom_class` hook (`cls(vllm_config)`, then
`load_model(target_model)`), and calls `propose(...)` once per engine step after the step's
sampled tokens are known. The runner patch in integration/ calls `begin_step` just before,
with the request id of every batch row, so per-request state survives the reordering of
vLLM's persistent batch.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from dlmspec_vllm.config import DlmSpeculativeConfig
from dlmspec_vllm.drafters.base import Drafter
from dlmspec_vllm.drafters.loading import load_drafter, resolve_checkpoint_dir

logger = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class StepBatch:
    """What the runner knows about the step whose drafts are being proposed."""

    req_ids: list[str]
    scheduled_draft_counts: dict[str, int]
    ended_req_ids: set[str] = field(default_factory=set)


@dataclass
class AcceptanceTotals:
    """Running totals of this proposer's drafts, as vLLM verified them."""

    verified_steps: int = 0
    drafted_tokens: int = 0
    accepted_tokens: int = 0


class DlmProposer:
    """Drafts with a diffusion LM: one parallel pass over [context + k masks] per step."""

    def __init__(self, vllm_config: Any) -> None:
        from dlmspec_vllm.integration.speculative_config import attached_settings

        speculative_config = vllm_config.speculative_config
        self.settings = attached_settings(speculative_config) or (
            DlmSpeculativeConfig.from_environment(speculative_config.num_speculative_tokens)
        )
        self.max_model_len: int = vllm_config.model_config.max_model_len
        self.target_vocab_size: int = vllm_config.model_config.get_vocab_size()
        self.target_dtype: torch.dtype = vllm_config.model_config.dtype
        self.drafter: Drafter | None = None
        self.totals = AcceptanceTotals()
        self._step: StepBatch | None = None

    def load_model(self, target_model: torch.nn.Module, *args: Any, **kwargs: Any) -> None:
        device = next(target_model.parameters()).device
        dtype = (
            self.target_dtype
            if self.settings.draft_dtype == "auto"
            else _DTYPES[self.settings.draft_dtype]
        )
        self.drafter = load_drafter(
            resolve_checkpoint_dir(self.settings.draft_model),
            target_vocab_size=self.target_vocab_size,
            device=device,
            dtype=dtype,
        )
        logger.info(
            "dlm drafter %s loaded on %s (%s), up to %d draft tokens per step",
            self.settings.draft_model,
            device,
            dtype,
            self.settings.num_speculative_tokens,
        )

    def begin_step(self, step: StepBatch) -> None:
        self._step = step

    def propose(
        self,
        sampled_token_ids: list[list[int]],
        num_tokens_no_spec: np.ndarray,
        token_ids_cpu: np.ndarray,
        slot_mappings: Any = None,
    ) -> list[list[int]]:
        step = self._step
        if step is None:
            raise RuntimeError(
                "dlm proposer was called without its runner hook: the dlmspec vLLM plugin is "
                "not loaded in this worker process (is VLLM_PLUGINS set without 'dlmspec'?)"
            )
        self._step = None
        if self.drafter is None:
            raise RuntimeError("dlm proposer.propose called before load_model")
        self._record_acceptance(step, sampled_token_ids)

        rows, contexts, lengths = [], [], []
        for row, sampled in enumerate(sampled_token_ids):
            num_tokens = int(num_tokens_no_spec[row])
            room = self.max_model_len - num_tokens
            # An empty row is a request still in chunked prefill: nothing to draft after yet.
            if not sampled or room <= 0:
                continue
            rows.append(row)
            contexts.append(token_ids_cpu[row, :num_tokens].tolist())
            lengths.append(min(self.settings.num_speculative_tokens, room))

        drafts: list[list[int]] = [[] for _ in sampled_token_ids]
        if rows:
            block = self.drafter.draft(_clip_contexts(contexts, self.settings), lengths)
            for row, tokens in zip(rows, block.argmax_tokens()):
                drafts[row] = tokens
        return drafts

    def _record_acceptance(self, step: StepBatch, sampled_token_ids: list[list[int]]) -> None:
        for req_id, sampled in zip(step.req_ids, sampled_token_ids):
            scheduled = step.scheduled_draft_counts.get(req_id, 0)
            if scheduled and sampled:
                self.totals.verified_steps += 1
                self.totals.drafted_tokens += scheduled
                self.totals.accepted_tokens += len(sampled) - 1


def _clip_contexts(
    contexts: Sequence[list[int]], settings: DlmSpeculativeConfig
) -> Sequence[list[int]]:
    limit = settings.max_draft_context
    if limit is None:
        return contexts
    return [context[-limit:] for context in contexts]
