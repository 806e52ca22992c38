"""`dlmspec train-drafter`: train a diffusion drafter for a target, from the target itself.

The drafter starts as a copy of the target's weights (optionally only its first ``--layers``
layers, so that it reads far fewer bytes per step than the target: what makes speculation pay
on a memory-bound CPU, DESIGN.md section 4), made a Dream model (bidirectional attention, shifted
logits), then trained with the masked-diffusion objective on text every machine has (the Python
standard library) and on the target's own greedy answers to prompts cut from that text.

The run is defined by its arguments and the Python/torch versions alone: fixed file list, seeded
prompt choice, greedy generations (cached in the output directory, so a resumed run does not
generate them again), seeded batches and masks, a fixed step count. Checkpoints hold every piece
of state, so ``--resume`` continues exactly where a stopped run left off.

Output: the drafter in the released Dream checkpoint layout (config.json + model.safetensors),
the target's tokenizer files, and training_recipe.json with every setting, version and the
data recipe. ``checkpoints/`` (optimizer state, for --resume) and ``data/`` (the generation
cache) can be deleted once training is finished.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import platform
import sys
import time
from importlib.metadata import version
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from dlmspec_vllm.drafters.dream import DreamModel, save_dream_model
from dlmspec_vllm.targets import copy_tokenizer_files
from dlmspec_vllm.training.conversion import dream_from_causal_lm
from dlmspec_vllm.training.corpus import (
    STDLIB_FILES,
    cached_generations,
    generate_greedy,
    generation_prompts,
    sha256_of_tensor,
    stdlib_documents,
    token_stream,
)
from dlmspec_vllm.training.resumable import WindowSampler, train_resumable
from dlmspec_vllm.training.trainers import deterministic_algorithms

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

KINDS = ("dream",)
LATER_KINDS = ("block", "dflash")
DATA_CHOICES = ("stdlib", "target-generations", "both")
# With --data both, the share of batch rows cut from the target's generations: they are few
# tokens next to the library's, and they are what the drafter is judged on.
GENERATION_WEIGHT = 0.5
RECIPE_FILE = "training_recipe.json"
# Arguments that do not change what is computed, so a resumed run may change them.
RUN_CONTROL = ("output", "resume", "stop_at", "save_every", "threads", "progress")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="dlmspec train-drafter",
        description="Train a diffusion-LM drafter for a target model, starting from its weights.",
    )
    parser.add_argument("--target", type=Path, required=True, help="target checkpoint directory")
    parser.add_argument("--output", type=Path, required=True, help="drafter output directory")
    parser.add_argument("--kind", default="dream", help=f"drafter kind: {', '.join(KINDS)}")
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument(
        "--seq-len", default="32:128", help="window length N, or LOW:HIGH drawn per batch"
    )
    parser.add_argument("--block-size", type=int, default=8, help="tokens masked at the end")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data", choices=DATA_CHOICES, default="both")
    parser.add_argument("--layers", type=int, help="keep the target's first N layers (default all)")
    parser.add_argument(
        "--mask-token", help="mask token (default: the tokenizer's, else its last special token)"
    )
    parser.add_argument(
        "--distill",
        action="store_true",
        help="learn the target's distributions (a target pass "
        "per step) instead of the data's tokens",
    )
    parser.add_argument("--gen-prompts", type=int, default=64, help="target generations to make")
    parser.add_argument("--gen-tokens", type=int, default=128, help="most tokens per generation")
    parser.add_argument("--gen-batch-size", type=int, default=8)
    parser.add_argument("--save-every", type=int, default=100, help="checkpoint interval (steps)")
    parser.add_argument("--resume", action="store_true", help="continue from the last checkpoint")
    parser.add_argument("--stop-at", type=int, help="stop after this step; continue with --resume")
    parser.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    parser.add_argument("--no-progress", dest="progress", action="store_false")
    args = parser.parse_args(argv)
    if args.kind not in KINDS:
        later = " (planned, not implemented yet)" if args.kind in LATER_KINDS else ""
        parser.error(f"--kind {args.kind!r}{later}: supported kinds are {', '.join(KINDS)}")
    low, _, high = args.seq_len.partition(":")
    args.seq_len = (int(low), int(high or low))
    if args.seq_len[0] <= args.block_size:
        parser.error(f"--seq-len must exceed --block-size ({args.block_size}): rows need a prefix")
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    started = time.perf_counter()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.target)
    target = AutoModelForCausalLM.from_pretrained(args.target, dtype=torch.float32)
    target = target.to(device).eval()
    fingerprint = _weights_sha256(args.target)
    mask_token, mask_id = _mask_token(tokenizer, args.mask_token)
    settings = {
        k: (str(v) if isinstance(v, Path) else v)
        for k, v in vars(args).items()
        if k not in RUN_CONTROL
    }
    settings |= {"target_weights_sha256": fingerprint, "mask_token": mask_token}

    streams, data_recipe = _training_streams(args, tokenizer, target, fingerprint)
    drafter = _drafter_from_target(target, args.layers, mask_id).to(device)
    total_layers = target.config.num_hidden_layers
    if not args.distill:
        del target  # the teacher is only needed for distillation; free its memory
    print(
        f"drafter: Dream from {args.target} ({drafter.config.num_hidden_layers} of {total_layers} "
        f"layers, {sum(p.numel() for p in drafter.parameters()) / 1e6:.1f}M parameters), "
        f"mask token {mask_token!r} (id {mask_id}), device {device}",
        flush=True,
    )

    weights = {"stdlib": [1.0], "target-generations": [1.0]}.get(
        args.data, [1.0 - GENERATION_WEIGHT, GENERATION_WEIGHT]
    )
    sampler = WindowSampler(
        streams, weights, batch_size=args.batch_size, seq_len=args.seq_len, seed=args.seed
    )
    teacher = (lambda rows: target(input_ids=rows).logits) if args.distill else None
    train_started = time.perf_counter()
    with deterministic_algorithms():
        result = train_resumable(
            drafter,
            sampler,
            steps=args.steps,
            lr=args.lr,
            seed=args.seed + 1,
            block_size=args.block_size,
            checkpoint_dir=args.output / "checkpoints",
            save_every=args.save_every,
            settings=settings,
            resume=args.resume,
            stop_at=args.stop_at,
            teacher=teacher,
            progress=args.progress,
        )
    train_seconds = time.perf_counter() - train_started
    if result.step < args.steps:
        print(f"stopped at step {result.step} of {args.steps}; continue with --resume")
        return

    save_dream_model(drafter, args.output)
    copy_tokenizer_files(args.target, args.output)
    steps_run = result.step - (result.resumed_from or 0)
    recipe = {
        "kind": args.kind,
        "settings": settings,
        "data": data_recipe,
        "objective": "masked diffusion on the last block_size tokens of each window, Dream's "
        "shifted logits, noise level t ~ U(0,1], mean cross-entropy over masked tokens"
        + (", labels = the target's distributions" if args.distill else ", labels = data"),
        "optimizer": "AdamW(0.9, 0.95), warmup 5% then cosine to 10% of lr, grad clip 1.0",
        "result": {
            "steps": result.step,
            "resumed_from_step": result.resumed_from,
            "loss_first": result.losses[0],
            "loss_last_10pct_mean": _tail_mean(result.losses),
            "losses": result.losses,
            "train_seconds_this_run": train_seconds,
            "seconds_per_step_this_run": train_seconds / max(1, steps_run),
            "total_seconds_this_run": time.perf_counter() - started,
        },
        "versions": _versions(),
        "device": str(device),
        "torch_threads": torch.get_num_threads(),
    }
    (args.output / RECIPE_FILE).write_text(json.dumps(recipe, indent=1) + "\n")
    print(
        f"wrote the drafter to {args.output} (loss {result.losses[0]:.3f} -> "
        f"{_tail_mean(result.losses):.3f}, {train_seconds / max(1, steps_run):.2f} s/step)"
    )


def _training_streams(
    args: argparse.Namespace,
    tokenizer: PreTrainedTokenizerBase,
    target: PreTrainedModel,
    fingerprint: str,
) -> tuple[list[torch.Tensor], dict[str, Any]]:
    """The token streams the windows are cut from, and how they were made."""
    documents = stdlib_documents()
    eos = tokenizer.eos_token_id
    recipe: dict[str, Any] = {"choice": args.data, "separator_token_id": eos}
    streams = []
    if args.data in ("stdlib", "both"):
        ids = [
            tokenizer(t, add_special_tokens=False, verbose=False)["input_ids"] for t in documents
        ]
        stdlib = token_stream(ids, eos)
        streams.append(stdlib)
        recipe["stdlib"] = {
            "files": list(STDLIB_FILES),
            "python": platform.python_version(),
            "tokens": stdlib.numel(),
            "sha256": sha256_of_tensor(stdlib),
        }
    if args.data in ("target-generations", "both"):
        prompts = generation_prompts(documents, args.gen_prompts, args.seed)
        key = {
            "target_weights_sha256": fingerprint,
            "prompts_sha256": hashlib.sha256(json.dumps(prompts).encode()).hexdigest(),
            "max_new_tokens": args.gen_tokens,
        }
        cache = args.output / "data" / "target_generations.jsonl"
        records, reused = cached_generations(
            cache,
            key,
            lambda: generate_greedy(
                target,
                tokenizer,
                prompts,
                max_new_tokens=args.gen_tokens,
                batch_size=args.gen_batch_size,
                progress=args.progress,
            ),
        )
        print(f"target generations: {'reused' if reused else 'wrote'} {cache}", flush=True)
        generations = token_stream([r["prompt_ids"] + r["output_ids"] for r in records], eos)
        streams.append(generations)
        recipe["target_generations"] = {
            "prompts": len(prompts),
            "prompt_seed": args.seed,
            "prompt_source": "documented public functions of the stdlib files, alternately "
            "'write this function' and 'explain this code', in the target's chat template",
            "decoding": f"greedy, at most {args.gen_tokens} new tokens, transformers generate",
            "generated_tokens": sum(len(r["output_ids"]) for r in records),
            "tokens": generations.numel(),
            "sha256": sha256_of_tensor(generations),
            "weight": GENERATION_WEIGHT if args.data == "both" else 1.0,
            "cache": str(cache),
        }
    return streams, recipe


def _drafter_from_target(target: PreTrainedModel, layers: int | None, mask_id: int) -> DreamModel:
    """A Dream copy of the target, cut to its first ``layers`` layers."""
    config = target.config.to_dict()
    total = config["num_hidden_layers"]
    layers = total if layers is None else layers
    if not 1 <= layers <= total:
        raise SystemExit(f"--layers must be in 1..{total} for this {total}-layer target")
    dropped = tuple(f"model.layers.{i}." for i in range(layers, total))
    state = {k: v for k, v in target.state_dict().items() if not k.startswith(dropped)}
    return dream_from_causal_lm(
        {**config, "num_hidden_layers": layers}, state, mask_token_id=mask_id
    )


def _mask_token(tokenizer: PreTrainedTokenizerBase, requested: str | None) -> tuple[str, int]:
    """The mask token: asked for, the tokenizer's own, or its highest-id special token that is
    none of bos/eos/pad/unk (a reserved token the target does not emit in chat)."""
    if requested is None and tokenizer.mask_token is not None:
        requested = tokenizer.mask_token
    if requested is None:
        reserved = {
            tokenizer.bos_token,
            tokenizer.eos_token,
            tokenizer.pad_token,
            tokenizer.unk_token,
        }
        specials = [
            (token_id, token.content)
            for token_id, token in tokenizer.added_tokens_decoder.items()
            if token.special and token.content not in reserved
        ]
        if not specials:
            raise SystemExit("the tokenizer has no spare special token: pass --mask-token")
        requested = max(specials)[1]
    ids = tokenizer.convert_tokens_to_ids([requested])
    if ids[0] is None or ids[0] == tokenizer.unk_token_id:
        raise SystemExit(f"--mask-token {requested!r} is not a token of the target's tokenizer")
    return requested, ids[0]


def _weights_sha256(directory: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(directory.glob("*.safetensors")):
        with path.open("rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


def _tail_mean(losses: list[float]) -> float:
    tail = losses[-max(1, len(losses) // 10) :]
    return sum(tail) / len(tail)


def _versions() -> dict[str, str]:
    found = {"python": sys.version.split()[0]}
    for package in ("torch", "transformers", "tokenizers", "dlmspec-vllm"):
        found[package] = version(package)
    return found


if __name__ == "__main__":
    main()
