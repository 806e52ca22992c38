"""`dlmspec train-drafter` end to end on the tiny pair's target: a few steps, stop, resume.

A resumed run must equal an uninterrupted one bit for bit (weights and every loss), reuse the
cached target generations, and leave a drafter the proposer's loader accepts.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dlmspec_vllm.drafters.loading import load_drafter
from dlmspec_vllm.training.command import RECIPE_FILE, main


def train(target: Path, output: Path, *extra: str) -> None:
    main(
        [
            "--target", str(target), "--output", str(output),
            "--steps", "4", "--save-every", "2", "--layers", "1",
            "--seq-len", "24:48", "--batch-size", "4",
            "--gen-prompts", "4", "--gen-tokens", "12",
            "--threads", "1", "--no-progress", *extra,
        ]
    )  # fmt: skip


@pytest.fixture(scope="module")
def uninterrupted(tiny_pair, tmp_path_factory) -> Path:
    output = tmp_path_factory.mktemp("uninterrupted")
    train(tiny_pair.target_dir, output)
    return output


def test_resume_continues_exactly_where_the_run_stopped(tiny_pair, uninterrupted, tmp_path, capsys):
    output = tmp_path / "sliced"
    train(tiny_pair.target_dir, output, "--stop-at", "2")
    assert "stopped at step 2 of 4" in capsys.readouterr().out
    assert not (output / "model.safetensors").exists()
    generations = output / "data" / "target_generations.jsonl"
    written = generations.stat().st_mtime_ns

    train(tiny_pair.target_dir, output, "--resume")
    assert "target generations: reused" in capsys.readouterr().out
    assert generations.stat().st_mtime_ns == written

    expected, actual = (load_file(d / "model.safetensors") for d in (uninterrupted, output))
    assert expected.keys() == actual.keys()
    assert all(torch.equal(expected[name], actual[name]) for name in expected)
    recipes = [json.loads((d / RECIPE_FILE).read_text()) for d in (uninterrupted, output)]
    assert recipes[0]["result"]["losses"] == recipes[1]["result"]["losses"]
    assert recipes[1]["result"]["resumed_from_step"] == 2


def test_output_is_a_dream_drafter_with_the_targets_tokenizer(tiny_pair, uninterrupted):
    config = json.loads((uninterrupted / "config.json").read_text())
    assert config["model_type"] == "Dream" and config["num_hidden_layers"] == 1
    assert config["mask_token_id"] == tiny_pair.mask_token_id
    target_tokenizer = (tiny_pair.target_dir / "tokenizer.json").read_text()
    assert (uninterrupted / "tokenizer.json").read_text() == target_tokenizer

    drafter = load_drafter(
        uninterrupted, target_vocab_size=tiny_pair.vocab_size, target_tokenizer=tiny_pair.target_dir
    )
    block = drafter.draft([[5, 6, 7, 8, 9]], [4])
    assert block.lengths == [4]
    assert len(block.argmax_tokens()[0]) == 4


def test_recipe_records_settings_data_and_versions(uninterrupted):
    recipe = json.loads((uninterrupted / RECIPE_FILE).read_text())
    assert recipe["settings"]["steps"] == 4 and recipe["settings"]["layers"] == 1
    assert recipe["data"]["stdlib"]["files"][0] == "textwrap.py"
    assert recipe["data"]["target_generations"]["prompts"] == 4
    assert len(recipe["result"]["losses"]) == 4
    assert {"python", "torch", "transformers"} <= recipe["versions"].keys()


def test_existing_run_is_not_overwritten_without_resume(tiny_pair, uninterrupted):
    with pytest.raises(FileExistsError, match="--resume"):
        train(tiny_pair.target_dir, uninterrupted)


def test_resume_under_other_settings_is_refused(tiny_pair, uninterrupted):
    with pytest.raises(ValueError, match="lr"):
        train(tiny_pair.target_dir, uninterrupted, "--resume", "--lr", "1e-3")


@pytest.mark.parametrize("kind", ["block", "llada"])
def test_unsupported_kinds_are_rejected_before_any_work(tmp_path, kind, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--target", str(tmp_path), "--output", str(tmp_path / "out"), "--kind", kind])
    assert exit_info.value.code == 2
    assert "supported kinds are dream" in capsys.readouterr().err


def train_dflash(target: Path, output: Path, *extra: str) -> None:
    main(
        [
            "--target", str(target), "--output", str(output), "--kind", "dflash",
            "--steps", "4", "--save-every", "2", "--batch-size", "2", "--anchors", "3",
            "--block-size", "4", "--gen-prompts", "4", "--gen-tokens", "12",
            "--draft-vocab", "200", "--threads", "1", "--no-progress", *extra,
        ]
    )  # fmt: skip


def test_dflash_run_resumes_exactly_and_loads_as_a_target_conditioned_drafter(
    tiny_pair, tmp_path, capsys
):
    whole, sliced = tmp_path / "whole", tmp_path / "sliced"
    train_dflash(tiny_pair.target_dir, whole)
    train_dflash(tiny_pair.target_dir, sliced, "--stop-at", "2")
    assert "stopped at step 2 of 4" in capsys.readouterr().out
    train_dflash(tiny_pair.target_dir, sliced, "--resume")
    out = capsys.readouterr().out
    assert "target generations: reused" in out and "target features: reused" in out
    expected, actual = (load_file(d / "model.safetensors") for d in (whole, sliced))
    assert expected.keys() == actual.keys()
    assert all(torch.equal(expected[name], actual[name]) for name in expected)

    config = json.loads((whole / "config.json").read_text())
    assert config["architectures"] == ["DFlashDraftModel"] and config["block_size"] == 4
    # vLLM exposes layer inputs only: a 2-layer target offers the first layer's output alone.
    assert config["dflash_config"]["target_layer_ids"] == [0]
    assert len(expected["d2t"]) <= 200
    recipe = json.loads((whole / RECIPE_FILE).read_text())
    assert recipe["kind"] == "dflash"
    assert sum(recipe["data"]["target_generations"]["prompts_by_kind"].values()) == 4

    from dlmspec_vllm.drafters.base import TargetConditionedDrafter, TargetFeatures

    drafter = load_drafter(
        whole,
        target_vocab_size=tiny_pair.vocab_size,
        target_tokenizer=tiny_pair.target_dir,
        target_dir=tiny_pair.target_dir,
    )
    assert isinstance(drafter, TargetConditionedDrafter)
    drafter.observe("r", TargetFeatures(torch.arange(4), torch.randn(4, 64)))
    assert drafter.draft([[5, 6, 7, 8, 9]], [3], req_ids=["r"]).lengths == [3]


def test_dflash_refuses_layers_the_target_does_not_have(tiny_pair, tmp_path):
    with pytest.raises(SystemExit, match=r"0\.\.1 for this 2-layer target"):
        train_dflash(tiny_pair.target_dir, tmp_path / "out", "--target-layer-ids", "2")


@pytest.mark.vllm
def test_vllm_generates_the_answers_when_asked(tiny_pair, tmp_path):
    """--generator vllm: the target's answers come from vLLM itself (in a process of their own
    here, as the command runs vLLM in-process); the cache key and recipe say so."""
    import os
    import subprocess
    import sys

    output = tmp_path / "out"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "VLLM_CPU_KVCACHE_SPACE": "1"}
    subprocess.run(
        [
            sys.executable, "-m", "dlmspec_vllm.cli", "train-drafter",
            "--target", str(tiny_pair.target_dir), "--output", str(output),
            "--generator", "vllm", "--steps", "2", "--save-every", "2", "--layers", "1",
            "--seq-len", "24:48", "--batch-size", "2", "--gen-prompts", "4",
            "--gen-tokens", "12", "--threads", "1", "--no-progress",
        ],
        check=True, env=env, timeout=600,
    )  # fmt: skip
    with (output / "data" / "target_generations.jsonl").open() as handle:
        header = json.loads(handle.readline())
        records = [json.loads(line) for line in handle]
    assert "vllm" in header["key"]["generator"]
    assert len(records) == 4 and all(0 < len(r["output_ids"]) <= 12 for r in records)
    recipe = json.loads((output / RECIPE_FILE).read_text())
    assert "vLLM" in recipe["data"]["target_generations"]["decoding"]


def _store_for(target: Path, directory: Path, vocab_size: int) -> list[str]:
    """An answer store of 40 random answers for ``target``; returns their keys."""
    import numpy as np

    from dlmspec_vllm.targets import weights_sha256
    from dlmspec_vllm.training.answers import Answer, AnswerStore

    store = AnswerStore(directory, target_sha256=weights_sha256(target), decoding={"test": 1})
    rng = np.random.default_rng(0)
    keys = [f"t:{i}" for i in range(40)]
    for shard in range(2):
        answers = []
        for key in keys[shard * 20 : (shard + 1) * 20]:
            tokens = rng.integers(0, vocab_size, 30).astype(np.int32)
            top = rng.integers(0, vocab_size, (20, 3)).astype(np.int32)
            top[:, 0] = tokens[10:]
            logprobs = np.log(np.array([[0.6, 0.3, 0.1]] * 20)).astype(np.float16)
            answers.append(Answer(key, tokens, 10, top, logprobs))
        store.add_shard(answers, {"sources": {"t": len(answers)}})
    return keys


def test_dflash_trains_on_an_answer_store_with_soft_labels_and_the_final_norm_state(
    tiny_pair, tmp_path, capsys
):
    from dlmspec_vllm.training.answers import is_validation

    store = tmp_path / "store"
    keys = _store_for(tiny_pair.target_dir, store, tiny_pair.vocab_size)
    validation = [k for k in keys[:20] if is_validation(k)]
    assert validation, "the fixture's keys must include validation answers"
    extra = ("--answers", str(store), "--soft-labels", "0.5", "--target-layer-ids", "0,1")
    # 200 output tokens: the first shard's training answers (20 output tokens each) suffice.
    train_dflash(tiny_pair.target_dir, tmp_path / "a", *extra, "--answer-tokens", "200")
    out = capsys.readouterr().out
    assert "target features of shard-00000.npz" in out and "shard-00001" not in out
    recipe = json.loads((tmp_path / "a" / RECIPE_FILE).read_text())
    used = recipe["data"]["answer_store"]
    assert used["shards_read"] == ["shard-00000.npz"]
    assert used["training_answers"] == 10 and used["training_output_tokens"] == 200
    assert used["validation_answers"] == len(validation)
    report = recipe["validation"]
    assert report["answers"] == len(validation) and report["anchors"] == 19 * len(validation)
    assert len(report["position_acceptance"]) == 3  # block 4: three drafted positions
    assert 1.0 <= report["mean_accepted_length"]["4"] <= 4.0
    assert "0.5 x its top-k distribution" in recipe["objective"]
    config = json.loads((tmp_path / "a" / "config.json").read_text())
    assert config["dflash_config"]["target_layer_ids"] == [0, 1]

    # Features are kept in the store: a second run over all of it computes only the new shard.
    train_dflash(tiny_pair.target_dir, tmp_path / "b", *extra)
    out = capsys.readouterr().out
    assert "shard-00000" not in out and "target features of shard-00001.npz" in out
    assert json.loads((tmp_path / "b" / RECIPE_FILE).read_text())["data"]["answer_store"][
        "shards_read"
    ] == ["shard-00000.npz", "shard-00001.npz"]

    # A run stopped here resumes elsewhere (the store at another path, as on another machine)
    # and ends with the uninterrupted run's weights.
    train_dflash(tiny_pair.target_dir, tmp_path / "c", *extra, "--stop-at", "2")
    moved = tmp_path / "elsewhere"
    shutil.move(store, moved)
    elsewhere = ("--answers", str(moved), *extra[2:])
    train_dflash(tiny_pair.target_dir, tmp_path / "c", *elsewhere, "--resume")
    expected, actual = (load_file(tmp_path / d / "model.safetensors") for d in ("b", "c"))
    assert all(torch.equal(expected[name], actual[name]) for name in expected)


def test_an_answer_store_of_another_target_is_refused(tiny_pair, tmp_path):
    from dlmspec_vllm.training.answers import AnswerStore

    AnswerStore(tmp_path / "store", target_sha256="0" * 64, decoding={})
    with pytest.raises(SystemExit, match="holds answers of another target"):
        train_dflash(tiny_pair.target_dir, tmp_path / "out", "--answers", str(tmp_path / "store"))


def test_soft_label_settings_need_a_store(tiny_pair, tmp_path, capsys):
    with pytest.raises(SystemExit):
        train_dflash(tiny_pair.target_dir, tmp_path / "out", "--soft-labels", "0.5")
    assert "need --answers" in capsys.readouterr().err
