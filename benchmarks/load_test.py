"""A bounded load test of vLLM's OpenAI server, with `dlm` and without speculation.

For each configuration in turn (never two servers at once, so they do not share the cores): start
`python -m vllm.entrypoints.openai.api_server` on 127.0.0.1, warm it up with the same kinds of
requests, take the engine processes' resident memory, send the load (a deterministic mix of
completions and chat, greedy and sampled, streaming and not, prompts of 2 to ~200 tokens, 4 to
64 output tokens) at each concurrency, wait until the dlm proposer holds no per-request state,
and take the memory again. Then compare every greedy response of the dlm server with the
no-speculation server's, token for token.

Writes benchmarks/results/<name>.json: requests, concurrency, p50/p90/p99 latency, tokens/s,
errors (must be 0), greedy mismatches (must be 0), RSS before/after per process, the proposer's
state after the load, machine, versions and settings. The tiny pair by default:

    python benchmarks/load_test.py                         # tiny pair, writes tiny-pair-load-test
    python benchmarks/load_test.py --target DIR --drafter DIR --name NAME --max-model-len 2048
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from run_bench import machine, versions

from dlmspec_harness.serving import (
    LoadRequest,
    OpenAIServer,
    greedy_mismatches,
    make_load,
    run_load,
    summarize,
)
from dlmspec_vllm.targets import DEFAULT_CACHE

HERE = Path(__file__).resolve().parent
MIB = 1 << 20
SPEC = {
    "num_speculative_tokens": 6,
    "controller": {"name": "adl", "k_min": 2, "k_max": 6, "delta": 2},
    "lattice": {"enabled": True, "lam": 0.8},
}
# See tests/test_serving_load.py: oneDNN's per-shape kernel cache grows RSS for hundreds of
# requests in any vLLM CPU server; it is off here so that before/after RSS says something.
SERVER_ENV = {"ONEDNN_PRIMITIVE_CACHE_CAPACITY": "0"}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", type=Path, help="target checkpoint (default: the tiny pair)")
    parser.add_argument("--drafter", type=Path, help="dlm drafter checkpoint")
    parser.add_argument("--name", default="tiny-pair-load-test")
    parser.add_argument("--requests", type=int, default=128, help="requests per concurrency")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[16, 64])
    parser.add_argument("--warmup", type=int, default=64)
    parser.add_argument("--max-model-len", type=int, default=512)
    parser.add_argument("--threads", type=int, default=1, help="OMP threads of each server")
    parser.add_argument(
        "--spec", type=json.loads, default=SPEC, help="dlm settings besides draft_model (JSON)"
    )
    parser.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE)
    parser.add_argument("--out-dir", type=Path, default=HERE / "results")
    return parser.parse_args(argv)


def serve_load(
    name: str,
    args: argparse.Namespace,
    spec: dict[str, Any] | None,
    phases: list[tuple[int, list[LoadRequest]]],
    log_dir: Path,
) -> dict[str, Any]:
    print(f"[{name}] starting the server ...", flush=True)
    with OpenAIServer(
        args.target,
        log_path=log_dir / f"{name}.log",
        speculative_config=spec,
        max_model_len=args.max_model_len,
        extra_env=SERVER_ENV,
        threads=args.threads,
    ) as server:
        startup = server.wait_ready()
        warm, wall = run_load(server.base, make_load(args.warmup, seed=1), concurrency=64)
        warm_errors = summarize(warm, wall)["errors"]
        _wait_idle(server, spec)
        rss_before = server.rss_bytes()
        results, runs = [], []
        for concurrency, load in phases:
            print(f"[{name}] {len(load)} requests, {concurrency} in flight ...", flush=True)
            got, wall = run_load(server.base, load, concurrency=concurrency)
            results += got
            runs.append({"concurrency": concurrency, **summarize(got, wall)})
        reports = _wait_idle(server, spec)
        rss_after = server.rss_bytes()
        total_wall = sum(r["wall_seconds"] for r in runs)
        return {
            "speculative_config": spec,
            "startup_seconds": round(startup, 1),
            "warmup_errors": warm_errors,
            "runs": runs,
            "all": summarize(results, total_wall),
            "rss_mib_before": _mib(rss_before),
            "rss_mib_after": _mib(rss_after),
            "proposer_after_load": [_short(r) for r in reports] if spec else None,
            "_results": results,
        }


def _wait_idle(server: OpenAIServer, spec: dict[str, Any] | None) -> list[dict | None]:
    if spec is None:
        time.sleep(1.0)  # the engine step that announces finished requests
        return []
    return server.wait_proposer_idle()


def _mib(rss: dict[str, int]) -> dict[str, float]:
    return {role: round(value / MIB, 1) for role, value in rss.items()}


def _short(report: dict[str, Any] | None) -> dict[str, Any] | None:
    if report is None:
        return None
    keep = ("controller", "failed_draft_steps", "state")
    return {key: report[key] for key in keep}


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.target is None or args.drafter is None:
        from dlmspec_harness.tiny_pair import cached_tiny_pair

        print(f"building (or reusing) the tiny pair under {args.cache_dir} ...", flush=True)
        pair = cached_tiny_pair(args.cache_dir)
        args.target = args.target or pair.target_dir
        args.drafter = args.drafter or pair.drafter_dir
    load = make_load(args.requests * len(args.concurrency), seed=0)
    phases = [
        (c, load[i * args.requests : (i + 1) * args.requests])
        for i, c in enumerate(args.concurrency)
    ]
    spec = {"method": "dlm", "draft_model": str(args.drafter), **args.spec}
    log_dir = Path(tempfile.mkdtemp(prefix=f"{args.name}-logs-"))
    print(f"server logs in {log_dir}", flush=True)
    report: dict[str, Any] = {
        "name": args.name,
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "machine": machine(),
        "versions": versions(),
        "settings": {
            "target": str(args.target),
            "drafter": str(args.drafter),
            "max_model_len": args.max_model_len,
            "server_flags": ["--enforce-eager", "--dtype", "float32", "--seed", "0"],
            "server_env": SERVER_ENV,
            "omp_threads_per_server": args.threads,
            "requests_per_concurrency": args.requests,
            "concurrency": args.concurrency,
            "warmup_requests": args.warmup,
            "load_mix": _mix(load),
        },
    }
    configs = {}
    for name, config_spec in (("none", None), ("dlm", spec)):
        configs[name] = serve_load(name, args, config_spec, phases, log_dir)
    base_results = configs["none"].pop("_results")
    dlm_results = configs["dlm"].pop("_results")
    mismatches = greedy_mismatches(load, dlm_results, base_results)
    report["configs"] = configs
    report["greedy_requests"] = sum(r.greedy for r in load)
    report["greedy_mismatches_vs_none"] = len(mismatches)
    report["errors"] = sum(c["all"]["errors"] + c["warmup_errors"] for c in configs.values())

    args.out_dir.mkdir(parents=True, exist_ok=True)
    out = args.out_dir / f"{args.name}.json"
    out.write_text(json.dumps(report, indent=1) + "\n")
    print(table(report))
    print(f"wrote {out}")
    if report["errors"] or mismatches:
        sys.exit(1)


def _mix(load: list[LoadRequest]) -> dict[str, int]:
    return {
        "requests": len(load),
        "greedy": sum(r.greedy for r in load),
        "sampled_with_seed": sum(r.seed is not None for r in load),
        "streaming": sum(r.stream for r in load),
        "chat": sum(r.endpoint == "chat" for r in load),
    }


def table(report: dict[str, Any]) -> str:
    lines = [
        f"{'config':6} {'in flight':>9} {'requests':>8} {'errors':>6} {'p50 s':>7} "
        f"{'p99 s':>7} {'tok/s':>8}"
    ]
    for name, config in report["configs"].items():
        for run in config["runs"]:
            lat = run["latency_seconds"]
            lines.append(
                f"{name:6} {run['concurrency']:>9} {run['requests']:>8} {run['errors']:>6} "
                f"{lat['p50']:>7.3f} {lat['p99']:>7.3f} {run['tokens_per_second']:>8.1f}"
            )
        lines.append(
            f"{name:6} RSS MiB before {config['rss_mib_before']} after {config['rss_mib_after']}"
        )
    lines.append(
        f"greedy mismatches vs none: {report['greedy_mismatches_vs_none']} of "
        f"{report['greedy_requests']}; errors: {report['errors']}"
    )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
