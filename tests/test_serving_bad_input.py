"""The OpenAI server with method `dlm` facing unusual and bad input (issue #7).

The dlm server here drafts vLLM's maximum, num_speculative_tokens = 128, every step, from at
most the last 100 context tokens (max_draft_context). Each
unusual request either works exactly as it does on a server without speculation (same status,
same greedy tokens, same log-probabilities) or is refused with a clear 4xx error, and a normal
request succeeds right after each one. Bad `--speculative-config` settings stop the server at
start-up with a message that names the setting (tests/test_serving_startup_refusals.py).
"""

from __future__ import annotations

import json

import pytest
import requests

from dlmspec_harness.serving import OpenAIServer, speculative_and_plain_servers

pytestmark = pytest.mark.vllm

MAX_MODEL_LEN = 512
K = 128
MAX_DRAFT_CONTEXT = 100
NORMAL = "def parse_args(argv):\n    "


@pytest.fixture(scope="module")
def servers(tiny_pair, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("serving_bad_input")
    spec = {
        "method": "dlm",
        "draft_model": str(tiny_pair.drafter_dir),
        "num_speculative_tokens": K,
        "max_draft_context": MAX_DRAFT_CONTEXT,
    }
    with speculative_and_plain_servers(
        tiny_pair.target_dir, tmp, spec, max_model_len=MAX_MODEL_LEN
    ) as pair:
        yield pair


def post(server: OpenAIServer, path: str, body: dict | str) -> requests.Response:
    body = {"model": server.served_name, **body} if isinstance(body, dict) else body
    kwargs = {"json": body} if isinstance(body, dict) else {"data": body}
    headers = {"Content-Type": "application/json"}
    return requests.post(f"{server.base}{path}", headers=headers, timeout=120, **kwargs)


def still_serving(dlm: OpenAIServer, base: OpenAIServer) -> None:
    body = {"prompt": NORMAL, "max_tokens": 24, "temperature": 0, "return_token_ids": True}
    got = post(dlm, "/v1/completions", body)
    assert got.status_code == 200, got.text
    expected = post(base, "/v1/completions", body).json()
    assert got.json()["choices"][0]["token_ids"] == expected["choices"][0]["token_ids"]


def same_answer(dlm: OpenAIServer, base: OpenAIServer, path: str, body: dict) -> dict | None:
    """Send to both servers; the same status, and for 200 the same choices (token ids, text,
    finish and stop reasons; log-probabilities to 1e-4). The dlm server's reply body, or None
    when both refused it with a 4xx error that says why."""
    got, expected = post(dlm, path, body), post(base, path, body)
    assert got.status_code == expected.status_code, (got.text, expected.text)
    if got.status_code != 200:
        assert 400 <= got.status_code < 500, got.text
        assert got.json()["error"]["message"], got.text
        return None
    got_body, expected_body = got.json(), expected.json()
    assert len(got_body["choices"]) == len(expected_body["choices"])
    for choice, reference in zip(got_body["choices"], expected_body["choices"]):
        for key in ("token_ids", "text", "message", "finish_reason", "stop_reason"):
            assert choice.get(key) == reference.get(key), key
        assert_close(choice.get("logprobs"), reference.get("logprobs"))
    return got_body


def assert_close(a, b, tol: float = 1e-4) -> None:
    """Nested JSON equal, numbers within tol."""
    if isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys()
        for key in a:
            assert_close(a[key], b[key], tol)
    elif isinstance(a, list):
        assert isinstance(b, list) and len(a) == len(b)
        for x, y in zip(a, b):
            assert_close(x, y, tol)
    elif isinstance(a, float) and isinstance(b, float):
        assert abs(a - b) <= tol, (a, b)
    else:
        assert a == b


def test_num_speculative_tokens_128_drafts_128_and_stays_lossless(servers):
    dlm, base = servers
    body = {"prompt": NORMAL, "max_tokens": 200, "ignore_eos": True, "temperature": 0}
    same_answer(dlm, base, "/v1/completions", {**body, "return_token_ids": True})
    (report,) = dlm.proposer_reports()
    assert max(max(step.values()) for step in report["recent_step_lengths"]) == K
    assert report["failed_draft_steps"] == 0


def test_prompts_longer_than_max_draft_context(servers):
    dlm, base = servers
    prompt = "".join(f"    value_{i} = compute(value_{i - 1}, {i})\n" for i in range(1, 20))
    body = {"prompt": prompt, "max_tokens": 32, "temperature": 0, "return_token_ids": True}
    reply = same_answer(dlm, base, "/v1/completions", body)
    assert reply is not None and reply["usage"]["prompt_tokens"] > 2 * MAX_DRAFT_CONTEXT
    (report,) = dlm.proposer_reports()
    assert report["failed_draft_steps"] == 0
    still_serving(dlm, base)


@pytest.mark.parametrize(
    "path, body",
    [
        ("/v1/completions", {"prompt": "", "max_tokens": 8, "temperature": 0}),
        ("/v1/completions", {"prompt": [], "max_tokens": 8, "temperature": 0}),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": ""}], "max_tokens": 8}),
        ("/v1/chat/completions", {"messages": [], "max_tokens": 8}),
    ],
    ids=["empty-text", "empty-token-list", "empty-chat-message", "no-chat-messages"],
)
def test_empty_prompt(servers, path, body):
    dlm, base = servers
    same_answer(dlm, base, path, {**body, "temperature": 0})
    still_serving(dlm, base)


@pytest.mark.parametrize("stream", [False, True])
def test_stop_strings(servers, stream):
    dlm, base = servers
    body = {"prompt": NORMAL, "max_tokens": 48, "temperature": 0, "ignore_eos": True}
    text = post(base, "/v1/completions", body).json()["choices"][0]["text"]
    # A stop string the greedy text first meets half-way, and one it never meets.
    at = next(i for i in range(12, len(text) - 3) if text.find(text[i : i + 3]) == i)
    body = {**body, "stop": [text[at : at + 3], "never in the text"]}
    if stream:
        texts = [_streamed_text(server, body) for server in servers]
        assert texts[0] == texts[1] == (text[:at], "stop")
    else:
        reply = same_answer(dlm, base, "/v1/completions", body)
        assert reply is not None and reply["choices"][0]["finish_reason"] == "stop"
        assert reply["choices"][0]["text"] == text[:at]
    still_serving(dlm, base)


def _streamed_text(server: OpenAIServer, body: dict) -> tuple[str, str | None]:
    reply = post(server, "/v1/completions", {**body, "stream": True})
    assert reply.status_code == 200
    text, finish = "", None
    for line in reply.iter_lines():
        if line.startswith(b"data: {"):
            for choice in json.loads(line[6:])["choices"]:
                text += choice["text"]
                finish = choice["finish_reason"] or finish
    return text, finish


def test_n_greater_than_one(servers):
    dlm, base = servers
    # Greedy: every one of the n choices is the target's greedy text.
    body = {"prompt": NORMAL, "n": 3, "max_tokens": 24, "temperature": 0}
    reply = same_answer(dlm, base, "/v1/completions", {**body, "return_token_ids": True})
    if reply is not None:
        assert len({tuple(c["token_ids"]) for c in reply["choices"]}) == 1
    # Sampled: n independent, well-formed choices.
    body = {"prompt": NORMAL, "n": 4, "max_tokens": 16, "temperature": 0.9, "seed": 7}
    reply = post(dlm, "/v1/completions", body)
    assert reply.status_code == 200, reply.text
    choices = reply.json()["choices"]
    assert sorted(c["index"] for c in choices) == [0, 1, 2, 3]
    assert reply.json()["usage"]["completion_tokens"] <= 4 * 16
    still_serving(dlm, base)


@pytest.mark.parametrize(
    "path, body",
    [
        ("/v1/completions", {"prompt": NORMAL, "logprobs": 3}),
        ("/v1/completions", {"prompt": NORMAL, "logprobs": 0, "echo": True}),
        ("/v1/completions", {"prompt": NORMAL, "logprobs": 2, "prompt_logprobs": 2}),
        (
            "/v1/chat/completions",
            {
                "messages": [{"role": "user", "content": NORMAL}],
                "logprobs": True,
                "top_logprobs": 4,
            },
        ),
    ],
    ids=["completion", "echo", "prompt-logprobs", "chat"],
)
def test_logprobs_match_the_target_alone(servers, path, body):
    dlm, base = servers
    reply = same_answer(dlm, base, path, {**body, "max_tokens": 24, "temperature": 0})
    assert reply is not None and reply["choices"][0]["logprobs"]
    still_serving(dlm, base)


@pytest.mark.parametrize(
    "body",
    [
        '{"model": "tiny", "prompt": "x", ',  # malformed JSON
        {"prompt": NORMAL, "max_tokens": -1},
        {"prompt": NORMAL, "temperature": -0.5},
        {"prompt": NORMAL, "max_tokens": MAX_MODEL_LEN + 1},
        {"prompt": "word " * MAX_MODEL_LEN, "max_tokens": 8},  # longer than the context
        {"prompt": NORMAL, "max_tokens": 8, "logprobs": 10_000},
        {"prompt": [10_000_000], "max_tokens": 8},  # a token id outside the vocabulary
        {"prompt": NORMAL, "max_tokens": 8, "no_such_field": 1, "n": 1},
        {"prompt": NORMAL, "max_tokens": 8, "seed": "seven"},
    ],
    ids=[
        "malformed-json",
        "negative-max-tokens",
        "negative-temperature",
        "max-tokens-past-context",
        "prompt-past-context",
        "too-many-logprobs",
        "token-outside-vocabulary",
        "unknown-field",
        "wrong-type",
    ],
)
def test_bad_requests_are_refused_or_served_and_the_server_goes_on(servers, body):
    dlm, base = servers
    got, expected = post(dlm, "/v1/completions", body), post(base, "/v1/completions", body)
    assert got.status_code == expected.status_code, (got.text, expected.text)
    assert got.status_code == 200 or 400 <= got.status_code < 500, got.text
    still_serving(dlm, base)
