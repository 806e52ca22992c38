"""Tell our proposer which request each batch row is, and which requests have ended.

vLLM's `custom_class` proposers see only rows of token ids. Per-request draft-length
controllers need to know which request each row is and how many of its drafts vLLM actually
scheduled (wrapped draft step), and which requests finished or were preempted, so their state
is freed. Ended requests are announced at the start of the next model step, which vLLM runs
even when nothing else is scheduled; the draft step does not run then, so that news is taken
from `execute_model`.
"""

from __future__ import annotations

from vllm.v1.worker.gpu_model_runner import GPUModelRunner

from dlmspec_vllm.integration.patching import MethodPatch
from dlmspec_vllm.proposer import DlmProposer, StepBatch


class GPUModelRunnerPatch(MethodPatch):
    target = GPUModelRunner
    methods = ("execute_model", "propose_draft_token_ids")
    expected_parameters = {
        "execute_model": ("self", "scheduler_output", "intermediate_tensors"),
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

    def execute_model(self, scheduler_output, *args, **kwargs):
        drafter = getattr(self, "drafter", None)
        if isinstance(drafter, DlmProposer):
            ended = set(scheduler_output.finished_req_ids)
            ended |= set(scheduler_output.preempted_req_ids or ())
            drafter.forget_requests(ended)
        original = GPUModelRunnerPatch.original("execute_model")
        return original(self, scheduler_output, *args, **kwargs)

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
                )
            )
        original = GPUModelRunnerPatch.original("propose_draft_token_ids")
        return original(self, scheduler_output, *args, **kwargs)
