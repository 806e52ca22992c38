"""The proposer's bookkeeping, driven step by step as vLLM's runner drives it, with a scripted
drafter: which rows draft, how acceptance reaches the controller, EOS, failures, state."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from dlmspec_vllm.config import DlmSpeculativeConfig
from dlmspec_vllm.drafters.base import Drafts, StepFeatures
from dlmspec_vllm.integration.speculative_config import SETTINGS_ATTRIBUTE
from dlmspec_vllm.proposer import DlmProposer, DrafterProfileError, StepBatch

VOCAB, EOS, MAX_LEN = 32, 0, 64


class ScriptedDrafter:
    """Drafts token (last context token + 1 + j) with confidence 0.9 at position j."""

    target_vocab_size = VOCAB
    max_context_length = MAX_LEN

    def __init__(self) -> None:
        self.calls: list[tuple[list[list[int]], list[int]]] = []
        self.fail = False
        self.forgotten: list[str] = []

    def forget(self, req_id: str) -> None:
        self.forgotten.append(req_id)

    def draft(self, contexts, lengths, *, req_ids=None) -> Drafts:
        if self.fail:
            raise RuntimeError("drafter exploded")
        self.calls.append(([list(c) for c in contexts], list(lengths)))
        logits = torch.full((len(contexts), max(lengths), VOCAB), -10.0)
        for b, (context, length) in enumerate(zip(contexts, lengths)):
            for j in range(length):
                logits[b, j, (context[-1] + 1 + j) % VOCAB] = 10.0
        return Drafts(logits=logits, lengths=list(lengths))


def make_proposer(**settings) -> tuple[DlmProposer, ScriptedDrafter]:
    config = DlmSpeculativeConfig(draft_model="unused", **settings)
    speculative_config = SimpleNamespace(num_speculative_tokens=config.num_speculative_tokens)
    setattr(speculative_config, SETTINGS_ATTRIBUTE, config.model_dump_json())
    model_config = SimpleNamespace(
        max_model_len=MAX_LEN,
        model="unused",
        tokenizer="unused",
        trust_remote_code=False,
        dtype=torch.float32,
        hf_text_config=SimpleNamespace(eos_token_id=EOS),
        get_vocab_size=lambda: VOCAB,
    )
    proposer = DlmProposer(
        SimpleNamespace(
            speculative_config=speculative_config,
            model_config=model_config,
            parallel_config=SimpleNamespace(data_parallel_index=0),
            cache_config=SimpleNamespace(block_size=16),
        )
    )
    proposer.drafter = drafter = ScriptedDrafter()
    return proposer, drafter


def step(
    proposer,
    rows: dict[str, list[int]],
    sampled: dict[str, list[int]],
    scheduled=None,
    prefill_tokens: int = 0,
):
    """One engine step: rows maps request id -> its tokens so far (prompt + output)."""
    req_ids = list(rows)
    token_ids = np.zeros((len(rows), MAX_LEN), dtype=np.int64)
    for i, tokens in enumerate(rows.values()):
        token_ids[i, : len(tokens)] = tokens
    proposer.begin_step(StepBatch(req_ids, scheduled or {}, prefill_tokens=prefill_tokens))
    return proposer.propose(
        [sampled[r] for r in req_ids],
        np.array([len(t) for t in rows.values()]),
        token_ids,
    )


def test_fixed_length_drafts_for_every_decoding_row_and_skips_prefill_chunks():
    proposer, drafter = make_proposer(num_speculative_tokens=3)
    drafts = step(proposer, {"a": [5, 6], "b": [9], "c": [1, 2, 3]}, {"a": [6], "b": [], "c": [3]})
    assert drafts == [[7, 8, 9], [], [4, 5, 6]]
    assert drafter.calls == [([[5, 6], [1, 2, 3]], [3, 3])]


def test_acceptance_of_the_scheduled_draft_reaches_the_controller():
    proposer, _ = make_proposer(num_speculative_tokens=3)
    step(proposer, {"a": [5]}, {"a": [5]})
    # vLLM scheduled 3 drafts for "a" and sampled 2 tokens: 1 draft accepted plus the bonus.
    step(proposer, {"a": [5, 6, 7]}, {"a": [6, 7]}, scheduled={"a": 3})
    stats = proposer.controller.stats()
    assert (stats.steps, stats.drafted_tokens, stats.accepted_tokens) == (1, 3, 1)


def test_draft_stops_after_eos_and_room_caps_the_length():
    proposer, _ = make_proposer(num_speculative_tokens=5)
    # Drafts 30, 31, 0 (= EOS) ...: nothing after an EOS is sent.
    assert step(proposer, {"a": [29]}, {"a": [29]}) == [[30, 31, EOS]]
    near_end = [3] * (MAX_LEN - 2)
    assert step(proposer, {"b": near_end}, {"b": [3]}) == [[4, 5]]


def test_failfast_extends_the_same_draft_in_a_further_pass():
    proposer, drafter = make_proposer(
        num_speculative_tokens=6,
        controller={"name": "failfast", "start_length": 2, "increment": 2, "length_cap": 6},
    )
    assert step(proposer, {"a": [1]}, {"a": [1]}) == [[2, 3, 4, 5, 6, 7]]
    # Each further pass drafts after the tokens already drafted, it does not start over.
    assert [call[0][0] for call in drafter.calls] == [[1], [1, 2, 3], [1, 2, 3, 4, 5]]


def test_a_drafter_failure_means_no_draft_this_step_not_a_failed_request():
    proposer, drafter = make_proposer(num_speculative_tokens=3)
    drafter.fail = True
    assert step(proposer, {"a": [1], "b": [2]}, {"a": [1], "b": [2]}) == [[], []]
    drafter.fail = False
    assert step(proposer, {"a": [1, 4]}, {"a": [4]}) == [[5, 6, 7]]
    assert proposer.report()["failed_draft_steps"] == 1


def test_state_of_ended_requests_is_dropped():
    proposer, drafter = make_proposer(num_speculative_tokens=3, controller="adl", lattice=True)
    for i in range(50):
        step(proposer, {f"r{i}": [1, 2]}, {f"r{i}": [2]})
    assert proposer.num_tracked_requests == 50
    proposer.forget_requests({f"r{i}" for i in range(50)})
    assert proposer.num_tracked_requests == 0
    assert sorted(drafter.forgotten) == sorted(f"r{i}" for i in range(50))


def test_context_lookup_drafts_where_the_context_recurs_and_the_drafter_elsewhere():
    proposer, drafter = make_proposer(num_speculative_tokens=3, context_lookup=True)
    repeating = [4, 9, 11, 12, 4, 9]
    drafts = step(proposer, {"a": repeating, "b": [1, 2]}, {"a": [9], "b": [2]})
    assert drafts == [[11, 12, 4], [3, 4, 5]]
    assert drafter.calls == [([[1, 2]], [3])]
    # The copied draft's verification is counted apart: the controller learns the drafter's.
    step(
        proposer,
        {"a": repeating + [11], "b": [1, 2, 3]},
        {"a": [11], "b": [3]},
        scheduled={"a": 3, "b": 3},
    )
    stats = proposer.controller.stats()
    assert (stats.steps, stats.drafted_tokens, stats.accepted_tokens) == (1, 3, 0)
    report = proposer.report()
    assert (report["copied_draft_steps"], report["copied_accepted_tokens"]) == (1, 0)
    proposer.forget_requests({"a", "b"})
    assert proposer.num_tracked_requests == 0


def test_a_copied_draft_ends_at_its_first_eos():
    proposer, _ = make_proposer(num_speculative_tokens=4, context_lookup=True)
    # "7 8" occurred before, followed by 9, EOS, 3: nothing after the EOS is sent.
    assert step(proposer, {"a": [7, 8, 9, EOS, 3, 7, 8]}, {"a": [8]}) == [[9, EOS]]


class Declines:
    """A controller stand-in that never lets its source draft."""

    name = "declines"
    max_length = 4
    num_tracked = 0

    def begin_step(self, batch_size):
        pass

    def record_step(self, timing):
        pass

    def initial_lengths(self, req_ids):
        return [0] * len(req_ids)

    def forget(self, req_id):
        pass


def test_copied_drafts_take_their_length_from_their_own_controller():
    proposer, drafter = make_proposer(
        num_speculative_tokens=4, context_lookup=True, controller={"name": "fixed", "k": 2}
    )
    repeating = [4, 9, 11, 12, 13, 4, 9]
    assert step(proposer, {"a": repeating}, {"a": [9]}) == [[11, 12]]
    step(proposer, {"a": repeating + [11, 12]}, {"a": [11, 12, 13]}, scheduled={"a": 2})
    report = proposer.report()
    assert report["copied_controller"]["steps"] == 1
    assert report["copied_controller"]["accepted_tokens"] == 2
    assert report["controller"]["steps"] == 0  # the drafter's controller learned nothing
    assert drafter.calls == []


def test_a_copied_draft_its_controller_declines_goes_to_the_drafter():
    proposer, drafter = make_proposer(num_speculative_tokens=4, context_lookup=True)
    proposer._copied_source.controller = Declines()
    assert step(proposer, {"a": [4, 9, 11, 4, 9]}, {"a": [9]}) == [[10, 11, 12, 13]]
    assert drafter.calls == [([[4, 9, 11, 4, 9]], [4])]


def test_the_never_drafting_setting_never_calls_the_drafter_nor_keeps_state():
    proposer, drafter = make_proposer(
        num_speculative_tokens=4, controller={"name": "fixed", "k": 0}
    )
    for i in range(5):
        assert step(proposer, {"a": [1] * (i + 1), "b": [2]}, {"a": [1], "b": [2]}) == [[], []]
    assert drafter.calls == []
    assert proposer.num_tracked_requests == 0
    assert proposer.report()["drafting_steps"] == 0
    assert proposer.metrics()["undrafted_request_steps"] == 10  # 5 steps of 2 requests


def test_only_steps_that_continue_a_request_are_timed_for_the_controllers():
    proposer, _ = make_proposer(num_speculative_tokens=3, controller="cost_aware")
    samples = proposer.controller.costs
    step(proposer, {"a": [1]}, {"a": [1]})
    assert samples.samples == 0  # nothing ran before: no step to time
    step(proposer, {"a": [1, 2]}, {"a": [2]})
    assert samples.samples == 1
    proposer.forget_requests({"a"})
    # An engine that was idle between "a" and "b": that gap is no step's cost.
    step(proposer, {"b": [5]}, {"b": [5]})
    assert samples.samples == 1
    step(proposer, {"b": [5, 6]}, {"b": [6]})
    assert samples.samples == 2


def test_a_step_that_also_prefills_a_joining_request_is_not_timed():
    proposer, _ = make_proposer(num_speculative_tokens=3, controller="cost_aware")
    samples = proposer.controller.costs
    step(proposer, {"a": [1]}, {"a": [1]})
    step(proposer, {"a": [1, 2]}, {"a": [2]})
    assert samples.samples == 1
    # "b" joins with its prompt's first chunk: the step measures that prefill, not a draft.
    step(proposer, {"a": [1, 2, 3], "b": [7, 7, 7]}, {"a": [3], "b": []}, prefill_tokens=3)
    assert samples.samples == 1
    step(proposer, {"a": [1, 2, 3, 4], "b": [7, 7, 7, 8]}, {"a": [4], "b": [8]})
    assert samples.samples == 2


def test_the_metrics_count_what_vllm_verified_by_source():
    proposer, _ = make_proposer(
        num_speculative_tokens=4, context_lookup=True, controller={"name": "fixed", "k": 2}
    )
    repeating = [4, 9, 11, 12, 13, 4, 9]
    # "a" repeats itself (a copied draft, 11 12); "b" does not (the drafter's, 3 4).
    assert step(proposer, {"a": repeating, "b": [1, 2]}, {"a": [9], "b": [2]}) == [
        [11, 12],
        [3, 4],
    ]
    step(
        proposer,
        {"a": repeating + [11, 12, 13], "b": [1, 2, 3, 7]},
        {"a": [11, 12, 13], "b": [3, 7]},
        scheduled={"a": 2, "b": 2},
    )
    metrics = proposer.metrics()
    assert metrics["by_source"] == {
        "copied": {"draft_tokens": 2, "drafted_request_steps": 1, "accepted_tokens": 2},
        "drafter": {"draft_tokens": 2, "drafted_request_steps": 1, "accepted_tokens": 1},
    }
    assert metrics["undrafted_request_steps"] == 0
    assert metrics["drafter_failures"] == 0
    # The drafter ran in both steps (for "b"): two steps in the histogram of its seconds.
    assert sum(metrics["drafter_seconds"]["counts"]) == 2
    assert metrics["tracked_requests"] == 2


class ScriptedTargetConditionedDrafter(ScriptedDrafter):
    """A ScriptedDrafter that reads target features: it keeps every step it is handed."""

    target_layer_ids = (0, 2)

    def __init__(self) -> None:
        super().__init__()
        self.steps: list[StepFeatures] = []
        self.held: dict[str, int] = {}

    def observe_step(self, features: StepFeatures) -> None:
        self.steps.append(features)
        for req_id, count in zip(features.req_ids, features.counts):
            self.held[req_id] = self.held.get(req_id, 0) + count

    def forget(self, req_id: str) -> None:
        super().forget(req_id)
        self.held.pop(req_id, None)

    @property
    def cached_tokens(self) -> int:
        return sum(self.held.values())


def test_the_profile_pass_drafts_the_largest_step_and_forgets_it():
    proposer, drafter = make_proposer(num_speculative_tokens=4, max_draft_context=20)
    profiled = proposer.profile(max_requests=3, max_step_tokens=16, target_hidden_size=8)
    # Every request drafts k after the longest context it may draft after (the window, 20 of
    # the engine's 60).
    assert [[len(c) for c in contexts] for contexts, _ in drafter.calls] == [[20, 20, 20]]
    assert [lengths for _, lengths in drafter.calls] == [[4, 4, 4]]
    assert (profiled.requests, profiled.draft_tokens, profiled.context_tokens) == (3, 4, 20)
    assert sorted(drafter.forgotten) == [f"dlmspec-profile-{i}" for i in range(3)]
    assert proposer.num_tracked_requests == 0
    assert proposer.report()["profiled"]["requests"] == 3
    # Steps after the profile are the engine's own: nothing of the profile reaches them.
    assert step(proposer, {"a": [1, 2, 3]}, {"a": [3]}) == [[4, 5, 6, 7]]


def test_the_profile_pass_fills_a_target_conditioned_drafters_context_budget():
    proposer, _ = make_proposer(num_speculative_tokens=4, drafting={"cache_max_tokens": 100})
    proposer.drafter = drafter = ScriptedTargetConditionedDrafter()
    profiled = proposer.profile(max_requests=4, max_step_tokens=16, target_hidden_size=8)
    # The budget of 100 tokens shared by 4 requests: 25 context tokens each, taken in as
    # target features in steps of at most 16 rows, 2 layers x 8 values each.
    assert profiled.context_tokens == 25
    assert profiled.held_context_tokens == 100
    assert [int(s.positions.numel()) for s in drafter.steps] == [16] * 6 + [4]
    assert {tuple(s.hidden.shape[1:]) for s in drafter.steps} == {(16,)}
    positions = torch.cat([s.positions for s in drafter.steps])
    assert positions.tolist() == list(range(25)) * 4
    assert drafter.cached_tokens == 0


def test_a_profile_pass_out_of_memory_names_the_settings_that_fix_it():
    proposer, drafter = make_proposer(num_speculative_tokens=4)

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory")

    drafter.draft = out_of_memory
    with pytest.raises(DrafterProfileError, match="max_num_seqs.*cache_max_tokens"):
        proposer.profile(max_requests=8, max_step_tokens=64, target_hidden_size=8)
    assert proposer.num_tracked_requests == 0
