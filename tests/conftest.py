"""Shared test fixtures.

``tiny_pair`` (session-scoped) is a tiny target/drafter pair in the exact Hugging Face layout,
built offline once per run (see harness/dlmspec_harness/tiny_pair.py for the recipe):

- ``tiny_pair.target_dir``: Qwen2ForCausalLM checkpoint + tokenizer. It is also the ready-made
  "wrong drafter" for error tests: a plain autoregressive checkpoint.
- ``tiny_pair.drafter_dir``: Dream checkpoint (model_type "Dream") + the same tokenizer.

The build takes 45-55 s on two cores (one thread). Set DLMSPEC_TEST_CACHE=/some/dir to keep the pair
between runs; it is stored under a key hashed from the recipe, the code it runs and the corpus,
so editing any of them rebuilds it.

``tiny_fast_dllm`` and ``tiny_llada`` (session-scoped, built in seconds, see
fixtures/tiny_drafters.py) are the other two drafter families in their released layouts: a
Fast-dLLM v2 drafter sharing the pair's tokenizer, and a LLaDA drafter with a tokenizer of its
own, which drafts for the pair's target only through the vocabulary bridge. ``tiny_dflash`` is a
DFlash drafter (z-lab layout) for the pair's target, trained by `dlmspec train-drafter --kind
dflash` in about half a minute.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from fixtures.tiny_drafters import TinyDrafter

    from dlmspec_harness.tiny_pair import TinyPair

# Tests never reach the Hugging Face hub; fail fast instead of waiting on the network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

_REPORT: list[str] = []


@pytest.fixture(scope="session")
def tiny_pair(tmp_path_factory: pytest.TempPathFactory) -> TinyPair:
    # Imported here so that sessions which never use the pair do not import transformers early.
    from dlmspec_harness.tiny_pair import build_tiny_pair, cached_tiny_pair

    cache = os.environ.get("DLMSPEC_TEST_CACHE")
    if cache:
        pair = cached_tiny_pair(Path(cache))
    else:
        pair = build_tiny_pair(tmp_path_factory.mktemp("tiny_pair"))
    how = "loaded from cache" if pair.from_cache else "built"
    _REPORT.append(
        f"tiny_pair: {how} ({pair.build_seconds:.1f}s to build) at {pair.target_dir.parent}"
    )
    return pair


@pytest.fixture(scope="session")
def tiny_dflash(tiny_pair: TinyPair, tmp_path_factory: pytest.TempPathFactory) -> TinyDrafter:
    from fixtures.tiny_drafters import build_tiny_dflash

    return build_tiny_dflash(tiny_pair, tmp_path_factory.mktemp("tiny_dflash"))


@pytest.fixture(scope="session")
def tiny_fast_dllm(tiny_pair: TinyPair, tmp_path_factory: pytest.TempPathFactory) -> TinyDrafter:
    from fixtures.tiny_drafters import build_tiny_fast_dllm

    return build_tiny_fast_dllm(tiny_pair, tmp_path_factory.mktemp("tiny_fast_dllm"))


@pytest.fixture(scope="session")
def tiny_llada(tmp_path_factory: pytest.TempPathFactory) -> TinyDrafter:
    from fixtures.tiny_drafters import build_tiny_llada

    return build_tiny_llada(tmp_path_factory.mktemp("tiny_llada"))


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    for line in _REPORT:
        terminalreporter.write_line(line)
