"""`dlmspec train-drafter`: train a diffusion drafter for a target, from the target itself.

Two kinds. ``--kind dream``: the drafter starts as a copy of the target's weights (optionally
only its first ``--layers`` layers, so that it reads far fewer bytes per step than the target:
what makes speculation pay on a memory-bound CPU, docs/design.md, Facts), made a Dream model
(bidirectional attention, shifted logits), then trained with the masked-diffusion objective on
text every machine has (the Python standard library) and on the target's own greedy answers to
prompts cut from that text and from arithmetic and everyday-request templates.

The run is defined by its arguments and the Python/torch versions alone: fixed file list, seeded
prompt choice, greedy generations (cached in the output directory, so a resumed run does not
generate them again), seeded batches and masks, a fixed step count. Checkpoints hold every piece
of state, so ``--resume`` continues exactly where a stopped run left off.

``--kind dflash``: a DFlash block drafter of ``--layers`` layers that reads the target's hidden
states (training/dflash.py has the recipe): trained on the target's own greedy answers only,
since it needs the target's features at every position. The answers come either from an answer
store (``--answers``, written by ``dlmspec generate-answers``: real chat and code prompts,
kept as token ids with the target's top-k distributions, features cached in the store per
shard; ``--answer-tokens`` takes a prefix of it, ``--soft-labels`` distils the top-k) or are
generated here from templates (``--gen-*``, features cached in ``data/``). ``--draft-vocab N``
restricts drafting to the N tokens most frequent in those answers (the head then reads N rows
instead of the whole vocabulary).

Output: the drafter in its released checkpoint layout (config.json + model.safetensors),
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
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch

from dlmspec_vllm.drafters.checkpoint import save_network
from dlmspec_vllm.drafters.dflash import default_target_layer_ids, save_dflash_network
from dlmspec_vllm.drafters.dream import DreamModel
from dlmspec_vllm.targets import copy_tokenizer_files, weights_sha256
from dlmspec_vllm.training.answers import (
    VALIDATION_EVERY,
    AnswerStore,
    is_validation,
    shard_features,
)
from dlmspec_vllm.training.conversion import dream_from_causal_lm
from dlmspec_vllm.training.corpus import (
    STDLIB_FILES,
    TargetGeneration,
    cached_generations,
    chat_prompts,
    generate_greedy,
    generate_greedy_vllm,
    generation_prompts,
    math_prompts,
    sha256_of_tensor,
    stdlib_documents,
    token_stream,
    vllm_generation_engine,
)
from dlmspec_vllm.training.dflash import (
    AnchorSampler,
    FeatureSequence,
    dflash_from_target,
    dflash_loss,
    draft_vocabulary,
    target_features,
    teacher_forced_acceptance,
)
from dlmspec_vllm.training.resumable import WindowSampler, train_resumable
from dlmspec_vllm.training.trainers import deterministic_algorithms, masked_diffusion_loss

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

KINDS = ("dream", "dflash")
DATA_CHOICES = ("stdlib", "target-generations", "both")
# With --data both, the share of batch rows cut from the target's generations: they are few
# tokens next to the library's, and they are what the drafter is judged on.
GENERATION_WEIGHT = 0.5
RECIPE_FILE = "training_recipe.json"
# Shares of the generation prompts: library code (write / explain a function), arithmetic
# and everyday chat, the three kinds of request the benchmark measures.
PROMPT_SHARES = {"code": 0.5, "math": 0.25, "chat": 0.25}
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
    parser.add_argument(
        "--block-size", type=int, help="dream: tokens masked at the end (8); dflash: block (16)"
    )
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--data", choices=DATA_CHOICES, help="dream: both (default); dflash: target-generations"
    )
    parser.add_argument(
        "--layers",
        type=int,
        help="dream: keep the target's first N layers (default all); "
        "dflash: drafter layers (default 1)",
    )
    parser.add_argument(
        "--target-layer-ids",
        help="dflash: comma-separated target layers to read (default: "
        "DFlash's spread, capped at the last layer vLLM can expose)",
    )
    parser.add_argument(
        "--draft-vocab",
        type=int,
        default=0,
        help="dflash: draft only the N most frequent answer tokens (0 = the whole vocabulary)",
    )
    parser.add_argument("--anchors", type=int, default=12, help="dflash: blocks per answer")
    parser.add_argument("--gamma", type=float, default=7.0, help="dflash: loss decay over block")
    parser.add_argument(
        "--mask-token", help="mask token (default: the tokenizer's, else its last special token)"
    )
    parser.add_argument(
        "--distill",
        action="store_true",
        help="learn the target's distributions (a target pass "
        "per step) instead of the data's tokens",
    )
    parser.add_argument(
        "--answers",
        type=Path,
        help="dflash: train on this answer store (`dlmspec generate-answers`) instead of "
        "generating answers here",
    )
    parser.add_argument(
        "--answer-tokens",
        type=int,
        help="dflash with --answers: train on the store's first answers holding this many "
        "output tokens (default: all); validation answers are never trained on",
    )
    parser.add_argument(
        "--soft-labels",
        type=float,
        default=0.0,
        help="dflash with --answers: share of the loss that is cross-entropy to the target's "
        "stored top-k distribution (0 = its greedy tokens only)",
    )
    parser.add_argument("--gen-prompts", type=int, default=64, help="target generations to make")
    parser.add_argument("--gen-tokens", type=int, default=128, help="most tokens per generation")
    parser.add_argument("--gen-batch-size", type=int, default=8)
    parser.add_argument(
        "--generator",
        choices=("transformers", "vllm"),
        default="transformers",
        help="what generates the target's answers: transformers (any device) or vLLM itself "
        "(much faster on a CPU; needs vLLM installed)",
    )
    parser.add_argument("--save-every", type=int, default=100, help="checkpoint interval (steps)")
    parser.add_argument("--resume", action="store_true", help="continue from the last checkpoint")
    parser.add_argument("--stop-at", type=int, help="stop after this step; continue with --resume")
    parser.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    parser.add_argument("--no-progress", dest="progress", action="store_false")
    args = parser.parse_args(argv)
    if args.kind not in KINDS:
        parser.error(f"--kind {args.kind!r}: supported kinds are {', '.join(KINDS)}")
    if args.block_size is None:
        args.block_size = 16 if args.kind == "dflash" else 8
    low, _, high = args.seq_len.partition(":")
    args.seq_len = (int(low), int(high or low))
    if args.data is None:
        args.data = "target-generations" if args.kind == "dflash" else "both"
    if args.kind == "dflash" and args.data != "target-generations":
        parser.error(
            "--kind dflash trains on the target's own answers only (they come with its "
            "hidden states): use --data target-generations"
        )
    if args.kind != "dflash" and (args.answers or args.answer_tokens or args.soft_labels):
        parser.error("--answers, --answer-tokens and --soft-labels are for --kind dflash")
    if args.answers is None and (args.answer_tokens or args.soft_labels):
        parser.error("--answer-tokens and --soft-labels need --answers (an answer store)")
    if not 0.0 <= args.soft_labels <= 1.0:
        parser.error(f"--soft-labels {args.soft_labels}: must be in 0..1")
    if args.answer_tokens is not None and args.answer_tokens < 1:
        parser.error("--answer-tokens must be at least 1")
    if args.seq_len[0] <= args.block_size and args.kind == "dream":
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
    # transformers wraps PreTrainedModel.to in functools.wraps, whose typeshed type binds no
    # `self`: mypy takes `device` for it.
    target = target.to(device).eval()  # type: ignore[arg-type]
    fingerprint = weights_sha256(args.target)
    mask_token, mask_id = _mask_token(tokenizer, args.mask_token)
    settings = {
        k: (str(v) if isinstance(v, Path) else v)
        for k, v in vars(args).items()
        if k not in RUN_CONTROL
    }
    settings |= {"target_weights_sha256": fingerprint, "mask_token": mask_token}
    build = _build_dflash if args.kind == "dflash" else _build_dream
    run = build(args, tokenizer, target, fingerprint, mask_id, device)
    print(run.description, flush=True)

    train_started = time.perf_counter()
    with deterministic_algorithms():
        result = train_resumable(
            run.model,
            run.sampler,
            run.loss_of,
            steps=args.steps,
            lr=args.lr,
            seed=args.seed + 1,
            checkpoint_dir=args.output / "checkpoints",
            save_every=args.save_every,
            settings=_checkpoint_identity(settings, run.data_recipe),
            resume=args.resume,
            stop_at=args.stop_at,
            progress=args.progress,
        )
    train_seconds = time.perf_counter() - train_started
    if result.step < args.steps:
        print(f"stopped at step {result.step} of {args.steps}; continue with --resume")
        return

    run.save(args.output)
    copy_tokenizer_files(args.target, args.output)
    validation = run.validate()
    steps_run = result.step - (result.resumed_from or 0)
    recipe = {
        "kind": args.kind,
        "settings": settings,
        "data": run.data_recipe,
        "objective": run.objective,
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
        "validation": validation,
        "versions": _versions(),
        "device": str(device),
        "torch_threads": torch.get_num_threads(),
    }
    (args.output / RECIPE_FILE).write_text(json.dumps(recipe, indent=1) + "\n")
    print(
        f"wrote the drafter to {args.output} (loss {result.losses[0]:.3f} -> "
        f"{_tail_mean(result.losses):.3f}, {train_seconds / max(1, steps_run):.2f} s/step)"
    )


# Where the target and the answer store lie is not what the run computes: a run resumed on
# another machine compares the target's weights and the answers read instead.
MACHINE_PATHS = ("target", "answers")


def _checkpoint_identity(settings: dict[str, Any], data_recipe: dict[str, Any]) -> dict[str, Any]:
    identity = {k: v for k, v in settings.items() if k not in MACHINE_PATHS}
    store = data_recipe.get("answer_store")
    if store is not None:
        identity["answer_store"] = {
            k: store[k] for k in ("header", "shards_read", "training_answers", "training_tokens")
        }
    return identity


@dataclass
class _Run:
    """What one drafter kind brings to the shared training loop."""

    model: torch.nn.Module
    sampler: Any
    loss_of: Callable[[Any, torch.Generator], Any]
    save: Callable[[Path], None]
    data_recipe: dict[str, Any]
    objective: str
    description: str
    validate: Callable[[], dict[str, Any] | None] = lambda: None


def _build_dream(args, tokenizer, target, fingerprint, mask_id, device) -> _Run:
    streams, data_recipe = _training_streams(args, tokenizer, target, fingerprint)
    drafter = _drafter_from_target(target, args.layers, mask_id).to(device)
    total_layers = target.config.num_hidden_layers
    weights = {"stdlib": [1.0], "target-generations": [1.0]}.get(
        args.data, [1.0 - GENERATION_WEIGHT, GENERATION_WEIGHT]
    )
    sampler = WindowSampler(
        streams, weights, batch_size=args.batch_size, seq_len=args.seq_len, seed=args.seed
    )
    block_size = args.block_size

    def loss_of(batch: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        batch = batch.to(device)
        teacher_logits = None
        if args.distill:
            with torch.no_grad():
                logits = target(input_ids=batch).logits
            prefix = batch.shape[1] - block_size
            teacher_logits = logits[:, prefix - 1 : -1, : drafter.config.vocab_size]
        return masked_diffusion_loss(
            drafter,
            batch,
            block_size=block_size,
            mask_token_id=mask_id,
            generator=generator,
            teacher_logits=teacher_logits,
        )

    return _Run(
        model=drafter,
        sampler=sampler,
        loss_of=loss_of,
        save=lambda output: save_network(drafter, output),
        data_recipe=data_recipe,
        objective="masked diffusion on the last block_size tokens of each window, Dream's "
        "shifted logits, noise level t ~ U(0,1], mean cross-entropy over masked tokens"
        + (", labels = the target's distributions" if args.distill else ", labels = data"),
        description=f"drafter: Dream from {args.target} ({drafter.config.num_hidden_layers} of "
        f"{total_layers} layers, {_millions(drafter)}M parameters), mask id {mask_id}, "
        f"device {device}",
    )


def _build_dflash(args, tokenizer, target, fingerprint, mask_id, device) -> _Run:
    total_layers = target.config.num_hidden_layers
    layers = args.layers or 1
    # The last id is the last layer's output after the final norm: what vLLM feeds the LM
    # head, and what Hugging Face reports as the last hidden state.
    deepest = total_layers - 1
    if args.target_layer_ids:
        layer_ids = tuple(int(i) for i in args.target_layer_ids.split(","))
    else:
        spread = default_target_layer_ids(total_layers, max(2, min(4, total_layers - 1)))
        layer_ids = tuple(sorted({max(0, min(i, deepest - 1)) for i in spread}))
    if not all(0 <= i <= deepest for i in layer_ids):
        raise SystemExit(
            f"--target-layer-ids {list(layer_ids)}: each must be in 0..{deepest} for this "
            f"{total_layers}-layer target ({deepest}: the last layer after the final norm)"
        )
    if not 1 <= layers <= total_layers:
        raise SystemExit(f"--layers must be in 1..{total_layers} for this target")
    validation: list[FeatureSequence] = []
    if args.answers is not None:
        sequences, validation, data_recipe = _store_sequences(args, target, fingerprint, layer_ids)
    else:
        sequences, data_recipe = _generated_sequences(
            args, tokenizer, target, fingerprint, layer_ids
        )
    network = dflash_from_target(
        target,
        layers=layers,
        block_size=args.block_size,
        mask_token_id=mask_id,
        target_layer_ids=layer_ids,
    ).to(device)
    embed = target.get_input_embeddings().weight.detach()
    head = target.get_output_embeddings().weight.detach()
    draft_ids = None
    target_to_draft = None
    if args.draft_vocab:
        draft_ids = draft_vocabulary(sequences, args.draft_vocab).to(device)
        target_to_draft = torch.full((head.shape[0],), -1, dtype=torch.long, device=device)
        target_to_draft[draft_ids] = torch.arange(len(draft_ids), device=device)
        head = head[draft_ids].contiguous()
    sampler = AnchorSampler(
        sequences, batch_size=args.batch_size, anchors=args.anchors, seed=args.seed
    )

    def loss_of(batch, generator: torch.Generator):
        rows_, anchors = batch
        out = dflash_loss(
            network,
            rows_,
            anchors,
            embed_weight=embed,
            head_weight=head,
            target_to_draft=target_to_draft,
            gamma=args.gamma,
            soft_weight=args.soft_labels,
        )
        return out.loss, {"first": out.first_accuracy, "run": out.mean_run}

    def validate() -> dict[str, Any] | None:
        if not validation:
            return None
        network.eval()
        report = teacher_forced_acceptance(
            network,
            validation,
            embed_weight=embed,
            head_weight=head,
            target_to_draft=target_to_draft,
        )
        network.train()
        return report

    def save(output: Path) -> None:
        if draft_ids is None:
            save_dflash_network(network, output)
            return
        offsets = draft_ids.cpu() - torch.arange(len(draft_ids))
        save_dflash_network(network, output, draft_to_target=offsets, draft_head=head)

    data_recipe["draft_vocabulary"] = (
        {"size": args.draft_vocab, "chosen": "most frequent tokens of the answers' outputs"}
        if args.draft_vocab
        else None
    )
    return _Run(
        model=network,
        sampler=sampler,
        loss_of=loss_of,
        save=save,
        validate=validate,
        data_recipe=data_recipe,
        objective=f"DFlash block cross-entropy: {args.anchors} random anchors per answer's "
        f"output, block [anchor, MASK x {args.block_size - 1}] causal to the context features "
        f"(target layers {list(layer_ids)}) and bidirectional inside, position j weighted "
        f"exp(-(j-1)/{args.gamma})"
        + (
            f"; labels {1 - args.soft_labels:g} x the target's greedy token + "
            f"{args.soft_labels:g} x its top-k distribution"
            if args.soft_labels
            else ""
        ),
        description=f"drafter: DFlash for {args.target} ({layers} layers, {_millions(network)}M "
        f"parameters, reads target layers {list(layer_ids)}), mask id {mask_id}, "
        f"draft vocabulary {args.draft_vocab or 'full'}, device {device}",
    )


def _generated_sequences(args, tokenizer, target, fingerprint, layer_ids):
    """Answers generated for this run (cached in its data/), with their features."""
    _, data_recipe, records = _generations(args, tokenizer, target, fingerprint)
    rows = [r["prompt_ids"] + r["output_ids"] for r in records]
    features_file = args.output / "data" / "target_features.pt"
    features_key = {
        "generations_sha256": data_recipe["target_generations"]["sha256"],
        "layer_ids": list(layer_ids),
    }
    cached = torch.load(features_file, weights_only=False) if features_file.is_file() else None
    if cached is not None and cached["key"] == features_key:
        features = cached["features"]
        print(f"target features: reused {features_file}", flush=True)
    else:
        features = target_features(target, rows, layer_ids)
        features_file.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"key": features_key, "features": features}, features_file)
        print(f"target features: wrote {features_file}", flush=True)
    sequences = [
        FeatureSequence(row, len(r["prompt_ids"]), f) for row, r, f in zip(rows, records, features)
    ]
    return sequences, data_recipe


def _store_sequences(args, target, fingerprint, layer_ids):
    """(training, validation) answers of the store ``--answers`` with their features, and how
    they were made. Features are cached in the store per shard and layer set."""
    store = AnswerStore.open(args.answers)
    if store.header["target_weights_sha256"] != fingerprint:
        raise SystemExit(
            f"--answers {args.answers} holds answers of another target (weights sha256 "
            f"{store.header['target_weights_sha256']}, not {fingerprint} of --target): "
            "generate answers for this target with `dlmspec generate-answers`"
        )
    by_shard = store.answers_by_shard()
    training, validation, outputs, used = [], [], 0, []
    for path, answers in by_shard:
        if args.answer_tokens is not None and outputs >= args.answer_tokens:
            break
        used.append(path)
        features = shard_features(store, path, answers, target, layer_ids)
        for answer, feature in zip(answers, features):
            sequence = FeatureSequence(
                answer.tokens.tolist(),
                answer.prompt_length,
                feature,
                torch.from_numpy(answer.top_ids),
                torch.from_numpy(answer.top_logprobs.astype("float32")),
            )
            if is_validation(answer.key):
                validation.append(sequence)
            elif args.answer_tokens is None or outputs < args.answer_tokens:
                training.append(sequence)
                outputs += len(answer.tokens) - answer.prompt_length
    if not training:
        raise SystemExit(f"--answers {args.answers} holds no training answers")
    sources: Counter[str] = Counter()
    for path in used:
        sources.update(json.loads(path.with_suffix(".json").read_text())["sources"])
    recipe = {
        "answer_store": {
            "directory": str(args.answers),
            "header": store.header,
            "shards_read": [p.name for p in used],
            "prompts_by_source_in_shards_read": dict(sources),
            "training_answers": len(training),
            "training_output_tokens": outputs,
            "training_tokens": sum(len(s.tokens) for s in training),
            "validation_answers": len(validation),
            "validation": f"answers whose key hashes to 0 mod {VALIDATION_EVERY}, never trained on",
        }
    }
    return training, validation, recipe


def _millions(model: torch.nn.Module) -> str:
    return f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f}"


def _training_streams(
    args: argparse.Namespace,
    tokenizer: PreTrainedTokenizerBase,
    target: PreTrainedModel,
    fingerprint: str,
) -> tuple[list[torch.Tensor], dict[str, Any]]:
    """The token streams the windows are cut from, and how they were made."""
    eos = tokenizer.eos_token_id
    recipe: dict[str, Any] = {"choice": args.data, "separator_token_id": eos}
    streams = []
    if args.data in ("stdlib", "both"):
        ids = [
            tokenizer(t, add_special_tokens=False, verbose=False)["input_ids"]
            for t in stdlib_documents()
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
        generations, generated_recipe, _ = _generations(args, tokenizer, target, fingerprint)
        streams.append(generations)
        recipe |= generated_recipe
    return streams, recipe


def training_prompts(count: int, seed: int) -> dict[str, list[str]]:
    """The generation prompts by kind, ``count`` in all, shared as PROMPT_SHARES says."""
    math = int(count * PROMPT_SHARES["math"])
    chat = int(count * PROMPT_SHARES["chat"])
    code = count - math - chat
    return {
        "code": generation_prompts(stdlib_documents(), code, seed),
        "math": math_prompts(math, seed),
        "chat": chat_prompts(chat, seed),
    }


def _generations(
    args: argparse.Namespace,
    tokenizer: PreTrainedTokenizerBase,
    target: PreTrainedModel,
    fingerprint: str,
) -> tuple[torch.Tensor, dict[str, Any], list[TargetGeneration]]:
    """The target's greedy answers to the training prompts (cached in the output directory):
    as one token stream, its recipe entry, and the records themselves."""
    by_kind = training_prompts(args.gen_prompts, args.seed)
    prompts = [p for kind in PROMPT_SHARES for p in by_kind[kind]]
    key = {
        "target_weights_sha256": fingerprint,
        "prompts_sha256": hashlib.sha256(json.dumps(prompts).encode()).hexdigest(),
        "max_new_tokens": args.gen_tokens,
    }
    if args.generator == "vllm":
        engine = vllm_generation_engine(args.target)
        key["generator"] = {"vllm": engine}
        decoding = f"vLLM {engine}"
        produce = lambda: generate_greedy_vllm(  # noqa: E731
            args.target, tokenizer, prompts, max_new_tokens=args.gen_tokens
        )
    else:
        decoding = "transformers generate"
        produce = lambda: generate_greedy(  # noqa: E731
            target,
            tokenizer,
            prompts,
            max_new_tokens=args.gen_tokens,
            batch_size=args.gen_batch_size,
            progress=args.progress,
        )
    cache = args.output / "data" / "target_generations.jsonl"
    records, reused = cached_generations(cache, key, produce)
    print(f"target generations: {'reused' if reused else 'wrote'} {cache}", flush=True)
    eos = tokenizer.eos_token_id
    generations = token_stream([r["prompt_ids"] + r["output_ids"] for r in records], eos)
    recipe = {
        "target_generations": {
            "prompts": len(prompts),
            "prompts_by_kind": {kind: len(by_kind[kind]) for kind in PROMPT_SHARES},
            "prompt_seed": args.seed,
            "prompt_source": "code: documented public functions of the stdlib files, "
            "alternately 'write this function' and 'explain this code'; math: seeded "
            "arithmetic templates; chat: seeded everyday-request templates (corpus.py); all "
            "in the target's chat template, none from benchmarks/prompts.json",
            "decoding": f"greedy, at most {args.gen_tokens} new tokens, {decoding}",
            "generated_tokens": sum(len(r["output_ids"]) for r in records),
            "tokens": generations.numel(),
            "sha256": sha256_of_tensor(generations),
            "weight": GENERATION_WEIGHT if args.data == "both" else 1.0,
            "cache": str(cache),
        }
    }
    return generations, recipe, records


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
    # A list in, a list out; an id is None where a slow tokenizer lacks the token.
    token_id = cast("list[int | None]", tokenizer.convert_tokens_to_ids([requested]))[0]
    if token_id is None or token_id == tokenizer.unk_token_id:
        raise SystemExit(f"--mask-token {requested!r} is not a token of the target's tokenizer")
    return requested, token_id


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
