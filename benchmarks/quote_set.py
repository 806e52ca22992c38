"""Our own prompt set of requests to quote a document given in the prompt.

A drafter conditioned on the target's features of the context should find these easiest: the
answer is in the prompt. Documents: prose paragraphs of module docstrings of the standard-library
files the training corpus does not read (so no training prompt holds them), seeded choice.
"""

from __future__ import annotations

import ast
import random
import sysconfig
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


def quote_prompts(count: int = PROMPTS) -> list[SourcePrompt]:
    root = Path(sysconfig.get_paths()["stdlib"])
    paragraphs = set()
    for path in sorted(root.glob("*.py")):
        if path.name in STDLIB_FILES:
            continue
        try:
            docstring = ast.get_docstring(ast.parse(path.read_text(encoding="utf-8"))) or ""
        except (SyntaxError, UnicodeDecodeError):
            continue
        paragraphs.update(prose_paragraphs(docstring))
    chosen = random.Random(0).sample(sorted(paragraphs), count)
    return [
        SourcePrompt(NAME, str(i), f"Repeat the following text exactly, word for word:\n\n{text}")
        for i, text in enumerate(chosen)
    ]
