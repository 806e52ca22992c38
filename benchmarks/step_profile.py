"""Where an engine step's time goes, with the dlm method on and off, per batch size.

Each configuration runs in an in-process engine of its own process; timers wrap the parts of a
step (the scheduler, the target's forward, sampling and vLLM's bookkeeping, our proposer, the
drafter's passes, the hand-off of target features, the lattice, the copy lookup), so the extra
time of a speculative step can be traced to one of them. A step is one `EngineCore.step`.

    python benchmarks/step_profile.py --target DIR --drafter DIR --name step-profile

Writes benchmarks/results/<name>.json: machine, versions, settings and, per configuration and
batch size, the mean seconds per step of each timed part and the tokens per second.
"""

from __future__ import annotations

import argparse
import functools
import json
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from run_bench import load_prompts, machine, versions  # noqa: E402

from dlmspec_harness.offline_run import engine_env  # noqa: E402

CONFIGS: dict[str, dict | None] = {
    "none": None,
    "ngram-k4": {
        "method": "ngram",
        "num_speculative_tokens": 4,
        "prompt_lookup_min": 2,
        "prompt_lookup_max": 4,
    },
    "dlm-never": {
        "method": "dlm",
        "num_speculative_tokens": 4,
        "controller": {"name": "fixed", "k": 0},
    },
    "dlm-k4": {"method": "dlm", "num_speculative_tokens": 4},
    "dlm-cost-aware-lookup": {
        "method": "dlm",
        "num_speculative_tokens": 16,
        "controller": "cost_aware",
        "context_lookup": True,
    },
}


class Timers:
    """Seconds and calls per named part, reset between batch sizes."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)

    def wrap(self, owner: Any, attribute: str, name: str) -> None:
        """Time every call of owner.attribute (an instance, class or module attribute)."""
        original = getattr(owner, attribute)

        @functools.wraps(original)
        def timed(*args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                self.seconds[name] += time.perf_counter() - started
                self.calls[name] += 1

        setattr(owner, attribute, timed)

    def per_step(self) -> dict[str, dict[str, float]]:
        steps = max(1, self.calls.get("engine_step", 0))
        return {
            name: {"ms_per_step": 1000 * seconds / steps, "calls": self.calls[name]}
            for name, seconds in sorted(self.seconds.items())
        }

    def reset(self) -> None:
        self.seconds.clear()
        self.calls.clear()


def instrument(llm: Any, timers: Timers) -> None:
    """Wrap the timed parts of this in-process engine."""
    import dlmspec_vllm.integration.model_runner as runner_patch
    import dlmspec_vllm.proposer as proposer_module
    from dlmspec_vllm.drafters.base import Drafts
    from dlmspec_vllm.lattice.chooser import PathChooser

    core = llm.llm_engine.engine_core.engine_core
    timers.wrap(core, "step_fn", "engine_step")
    timers.wrap(core.scheduler, "schedule", "scheduler_schedule")
    timers.wrap(core.scheduler, "update_from_output", "scheduler_update")
    runner = core.model_executor.driver_worker.worker.model_runner
    timers.wrap(runner, "execute_model", "runner_execute_model")
    timers.wrap(runner, "sample_tokens", "runner_sample_tokens")
    timers.wrap(runner, "_sample", "runner_sample")
    timers.wrap(runner, "_bookkeeping_sync", "runner_bookkeeping")
    timers.wrap(runner, "propose_draft_token_ids", "runner_propose_draft_token_ids")
    timers.wrap(runner_patch, "target_features_of_step", "features_gather")
    proposer = getattr(runner, "drafter", None)
    if isinstance(proposer, proposer_module.DlmProposer):
        timers.wrap(proposer, "propose", "dlm_propose")
        drafter = proposer.drafter
        timers.wrap(drafter, "draft", "drafter_draft")
        # The hand-over of target features: batched since the step-path rework, per request
        # before it (--reference-src runs the older code).
        for method in ("observe_step", "observe"):
            if hasattr(drafter, method):
                timers.wrap(drafter, method, "drafter_take_features")
                break
        timers.wrap(PathChooser, "choose", "lattice_choose")
        timers.wrap(Drafts, "confidences", "draft_confidences")
        timers.wrap(proposer_module, "context_continuations", "context_lookup")


def child(job_path: Path, out_path: Path) -> None:
    from vllm import LLM, SamplingParams

    job = json.loads(job_path.read_text())
    llm = LLM(
        model=job["target"],
        speculative_config=job["speculative_config"],
        enforce_eager=True,
        max_model_len=job["max_model_len"],
        dtype="float32",
        seed=0,
        enable_prefix_caching=False,
    )
    tokenizer = llm.get_tokenizer()
    prompts = [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True
        )
        for p in job["prompts"]
    ]
    params = SamplingParams(temperature=0.0, max_tokens=job["max_tokens"], ignore_eos=True)
    llm.generate(prompts[:2], SamplingParams(max_tokens=4), use_tqdm=False)
    timers = Timers()
    instrument(llm, timers)
    rows = []
    for size in job["batch_sizes"]:
        batch = (prompts * (size // len(prompts) + 1))[:size]
        timers.reset()
        started = time.perf_counter()
        outputs = llm.generate(batch, params, use_tqdm=False)
        seconds = time.perf_counter() - started
        generated = sum(len(o.outputs[0].token_ids) for o in outputs)
        rows.append(
            {
                "batch_size": size,
                "steps": timers.calls.get("engine_step", 0),
                "seconds": seconds,
                "tokens_per_second": generated / seconds,
                "parts": timers.per_step(),
            }
        )
    out_path.write_text(json.dumps(rows))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--target", type=Path)
    parser.add_argument("--drafter", type=Path)
    parser.add_argument("--name", default="step-profile")
    parser.add_argument("--configs", default=",".join(CONFIGS))
    parser.add_argument("--batch-sizes", default="1,4,16,64")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--max-model-len", type=int, default=512)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--results-dir", type=Path, default=HERE / "results")
    parser.add_argument("--child", nargs=2, type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(*args.child)
        return
    records = load_prompts(HERE / "prompts.json", ["code", "math", "chat"], 8)
    settings = {
        "target": str(args.target),
        "drafter": str(args.drafter),
        "batch_sizes": [int(b) for b in args.batch_sizes.split(",")],
        "max_tokens": args.max_tokens,
        "max_model_len": args.max_model_len,
        "omp_threads": args.threads,
        "prompts": "benchmarks/prompts.json (code, math, chat; repeated to fill a batch)",
        "sampling": "greedy, ignore_eos, chat template",
        "engine": "in-process, enforce_eager, float32, no prefix caching",
    }
    report: dict[str, Any] = {
        "name": args.name,
        "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        "machine": machine(),
        "versions": versions(),
        "settings": settings,
        "configs": {},
    }
    for name in args.configs.split(","):
        spec = CONFIGS[name]
        if spec is not None and spec["method"] == "dlm":
            spec = {**spec, "draft_model": str(args.drafter)}
        job = {
            "target": str(args.target),
            "speculative_config": spec,
            "prompts": [r["prompt"] for r in records],
            "batch_sizes": settings["batch_sizes"],
            "max_tokens": args.max_tokens,
            "max_model_len": args.max_model_len,
        }
        print(f"[{name}] ...", flush=True)
        with tempfile.TemporaryDirectory() as tmp:
            job_path, out_path = Path(tmp) / "job.json", Path(tmp) / "out.json"
            job_path.write_text(json.dumps(job))
            done = subprocess.run(
                [sys.executable, __file__, "--child", str(job_path), str(out_path)],
                env=engine_env(threads=args.threads),
                capture_output=True,
                text=True,
                check=False,
            )
            if done.returncode != 0:
                raise SystemExit(f"[{name}] failed:\n{done.stderr[-4000:]}")
            rows = json.loads(out_path.read_text())
        report["configs"][name] = {"speculative_config": spec, "by_batch_size": rows}
        for row in rows:
            parts = {k: round(v["ms_per_step"], 2) for k, v in row["parts"].items()}
            print(f"  batch {row['batch_size']}: {row['tokens_per_second']:.1f} tok/s {parts}")
    args.results_dir.mkdir(parents=True, exist_ok=True)
    path = args.results_dir / f"{args.name}.json"
    path.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
