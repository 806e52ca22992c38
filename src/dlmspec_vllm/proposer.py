"""The vLLM-facing proposer of the `dlm` method: vLLM's batch in, per-request drafts out.

vLLM constructs it through its `custom_class` hook (`cls(vllm_config)`, then
`load_model(target_model)`), and calls `propose(...)` once per engine step after the step's
sampled tokens are known. The runner patch in integration/ calls `begin_step` just before,
with the request id of every batch row, so per-request state survives the reordering of
vLLM's persistent batch.

Per step: read what vLLM accepted of each request's last draft and feed it to the controller
of the source that drafted it, with what the step cost; then, source after source (copied from
the context, then the drafter), ask its controller how many tokens each remaining request
drafts; run the drafter over the batch (again, for the requests the controller extends); send
the prefix the controller keeps. A request that drafts nothing costs a context lookup at most.
"""

from __future__ import annotations

import hashlib
import logging
import time
from bisect import bisect_left
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import torch

from dlmspec_vllm.config import DlmSpeculativeConfig
from dlmspec_vllm.control import LengthController, StepTiming
from dlmspec_vllm.drafters.base import (
    Drafter,
    DraftingOptions,
    StepFeatures,
    TargetConditionedDrafter,
)
from dlmspec_vllm.drafters.checkpoint import resolve_checkpoint_dir
from dlmspec_vllm.drafters.context_lookup import context_continuations
from dlmspec_vllm.drafters.loading import load_drafter
from dlmspec_vllm.drafters.shared_prefix import SharedPrefixStore
from dlmspec_vllm.lattice.chooser import PathChooser

if TYPE_CHECKING:
    from dlmspec_vllm.integration.metrics import MetricsPublisher

logger = logging.getLogger(__name__)

# Recent steps whose per-request draft lengths are kept for inspection (bounded memory).
RECENT_STEPS = 256
LOG_INTERVAL_SECONDS = 10.0

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# The draft sources, as the report and the metrics name them.
DRAFTER = "drafter"
COPIED = "copied"


@dataclass
class StepBatch:
    """What the runner knows about the step whose drafts are being proposed.

    req_ids: the request of every batch row.
    scheduled_draft_counts: per request, how many of its drafts vLLM verified this step.
    target_features: only for a TargetConditionedDrafter, for the requests with new tokens:
        the target's hidden states at the drafter's layers for the tokens that joined their
        sequences this step (a prompt chunk, or the last token plus the accepted drafts).
    prefill_tokens: tokens the step computed beyond one per request and its drafts (prompt
        chunks of requests joining the batch).
    """

    req_ids: list[str]
    scheduled_draft_counts: dict[str, int]
    target_features: StepFeatures | None = None
    prefill_tokens: int = 0


class DrafterProfileError(RuntimeError):
    """The drafter's pass at the engine's largest batch does not fit in device memory."""


@dataclass(frozen=True)
class ProfiledPass:
    """The drafter pass run while vLLM measured the memory its KV cache may take: the largest
    batch and draft length the engine allows, each request holding the context it may keep."""

    requests: int
    draft_tokens: int
    context_tokens: int
    # The context positions the drafter held at the end of the pass, over all requests.
    held_context_tokens: int | None
    seconds: float


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


@dataclass
class _Source:
    """A draft source and the controller deciding its lengths, with this step's cost."""

    name: str  # DRAFTER or COPIED
    controller: LengthController
    seconds: float = 0.0
    drafted_tokens: int = 0


# Upper bounds (seconds) of the drafter-seconds-per-step histogram's buckets.
DRAFTER_SECONDS_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)


@dataclass
class SourceCounts:
    """What vLLM verified of one draft source's drafts, and accepted, since the engine started
    (counted as vLLM counts them: a draft sent with a request's last token is never verified)."""

    draft_tokens: int = 0
    drafted_request_steps: int = 0
    accepted_tokens: int = 0


@dataclass
class _RequestState:
    """What the proposer keeps for one request between its steps."""

    # The source of the draft vLLM verifies next, None if it drafted nothing.
    source: _Source | None = None
    # EOS-aware raw length of that draft (DiffuSpec's L_gen), for the controller.
    generated: int = 0


class ProposerStats:
    """The proposer's counters, its recent draft lengths, its own timing and its log line."""

    def __init__(self, *, draft_digest: bool) -> None:
        self.failed_draft_steps = 0
        self.by_source = {DRAFTER: SourceCounts(), COPIED: SourceCounts()}
        # Request-steps of decoding requests that no source drafted for (its controller chose
        # not to), steps whose drafter failed aside.
        self.undrafted_request_steps = 0
        # Per DRAFTER_SECONDS_BUCKETS bound (and one past the last), the steps whose drafter
        # passes took at most that long.
        self.drafter_seconds_counts = [0] * (len(DRAFTER_SECONDS_BUCKETS) + 1)
        self.steps = 0
        self.drafting_steps = 0
        # Seconds of propose() with drafts, and of the drafter's forward passes inside them.
        self.drafting_step_seconds = 0.0
        self.drafter_seconds = 0.0
        self.recent_step_lengths: deque[dict[str, int]] = deque(maxlen=RECENT_STEPS)
        self._digest = hashlib.sha256() if draft_digest else None
        self._next_log = time.monotonic() + LOG_INTERVAL_SECONDS

    def record_step(
        self, req_ids: Sequence[str], drafts: list[list[int]], seconds: float, drafter: float
    ) -> None:
        self.steps += 1
        sent = {req_id: len(d) for req_id, d in zip(req_ids, drafts) if d}
        if not sent:
            return
        self.drafting_steps += 1
        self.drafting_step_seconds += seconds
        self.drafter_seconds += drafter
        if drafter > 0:
            self.drafter_seconds_counts[bisect_left(DRAFTER_SECONDS_BUCKETS, drafter)] += 1
        self.recent_step_lengths.append(sent)
        if self._digest is not None:
            self._digest.update(repr(drafts).encode())

    def record_failure(self) -> None:
        self.failed_draft_steps += 1
        if self.failed_draft_steps == 1:
            logger.exception("dlm drafter failed; drafting nothing this step (logged once)")

    @property
    def copied_draft_steps(self) -> int:
        return self.by_source[COPIED].drafted_request_steps

    def record_verified(self, source: str, drafted: int, accepted: int) -> None:
        counts = self.by_source[source]
        counts.draft_tokens += drafted
        counts.drafted_request_steps += 1
        counts.accepted_tokens += accepted

    def metrics(self) -> dict[str, Any]:
        """The counters the method's Prometheus series are made of (integration/metrics.py)."""
        return {
            "by_source": {name: asdict(counts) for name, counts in self.by_source.items()},
            "undrafted_request_steps": self.undrafted_request_steps,
            "drafter_failures": self.failed_draft_steps,
            "drafter_seconds": {
                "bounds": list(DRAFTER_SECONDS_BUCKETS),
                "counts": list(self.drafter_seconds_counts),
                "sum": self.drafter_seconds,
            },
        }

    def as_dict(self) -> dict[str, Any]:
        steps = max(1, self.drafting_steps)
        return {
            "failed_draft_steps": self.failed_draft_steps,
            "copied_draft_steps": self.copied_draft_steps,
            "copied_accepted_tokens": self.by_source[COPIED].accepted_tokens,
            "steps": self.steps,
            "drafting_steps": self.drafting_steps,
            "drafting_step_seconds": self.drafting_step_seconds,
            "drafter_seconds": self.drafter_seconds,
            # What a drafting step costs the proposer beyond the drafter's own forward passes.
            "proposer_ms_per_drafting_step": 1000
            * (self.drafting_step_seconds - self.drafter_seconds)
            / steps,
            "drafter_ms_per_drafting_step": 1000 * self.drafter_seconds / steps,
            "drafts_digest": self._digest.hexdigest() if self._digest is not None else None,
            "recent_step_lengths": list(self.recent_step_lengths),
        }

    def log_now_and_then(self, controller: LengthController, tracked: int) -> None:
        now = time.monotonic()
        if now < self._next_log:
            return
        self._next_log = now + LOG_INTERVAL_SECONDS
        stats = controller.stats()
        logger.info(
            "dlm %s controller: %d verified drafts, mean sent length %.2f, mean accepted %.2f "
            "(acceptance %.1f%%), %d copied drafts, %d requests tracked",
            stats.controller,
            stats.steps,
            stats.mean_length,
            stats.mean_accepted,
            100 * stats.acceptance_rate,
            self.copied_draft_steps,
            tracked,
        )


class DlmProposer:
    """Drafts for every request of a step from a chain of sources: drafts copied from the
    request's own context where its last tokens recur (optional), then the diffusion drafter.
    Each source has its own length controller, so copied drafts are kept or shortened by their
    own measured acceptance and the step's measured cost, like the drafter's."""

    def __init__(self, vllm_config: Any) -> None:
        from dlmspec_vllm.integration.metrics import metrics_dir
        from dlmspec_vllm.integration.speculative_config import attached_settings

        speculative_config = vllm_config.speculative_config
        self.settings = attached_settings(speculative_config) or (
            DlmSpeculativeConfig.from_environment(speculative_config.num_speculative_tokens)
        )
        self._metrics_dir = metrics_dir(speculative_config)
        # vLLM resets data_parallel_rank to 0 in an independent (non-MoE) replica; the index
        # keeps which replica this is, as vLLM's own metrics label it.
        self._engine_index: int = vllm_config.parallel_config.data_parallel_index
        self._metrics: MetricsPublisher | None = None
        model_config = vllm_config.model_config
        self.max_model_len: int = model_config.max_model_len
        self.target_vocab_size: int = model_config.get_vocab_size()
        self.target_dtype: torch.dtype = model_config.dtype
        self.eos_token_ids = _eos_ids(model_config.hf_text_config)
        self.target_tokenizer: str = model_config.tokenizer
        self.target_path: str = model_config.model
        self.trust_remote_code: bool = model_config.trust_remote_code
        # vLLM caches prefixes in whole KV-cache blocks: the drafter shares its own in the same.
        self.kv_block_size: int = vllm_config.cache_config.block_size
        k = self.settings.num_speculative_tokens
        self._drafter_source = _Source(DRAFTER, self.settings.controller.build(k))
        self._copied_source = (
            _Source(COPIED, self.settings.controller.build(k))
            if self.settings.context_lookup.enabled
            else None
        )
        self.chooser = PathChooser(
            self.settings.lattice,
            vocab_size=self.target_vocab_size,
            eos_id=min(self.eos_token_ids) if self.eos_token_ids else None,
        )
        self.drafter: Drafter | None = None
        # Where the target computes, so where its features reach the drafter.
        self._device = torch.device("cpu")
        self.profiled: ProfiledPass | None = None
        self.stats = ProposerStats(draft_digest=self.settings.draft_digest)
        self._step: StepBatch | None = None
        self._requests: dict[str, _RequestState] = {}
        self._last_step_end: float | None = None
        # Requests that were decoding at the last proposal: only a step that continues one of
        # them measures a step; the first after an idle engine would measure the idle time.
        self._last_decoding: set[str] = set()

    @property
    def controller(self) -> LengthController:
        """The drafter's length controller."""
        return self._drafter_source.controller

    @property
    def _sources(self) -> list[_Source]:
        return [s for s in (self._copied_source, self._drafter_source) if s is not None]

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
            options=DraftingOptions(
                **self.settings.drafting.model_dump(), kv_block_tokens=self.kv_block_size
            ),
            target_tokenizer=self.target_tokenizer,
            target_dir=self.target_path,
            trust_remote_code=self.trust_remote_code,
        )
        self._device = device
        self._publish_metrics()
        logger.info(
            "dlm drafter %s loaded on %s (%s); controller %s, at most %d draft tokens per step",
            self.settings.draft_model,
            device,
            dtype,
            self.settings.controller.name,
            self.settings.num_speculative_tokens,
        )

    def profile(
        self, *, max_requests: int, max_step_tokens: int, target_hidden_size: int
    ) -> ProfiledPass:
        """Run the drafter as the engine's largest step would, so that vLLM's memory profile,
        which this runs inside, counts what the drafter needs before the KV cache takes the
        rest: every one of max_requests requests drafts num_speculative_tokens tokens after a
        context as long as the engine and the drafter's context budget let each keep; a
        target-conditioned drafter first takes that context in as target features, in chunks
        of a step's token budget, as it would from vLLM. Everything is forgotten afterwards."""
        if self.drafter is None:
            raise RuntimeError("dlm proposer.profile called before load_model")
        drafter = self.drafter
        k = self.settings.num_speculative_tokens
        context_tokens = self._profile_context_tokens(max_requests)
        req_ids = [f"dlmspec-profile-{i}" for i in range(max_requests)]
        contexts = [
            [(i + j) % self.target_vocab_size for j in range(context_tokens)]
            for i in range(max_requests)
        ]
        started = time.perf_counter()
        try:
            if isinstance(drafter, TargetConditionedDrafter):
                width = len(drafter.target_layer_ids) * target_hidden_size
                for features in self._profile_features(
                    req_ids, context_tokens, width, max_step_tokens
                ):
                    drafter.observe_step(features)
            block = drafter.draft(contexts, [k] * max_requests, req_ids=req_ids)
            self.chooser.choose(block, contexts, req_ids)
            held = getattr(drafter, "cached_tokens", None)
        except torch.OutOfMemoryError as err:
            raise DrafterProfileError(
                f"the dlm drafter's pass at the engine's largest step ({max_requests} requests "
                f"x {k} draft tokens after {context_tokens} context tokens each) does not fit "
                "in device memory beside the target: lower vLLM's max_num_seqs or "
                "max_model_len, or the dlm settings num_speculative_tokens, "
                f"drafting.cache_max_tokens (now {self.settings.drafting.cache_max_tokens}) or "
                "max_draft_context, or raise gpu_memory_utilization"
            ) from err
        finally:
            self.forget_requests(set(req_ids))
        self.profiled = ProfiledPass(
            max_requests, k, context_tokens, held, time.perf_counter() - started
        )
        logger.info(
            "dlm drafter profiled at %d requests x %d draft tokens after %d context tokens "
            "each (%.2f s)",
            max_requests,
            k,
            context_tokens,
            self.profiled.seconds,
        )
        return self.profiled

    def _profile_context_tokens(self, requests: int) -> int:
        """The longest context each of ``requests`` requests drafts after at once: what the
        engine leaves room for, and what the drafter keeps (its token budget shared among them
        for a target-conditioned drafter, its context window for one that reads tokens)."""
        assert self.drafter is not None
        longest = self.max_model_len - self.settings.num_speculative_tokens
        if isinstance(self.drafter, TargetConditionedDrafter):
            share = self.settings.drafting.cache_max_tokens // requests
        else:
            share = self.settings.max_draft_context or self.drafter.max_context_length
        return max(1, min(longest, share))

    def _profile_features(
        self, req_ids: list[str], context_tokens: int, width: int, chunk: int
    ) -> Iterator[StepFeatures]:
        """Target features for every request's context, at most ``chunk`` rows per step."""
        total = len(req_ids) * context_tokens
        for start in range(0, total, chunk):
            rows = torch.arange(start, min(total, start + chunk))
            owners, counts = torch.unique_consecutive(rows // context_tokens, return_counts=True)
            yield StepFeatures(
                req_ids=[req_ids[i] for i in owners.tolist()],
                counts=counts.tolist(),
                positions=rows % context_tokens,
                hidden=torch.zeros(len(rows), width, device=self._device, dtype=self.target_dtype),
            )

    def _publish_metrics(self) -> None:
        """Publish this engine's counters for /metrics, where vLLM's config asks for them."""
        from dlmspec_vllm.integration.metrics import publish_for_this_engine

        if self._metrics_dir is not None:
            self._metrics = publish_for_this_engine(
                self._metrics_dir, self._engine_index, self.metrics
            )

    def metrics(self) -> dict[str, Any]:
        """This engine's counters, as the Prometheus collector reads them."""
        return {
            "engine": self._engine_index,
            "tracked_requests": self.num_tracked_requests,
            **self.stats.metrics(),
        }

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
        """Drop every per-request state of requests that finished or were preempted: the
        proposer's, each source's controller's, the lattice's and the drafter's."""
        for req_id in req_ids:
            self._requests.pop(req_id, None)
            for source in self._sources:
                source.controller.forget(req_id)
            self.chooser.forget(req_id)
            if self.drafter is not None:
                self.drafter.forget(req_id)

    @property
    def num_tracked_requests(self) -> int:
        """Requests holding per-request state here, in a controller or in the lattice."""
        return max(
            len(self._requests),
            self.chooser.num_tracked,
            *(source.controller.num_tracked for source in self._sources),
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
        # An empty row is a request still in chunked prefill: nothing to draft after yet.
        rooms = self.max_model_len - np.asarray(num_tokens_no_spec[: len(sampled_token_ids)])
        decoding = [
            row for row, sampled in enumerate(sampled_token_ids) if sampled and rooms[row] > 0
        ]
        verified = self._observe_verification(step, sampled_token_ids)
        decoding_ids = {step.req_ids[row] for row in decoding}
        # A step that also prefilled measures the prompt, which no draft length changes: at
        # batch 16 one joining request's prompt costs as much as a few decode steps, and
        # counted as verification it would hide what drafting costs.
        if step.prefill_tokens == 0 and not decoding_ids.isdisjoint(self._last_decoding):
            self._record_costs(len(decoding), verified, started)
        self._last_decoding = decoding_ids
        for source in self._sources:
            source.controller.begin_step(len(decoding))
            source.seconds, source.drafted_tokens = 0.0, 0

        drafts: list[list[int]] = [[] for _ in sampled_token_ids]
        rows = self._copy_from_context(
            decoding, step, num_tokens_no_spec, token_ids_cpu, rooms, drafts
        )
        drafter_seconds = self._draft_with_drafter(
            rows, step, num_tokens_no_spec, token_ids_cpu, rooms, drafts
        )

        finished = time.perf_counter()
        self.stats.record_step(step.req_ids, drafts, finished - started, drafter_seconds)
        self.stats.log_now_and_then(self.controller, self.num_tracked_requests)
        self._last_step_end = finished
        return drafts

    def _state(self, req_id: str) -> _RequestState:
        state = self._requests.get(req_id)
        if state is None:
            state = self._requests[req_id] = _RequestState()
        return state

    def _copy_from_context(
        self,
        rows: list[int],
        step: StepBatch,
        num_tokens_no_spec: np.ndarray,
        token_ids_cpu: np.ndarray,
        rooms: np.ndarray,
        drafts: list[list[int]],
    ) -> list[int]:
        """Drafts copied where a request's last tokens recur in its context, as long as their
        controller keeps them; the rows left for the drafter."""
        source = self._copied_source
        if source is None or not rows:
            return rows
        started = time.perf_counter()
        lookup = self.settings.context_lookup
        index = np.asarray(rows)
        ends = np.asarray(num_tokens_no_spec)[index]
        continuations = context_continuations(
            token_ids_cpu[index, : int(ends.max())],
            ends,
            np.minimum(self.settings.num_speculative_tokens, rooms[index]),
            min_ngram=lookup.min_ngram,
            max_ngram=lookup.max_ngram,
        )
        found = {
            row: copied[: _length_before_eos(copied, self.eos_token_ids) + 1]
            for row, copied in zip(rows, continuations)
            if copied
        }
        lengths = source.controller.initial_lengths([step.req_ids[row] for row in found])
        for (row, copied), length in zip(found.items(), lengths):
            if length > 0:
                drafts[row] = copied[:length]
                state = self._state(step.req_ids[row])
                state.source, state.generated = source, len(drafts[row])
                source.drafted_tokens += len(drafts[row])
        source.seconds = time.perf_counter() - started
        return [row for row in rows if not drafts[row]]

    def _draft_with_drafter(
        self,
        rows: list[int],
        step: StepBatch,
        num_tokens_no_spec: np.ndarray,
        token_ids_cpu: np.ndarray,
        rooms: np.ndarray,
        drafts: list[list[int]],
    ) -> float:
        """The drafter's drafts for the rows its controller gives a length; the seconds its
        forward passes took."""
        source = self._drafter_source
        started = time.perf_counter()
        req_ids = [step.req_ids[row] for row in rows]
        lengths = source.controller.initial_lengths(req_ids)
        pending = []
        for row, req_id, length in zip(rows, req_ids, lengths):
            length = min(length, int(rooms[row]))
            if length > 0:
                context = token_ids_cpu[row, : int(num_tokens_no_spec[row])].tolist()
                self.chooser.observe_context(req_id, context)
                pending.append(_Drafting(row, req_id, context, int(rooms[row]), length))
        drafter_seconds = 0.0
        try:
            self._hand_over_target_features(step, token_ids_cpu)
            if pending:
                drafter_seconds = self._draft_in_passes(pending)
        except Exception:
            # A failed draft must not fail the requests: this step simply has no drafts.
            self.stats.record_failure()
            source.seconds = time.perf_counter() - started
            return 0.0
        for request in pending:
            keep = source.controller.clip(request.req_id, request.confidences)
            drafts[request.row] = request.tokens[:keep]
            state = self._state(request.req_id)
            state.source = source if keep else None
            state.generated = _length_before_eos(request.tokens, self.eos_token_ids)
            source.drafted_tokens += keep
        self.stats.undrafted_request_steps += sum(1 for row in rows if not drafts[row])
        source.seconds = time.perf_counter() - started
        return drafter_seconds

    def _hand_over_target_features(self, step: StepBatch, token_ids_cpu: np.ndarray) -> None:
        """Before drafting, the drafter learns what the target computed for every request in
        the batch this step (also those that draft nothing now, e.g. mid-prefill); a drafter
        that shares context between requests also gets the tokens it is keyed by."""
        features = step.target_features
        if features is None:
            return
        drafter = cast(TargetConditionedDrafter, self.drafter)
        if _shared_prefixes(drafter) is not None:
            assert features.batch_rows is not None, "the runner gives every row's batch row"
            tokens = token_ids_cpu[features.batch_rows.numpy(), features.positions.numpy()]
            req_ids = step.req_ids
            features = replace(
                features,
                token_ids=torch.from_numpy(tokens.astype(np.int64)),
                # Asked only for a request that adopts shared blocks: rare, so looked up then.
                prefix_tokens=lambda req_id, count: token_ids_cpu[
                    req_ids.index(req_id), :count
                ].tolist(),
            )
        drafter.observe_step(features)

    def report(self) -> dict[str, Any]:
        """Controller totals, per-request state size, counters, timing and recent lengths."""
        report = {
            "controller": self.controller.stats().as_dict(),
            "profiled": asdict(self.profiled) if self.profiled is not None else None,
            "num_tracked_requests": self.num_tracked_requests,
            **self.stats.as_dict(),
        }
        if self._copied_source is not None:
            report["copied_controller"] = self._copied_source.controller.stats().as_dict()
        shared = _shared_prefixes(self.drafter)
        if shared is not None:
            report["shared_prefix"] = {
                **shared.stats.as_dict(),
                "shared_prefix_tokens": shared.num_tokens,
                "shared_prefix_held_blocks": shared.num_held,
            }
        return report

    def _draft_in_passes(self, pending: list[_Drafting]) -> float:
        """First pass for every request, then further passes for those the controller extends;
        a further pass drafts after the tokens already drafted, it does not start over. Returns
        the seconds the drafter's forward passes took."""
        assert self.drafter is not None
        controller = self.controller
        active = pending
        forward_seconds = 0.0
        while active:
            histories = [r.context + r.tokens for r in active]
            # A target-conditioned drafter places its block by absolute position, and its
            # context is the target's features, not these tokens: never clip for it.
            clipped = (
                histories
                if isinstance(self.drafter, TargetConditionedDrafter)
                else _clip_contexts(histories, self.settings)
            )
            forward_started = time.perf_counter()
            block = self.drafter.draft(
                clipped,
                [r.next_length for r in active],
                req_ids=[r.req_id for r in active],
            )
            forward_seconds += time.perf_counter() - forward_started
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
                more = controller.extension(request.req_id, request.confidences)
                more = min(more, request.room - len(request.tokens))
                if more > 0:
                    request.next_length = more
                    extended.append(request)
            active = extended
        return forward_seconds

    def _observe_verification(self, step: StepBatch, sampled_token_ids: list[list[int]]) -> int:
        """vLLM accepted len(sampled) - 1 of the tokens it scheduled from a request's draft;
        each source's controller learns from its own drafts. Returns the draft tokens vLLM
        verified in all."""
        verified = 0
        for req_id, sampled in zip(step.req_ids, sampled_token_ids):
            state = self._requests.get(req_id)
            if state is None or state.source is None:
                continue
            source, state.source = state.source, None
            scheduled = min(
                step.scheduled_draft_counts.get(req_id, 0), source.controller.max_length
            )
            if not scheduled or not sampled:
                continue
            accepted = min(len(sampled) - 1, scheduled)
            self.stats.record_verified(source.name, scheduled, accepted)
            source.controller.observe(req_id, scheduled, accepted, state.generated)
            verified += scheduled
        return verified

    def _record_costs(self, batch_size: int, verified: int, now: float) -> None:
        """The engine step between two proposals is the verification of the last drafts (plus
        scheduling and sampling); every source's controller learns it, with its own share of
        the last proposer call."""
        assert self._last_step_end is not None
        for source in self._sources:
            source.controller.record_step(
                StepTiming(
                    batch_size=batch_size,
                    verify_seconds=now - self._last_step_end,
                    verified_tokens=verified,
                    draft_seconds=source.seconds,
                    drafted_tokens=source.drafted_tokens,
                )
            )


def _shared_prefixes(drafter: Drafter | None) -> SharedPrefixStore | None:
    """The drafter's store of context shared per prefix block: an optional capability of a
    target-conditioned drafter (DFlash's), so other drafters need not declare it."""
    return getattr(drafter, "shared_prefixes", None)


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
