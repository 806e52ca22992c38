"""The target's own answers, kept as compact token ids so that later runs add to them.

A drafter is trained on what the target writes. Writing it is the expensive part on a CPU, so
the answers are kept, not regenerated: an answer store is a directory of shards, each the
greedy answers to a few hundred prompts, holding for every answer its prompt's provenance
(``source:id``), its token ids (chat-formatted prompt, then the output) and, for every output
position, the target's top-k next-token distribution (for distillation). Features are not
kept: they are the target's hidden states of these tokens and are rebuilt from them.

    dlmspec generate-answers --target DIR --store DIR [--max-prompts N] [--exclude-prompts F]

writes shards until the plan's prompts are answered or ``--max-prompts`` are in the store;
run again with a larger number and it continues where the store ends. The prompt plan is a
seeded shuffle of every prompt of the sources (real chat turns and standard-library code
requests), minus the prompts that overlap an excluded file (the benchmark sets), so any
prefix of the store is a mix of all sources. One prompt in VALIDATION_EVERY (by a hash of its
key) is a validation prompt: generated like the others, never trained on.
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import json
import os
import random
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from dlmspec_vllm.targets import weights_sha256
from dlmspec_vllm.training.chat_sources import (
    SOURCES,
    SourcePrompt,
    drop_overlapping,
    source_prompts,
    texts_of_jsonl,
)
from dlmspec_vllm.training.corpus import (
    documented_functions,
    explain_code_prompt,
    stdlib_documents,
    vllm_generation_engine,
    write_function_prompt,
)
from dlmspec_vllm.wheel_data import sha256_of_file

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase
    from vllm import LLM
    from vllm.inputs import TokensPrompt
    from vllm.logprobs import Logprob
    from vllm.outputs import CompletionOutput

PROMPT_SOURCES = (*SOURCES, "stdlib-code", "stdlib-context")
# Requests whose answer should repeat a document given in the prompt. None uses the wording of
# benchmarks/drafter_curve.py's quote set, and their documents are the corpus' own files, which
# that set never draws from.
PARAGRAPH_TASKS = (
    "Quote the passage below, then say in one sentence what it is about.\n\n{}",
    "Copy this text, putting each sentence on its own line:\n\n{}",
    "Here is a paragraph from some documentation:\n\n{}\n\nRepeat it, then list the "
    "technical terms it uses.",
)
FUNCTION_TASKS = (
    "Add type hints to this Python function and give the whole function back:"
    "\n\n```python\n{}\n```",
    "Here is a Python function:\n\n```python\n{}\n```\n\nRewrite it with a short "
    "comment above each line that does something.",
)
SHORTEST_PARAGRAPH, LONGEST_PARAGRAPH = 200, 600
VALIDATION_EVERY = 20
STORE_FILE = "store.json"
FORMAT = 1


def stdlib_code_prompts() -> list[SourcePrompt]:
    """Both requests ("write this function", "explain this code") for every public documented
    function of the corpus' standard-library files: ids are stable for a Python version."""
    prompts = []
    for index, (signature, summary, source) in enumerate(documented_functions(stdlib_documents())):
        prompts.append(
            SourcePrompt("stdlib-code", f"write:{index}", write_function_prompt(signature, summary))
        )
        prompts.append(SourcePrompt("stdlib-code", f"explain:{index}", explain_code_prompt(source)))
    return prompts


def prose_paragraphs(docstring: str) -> list[str]:
    """The docstring's paragraphs of 200-600 characters, nine tenths letters and spaces,
    whitespace joined."""
    paragraphs = []
    for paragraph in docstring.split("\n\n"):
        joined = " ".join(paragraph.split())
        letters = sum(c.isalpha() or c == " " for c in joined)
        if SHORTEST_PARAGRAPH <= len(joined) <= LONGEST_PARAGRAPH and letters > 0.9 * len(joined):
            paragraphs.append(joined)
    return paragraphs


def docstring_paragraphs(documents: Sequence[str]) -> list[str]:
    """The prose paragraphs of every docstring of the documents, deduplicated, in document and
    ``ast.walk`` order."""
    paragraphs: dict[str, None] = {}
    for text in documents:
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef):
                paragraphs.update(dict.fromkeys(prose_paragraphs(ast.get_docstring(node) or "")))
    return list(paragraphs)


def stdlib_context_prompts() -> list[SourcePrompt]:
    """Requests to repeat, reformat or annotate a document the prompt gives (a docstring
    paragraph or a function of the corpus' standard-library files): answers that copy from their
    context, which a drafter reading the target's features of that context should learn to
    draft. Each document gets one task, in turn; ids are stable for a Python version."""
    documents = stdlib_documents()
    prompts = []
    for index, paragraph in enumerate(docstring_paragraphs(documents)):
        task = PARAGRAPH_TASKS[index % len(PARAGRAPH_TASKS)]
        prompts.append(SourcePrompt("stdlib-context", f"paragraph:{index}", task.format(paragraph)))
    for index, (_, _, source) in enumerate(documented_functions(documents)):
        task = FUNCTION_TASKS[index % len(FUNCTION_TASKS)]
        prompts.append(SourcePrompt("stdlib-context", f"function:{index}", task.format(source)))
    return prompts


def is_validation(key: str) -> bool:
    return int(hashlib.sha256(key.encode()).hexdigest()[:8], 16) % VALIDATION_EVERY == 0


@dataclass(frozen=True)
class PromptPlan:
    prompts: list[SourcePrompt]  # in generation order
    dropped: list[SourcePrompt]  # overlapped an excluded text
    excluded_files: dict[str, str]  # path -> sha256


def prompt_plan(
    *,
    seed: int,
    sources: Sequence[str] = PROMPT_SOURCES,
    exclude_files: Sequence[Path] = (),
    cache_dir: Path | None = None,
) -> PromptPlan:
    unknown = [s for s in sources if s not in PROMPT_SOURCES]
    if unknown:
        raise ValueError(f"unknown prompt source(s) {unknown}: choose from {list(PROMPT_SOURCES)}")
    everything: list[SourcePrompt] = []
    built_in = {"stdlib-code": stdlib_code_prompts, "stdlib-context": stdlib_context_prompts}
    for name in sources:
        everything += built_in[name]() if name in built_in else source_prompts(name, cache_dir)
    excluded_texts: list[str] = []
    excluded_files = {}
    for path in exclude_files:
        excluded_texts += texts_of_jsonl(path)
        excluded_files[str(path)] = sha256_of_file(path)
    kept, dropped = drop_overlapping(everything, excluded_texts)
    kept.sort(key=lambda p: p.key)
    random.Random(seed).shuffle(kept)
    return PromptPlan(kept, dropped, excluded_files)


@dataclass(frozen=True)
class Answer:
    key: str
    tokens: np.ndarray  # int32: chat-formatted prompt ids, then the output ids
    prompt_length: int
    top_ids: np.ndarray  # int32 [output length, k]: the target's k likeliest next tokens
    top_logprobs: np.ndarray  # float16 [output length, k]: their log-probabilities


class AnswerStore:
    """A directory of answer shards for one target and one decoding recipe."""

    def __init__(self, directory: Path, *, target_sha256: str, decoding: dict) -> None:
        self.directory = Path(directory)
        header = {"format": FORMAT, "target_weights_sha256": target_sha256, "decoding": decoding}
        path = self.directory / STORE_FILE
        if path.is_file():
            existing = json.loads(path.read_text())
            if existing != header:
                raise ValueError(
                    f"answer store {self.directory} holds answers of another target or decoding "
                    f"({existing}), not {header}: give another --store directory"
                )
        else:
            self.directory.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(header, indent=1) + "\n")
        self.header = header

    @staticmethod
    def open(directory: Path) -> AnswerStore:
        path = Path(directory) / STORE_FILE
        if not path.is_file():
            raise FileNotFoundError(f"{directory} is not an answer store (no {STORE_FILE})")
        header = json.loads(path.read_text())
        return AnswerStore(
            directory, target_sha256=header["target_weights_sha256"], decoding=header["decoding"]
        )

    def shard_paths(self) -> list[Path]:
        return sorted(self.directory.glob("shard-*.npz"))

    def keys(self) -> set[str]:
        keys: set[str] = set()
        for path in self.shard_paths():
            keys.update(json.loads(path.with_suffix(".json").read_text())["keys"])
        return keys

    def answers(self) -> list[Answer]:
        """Every stored answer, in the order they were written."""
        return [answer for _, answers in self.answers_by_shard() for answer in answers]

    def answers_by_shard(self) -> list[tuple[Path, list[Answer]]]:
        out = []
        for path in self.shard_paths():
            keys = json.loads(path.with_suffix(".json").read_text())["keys"]
            with np.load(path) as shard:
                tokens, offsets = shard["tokens"], shard["offsets"]
                top_ids, top_logprobs = shard["top_ids"], shard["top_logprobs"]
                top_offsets, prompt_lengths = shard["top_offsets"], shard["prompt_lengths"]
            answers = []
            for i, key in enumerate(keys):
                top = slice(top_offsets[i], top_offsets[i + 1])
                answers.append(
                    Answer(
                        key,
                        tokens[offsets[i] : offsets[i + 1]],
                        int(prompt_lengths[i]),
                        top_ids[top],
                        top_logprobs[top],
                    )
                )
            out.append((path, answers))
        return out

    def add_shard(self, answers: Sequence[Answer], provenance: dict) -> Path:
        index = len(self.shard_paths())
        path = self.directory / f"shard-{index:05d}.npz"
        lengths = np.array([len(a.tokens) for a in answers], dtype=np.int64)
        top_lengths = np.array([len(a.top_ids) for a in answers], dtype=np.int64)
        partial = path.with_name(path.stem + ".partial.npz")
        np.savez(
            partial,
            tokens=np.concatenate([a.tokens for a in answers]).astype(np.int32),
            offsets=np.concatenate(([0], np.cumsum(lengths))),
            prompt_lengths=np.array([a.prompt_length for a in answers], dtype=np.int32),
            top_ids=np.concatenate([a.top_ids for a in answers]).astype(np.int32),
            top_logprobs=np.concatenate([a.top_logprobs for a in answers]).astype(np.float16),
            top_offsets=np.concatenate(([0], np.cumsum(top_lengths))),
        )
        # The key list goes first and the shard last, so a shard on disk always has its keys.
        path.with_suffix(".json").write_text(
            json.dumps({"keys": [a.key for a in answers], **provenance}, indent=1) + "\n"
        )
        os.replace(partial, path)
        return path


def shard_features(
    store: AnswerStore,
    shard: Path,
    answers: Sequence[Answer],
    target: PreTrainedModel,
    layer_ids: Sequence[int],
    *,
    log=print,
) -> list:
    """The target's features of a shard's answers at ``layer_ids`` (training/dflash.py's
    target_features), cached in the store per layer set. A cache of a superset of the layers
    serves too: its columns are sliced, so ablations over layer sets compute nothing again."""
    import torch

    from dlmspec_vllm.training.dflash import target_features

    wanted = [int(i) for i in layer_ids]
    for directory in sorted(store.directory.glob("features-*")):
        held = [int(i) for i in directory.name.removeprefix("features-").split("-")]
        cache = directory / (shard.stem + ".pt")
        if set(wanted) <= set(held) and cache.is_file():
            features = torch.load(cache, weights_only=True)
            if held == wanted:
                return features
            width = features[0].shape[1] // len(held)
            columns = torch.cat([torch.arange(width) + held.index(i) * width for i in wanted])
            return [f[:, columns] for f in features]
    began = time.perf_counter()
    features = target_features(target, [a.tokens.tolist() for a in answers], wanted)
    directory = store.directory / ("features-" + "-".join(str(i) for i in wanted))
    directory.mkdir(exist_ok=True)
    cache = directory / (shard.stem + ".pt")
    partial = cache.with_suffix(".partial")
    torch.save(features, partial)
    partial.replace(cache)
    tokens = sum(len(a.tokens) for a in answers)
    seconds = time.perf_counter() - began
    log(
        f"target features of {shard.name}: {tokens} tokens in {seconds:.0f} s "
        f"({tokens / seconds:.0f} tok/s), cached in {cache}"
    )
    return features


def answer_engine(target: Path, *, max_model_len: int, batch_size: int, top_k: int) -> LLM:
    """The in-process vLLM engine that writes answers: the generation engine's settings
    (corpus.VLLM_GENERATION_ENGINE), this batch size, and log-probabilities for the top-k."""
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    from vllm import LLM

    settings = {**vllm_generation_engine(target), "max_model_len": max_model_len}
    return LLM(str(target), **settings | {"max_num_seqs": batch_size, "max_logprobs": top_k})


def generate_answers(
    store: AnswerStore,
    llm: LLM,
    tokenizer: PreTrainedTokenizerBase,
    plan: PromptPlan,
    *,
    max_prompts: int,
    max_new_tokens: int,
    top_k: int,
    shard_size: int,
    max_model_len: int,
    log=print,
) -> int:
    """Answer the plan's prompts not yet in the store, in plan order, a shard at a time, until
    the store holds ``max_prompts`` answers. Returns the answers written. A prompt too long to
    leave room for ``max_new_tokens`` within ``max_model_len`` is skipped (and said)."""
    from vllm import SamplingParams

    from dlmspec_vllm.training.corpus import chat_prompt_ids

    done = store.keys()
    wanted = max(0, max_prompts - len(done))
    todo: list[tuple[SourcePrompt, list[int]]] = []
    skipped = 0
    for prompt in plan.prompts:
        if len(todo) == wanted:
            break
        if prompt.key in done:
            continue
        ids = chat_prompt_ids(tokenizer, prompt.text)
        if len(ids) + max_new_tokens > max_model_len:
            skipped += 1
            continue
        todo.append((prompt, ids))
    if skipped:
        log(f"skipped {skipped} prompts longer than {max_model_len - max_new_tokens} tokens")
    params = SamplingParams(temperature=0.0, max_tokens=max_new_tokens, logprobs=top_k)
    written = 0
    for start in range(0, len(todo), shard_size):
        chunk = [prompt for prompt, _ in todo[start : start + shard_size]]
        rows = [row for _, row in todo[start : start + shard_size]]
        began = time.perf_counter()
        requests: list[TokensPrompt] = [{"prompt_token_ids": row} for row in rows]
        outputs = llm.generate(requests, params, use_tqdm=False)
        seconds = time.perf_counter() - began
        answers = [
            _answer(prompt.key, row, output.outputs[0], top_k)
            for prompt, row, output in zip(chunk, rows, outputs)
        ]
        generated = sum(len(a.tokens) - a.prompt_length for a in answers)
        path = store.add_shard(
            answers,
            {
                "sources": dict(Counter(p.source for p in chunk)),
                "generated_tokens": generated,
                "seconds": round(seconds, 1),
            },
        )
        written += len(answers)
        log(
            f"{path.name}: {len(answers)} answers, {generated} tokens in {seconds:.0f} s "
            f"({generated / seconds:.0f} tok/s); store: {len(done) + written} answers"
        )
    return written


def _answer(key: str, prompt_ids: list[int], completion: CompletionOutput, top_k: int) -> Answer:
    output = list(completion.token_ids)
    top_ids = np.zeros((len(output), top_k), dtype=np.int32)
    top_logprobs = np.full((len(output), top_k), -np.inf, dtype=np.float16)
    for position, ranked in enumerate(completion.logprobs or []):
        assert ranked is not None  # only a prompt's first position has no log-probs
        best = sorted(ranked.items(), key=_rank)[:top_k]
        for j, (token, logprob) in enumerate(best):
            top_ids[position, j] = token
            top_logprobs[position, j] = logprob.logprob
    return Answer(
        key, np.array(prompt_ids + output, dtype=np.int32), len(prompt_ids), top_ids, top_logprobs
    )


def _rank(entry: tuple[int, Logprob]) -> int:
    rank = entry[1].rank
    assert rank is not None  # vLLM ranks every log-prob of a sampled position
    return rank


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="dlmspec generate-answers",
        description="Write the target's greedy answers to real chat and code prompts into an "
        "answer store (token ids and top-k distributions) for drafter training.",
    )
    parser.add_argument("--target", type=Path, required=True)
    parser.add_argument("--store", type=Path, required=True)
    parser.add_argument(
        "--max-prompts", type=int, default=2048, help="answers the store should hold"
    )
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--top-k", type=int, default=8, help="target distribution kept per token")
    parser.add_argument("--shard-size", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=128, help="vLLM max_num_seqs")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--sources", default=",".join(PROMPT_SOURCES))
    parser.add_argument(
        "--exclude-prompts",
        type=Path,
        action="append",
        default=[],
        help="JSONL file whose texts no training prompt may overlap (repeatable; e.g. the "
        "benchmark sets' files)",
    )
    parser.add_argument(
        "--max-model-len",
        type=int,
        help="vLLM's (default: 1024, or the target's window if shorter)",
    )
    args = parser.parse_args(argv)
    for name in ("max_prompts", "max_new_tokens", "top_k", "shard_size", "batch_size"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    missing = [str(p) for p in args.exclude_prompts if not p.is_file()]
    if missing:
        parser.error(f"--exclude-prompts: no such file {missing}")

    from transformers import AutoTokenizer

    decoding = {
        "greedy": True,
        "max_new_tokens": args.max_new_tokens,
        "top_k": args.top_k,
        "seed": args.seed,
        "sources": args.sources.split(","),
    }
    store = AnswerStore(args.store, target_sha256=weights_sha256(args.target), decoding=decoding)
    plan = prompt_plan(
        seed=args.seed, sources=decoding["sources"], exclude_files=args.exclude_prompts
    )
    print(
        f"plan: {len(plan.prompts)} prompts ({dict(Counter(p.source for p in plan.prompts))}), "
        f"{len(plan.dropped)} dropped for overlapping {list(plan.excluded_files)}",
        flush=True,
    )
    max_model_len = args.max_model_len or vllm_generation_engine(args.target)["max_model_len"]
    llm = answer_engine(
        args.target, max_model_len=max_model_len, batch_size=args.batch_size, top_k=args.top_k
    )
    tokenizer = AutoTokenizer.from_pretrained(args.target)
    generate_answers(
        store,
        llm,
        tokenizer,
        plan,
        max_prompts=args.max_prompts,
        max_new_tokens=args.max_new_tokens,
        top_k=args.top_k,
        shard_size=args.shard_size,
        max_model_len=max_model_len,
        log=lambda line: print(line, flush=True),
    )
