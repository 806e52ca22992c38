"""How far DFlash drafters' blocks match the target on the benchmark sets: a learning curve.

For each drafter, teacher-forced acceptance on the target's own greedy answers to the step-path
benchmark's prompt sets (MT-Bench first turns, HumanEval/0-81; never trained on) and to requests
to quote a document given in the prompt (``quote``, our own): from every
output position, the share of blocks whose first j drafted tokens are the target's next j
tokens, and the mean accepted length per step at draft lengths 4 and 8 (what vLLM would accept
there with the same features). Plotted against the drafter's training output tokens.

    python benchmarks/drafter_curve.py --target DIR --name NAME DRAFTER_DIR [DRAFTER_DIR ...]

The target's answers (128 tokens, greedy, by vLLM) and their features are kept in
``--eval-store`` and ``--quote-store`` and reused by later runs.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from public_sets import load_public_prompts, provenance  # noqa: E402
from quote_set import DESCRIPTION as QUOTE_DESCRIPTION  # noqa: E402
from quote_set import quote_prompts  # noqa: E402
from run_bench import machine, versions  # noqa: E402

from dlmspec_vllm.drafters.dflash import DFlashDrafter  # noqa: E402
from dlmspec_vllm.targets import (
    DEFAULT_CACHE,  # noqa: E402
    weights_sha256,  # noqa: E402
)
from dlmspec_vllm.training.answers import (  # noqa: E402
    AnswerStore,
    PromptPlan,
    answer_engine,
    generate_answers,
    shard_features,
)
from dlmspec_vllm.training.chat_sources import SourcePrompt  # noqa: E402
from dlmspec_vllm.training.dflash import FeatureSequence, teacher_forced_acceptance  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
MAX_NEW_TOKENS = 128


def evaluation_store(
    target: Path, directory: Path, prompts: list[SourcePrompt], what
) -> AnswerStore:
    """The target's greedy answers to ``prompts``, generated on first use."""
    store = AnswerStore(
        directory,
        target_sha256=weights_sha256(target),
        decoding={"greedy": True, "max_new_tokens": MAX_NEW_TOKENS, "prompts": what},
    )
    if store.keys() >= {p.key for p in prompts}:
        return store
    from transformers import AutoTokenizer

    llm = answer_engine(target, max_model_len=1024, batch_size=len(prompts), top_k=1)
    generate_answers(
        store,
        llm,
        AutoTokenizer.from_pretrained(target),
        PromptPlan(prompts, [], {}),
        max_prompts=len(prompts),
        max_new_tokens=MAX_NEW_TOKENS,
        top_k=1,
        shard_size=len(prompts),
        max_model_len=1024,
    )
    del llm
    return store


def drafter_report(
    drafter_dir: Path, target: Path, stores: list[AnswerStore], model, per_set: int | None
) -> dict:
    recipe_path = drafter_dir / "training_recipe.json"
    recipe = json.loads(recipe_path.read_text()) if recipe_path.is_file() else {}
    drafter = DFlashDrafter.from_pretrained(
        drafter_dir, target_vocab_size=model.config.vocab_size, target_dir=target
    )
    target_to_draft = None
    if drafter.draft_ids is not None:
        target_to_draft = torch.full((model.config.vocab_size,), -1, dtype=torch.long)
        target_to_draft[drafter.draft_ids] = torch.arange(len(drafter.draft_ids))
    by_set: dict[str, list[FeatureSequence]] = {}
    shards = [(store, *shard) for store in stores for shard in store.answers_by_shard()]
    for store, shard, answers in shards:
        features = shard_features(store, shard, answers, model, drafter.target_layer_ids)
        for answer, feature in zip(answers, features):
            sequence = FeatureSequence(answer.tokens.tolist(), answer.prompt_length, feature)
            chosen = by_set.setdefault(answer.key.split(":")[0], [])
            if per_set is None or len(chosen) < per_set:
                chosen.append(sequence)
    began = time.perf_counter()
    sets = {
        name: teacher_forced_acceptance(
            drafter.network,
            sequences,
            embed_weight=drafter.embed_weight,
            head_weight=drafter.head_weight,
            target_to_draft=target_to_draft,
        )
        for name, sequences in by_set.items()
    }
    store_recipe = recipe.get("data", {}).get("answer_store", {})
    generations = recipe.get("data", {}).get("target_generations", {})
    return {
        "drafter": str(drafter_dir),
        "training_output_tokens": store_recipe.get("training_output_tokens")
        or generations.get("generated_tokens"),
        "settings": recipe.get("settings"),
        "validation": recipe.get("validation"),
        "sets": sets,
        "seconds": round(time.perf_counter() - began, 1),
    }


def plot(report: dict, path: Path) -> None:
    """Left: mean accepted length (k=4) against training tokens, a line through the curve's
    drafters per set and a point per other drafter; right: acceptance per draft position."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (curve, positions) = plt.subplots(1, 2, figsize=(14, 5.5))
    rows = sorted(
        (r for r in report["drafters"] if r["on_curve"]),
        key=lambda r: r["training_output_tokens"] or 0,
    )
    others = [r for r in report["drafters"] if not r["on_curve"]]
    for name, color in (("mt_bench", "C0"), ("humaneval", "C1"), ("quote", "C2")):
        points = [(r["training_output_tokens"], r["sets"][name]) for r in rows if name in r["sets"]]
        curve.plot(
            [x for x, _ in points],
            [s["mean_accepted_length"]["4"] for _, s in points],
            "-o",
            color=color,
            label=name,
        )
        for marker, row in zip("s^vDP", others):
            if name in row["sets"]:
                curve.plot(
                    row["training_output_tokens"],
                    row["sets"][name]["mean_accepted_length"]["4"],
                    marker,
                    color=color,
                    fillstyle="none",
                    label=f"{name}: {Path(row['drafter']).name}",
                )
    curve.set_xscale("log")
    curve.set_xlabel("training output tokens (target answers)")
    curve.set_ylabel("mean accepted length per step, k=4 (teacher-forced)")
    curve.set_title("learning curve (lines) and other drafters (hollow)")
    curve.legend(fontsize=7)
    curve.grid(alpha=0.3)
    for row in rows + others:
        shares = row["sets"].get("mt_bench", {}).get("position_acceptance", [])
        positions.plot(range(1, len(shares) + 1), shares, "-o", label=Path(row["drafter"]).name)
    positions.set_xlabel("draft position j")
    positions.set_ylabel("share of blocks with the first j right (MT-Bench)")
    positions.legend(fontsize=7)
    positions.grid(alpha=0.3)
    figure.suptitle(f"{report['name']}: {report['target']}")
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", type=Path, required=True)
    parser.add_argument("--name", required=True)
    parser.add_argument("--eval-store", type=Path, default=DEFAULT_CACHE / "eval-answers")
    parser.add_argument("--quote-store", type=Path, default=DEFAULT_CACHE / "eval-quote-answers")
    parser.add_argument(
        "--prompts-per-set",
        type=int,
        help="the first N prompts of each set only (run_bench.py's choice of the same N)",
    )
    parser.add_argument("drafters", type=Path, nargs="+", help="the learning curve's drafters")
    parser.add_argument(
        "--also", type=Path, nargs="*", default=[], help="other drafters (ablations, baselines)"
    )
    args = parser.parse_args(argv)
    from transformers import AutoModelForCausalLM

    public = [SourcePrompt(r["set"], r["id"], r["prompt"]) for r in load_public_prompts()]
    stores = [
        evaluation_store(args.target, args.eval_store, public, provenance()),
        evaluation_store(args.target, args.quote_store, quote_prompts(), QUOTE_DESCRIPTION),
    ]
    model = AutoModelForCausalLM.from_pretrained(args.target, dtype=torch.float32).eval()
    report = {
        "name": args.name,
        "target": str(args.target),
        "what": __doc__.splitlines()[0],
        "prompts": provenance(),
        "quote_prompts": QUOTE_DESCRIPTION,
        "prompts_per_set": args.prompts_per_set,
        "answers": f"the target's greedy answers, at most {MAX_NEW_TOKENS} tokens, by vLLM",
        "drafters": [],
        "machine": machine(),
        "versions": versions(),
        "torch_threads": torch.get_num_threads(),
    }
    for drafter_dir in [*args.drafters, *args.also]:
        row = drafter_report(drafter_dir, args.target, stores, model, args.prompts_per_set)
        row["on_curve"] = drafter_dir in args.drafters
        report["drafters"].append(row)
        summary = {n: s["mean_accepted_length"] for n, s in row["sets"].items()}
        print(f"{drafter_dir}: {row['training_output_tokens']} tokens -> {summary}", flush=True)
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"{args.name}.json"
    out.write_text(json.dumps(report, indent=1) + "\n")
    plot(report, out.with_suffix(".png"))
    print(f"wrote {out} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
