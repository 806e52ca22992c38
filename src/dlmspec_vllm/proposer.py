"""The vLLM-facing proposer of the `dlm` method: vLLM's batch in, per-request drafts out.

vLLM constructs it through its `custom_class` hook (`cls(vllm_config)`, then
`load_model(target_model)`), and calls `propose(...)` once per engine step after the step's
sampled tokens are known. The runner patch in integration/ calls `begin_step` just before,
with the request id of every batch row, so per-request state survives the reordering of
vLLM's persistent batch.

Per step: read what vLLM accepted of each request's last draft and feed it to the length
controller; ask the controller how many tokens each request drafts; run the drafter over the
batch (again, for the requests the controller extends); send the prefix the controller keeps.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import numpy as np
import torch

from dlmspec_vllm.config import DlmSpeculativeConfig
from dlmspec_vllm.control import CostAwareController, LengthController
from dlmspec_vllm.drafters.base import (
    Drafter,
    DraftingOptions,
    TargetConditionedDrafter,
    TargetFeatures,
)
from dlmspec_vllm.drafters.context_lookup import context_continuation
from dlmspec_vllm.drafters.loading import load_drafter, resolve_checkpoint_dir
from dlmspec_vllm.lattice.chooser import PathChooser

logger = logging.getLogger(__name__)

# Recent steps whose per-request draft lengths are kept for inspection (bounded memory).
RECENT_STEPS = 256
LOG_INTERVAL_SECONDS = 10.0

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class StepBatch:
    """What the runner knows about the step whose drafts are being proposed.

    req_ids: the request of every batch row.
    scheduled_draft_counts: per request, how many of its drafts vLLM verified this step.
    target_features: only for a TargetConditionedDrafter, per request with new tokens: the
        target's hidden states at the drafter's layers for the tokens that joined its sequence
        this step (the prompt chunk, or the last token plus the accepted drafts).
    """

    req_ids: list[str]
    scheduled_draft_counts: dict[str, int]
    target_features: dict[str, TargetFeatures] = field(default_factory=dict)


@dataclass
class _Drafting:
    """One request's draft while it is being built this step."""

    row: int
    req_id: str
    context: list[int]
    room: int
    next_length: int
    tokens: list[int] = field(default_factory=list)
    confidences: list[float] = field(default_factory=list)


class DlmProposer:
    """Drafts with a diffusion LM: parallel passes over [context + k masks] per step."""

    def __init__(self, vllm_config: Any) -> None:
        from dlmspec_vllm.integration.speculative_config import attached_settings

        speculative_config = vllm_config.speculative_config
        self.settings = attached_settings(speculative_config) or (
            DlmSpeculativeConfig.from_environment(speculative_config.num_speculative_tokens)
        )
        model_config = vllm_config.model_config
        self.max_model_len: int = model_config.max_model_len
        self.target_vocab_size: int = model_config.get_vocab_size()
        self.target_dtype: torch.dtype = model_config.dtype
        self.eos_token_ids = _eos_ids(model_config.hf_text_config)
        self.target_tokenizer: str = model_config.tokenizer
        self.target_path: str = model_config.model
        self.controller: LengthController = self.settings.controller.build(
            self.settings.num_speculative_tokens
        )
        self.chooser = PathChooser(
            self.settings.lattice,
            vocab_size=self.target_vocab_size,
            eos_id=min(self.eos_token_ids) if self.eos_token_ids else None,
        )
        self.drafter: Drafter | None = None
        self._step: StepBatch | None = None
        # EOS-aware raw length of each request's last draft (DiffuSpec's L_gen), read back
        # when vLLM reports how much of that draft it accepted.
        self._generated: dict[str, int] = {}
        # Requests whose last draft was copied from their context: its verification says nothing
        # about the drafter, so the controller does not learn from it.
        self._copied_drafts: set[str] = set()
        self.copied_draft_steps = 0
        self.copied_accepted_tokens = 0
        self.failed_draft_steps = 0
        # Running digest of every draft sent, to compare what tensor-parallel ranks proposed.
        self._drafts_digest = hashlib.sha256()
        self.recent_step_lengths: deque[dict[str, int]] = deque(maxlen=RECENT_STEPS)
        self._next_log = time.monotonic() + LOG_INTERVAL_SECONDS
        self._last_step_end: float | None = None
        self._last_draft_seconds = 0.0
        self._last_mean_draft = 0.0

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
            options=DraftingOptions(**self.settings.drafting.model_dump()),
            target_tokenizer=self.target_tokenizer,
            target_dir=self.target_path,
        )
        logger.info(
            "dlm drafter %s loaded on %s (%s); controller %s, at most %d draft tokens per step",
            self.settings.draft_model,
            device,
            dtype,
            self.settings.controller.name,
            self.settings.num_speculative_tokens,
        )

    @property
    def target_layer_ids(self) -> tuple[int, ...] | None:
        """The target layers (DFlash numbering) whose outputs the drafter reads, if any; the
        runner patch asks the target for them once the models are loaded."""
        if isinstance(self.drafter, TargetConditionedDrafter):
            return tuple(self.drafter.target_layer_ids)
        return None

    def begin_step(self, step: StepBatch) -> None:
        self._step = step

    def forget_requests(self, req_ids: set[str]) -> None:
        """Drop every per-request state of requests that finished or were preempted."""
        for req_id in req_ids:
            self._generated.pop(req_id, None)
            self._copied_drafts.discard(req_id)
            self.controller.forget(req_id)
            self.chooser.forget(req_id)
            if self.drafter is not None:
                self.drafter.forget(req_id)

    @property
    def num_tracked_requests(self) -> int:
        """Requests holding per-request state here or in the controller."""
        return max(
            len(self._generated),
            len(self._copied_drafts),
            self.controller.num_tracked,
            self.chooser.num_tracked,
        )

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
        started = time.perf_counter()
        self._observe_verification(step, sampled_token_ids, started)

        pending = []
        drafts: list[list[int]] = [[] for _ in sampled_token_ids]
        lookup = self.settings.context_lookup
        for row, sampled in enumerate(sampled_token_ids):
            num_tokens = int(num_tokens_no_spec[row])
            room = self.max_model_len - num_tokens
            # An empty row is a request still in chunked prefill: nothing to draft after yet.
            if not sampled or room <= 0:
                continue
            req_id = step.req_ids[row]
            if lookup.enabled:
                copied = context_continuation(
                    token_ids_cpu[row, :num_tokens],
                    min(self.settings.num_speculative_tokens, room),
                    min_ngram=lookup.min_ngram,
                    max_ngram=lookup.max_ngram,
                )
                if copied:
                    drafts[row] = copied[: _length_before_eos(copied, self.eos_token_ids) + 1]
                    self._copied_drafts.add(req_id)
                    continue
            length = min(self.controller.initial_length(req_id), room)
            if length > 0:
                context = token_ids_cpu[row, :num_tokens].tolist()
                self.chooser.observe_context(req_id, context)
                pending.append(_Drafting(row, req_id, context, room, length))

        try:
            self._hand_over_target_features(step)
            self._draft_in_passes(pending)
        except Exception:
            # A failed draft must not fail the requests: this step simply has no drafts.
            self._report_draft_failure()
            pending = []
        for request in pending:
            self._generated[request.req_id] = _length_before_eos(request.tokens, self.eos_token_ids)
            keep = self.controller.clip(request.req_id, request.confidences)
            drafts[request.row] = request.tokens[:keep]

        sent = {step.req_ids[row]: len(draft) for row, draft in enumerate(drafts) if draft}
        sent |= {r.req_id: len(drafts[r.row]) for r in pending}
        if sent:
            self.recent_step_lengths.append(sent)
            self._drafts_digest.update(repr(drafts).encode())
        self._log_summary_now_and_then()
        finished = time.perf_counter()
        self._last_draft_seconds = finished - started
        self._last_mean_draft = (
            sum(len(drafts[r.row]) for r in pending) / len(pending) if pending else 0.0
        )
        self._last_step_end = finished
        return drafts

    def _hand_over_target_features(self, step: StepBatch) -> None:
        """Before drafting, the drafter learns what the target computed for every request in
        the batch this step (also those that draft nothing now, e.g. mid-prefill)."""
        if not step.target_features:
            return
        drafter = cast(TargetConditionedDrafter, self.drafter)
        for req_id, features in step.target_features.items():
            drafter.observe(req_id, features)

    def _report_draft_failure(self) -> None:
        self.failed_draft_steps += 1
        if self.failed_draft_steps == 1:
            logger.exception("dlm drafter failed; drafting nothing this step (logged once)")

    def report(self) -> dict[str, Any]:
        """Controller totals, per-request state size and recent per-step draft lengths."""
        return {
            "controller": self.controller.stats().as_dict(),
            "num_tracked_requests": self.num_tracked_requests,
            "failed_draft_steps": self.failed_draft_steps,
            "copied_draft_steps": self.copied_draft_steps,
            "copied_accepted_tokens": self.copied_accepted_tokens,
            "drafts_digest": self._drafts_digest.hexdigest(),
            "recent_step_lengths": list(self.recent_step_lengths),
        }

    def _log_summary_now_and_then(self) -> None:
        now = time.monotonic()
        if now < self._next_log:
            return
        self._next_log = now + LOG_INTERVAL_SECONDS
        stats = self.controller.stats()
        logger.info(
            "dlm %s controller: %d verified drafts, mean sent length %.2f, mean accepted %.2f "
            "(acceptance %.1f%%), %d requests tracked",
            stats.controller,
            stats.steps,
            stats.mean_length,
            stats.mean_accepted,
            100 * stats.acceptance_rate,
            self.num_tracked_requests,
        )

    def _draft_in_passes(self, pending: list[_Drafting]) -> None:
        """First pass for every request, then further passes for those the controller extends;
        a further pass drafts after the tokens already drafted, it does not start over."""
        assert self.drafter is not None
        active = pending
        while active:
            histories = [r.context + r.tokens for r in active]
            # A target-conditioned drafter places its block by absolute position, and its
            # context is the target's features, not these tokens: never clip for it.
            clipped = (
                histories
                if isinstance(self.drafter, TargetConditionedDrafter)
                else _clip_contexts(histories, self.settings)
            )
            block = self.drafter.draft(
                clipped,
                [r.next_length for r in active],
                req_ids=[r.req_id for r in active],
            )
            paths = self.chooser.choose(block, histories, [r.req_id for r in active])
            extended = []
            for request, tokens, confidences in zip(active, paths, block.confidences()):
                request.tokens += tokens
                request.confidences += confidences[: len(tokens)]
                if _length_before_eos(request.tokens, self.eos_token_ids) < len(request.tokens):
                    _truncate_after_eos(request, self.eos_token_ids)
                    continue
                if len(tokens) < request.next_length:
                    continue  # the drafter gave less than asked (a bridge may): do not extend
                more = self.controller.extension(request.req_id, request.confidences)
                more = min(more, request.room - len(request.tokens))
                if more > 0:
                    request.next_length = more
                    extended.append(request)
            active = extended

    def _observe_verification(
        self, step: StepBatch, sampled_token_ids: list[list[int]], now: float
    ) -> None:
        """vLLM accepted len(sampled) - 1 of the tokens it scheduled from a request's draft."""
        verified = []
        for req_id, sampled in zip(step.req_ids, sampled_token_ids):
            copied = req_id in self._copied_drafts
            self._copied_drafts.discard(req_id)
            scheduled = min(step.scheduled_draft_counts.get(req_id, 0), self.controller.max_length)
            if not scheduled or not sampled:
                continue
            accepted = min(len(sampled) - 1, scheduled)
            if copied:
                self.copied_draft_steps += 1
                self.copied_accepted_tokens += accepted
                continue
            generated = self._generated.pop(req_id, scheduled)
            self.controller.observe(req_id, scheduled, accepted, generated)
            verified.append(scheduled)
        if (
            isinstance(self.controller, CostAwareController)
            and verified
            and self._last_step_end is not None
        ):
            # The engine step between two proposals is the verification of the last drafts
            # (plus scheduling); at batch > 1 each request is charged an equal share.
            batch = len(verified)
            self.controller.record_costs(
                draft_seconds=self._last_draft_seconds / batch,
                draft_len=round(self._last_mean_draft),
                verify_seconds=(now - self._last_step_end) / batch,
                verify_tokens=round(1 + sum(verified) / batch),
            )


def _eos_ids(hf_config: Any) -> frozenset[int]:
    eos = getattr(hf_config, "eos_token_id", None)
    if eos is None:
        return frozenset()
    return frozenset([eos] if isinstance(eos, int) else eos)


def _length_before_eos(tokens: Sequence[int], eos_ids: frozenset[int]) -> int:
    for position, token in enumerate(tokens):
        if token in eos_ids:
            return position
    return len(tokens)


def _truncate_after_eos(request: _Drafting, eos_ids: frozenset[int]) -> None:
    # Nothing after an accepted EOS is ever generated, so drafting past it only costs.
    end = _length_before_eos(request.tokens, eos_ids) + 1
    del request.tokens[end:]
    del request.confidences[end:]


def _clip_contexts(
    contexts: Sequence[list[int]], settings: DlmSpeculativeConfig
) -> Sequence[list[int]]:
    limit = settings.max_draft_context
    if limit is None:
        return contexts
    return [context[-limit:] for context in contexts]
