"""`dlmspec demo`: the built-in small pair served by vLLM with and without the dlm method.

Prints each prompt's text, the mean accepted length vLLM measured, and tokens/s of the same
engine without speculation, both engines run in this one command on this machine.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from dlmspec_vllm.offline_run import Batch, EngineJob, SamplingSettings, run_in_subprocess
from dlmspec_vllm.tiny_pair import cached_tiny_pair

PROMPTS = [
    "def format_line(text, width):\n    ",
    "import os\nimport sys\n\n\nclass ",
    "    for index, item in enumerate(",
    "# Return the sum of the values\ndef total(",
]
DEFAULT_CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "dlmspec"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="dlmspec demo", description=__doc__)
    parser.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE)
    parser.add_argument("--num-speculative-tokens", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)

    print(f"Building (or reusing) the small pair under {args.cache_dir} ...", flush=True)
    pair = cached_tiny_pair(args.cache_dir)
    speculative_config = {
        "method": "dlm",
        "draft_model": str(pair.drafter_dir),
        "num_speculative_tokens": args.num_speculative_tokens,
    }
    sampling = SamplingSettings(max_tokens=args.max_tokens)
    # One prompt per generate call: batch 1, where speculative decoding matters most.
    batches = [Batch(prompts=[prompt], sampling=sampling) for prompt in PROMPTS]
    engine = {"enforce_eager": True, "max_model_len": 512, "dtype": "float32", "seed": 0}

    print(f"vLLM target {pair.target_dir}\n--speculative-config '{json.dumps(speculative_config)}'")
    results = {}
    for name, spec in (("no speculation", None), ("dlm", speculative_config)):
        print(f"running vLLM ({name}) ...", flush=True)
        job = EngineJob(
            model=str(pair.target_dir),
            speculative_config=spec,
            engine_kwargs=engine,
            batches=batches,
        )
        results[name] = run_in_subprocess(job, threads=args.threads)

    baseline, dlm = results["no speculation"], results["dlm"]
    for prompt, batch, reference in zip(PROMPTS, dlm.batches, baseline.batches):
        same = "identical to" if batch.token_ids == reference.token_ids else "DIFFERS FROM"
        print(f"\n--- prompt {prompt!r}\n{prompt}{batch.texts[0]}\n--- ({same} no speculation)")

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
