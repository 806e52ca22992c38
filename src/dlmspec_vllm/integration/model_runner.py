"""Give our proposer the request ids and scheduled draft counts of each step.

vLLM's `custom_class` proposers see only rows of token ids. Per-request draft-length
controllers need to know which request each row is, how many of its drafts vLLM actually
scheduled, and which requests finished or were preempted, so the runner's draft step is
wrapped to hand those over before the original step runs.
"""

from __future__ import annotations

from vllm.v1.worker.gpu_model_runner import GPUModelRunner

from dlmspec_vllm.integration.patching import MethodPatch
from dlmspec_vllm.proposer import DlmProposer, StepBatch


class GPUModelRunnerProposeDraftTokenIdsPatch(MethodPatch):
    target = GPUModelRunner
    methods = ("propose_draft_token_ids",)
    expected_parameters = {
        "propose_draft_token_ids": (
            "self",
            "scheduler_output",
            "sampled_token_ids",
            "sampling_metadata",
            "hidden_states",
            "sample_hidden_states",
            "aux_hidden_states",
            "spec_decode_metadata",
            "common_attn_metadata",
            "slot_mappings",
        ),
    }

    def propose_draft_token_ids(self, scheduler_output, *args, **kwargs):
        drafter = getattr(self, "drafter", None)
        if isinstance(drafter, DlmProposer):
            drafter.begin_step(
                StepBatch(
                    req_ids=list(self.input_batch.req_ids),
                    scheduled_draft_counts={
                        req_id: len(tokens)
                        for req_id, tokens in scheduler_output.scheduled_spec_decode_tokens.items()
                    },
                    ended_req_ids=set(scheduler_output.finished_req_ids)
                    | set(scheduler_output.preempted_req_ids or ()),
                )
            )
        original = GPUModelRunnerProposeDraftTokenIdsPatch.original("propose_draft_token_ids")
        return original(self, scheduler_output, *args, **kwargs)
