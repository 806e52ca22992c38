"""The answer store and `dlmspec generate-answers` through vLLM on the tiny pair's target."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from dlmspec_vllm.training.answers import Answer, AnswerStore, is_validation, prompt_plan


def _answer(key: str, length: int) -> Answer:
    outputs = length - 3
    return Answer(
        key,
        np.arange(length, dtype=np.int32),
        3,
        np.arange(outputs * 2, dtype=np.int32).reshape(outputs, 2),
        np.full((outputs, 2), -0.5, dtype=np.float16),
    )


def test_shards_round_trip_and_another_target_is_refused(tmp_path):
    store = AnswerStore(tmp_path, target_sha256="abc", decoding={"max_new_tokens": 4})
    store.add_shard([_answer("s:1", 6), _answer("s:2", 5)], {"sources": {"s": 2}})
    store.add_shard([_answer("s:3", 7)], {"sources": {"s": 1}})
    reopened = AnswerStore.open(tmp_path)
    answers = reopened.answers()
    assert [a.key for a in answers] == ["s:1", "s:2", "s:3"]
    assert reopened.keys() == {"s:1", "s:2", "s:3"}
    assert answers[2].tokens.tolist() == list(range(7)) and answers[2].prompt_length == 3
    assert answers[1].top_ids.tolist() == [[0, 1], [2, 3]]
    assert answers[0].top_logprobs.dtype == np.float16
    with pytest.raises(ValueError, match="another target or decoding"):
        AnswerStore(tmp_path, target_sha256="other", decoding={"max_new_tokens": 4})


def test_the_plan_is_seeded_mixed_and_keeps_excluded_prompts_out(tmp_path):
    first = prompt_plan(seed=0, sources=["stdlib-code"])
    again = prompt_plan(seed=0, sources=["stdlib-code"])
    other = prompt_plan(seed=1, sources=["stdlib-code"])
    assert [p.key for p in first.prompts] == [p.key for p in again.prompts]
    assert [p.key for p in first.prompts] != [p.key for p in other.prompts]
    assert {p.key for p in first.prompts} == {p.key for p in other.prompts}
    assert len({p.key for p in first.prompts}) == len(first.prompts) > 1000
    excluded = tmp_path / "benchmark.jsonl"
    excluded.write_text(json.dumps({"prompt": first.prompts[5].text}) + "\n")
    plan = prompt_plan(seed=0, sources=["stdlib-code"], exclude_files=[excluded])
    assert first.prompts[5].key in {p.key for p in plan.dropped}
    assert first.prompts[5].key not in {p.key for p in plan.prompts}
    assert 0 < sum(is_validation(p.key) for p in first.prompts) < len(first.prompts) / 10


def generate(target: Path, store: Path, prompts: int) -> str:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "VLLM_CPU_KVCACHE_SPACE": "1"}
    completed = subprocess.run(
        [
            sys.executable, "-m", "dlmspec_vllm.cli", "generate-answers",
            "--target", str(target), "--store", str(store), "--sources", "stdlib-code",
            "--max-prompts", str(prompts), "--shard-size", "4", "--max-new-tokens", "8",
            "--top-k", "3", "--batch-size", "4",
        ],
        check=True, env=env, timeout=600, capture_output=True, text=True,
    )  # fmt: skip
    return completed.stdout


@pytest.mark.vllm
def test_vllm_writes_greedy_answers_with_their_distributions_and_a_rerun_adds(tiny_pair, tmp_path):
    store_dir = tmp_path / "store"
    out = generate(tiny_pair.target_dir, store_dir, 5)
    assert "shard-00001.npz: 1 answers" in out
    answers = AnswerStore.open(store_dir).answers()
    assert len(answers) == 5
    for answer in answers:
        outputs = answer.tokens[answer.prompt_length :]
        assert 0 < len(outputs) <= 8 and answer.top_ids.shape == (len(outputs), 3)
        # Greedy: the token written is the target's likeliest, ranked first.
        assert np.array_equal(answer.top_ids[:, 0], outputs)
        assert np.all(np.diff(answer.top_logprobs.astype(np.float32), axis=1) <= 0)
    out = generate(tiny_pair.target_dir, store_dir, 7)
    assert "shard-00002.npz: 2 answers" in out and "store: 7 answers" in out
    keys = [a.key for a in AnswerStore.open(store_dir).answers()]
    assert len(set(keys)) == 7 and keys[:5] == [a.key for a in answers]
    plan = prompt_plan(seed=0, sources=["stdlib-code"])
    assert keys == [p.key for p in plan.prompts[:7]]
