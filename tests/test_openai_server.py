"""vLLM's OpenAI-compatible server with `--speculative-config '{"method": "dlm", ...}'`,
on loopback, answering completions and chat completions and exporting spec-decode counters."""

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

pytestmark = pytest.mark.vllm

PROMPT = "def format_line(text, width):\n    "
MAX_TOKENS = 32
STARTUP_SECONDS = 240


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def server(tiny_pair, tmp_path_factory):
    port = free_port()
    log_path = tmp_path_factory.mktemp("server") / "server.log"
    spec = {"method": "dlm", "draft_model": str(tiny_pair.drafter_dir), "num_speculative_tokens": 4}
    command = [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server",
        "--model", str(tiny_pair.target_dir),
        "--served-model-name", "tiny",
        "--host", "127.0.0.1", "--port", str(port),
        "--max-model-len", "256", "--enforce-eager", "--dtype", "float32",
        "--speculative-config", json.dumps(spec),
    ]  # fmt: skip
    with open(log_path, "w") as log:
        process = subprocess.Popen(
            command, env=engine_env(multiprocess=True), stdout=log, stderr=subprocess.STDOUT
        )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + STARTUP_SECONDS
        while True:
            if process.poll() is not None:
                tail = log_path.read_text()[-4000:]
                pytest.fail(f"server exited with {process.returncode}:\n{tail}")
            try:
                if requests.get(f"{base}/health", timeout=2).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            if time.monotonic() > deadline:
                tail = log_path.read_text()[-4000:]
                pytest.fail(f"server not ready in {STARTUP_SECONDS} s:\n{tail}")
            time.sleep(1)
        yield base
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()


def test_completion_is_the_targets_own_greedy_text(server, tiny_pair):
    reply = requests.post(
        f"{server}/v1/completions",
        json={"model": "tiny", "prompt": PROMPT, "max_tokens": MAX_TOKENS, "temperature": 0},
        timeout=60,
    )
    assert reply.status_code == 200, reply.text
    text = reply.json()["choices"][0]["text"]
    reference = run_in_subprocess(
        EngineJob(
            model=str(tiny_pair.target_dir),
            engine_kwargs={"enforce_eager": True, "max_model_len": 256, "dtype": "float32"},
            batches=[Batch(prompts=[PROMPT], sampling=SamplingSettings(max_tokens=MAX_TOKENS))],
            warmup=False,
        )
    )
    assert text == reference.batches[0].texts[0]


def test_chat_completion(server):
    reply = requests.post(
        f"{server}/v1/chat/completions",
        json={
            "model": "tiny",
            "messages": [{"role": "user", "content": "Write a function that sorts a list."}],
            "max_tokens": 24,
            "temperature": 0.8,
            "seed": 3,
        },
        timeout=60,
    )
    assert reply.status_code == 200, reply.text
    body = reply.json()
    assert body["choices"][0]["message"]["role"] == "assistant"
    assert 0 < body["usage"]["completion_tokens"] <= 24


def test_metrics_show_spec_decode_counters(server):
    requests.post(
        f"{server}/v1/completions",
        json={"model": "tiny", "prompt": "import ", "max_tokens": 16, "temperature": 0},
        timeout=60,
    )
    metrics = requests.get(f"{server}/metrics", timeout=10).text

    def counter(name: str) -> float:
        found = re.findall(rf"^{name}_total{{[^}}]*}} ([0-9.e+]+)$", metrics, flags=re.M)
        assert found, f"{name} missing from /metrics"
        return sum(float(value) for value in found)

    assert counter("vllm:spec_decode_num_drafts") > 0
    assert counter("vllm:spec_decode_num_draft_tokens") > 0
    assert counter("vllm:spec_decode_num_accepted_tokens") > 0


def test_the_methods_own_series_count_what_vllm_verified(server):
    """The dlmspec: series are made in the worker process and served by the API server: their
    totals equal vLLM's own spec-decode counters, split by draft source."""
    from dlmspec_vllm.integration.metrics import PUBLISH_INTERVAL_SECONDS

    for prompt in ("import ", PROMPT, "class Stack:\n    def push(self, item):\n        "):
        reply = requests.post(
            f"{server}/v1/completions",
            json={"model": "tiny", "prompt": prompt, "max_tokens": 24, "temperature": 0},
            timeout=60,
        )
        assert reply.status_code == 200, reply.text
    time.sleep(3 * PUBLISH_INTERVAL_SECONDS)
    metrics = requests.get(f"{server}/metrics", timeout=10).text

    def total(name: str, **labels: str) -> float:
        found = series(metrics, name, **labels)
        assert found, f"{name} {labels} missing from /metrics"
        return sum(found)

    assert total("dlmspec:draft_tokens_total") == total("vllm:spec_decode_num_draft_tokens_total")
    assert total("dlmspec:accepted_tokens_total") == total(
        "vllm:spec_decode_num_accepted_tokens_total"
    )
    assert total("dlmspec:drafted_request_steps_total") == total(
        "vllm:spec_decode_num_drafts_total"
    )
    assert total("dlmspec:drafted_request_steps_total", source="drafter", engine="0") > 0
    assert total("dlmspec:draft_tokens_total", source="copied") == 0  # context lookup is off
    steps = total("dlmspec:drafter_seconds_count")
    assert 0 < steps == total("dlmspec:drafter_seconds_bucket", le="+Inf")
    assert total("dlmspec:drafter_seconds_sum") > 0
    assert total("dlmspec:drafter_failures_total") == 0
    assert total("dlmspec:undrafted_request_steps_total") >= 0
    assert 0 <= total("dlmspec:tracked_requests") <= 1  # the last request ends in a next step
