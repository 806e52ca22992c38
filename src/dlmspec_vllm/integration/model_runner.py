"""Tell our proposer which request each batch row is, which requests have ended, and what the
target computed for them.

vLLM's `custom_class` proposers see only rows of token ids. Per-request draft-length
controllers need to know which request each row is and how many of its drafts vLLM actually
scheduled (wrapped draft step), and which requests finished or were preempted, so their state
is freed. Ended requests are announced at the start of the next model step, which vLLM runs
even when nothing else is scheduled; the draft step does not run then, so that news is taken
from `execute_model`.

A drafter that reads the target's hidden states (`TargetConditionedDrafter`) gets them the way
vLLM's eagle3/dflash proposers do: once the models are loaded, the target is asked for its
auxiliary hidden states at the drafter's layers (`set_aux_hidden_state_layers`), and every draft
step hands the proposer, as one batch, the states of the tokens that became part of each
request's sequence in that step (`target_features_of_step`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from vllm.model_executor.models.interfaces import supports_eagle3
from vllm.v1.worker.gpu_model_runner import GPUModelRunner

from dlmspec_vllm.drafters.base import StepFeatures
from dlmspec_vllm.integration.patching import MethodPatch
from dlmspec_vllm.proposer import DlmProposer, StepBatch

# Set on the runner once the target returns the drafter's layers: a TargetLayerPlan.
PLAN_ATTRIBUTE = "dlmspec_target_layers"


class TargetLayersError(ValueError):
    """The target model cannot give the drafter the hidden states it reads."""


@dataclass(frozen=True)
class TargetLayerPlan:
    """How the drafter's target layers map onto vLLM's auxiliary hidden states.

    vllm_layers: what `set_aux_hidden_state_layers` is given. vLLM's aux id j is the input of
        decoder layer j (the residual stream before it), so DFlash's id i (output of layer i)
        is vLLM's i + 1. vLLM collects them sorted and without repeats. The last layer's id
        is not among them: its output after the final norm is the state vLLM feeds the LM head,
        which the model returns beside the aux states.
    order: for each of the drafter's target_layer_ids, in its order, the index of its tensor in
        the list vLLM returns, len(vllm_layers) standing for the final-norm state.
    """

    vllm_layers: tuple[int, ...]
    order: tuple[int, ...]


def plan_target_layers(
    target_layer_ids: Sequence[int], model: Any, *, num_layers: int, architecture: str
) -> TargetLayerPlan:
    """Check that the target can return these layers' outputs, and how to ask vLLM for them.

    A DFlash id i may be 0 .. num_layers - 1; num_layers - 1 is the last layer's output after
    the final norm, as in Hugging Face's `hidden_states[num_layers]` (what DFlash-style drafters
    are trained on), which is the model's own output, not one of vLLM's aux states (vLLM's
    aux id num_layers would be the same layer before the norm).
    """
    ids = tuple(target_layer_ids)
    described = f"the drafter's target_layer_ids {list(ids)}"
    if not supports_eagle3(model):
        raise TargetLayersError(
            f"{described} need the target's hidden states, but vLLM's {architecture} cannot "
            "return them (it does not implement vLLM's SupportsEagle3 interface): use a target "
            "architecture that vLLM's eagle3/dflash methods support (e.g. Llama, Qwen2, Qwen3)"
        )
    final = num_layers - 1
    bad = [i for i in ids if not isinstance(i, int) or not 0 <= i <= final]
    if not ids or bad:
        problem = "are empty" if not ids else f"include {bad}"
        raise TargetLayersError(
            f"{described} {problem}, but the target {architecture} has {num_layers} decoder "
            f"layers: ids (DFlash numbering, i = output of layer i) must be 0..{final} ({final}: "
            "the last layer after the final norm): use a drafter trained for this target"
        )
    vllm_layers = tuple(sorted({i + 1 for i in ids if i != final}))
    order = tuple(len(vllm_layers) if i == final else vllm_layers.index(i + 1) for i in ids)
    return TargetLayerPlan(vllm_layers, order)


def target_features_of_step(
    req_ids: Sequence[str],
    num_scheduled_tokens: Mapping[str, int],
    scheduled_draft_counts: Mapping[str, int],
    sampled_token_ids: Sequence[Sequence[int]],
    num_computed_tokens: np.ndarray,
    layer_states: Sequence[torch.Tensor],
    order: Sequence[int],
) -> StepFeatures | None:
    """The target's states for the tokens that joined each request's sequence this step, for
    the whole batch in one tensor (None if no request has any).

    The step's tokens are laid out request after request, in batch-row order, each request's
    starting at its position num_computed_tokens[row]. A request keeps all of its scheduled
    tokens except the drafts the target rejected: a prompt chunk keeps the whole chunk (sampled
    or not), a decode step with d drafts of which a were accepted keeps its first 1 + a tokens.
    ``layer_states``: vLLM's aux hidden states, then the model's final-norm output; ``order``
    picks the drafter's layers from them. Positions are on the CPU; hidden states stay where the
    target computed them, gathered with one index per layer.
    """
    rows = len(req_ids)
    scheduled = np.fromiter((num_scheduled_tokens[r] for r in req_ids), np.int64, rows)
    drafts = np.fromiter((scheduled_draft_counts.get(r, 0) for r in req_ids), np.int64, rows)
    sampled = np.fromiter((len(s) for s in sampled_token_ids), np.int64, rows)
    # A request with drafts always samples; one without keeps its chunk whatever it sampled.
    accepted = np.clip(sampled - 1, 0, drafts)
    keep = scheduled - drafts + accepted
    total = int(keep.sum())
    if total == 0:
        return None
    owner = np.repeat(np.arange(rows), keep)
    offset = np.arange(total) - np.repeat(np.cumsum(keep) - keep, keep)
    positions = torch.from_numpy(num_computed_tokens[:rows].astype(np.int64)[owner] + offset)
    if total == int(scheduled.sum()):
        # Nothing rejected (a step without drafts, or every draft accepted): the kept tokens
        # are the first `total` rows as they are, and one concatenation copies them.
        hidden = torch.cat([layer_states[j][:total] for j in order], dim=-1)
    else:
        flat = (np.cumsum(scheduled) - scheduled)[owner] + offset
        index = torch.from_numpy(flat).to(layer_states[0].device, non_blocking=True)
        hidden = torch.cat([layer_states[j].index_select(0, index) for j in order], dim=-1)
    has_new = keep > 0
    return StepFeatures(
        req_ids=[r for r, new in zip(req_ids, has_new) if new],
        counts=keep[has_new].tolist(),
        positions=positions,
        hidden=hidden,
        batch_rows=torch.from_numpy(owner),
    )


class GPUModelRunnerPatch(MethodPatch):
    target = GPUModelRunner
    # `_setup_eagle3_aux_hidden_state_outputs` is where both the GPU and the CPU runner's
    # load_model end, after the drafter's load_model: the point where eagle3 picks its layers.
    methods = (
        "execute_model",
        "propose_draft_token_ids",
        "_setup_eagle3_aux_hidden_state_outputs",
        "_input_fits_in_drafter",
        "_sample",
        "profile_run",
    )
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
        "_setup_eagle3_aux_hidden_state_outputs": ("self",),
        "_input_fits_in_drafter": ("self", "common_attn_metadata"),
        "_sample": ("self", "logits", "spec_decode_metadata"),
        "profile_run": ("self", "randomize_inputs"),
    }

    def profile_run(self: Any, *args, **kwargs):
        # vLLM measures the peak memory of this run to size the KV cache, and runs a dummy
        # draft in it for its own methods but not for custom_class: without ours the drafter's
        # activations at the largest batch, and the context it keeps, would take memory the
        # KV cache was already given.
        GPUModelRunnerPatch.original("profile_run")(self, *args, **kwargs)
        drafter = getattr(self, "drafter", None)
        if isinstance(drafter, DlmProposer):
            drafter.profile(
                max_requests=self.max_num_reqs,
                max_step_tokens=self.max_num_tokens,
                target_hidden_size=self.model_config.get_hidden_size(),
            )
            self._sync_device()

    def _sample(self, logits, spec_decode_metadata):
        # With speculation configured vLLM sends every step through the rejection sampler,
        # also a step in which no request has a draft, where it only samples each request's
        # bonus token with the plain sampler, after copies and bookkeeping that cost a
        # never-drafting step about 1.5% at batch 16 on a CPU. Such a step is a plain step.
        if (
            spec_decode_metadata is not None
            and spec_decode_metadata.max_spec_len == 0
            and isinstance(getattr(self, "drafter", None), DlmProposer)
        ):
            spec_decode_metadata = None
        return GPUModelRunnerPatch.original("_sample")(self, logits, spec_decode_metadata)

    def _input_fits_in_drafter(self, common_attn_metadata):
        # vLLM asks whether the longest sequence plus num_speculative_tokens fits max_model_len;
        # if not, it skips the proposer and schedules num_speculative_tokens zero tokens as
        # drafts for every request of the batch, all of which the target then verifies. Our
        # proposer caps each request's draft at its own room, so the batch always fits it.
        if isinstance(getattr(self, "drafter", None), DlmProposer):
            return common_attn_metadata is not None
        return GPUModelRunnerPatch.original("_input_fits_in_drafter")(self, common_attn_metadata)

    def execute_model(self, scheduler_output, *args, **kwargs):
        drafter = getattr(self, "drafter", None)
        if isinstance(drafter, DlmProposer):
            ended = set(scheduler_output.finished_req_ids)
            ended |= set(scheduler_output.preempted_req_ids or ())
            drafter.forget_requests(ended)
        original = GPUModelRunnerPatch.original("execute_model")
        return original(self, scheduler_output, *args, **kwargs)

    def _setup_eagle3_aux_hidden_state_outputs(self: Any):
        GPUModelRunnerPatch.original("_setup_eagle3_aux_hidden_state_outputs")(self)
        drafter = getattr(self, "drafter", None)
        layer_ids = drafter.target_layer_ids if isinstance(drafter, DlmProposer) else None
        if layer_ids is None:
            return
        model = self.get_model()
        plan = plan_target_layers(
            layer_ids,
            model,
            num_layers=self.model_config.hf_text_config.num_hidden_layers,
            architecture=type(model).__name__,
        )
        if plan.vllm_layers:
            model.set_aux_hidden_state_layers(plan.vllm_layers)
            self.use_aux_hidden_state_outputs = True
        setattr(self, PLAN_ATTRIBUTE, plan)

    def propose_draft_token_ids(
        self: Any,
        scheduler_output,
        sampled_token_ids,
        sampling_metadata,
        hidden_states,
        sample_hidden_states,
        aux_hidden_states,
        *args,
        **kwargs,
    ):
        drafter = getattr(self, "drafter", None)
        if isinstance(drafter, DlmProposer):
            req_ids = list(self.input_batch.req_ids)
            draft_counts = {
                req_id: len(tokens)
                for req_id, tokens in scheduler_output.scheduled_spec_decode_tokens.items()
            }
            plan: TargetLayerPlan | None = getattr(self, PLAN_ATTRIBUTE, None)
            features = None
            if plan is not None and (aux_hidden_states is not None or not plan.vllm_layers):
                features = target_features_of_step(
                    req_ids,
                    scheduler_output.num_scheduled_tokens,
                    draft_counts,
                    sampled_token_ids,
                    self.input_batch.num_computed_tokens_cpu,
                    [*(aux_hidden_states or ()), hidden_states],
                    plan.order,
                )
            drafter.begin_step(
                StepBatch(
                    req_ids=req_ids,
                    scheduled_draft_counts=draft_counts,
                    target_features=features,
                    prefill_tokens=scheduler_output.total_num_scheduled_tokens
                    - len(scheduler_output.num_scheduled_tokens)
                    - sum(draft_counts.values()),
                )
            )
        original = GPUModelRunnerPatch.original("propose_draft_token_ids")
        return original(
            self,
            scheduler_output,
            sampled_token_ids,
            sampling_metadata,
            hidden_states,
            sample_hidden_states,
            aux_hidden_states,
            *args,
            **kwargs,
        )
