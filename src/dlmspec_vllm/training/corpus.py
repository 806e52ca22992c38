"""Training text for drafters that exists on every machine: the Python standard library, and the
target's own greedy answers to prompts cut from it.

No data set can be downloaded where this project trains (no hub, no internet in CI), but every
Python install carries its standard library: real code with real docstrings. A fixed file list in
a fixed order makes the corpus a pure function of the Python version. The target's own greedy
generations teach the drafter the target's chat behaviour, which is what speculative decoding is
judged on: in a generated answer, the data's next token *is* the target's greedy choice.
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import random
import sysconfig
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypedDict

import torch

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase
    from vllm.inputs import TokensPrompt

# Fixed list, fixed order: the corpus is part of a trained drafter's recipe. Modules whose file
# is the same name in Python 3.11 to 3.14 (no packages that moved between versions).
STDLIB_FILES = (
    "textwrap.py",
    "string.py",
    "heapq.py",
    "bisect.py",
    "fnmatch.py",
    "glob.py",
    "shlex.py",
    "base64.py",
    "csv.py",
    "functools.py",
    "contextlib.py",
    "copy.py",
    "abc.py",
    "queue.py",
    "sched.py",
    "colorsys.py",
    "argparse.py",
    "dataclasses.py",
    "enum.py",
    "fractions.py",
    "statistics.py",
    "random.py",
    "calendar.py",
    "difflib.py",
    "ipaddress.py",
    "json/decoder.py",
    "json/encoder.py",
    "operator.py",
    "shutil.py",
    "tempfile.py",
    "uuid.py",
    "configparser.py",
    "weakref.py",
    "secrets.py",
    "numbers.py",
    "graphlib.py",
    "html/parser.py",
    "urllib/parse.py",
    "collections/__init__.py",
    "reprlib.py",
    "traceback.py",
    "warnings.py",
    "tokenize.py",
    "gettext.py",
    "logging/__init__.py",
    "inspect.py",
    "typing.py",
    "pprint.py",
    "posixpath.py",
    "locale.py",
    "mimetypes.py",
    "subprocess.py",
    "threading.py",
    "socket.py",
    "http/client.py",
    "codecs.py",
    "bdb.py",
    "pdb.py",
    "timeit.py",
    "cmd.py",
    "ast.py",
    "platform.py",
    "optparse.py",
    "tarfile.py",
    "bz2.py",
    "pydoc.py",
    "smtplib.py",
    "ftplib.py",
    "imaplib.py",
    "mailbox.py",
    "poplib.py",
    "_pydecimal.py",
    "site.py",
    "os.py",
    "zipimport.py",
)
# Longest function source quoted in an "explain this code" prompt, in lines and characters.
MAX_QUOTED_LINES, MAX_QUOTED_CHARS = 25, 1200


def stdlib_documents(files: Sequence[str] = STDLIB_FILES) -> list[str]:
    """The listed standard-library sources, read from this interpreter's installation."""
    root = Path(sysconfig.get_paths()["stdlib"])
    missing = [name for name in files if not (root / name).is_file()]
    if missing:
        raise FileNotFoundError(f"standard library files missing under {root}: {missing}")
    return [(root / name).read_text(encoding="utf-8") for name in files]


def documented_functions(documents: Sequence[str]) -> list[tuple[str, str, str]]:
    """(signature, docstring summary, quoted source) of every public documented function of
    the documents, in document and ``ast.walk`` order."""
    candidates: list[tuple[str, str, str]] = []
    for text in documents:
        lines = text.splitlines()
        for node in ast.walk(ast.parse(text)):
            if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                continue
            docstring = ast.get_docstring(node)
            if not docstring or node.name.startswith("_"):
                continue
            summary = " ".join(docstring.split("\n\n")[0].split())
            source = "\n".join(lines[node.lineno - 1 : node.end_lineno][:MAX_QUOTED_LINES])
            signature = f"{node.name}({ast.unparse(node.args)})"
            candidates.append((signature, summary, source[:MAX_QUOTED_CHARS]))
    return candidates


def write_function_prompt(signature: str, summary: str) -> str:
    return f"Write a Python function `{signature}`. {summary}"


def explain_code_prompt(source: str) -> str:
    return f"Explain what this Python code does:\n\n```python\n{source}\n```"


def generation_prompts(documents: Sequence[str], count: int, seed: int) -> list[str]:
    """``count`` user requests built from the documents' documented functions, seeded.

    Alternately "write this function" (name, arguments and the docstring's first paragraph) and
    "explain this code" (the function's source), so the target answers both in prose and in code.
    """
    candidates = documented_functions(documents)
    if count > len(candidates):
        raise ValueError(f"{count} prompts asked for, {len(candidates)} documented functions found")
    chosen = random.Random(seed).sample(candidates, count)
    return [
        write_function_prompt(signature, summary) if i % 2 == 0 else explain_code_prompt(source)
        for i, (signature, summary, source) in enumerate(chosen)
    ]


def chat_prompt_ids(tokenizer: PreTrainedTokenizerBase, prompt: str) -> list[int]:
    """A user message in the target's chat template, as the served model will see it."""
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
    )
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


class TargetGeneration(TypedDict):
    """One prompt and the target's greedy answer to it, as cached_generations stores them."""

    prompt: str
    prompt_ids: list[int]
    output_ids: list[int]


@torch.no_grad()
def generate_greedy(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    *,
    max_new_tokens: int,
    batch_size: int,
    progress: bool = True,
) -> list[TargetGeneration]:
    """Per prompt: its chat-formatted ids and the target's greedy continuation (to EOS or
    ``max_new_tokens``), batched with left padding."""
    from tqdm.auto import tqdm

    device = next(model.parameters()).device
    eos = model.generation_config.eos_token_id
    eos_ids = set(eos if isinstance(eos, list) else [eos])
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else next(iter(eos_ids))
    records: list[TargetGeneration] = []
    for start in tqdm(
        range(0, len(prompts), batch_size), desc="target generations", disable=not progress
    ):
        batch = list(prompts[start : start + batch_size])
        ids = [chat_prompt_ids(tokenizer, p) for p in batch]
        width = max(len(row) for row in ids)
        input_ids = torch.tensor([[pad] * (width - len(row)) + row for row in ids], device=device)
        attention = torch.tensor(
            [[0] * (width - len(row)) + [1] * len(row) for row in ids], device=device
        )
        # transformers 5 declares `generate` on GenerationMixin, which every model
        # AutoModelForCausalLM loads has but PreTrainedModel lacks.
        output = model.generate(  # type: ignore[operator]
            input_ids=input_ids,
            attention_mask=attention,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=pad,
        )
        for prompt, prompt_ids, row in zip(batch, ids, output[:, width:].tolist()):
            ends = [i for i, token in enumerate(row) if token in eos_ids]
            records.append(
                {"prompt": prompt, "prompt_ids": prompt_ids, "output_ids": row[: ends[0] + 1]}
                if ends
                else {"prompt": prompt, "prompt_ids": prompt_ids, "output_ids": row}
            )
    return records


def cached_generations(
    cache_file: Path,
    key: dict[str, object],
    produce: Callable[[], list[TargetGeneration]],
) -> tuple[list[TargetGeneration], bool]:
    """The records stored under ``key`` in ``cache_file``, else ``produce()``'s, stored there.

    Returns (records, reused). A file written for another key (other prompts, target or
    length) is replaced, so a resumed run never trains on generations of a different recipe.
    """
    if cache_file.is_file():
        with cache_file.open() as handle:
            header = json.loads(handle.readline())
            if header == {"key": key}:
                return [json.loads(line) for line in handle], True
    records = produce()
    cache_file.parent.mkdir(parents=True, exist_ok=True)
    partial = cache_file.with_suffix(".partial")
    with partial.open("w") as handle:
        handle.write(json.dumps({"key": key}) + "\n")
        for record in records:
            handle.write(json.dumps(record) + "\n")
    os.replace(partial, cache_file)
    return records, False


def token_stream(documents: Sequence[Sequence[int]], separator: int) -> torch.Tensor:
    """Token-id documents joined by ``separator`` (EOS), as pretraining documents are."""
    ids: list[int] = []
    for document in documents:
        ids.extend(document)
        ids.append(separator)
    return torch.tensor(ids, dtype=torch.long)


def sha256_of_tensor(tokens: torch.Tensor) -> str:
    """Fingerprint of a token stream, for the training recipe."""
    return hashlib.sha256(tokens.numpy().tobytes()).hexdigest()


# Word lists for the math and chat requests below: written for training, disjoint in wording
# from benchmarks/prompts.json (which stays held out), so that drafters learn how the target
# answers arithmetic and everyday questions, not the benchmark's own prompts.
_ITEMS = ("notebooks", "apples", "tickets", "pencils", "mugs", "books", "lamps", "chairs")
_NAMES = ("Ana", "Ben", "Chen", "Dara", "Eli", "Farah", "Goran", "Hana", "Ivo", "Jun")
_ACTIVITIES = (
    "learning a new language",
    "staying focused while studying",
    "saving money",
    "keeping a small garden",
    "running a first 5k",
    "cooking for a week ahead",
    "organising a desk",
    "making new friends in a city",
    "writing a cover letter",
    "drinking more water",
    "taking better photos with a phone",
    "planning a road trip",
)
_TOPICS = (
    "how a refrigerator keeps food cold",
    "what inflation is",
    "how vaccines work",
    "why leaves change colour in autumn",
    "what a black hole is",
    "how the internet works",
    "what compound interest is",
    "how bees make honey",
    "why we have seasons",
    "what a volcano is",
    "how a bicycle stays upright",
    "what recycling does",
)
_LETTERS = (
    ("an invitation", "a neighbour", "a garden party"),
    ("an apology", "a friend", "missing a birthday"),
    ("a welcome message", "a new team member", "their first day"),
    ("a reminder", "a book club", "the next meeting"),
    ("a congratulations note", "a cousin", "a graduation"),
)


def math_prompts(count: int, seed: int) -> list[str]:
    """``count`` seeded arithmetic requests with random numbers."""
    rng = random.Random(seed)
    templates = (
        lambda: f"Compute {rng.randint(12, 99)} times {rng.randint(3, 40)} and show your work.",
        lambda: (
            f"A shop sells {rng.choice(_ITEMS)} for ${rng.randint(2, 30)} each. How much "
            f"do {rng.randint(3, 15)} of them cost in total?"
        ),
        lambda: (
            f"What is {rng.randint(100, 999)} divided by {rng.randint(3, 12)}, rounded to "
            "two decimal places?"
        ),
        lambda: f"Find the perimeter of a square whose side is {rng.randint(2, 50)} cm.",
        lambda: (
            f"{rng.choice(_NAMES)} has {rng.randint(20, 90)} marbles and gives away "
            f"{rng.randint(1, 19)}. How many marbles are left?"
        ),
        lambda: (
            f"Solve the equation {rng.randint(2, 9)}y - {rng.randint(1, 20)} = "
            f"{rng.randint(21, 80)}."
        ),
        lambda: f"Convert {rng.randint(2, 60)} kilometres to miles.",
        lambda: (
            f"What is the average of {rng.randint(1, 50)}, {rng.randint(1, 50)} and "
            f"{rng.randint(1, 50)}?"
        ),
        lambda: (
            f"How many minutes are there in {rng.randint(2, 9)} hours and "
            f"{rng.randint(1, 59)} minutes?"
        ),
        lambda: f"Is {rng.randint(20, 200)} a prime number? Explain your reasoning.",
        lambda: (
            f"A car uses {rng.randint(4, 9)} litres of fuel per 100 km. How much fuel "
            f"does it need for {rng.randint(120, 900)} km?"
        ),
        lambda: (
            f"What is {rng.randint(2, 9)}/{rng.randint(10, 20)} plus "
            f"{rng.randint(1, 9)}/{rng.randint(10, 20)}?"
        ),
    )
    return [templates[i % len(templates)]() for i in range(count)]


def chat_prompts(count: int, seed: int) -> list[str]:
    """``count`` seeded everyday requests: advice, explanations, short letters."""
    rng = random.Random(seed)
    templates = (
        lambda: f"Give me {rng.randint(3, 5)} tips for {rng.choice(_ACTIVITIES)}.",
        lambda: f"Explain {rng.choice(_TOPICS)} in simple terms.",
        lambda: "Write {} to {} about {}.".format(*rng.choice(_LETTERS)),
        lambda: f"What should a beginner know before {rng.choice(_ACTIVITIES)}?",
        lambda: f"Can you explain {rng.choice(_TOPICS)} to a ten-year-old?",
    )
    return [templates[i % len(templates)]() for i in range(count)]


# vLLM engine settings of generate_greedy_vllm: part of a drafter's data recipe.
VLLM_GENERATION_ENGINE: dict[str, Any] = {
    "enforce_eager": True,
    "max_model_len": 1024,
    "dtype": "float32",
    "max_num_seqs": 64,
}


def vllm_generation_engine(target_dir: Path) -> dict[str, Any]:
    """VLLM_GENERATION_ENGINE for this target: max_model_len no longer than its own window."""
    config = json.loads((Path(target_dir) / "config.json").read_text())
    longest = int(VLLM_GENERATION_ENGINE["max_model_len"])
    window = int(config.get("max_position_embeddings") or longest)
    return {**VLLM_GENERATION_ENGINE, "max_model_len": min(longest, window)}


def generate_greedy_vllm(
    target_dir: Path,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    *,
    max_new_tokens: int,
) -> list[TargetGeneration]:
    """Per prompt: its chat-formatted ids and the target's greedy continuation, generated by vLLM
    itself (many times faster than transformers' generate on a CPU, and the very numerics the
    served target will have). vLLM runs in this process."""
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    from vllm import LLM, SamplingParams

    ids = [chat_prompt_ids(tokenizer, p) for p in prompts]
    llm = LLM(str(target_dir), **vllm_generation_engine(target_dir))
    requests: list[TokensPrompt] = [{"prompt_token_ids": row} for row in ids]
    outputs = llm.generate(
        requests,
        SamplingParams(temperature=0.0, max_tokens=max_new_tokens),
    )
    return [
        {"prompt": p, "prompt_ids": row, "output_ids": list(o.outputs[0].token_ids)}
        for p, row, o in zip(prompts, ids, outputs)
    ]
