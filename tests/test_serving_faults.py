"""The OpenAI server with method `dlm` under faults (issue #7).

One dlm server and one no-speculation server, both with a KV cache of 8 blocks (1024 tokens,
so concurrent requests get preempted) and max_model_len 256. The dlm drafter is the tiny pair's
with its context window cut to 64 positions, so most prompts are longer than the drafter can
read. A test-only vLLM plugin (tests/fixtures/fault_plugin, on the dlm server's PYTHONPATH)
makes the drafter raise, or stall, on any batch holding a request with a trigger token sequence.

Every fault must leave the server answering, greedy output token-for-token the no-speculation
server's, the failure logged once with its cause, and no per-request state behind.
"""

from __future__ import annotations

import json
import os
import re
import threading
import time
from pathlib import Path

import pytest
import requests

from dlmspec_harness.serving import OpenAIServer, make_load, speculative_and_plain_servers

pytestmark = pytest.mark.vllm

FAULT_PLUGIN = Path(__file__).parent / "fixtures" / "fault_plugin"
FAULT_TRIGGER = [77, 77, 77]
SLOW_TRIGGER = [78, 78, 78]
FAULT_MESSAGE = "injected drafter fault for the serving tests"
MAX_MODEL_LEN = 256
DRAFTER_WINDOW = 64
K = 8
# vLLM's CPU KV blocks hold 128 tokens each. The server logs "Added request <id>." once a
# request is on its way to the engine core (test_preemption_... waits for those lines).
SERVER_ARGS = ["--num-gpu-blocks-override", "8", "--enable-log-requests"]


def small_window_drafter(drafter_dir: Path, out: Path, window: int) -> Path:
    """The same drafter weights with `max_position_embeddings` cut to `window`."""
    out.mkdir()
    for item in drafter_dir.iterdir():
        if item.name != "config.json":
            (out / item.name).symlink_to(item)
    config = json.loads((drafter_dir / "config.json").read_text())
    config["max_position_embeddings"] = window
    (out / "config.json").write_text(json.dumps(config))
    return out


@pytest.fixture(scope="module")
def servers(tiny_pair, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("serving_faults")
    drafter = small_window_drafter(tiny_pair.drafter_dir, tmp / "drafter", DRAFTER_WINDOW)
    env = {
        "PYTHONPATH": os.pathsep.join(
            filter(None, [str(FAULT_PLUGIN), os.environ.get("PYTHONPATH")])
        ),
        "DLMSPEC_TEST_FAULT_TRIGGER": ",".join(map(str, FAULT_TRIGGER)),
        "DLMSPEC_TEST_SLOW_TRIGGER": ",".join(map(str, SLOW_TRIGGER)),
        "DLMSPEC_TEST_SLOW_SECONDS": "1",
    }
    spec = {"method": "dlm", "draft_model": str(drafter), "num_speculative_tokens": K}
    with speculative_and_plain_servers(
        tiny_pair.target_dir,
        tmp,
        spec,
        speculative_env=env,
        max_model_len=MAX_MODEL_LEN,
        extra_args=SERVER_ARGS,
    ) as pair:
        yield pair


def tokens(server: OpenAIServer, text: str) -> list[int]:
    reply = requests.post(
        f"{server.base}/tokenize", json={"model": server.served_name, "prompt": text}, timeout=30
    )
    reply.raise_for_status()
    return reply.json()["tokens"]


def greedy(server: OpenAIServer, prompt, ignore_eos: bool | None = None, max_tokens=32, **body):
    body = {**body, "prompt": prompt, "temperature": 0, "return_token_ids": True}
    body["max_tokens"] = max_tokens
    if ignore_eos is not None:
        body["ignore_eos"] = ignore_eos
    reply = server.complete(**body)
    assert reply.status_code == 200, reply.text
    return reply.json()["choices"][0]


def assert_same_greedy(dlm: OpenAIServer, base: OpenAIServer, prompt, **body) -> dict:
    got, expected = greedy(dlm, prompt, **body), greedy(base, prompt, **body)
    assert got["token_ids"] == expected["token_ids"]
    assert got["finish_reason"] == expected["finish_reason"]
    return got


def assert_idle(server: OpenAIServer) -> dict:
    """No request running and no per-request state left; the proposer's report."""
    (report,) = server.wait_proposer_idle()
    assert {k: v for k, v in report["state"].items() if v} == {}
    assert metric(server, "vllm:num_requests_running") == 0
    return report


def metric(server: OpenAIServer, name: str, **labels: str) -> float:
    text = requests.get(f"{server.base}/metrics", timeout=10).text
    total = 0.0
    for line in text.splitlines():
        match = re.match(rf"^{re.escape(name)}{{([^}}]*)}} ([0-9.e+-]+)$", line)
        if match and all(f'{k}="{v}"' in match.group(1) for k, v in labels.items()):
            total += float(match.group(2))
    return total


def long_text(n_chars: int) -> str:
    return "".join(r.prompt for r in make_load(40, seed=5))[:n_chars]


def test_prompts_longer_than_the_drafter_window_are_clipped(servers):
    dlm, base = servers
    before = dlm.proposer_reports()[0]
    for chars in (300, 450, 600):
        prompt = long_text(chars)
        assert len(tokens(dlm, prompt)) > DRAFTER_WINDOW
        assert_same_greedy(dlm, base, prompt)
    after = assert_idle(dlm)
    assert after["failed_draft_steps"] == before["failed_draft_steps"]
    assert after["controller"]["steps"] > before["controller"]["steps"]  # it did draft
    assert after["controller"]["accepted_tokens"] > before["controller"]["accepted_tokens"]


@pytest.mark.parametrize("room", [1, 2, 5, K - 1, K + 3])
def test_request_reaching_max_model_len_during_a_draft(servers, room):
    dlm, base = servers
    prompt = tokens(dlm, long_text(2000))[: MAX_MODEL_LEN - room]
    # No max_tokens: vLLM fills the context; ignore_eos makes it run to the very end.
    got = assert_same_greedy(dlm, base, prompt, max_tokens=None, ignore_eos=True)
    assert len(got["token_ids"]) == room and got["finish_reason"] == "length"
    assert_idle(dlm)


def greedy_batch(server: OpenAIServer, prompts: list, max_tokens: int) -> list[dict]:
    """One /v1/completions request for all `prompts` (ignore_eos); their choices in order."""
    body = {"prompt": prompts, "temperature": 0, "return_token_ids": True, "ignore_eos": True}
    reply = server.complete(timeout=300, **body, max_tokens=max_tokens)
    assert reply.status_code == 200, reply.text
    choices = sorted(reply.json()["choices"], key=lambda choice: choice["index"])
    assert [choice["index"] for choice in choices] == list(range(len(prompts)))
    return choices


ADDED = "Added request "  # what vLLM's AsyncLLM logs once it has sent a request to its engine


def resume_when_queued(server: OpenAIServer, logged: int, count: int, timeout=60.0) -> int:
    """Wait until the server has logged `count` more added requests than `logged`, then resume
    its paused engine (whatever happened); the number of added requests seen."""
    deadline = time.monotonic() + timeout
    try:
        while (added := server.log().count(ADDED) - logged) < count:
            if time.monotonic() > deadline:
                break
            time.sleep(0.1)
        return added
    finally:
        requests.post(f"{server.base}/resume", timeout=30).raise_for_status()


PREEMPTION_PROMPT = 100  # tokens: under one KV block, and more than one with 48 tokens out


def test_preemption_under_a_small_kv_cache_keeps_greedy_output(servers):
    """16 greedy requests under the 8-block KV cache, certain to preempt, whatever the timing.

    The dlm engine is paused (vLLM's dev route /pause, mode "keep": requests queue, none is
    scheduled) while one request of 16 prompts is sent, and resumed only once the server has
    logged all 16 as sent to the engine core; the resume goes down the same ordered socket,
    so the engine's first step after it sees all 16 waiting. That step admits them in order,
    each with one block (100 prompt tokens and no lookahead slots for a custom_class proposer;
    K + 1 would fit too), until no block is free: the token budget (2048) holds all 16
    prompts, so blocks run out first and the rest wait. From then on no block is freed until a
    request ends or is preempted, and none can end without a second block (its 48 tokens need
    KV for 100 + 47 > 128 positions): the first request to need one finds none free, and vLLM
    preempts."""
    dlm, base = servers
    before = metric(dlm, "vllm:num_preemptions_total")
    context = tokens(dlm, long_text(2000))
    prompts = [context[i * 16 : i * 16 + PREEMPTION_PROMPT] for i in range(16)]
    assert {len(prompt) for prompt in prompts} == {PREEMPTION_PROMPT}
    logged = dlm.log().count(ADDED)
    pause = {"mode": "keep", "clear_cache": "false"}
    requests.post(f"{dlm.base}/pause", params=pause, timeout=30).raise_for_status()
    results, added = run_all(
        [
            (greedy_batch, (dlm, prompts, 48)),
            (resume_when_queued, (dlm, logged, len(prompts))),
        ]
    )
    assert results is not None, "the request of 16 prompts failed (its error is above)"
    assert added == len(prompts), "the requests did not all reach the paused engine"
    assert metric(dlm, "vllm:num_preemptions_total") > before, "the load did not preempt"
    for i, prompt in enumerate(prompts):
        expected = greedy(base, prompt, ignore_eos=True, max_tokens=48)
        assert results[i]["token_ids"] == expected["token_ids"], i
    assert_idle(dlm)


def read_then_drop(url: str, body: dict, events: int) -> int:
    """Read a few server-sent events of a streamed reply, then close the connection; the
    number of events read (-1 if the reply was not 200)."""
    seen = 0
    with requests.post(url, json=body, stream=True, timeout=60) as reply:
        if reply.status_code != 200:
            return -1
        for line in reply.iter_lines():
            if line.startswith(b"data: {"):
                seen += 1
            if seen >= events:
                break
    return seen


def give_up_waiting(url: str, body: dict) -> str:
    """A non-streamed request whose client stops waiting after 0.3 s."""
    try:
        requests.post(url, json=body, timeout=0.3)
    except requests.Timeout:
        return "gave up"
    return "answered"


def run_all(calls: list) -> list:
    """Run (function, args) pairs in threads at once; their results in order."""
    results: list = [None] * len(calls)

    def run(i: int) -> None:
        function, args = calls[i]
        results[i] = function(*args)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(calls))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return results


def test_clients_disconnecting_mid_stream(servers):
    dlm, base = servers
    generated = metric(dlm, "vllm:generation_tokens_total")
    url = f"{dlm.base}/v1/completions"
    calls = []
    for i in range(12):
        body = {
            "model": dlm.served_name,
            "prompt": long_text(40 + 30 * i),
            "max_tokens": 200,
            "ignore_eos": True,
            "stream": True,
            "temperature": 0 if i % 2 else 0.8,
        }
        calls.append((read_then_drop, (url, body, 1 + i % 4)))
    for i in range(4):
        body = {"model": dlm.served_name, "prompt": long_text(100 + i), "max_tokens": 200}
        calls.append((give_up_waiting, (url, {**body, "ignore_eos": True})))
    outcomes = run_all(calls)
    assert outcomes == [1 + i % 4 for i in range(12)] + ["gave up"] * 4
    assert_idle(dlm)
    # Run to the end, the 16 requests would have generated 3200 tokens: they were aborted.
    assert metric(dlm, "vllm:generation_tokens_total") - generated < 16 * 200 / 2
    assert_same_greedy(dlm, base, "def read_lines(path):\n    ")


def test_request_aborted_while_its_draft_is_in_flight(servers):
    dlm, base = servers
    before = dlm.proposer_reports()[0]
    # Every draft of a batch holding the slow request stalls 1 s, so the engine spends nearly
    # all its time inside draft passes and the disconnect lands during one.
    slow = tokens(dlm, "import os\n") + SLOW_TRIGGER + tokens(dlm, "\ndef main():\n    ")
    body = {"model": dlm.served_name, "prompt": slow, "max_tokens": 100, "stream": True}
    body["ignore_eos"] = True
    normal = "class Stack:\n    def push(self, item):\n        "
    read, beside = run_all(
        [(read_then_drop, (f"{dlm.base}/v1/completions", body, 2)), (greedy, (dlm, normal))]
    )
    assert read == 2
    assert beside["token_ids"] == greedy(base, normal)["token_ids"]
    after = assert_idle(dlm)
    assert after["failed_draft_steps"] == before["failed_draft_steps"]
    assert_same_greedy(dlm, base, normal)


def test_a_failing_drafter_degrades_to_no_draft_and_is_logged_once(servers):
    dlm, base = servers
    before = dlm.proposer_reports()[0]
    prompts = [
        tokens(dlm, "def area(radius):\n    ") + FAULT_TRIGGER + tokens(dlm, "\n    return "),
        FAULT_TRIGGER + tokens(dlm, "for item in items:\n    "),
    ]
    for prompt in prompts:
        assert_same_greedy(dlm, base, prompt, max_tokens=24)
        # ... and a request without the trigger right after is served, and drafted for.
        assert_same_greedy(dlm, base, "import sys\n\n\ndef ")
    # A faulty request batched with healthy ones: all of them are answered, all lossless.
    batch = [prompts[0], "x = [", "while True:\n    ", prompts[1]]
    results = run_all([(greedy, (dlm, prompt, None, 24)) for prompt in batch])
    for result, prompt in zip(results, batch):
        assert result["token_ids"] == greedy(base, prompt, max_tokens=24)["token_ids"]

    after = assert_idle(dlm)
    assert after["failed_draft_steps"] > before["failed_draft_steps"] + 2
    assert after["controller"]["steps"] > before["controller"]["steps"]
    time.sleep(0.5)  # let the server's log catch up
    log = dlm.log()
    assert log.count("dlm drafter failed") == 1, "the failure must be logged exactly once"
    assert log.count(FAULT_MESSAGE) == 1, "the log must name the cause, once"
    (line,) = [ln for ln in log.splitlines() if "dlm drafter failed" in ln]
    assert "ERROR" in line and "Worker" in line  # through vLLM's log format, not bare stderr
