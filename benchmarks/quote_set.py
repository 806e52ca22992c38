"""Our own prompt set of requests to quote a document given in the prompt, and a shared document
for a system prompt.

A drafter conditioned on the target's features of the context should find these easiest: the
answer is in the prompt. Documents: prose paragraphs of module docstrings of the standard-library
files the training corpus does not read (so no training prompt holds them), seeded choice. The
shared document is one such module's docstring, the first by name that reaches a given length.
"""

from __future__ import annotations

import ast
import random
import sysconfig
from collections.abc import Callable, Iterator
from pathlib import Path

from dlmspec_vllm.training.answers import prose_paragraphs
from dlmspec_vllm.training.chat_sources import SourcePrompt
from dlmspec_vllm.training.corpus import STDLIB_FILES

NAME = "quote"
PROMPTS = 40
DESCRIPTION = (
    f"quote: {PROMPTS} requests to repeat a prose paragraph (200-600 characters) of a module "
    "docstring of a standard-library file the training corpus does not read, word for word "
    "(seeded choice; benchmarks/quote_set.py)"
)


def _unread_docstrings() -> Iterator[tuple[str, str]]:
    """(file name, module docstring) of the standard-library files the corpus does not read."""
    root = Path(sysconfig.get_paths()["stdlib"])
    for path in sorted(root.glob("*.py")):
        if path.name in STDLIB_FILES:
            continue
        try:
            docstring = ast.get_docstring(ast.parse(path.read_text(encoding="utf-8"))) or ""
        except (SyntaxError, UnicodeDecodeError):
            continue
        yield path.name, docstring


def shared_document(count_tokens: Callable[[str], int], tokens: int) -> tuple[str, str]:
    """(file name, text): the prose paragraphs of the module docstring of the first public
    standard-library file by name, of those the corpus does not read, that reach ``tokens``
    tokens, cut after the paragraph that reaches them."""
    for name, docstring in _unread_docstrings():
        if name.startswith("_"):
            continue
        text = ""
        for paragraph in prose_paragraphs(docstring):
            text = f"{text}\n\n{paragraph}" if text else paragraph
            if count_tokens(text) >= tokens:
                return name, text
    raise ValueError(f"no standard-library module docstring reaches {tokens} tokens")


def quote_prompts(count: int = PROMPTS) -> list[SourcePrompt]:
    paragraphs = set()
    for _, docstring in _unread_docstrings():
        paragraphs.update(prose_paragraphs(docstring))
    chosen = random.Random(0).sample(sorted(paragraphs), count)
    return [
        SourcePrompt(NAME, str(i), f"Repeat the following text exactly, word for word:\n\n{text}")
        for i, text in enumerate(chosen)
    ]
