"""The benchmark's engine settings are parameters, with this machine's CPU values as defaults,
so the same benchmark runs with CUDA graphs and bfloat16 on a GPU."""

from __future__ import annotations

import ast
import sys
import sysconfig
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import run_bench  # noqa: E402

from dlmspec_harness.offline_run import BatchResult, engine_env  # noqa: E402


def engine_of(*flags: str) -> dict:
    args = run_bench.parse_args(["--target", "T", "--name", "n", "--batch-sizes", "1", *flags])
    return run_bench.engine_job(Path("T"), None, {1: ["a prompt"]}, args).engine_kwargs


def test_cpu_defaults_and_gpu_settings():
    assert engine_of()["enforce_eager"] is True and engine_of()["dtype"] == "float32"
    gpu = engine_of("--no-enforce-eager", "--dtype", "bfloat16", "--device", "cuda")
    assert gpu["enforce_eager"] is False and gpu["dtype"] == "bfloat16"


def test_only_a_cpu_engine_gets_vllm_cpus_environment(monkeypatch):
    monkeypatch.delenv("VLLM_CPU_KVCACHE_SPACE", raising=False)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    cpu = engine_env(threads=2)
    assert cpu["VLLM_CPU_KVCACHE_SPACE"] == "1" and cpu["OMP_NUM_THREADS"] == "2"
    cuda = engine_env(threads=2, device="cuda")
    assert "VLLM_CPU_KVCACHE_SPACE" not in cuda and "OMP_NUM_THREADS" not in cuda
    assert cuda["HF_HUB_OFFLINE"] == "1"


def test_a_previous_drafter_reruns_the_dlm_configurations_only(tmp_path):
    configs = run_bench.all_configs(tmp_path / "target", tmp_path / "new", tmp_path / "ar")
    previous = run_bench.with_drafter(configs, tmp_path / "old", "@previous")
    assert previous["dlm-k4@previous"] == {
        **configs["dlm-k4"],
        "draft_model": str(tmp_path / "old"),
    }
    assert "dlm-cost_aware-lookup@previous" in previous and "dlm-never@previous" in previous
    assert not any(name.startswith(("ngram", "ar-draft", "none")) for name in previous)


def test_a_dflash_drafter_gets_vllms_own_dflash_beside_dlm(tmp_path):
    drafter = tmp_path / "drafter"
    drafter.mkdir()
    (drafter / "config.json").write_text('{"architectures": ["DFlashDraftModel"], "block_size": 8}')
    configs = run_bench.all_configs(tmp_path / "target", drafter, tmp_path / "ar")
    assert configs["vllm-dflash"] == {
        "method": "dflash",
        "model": str(drafter),
        "num_speculative_tokens": 7,
    }
    assert configs["vllm-dflash-k4"]["num_speculative_tokens"] == 4


def test_the_quote_set_is_ours_and_disjoint_from_the_training_corpus():
    from quote_set import quote_prompts

    from dlmspec_vllm.training.answers import docstring_paragraphs
    from dlmspec_vllm.training.corpus import stdlib_documents

    records = run_bench.load_prompts(run_bench.HERE / "prompts.json", ["humaneval", "quote"], 3)
    assert [r["set"] for r in records] == ["humaneval", "quote"] * 3
    quoted = {p.text.split("\n\n", 1)[1] for p in quote_prompts()}
    assert len(quoted) == 40
    assert not quoted & set(docstring_paragraphs(stdlib_documents()))


def test_with_prefix_caching_each_batch_size_serves_prompts_of_its_own():
    records = [{"set": "s", "prompt": str(i)} for i in range(40)]
    rounds = run_bench.requests_per_round(records, [4, 16], 8, 2, waves=1, distinct=True)
    served = [r["prompt"] for per_round in rounds for size in (4, 16) for r in per_round[size]]
    assert len(served) == len(set(served)) == 2 * 4 + 2 * 16
    shared = run_bench.requests_per_round(records, [4, 16], 8, 2, waves=1)
    assert shared[0][4][0] == shared[0][16][0]  # without it both start at the front
    with pytest.raises(SystemExit, match="prompts of its own"):
        run_bench.requests_per_round(records[:30], [4, 16], 8, 2, waves=1, distinct=True)


def test_prefix_caching_variants_turn_the_cache_or_the_shared_prefixes_off(tmp_path):
    configs = run_bench.all_configs(tmp_path / "target", tmp_path / "drafter", tmp_path / "ar")
    variants = run_bench.prefix_cache_variants(configs)
    assert variants["none-no-prefix-cache"] is None
    assert variants["dlm-k4-no-prefix-cache"] == configs["dlm-k4"]
    assert variants["dlm-k4-unshared"]["drafting"] == {"shared_prefix_max_tokens": 0}
    assert "ngram-k4-unshared" not in variants
    args = run_bench.parse_args(
        ["--target", "T", "--name", "n", "--batch-sizes", "1", "--prefix-caching"]
    )
    prompts = {1: ["a prompt"]}
    on, _ = run_bench.engine_setup("dlm-k4", configs["dlm-k4"], prompts, args)
    off, _ = run_bench.engine_setup("dlm-k4-no-prefix-cache", configs["dlm-k4"], prompts, args)
    assert on.engine_kwargs["enable_prefix_caching"] is True
    assert off.engine_kwargs["enable_prefix_caching"] is False
    assert engine_of()["enable_prefix_caching"] is False  # the default: every engine without


def test_a_configuration_without_prefix_caching_is_compared_with_the_baseline_without_it():
    def row(tokens):
        return {"by_batch_size": [{"batch_size": 4, "token_ids": tokens}]}

    configs = {
        "none": row([[1, 2]]),
        "none-no-prefix-cache": row([[1, 3]]),
        "dlm-k4": row([[1, 2]]),
        "dlm-k4-no-prefix-cache": row([[1, 3]]),
    }
    run_bench.mark_lossless(configs)
    assert all(entry["by_batch_size"][0]["lossless"] for entry in configs.values())


def test_the_shared_system_prompt_is_one_unread_module_docstring_of_the_asked_length():
    from quote_set import shared_document

    from dlmspec_vllm.training.answers import prose_paragraphs
    from dlmspec_vllm.training.corpus import STDLIB_FILES

    def count(text: str) -> int:
        return len(text) // 4

    name, text = shared_document(count, 300)
    assert name not in STDLIB_FILES and not name.startswith("_")
    paragraphs = text.split("\n\n")
    assert count(text) >= 300 > count("\n\n".join(paragraphs[:-1]))
    source = Path(sysconfig.get_paths()["stdlib"]) / name
    docstring = ast.get_docstring(ast.parse(source.read_text(encoding="utf-8")))
    assert paragraphs == prose_paragraphs(docstring or "")[: len(paragraphs)]


def test_a_system_message_begins_every_chat_prompt_and_needs_chat():
    from dlmspec_harness.offline_run import Batch, _prompts

    class Tokenizer:
        def apply_chat_template(self, messages, tokenize, add_generation_prompt):
            return repr(messages)

    class Engine:
        def get_tokenizer(self):
            return Tokenizer()

    batch = Batch(prompts=["a", "b"], chat=True, system="the document")
    first, second = (ast.literal_eval(p) for p in _prompts(Engine(), batch))
    assert first == [
        {"role": "system", "content": "the document"},
        {"role": "user", "content": "a"},
    ]
    assert second[0] == first[0] and second[1]["content"] == "b"
    with pytest.raises(ValueError, match="chat=True"):
        _prompts(Engine(), Batch(prompts=["a"], system="the document"))


def test_engine_steps_are_summed_by_kind_over_a_batch_sizes_batches():
    def batch(steps: dict[str, list[float]]) -> BatchResult:
        return BatchResult(
            token_ids=[], texts=[], seconds=1.0, generated_tokens=0, engine_steps=steps
        )

    summed = run_bench.engine_steps(
        [
            batch({"first_token": [2, 0.5], "decode": [10, 1.0]}),
            batch({"first_token": [1, 0.25], "decode": [30, 2.0]}),
        ]
    )
    assert summed == {
        "first_token": {"steps": 3, "seconds": 0.75, "ms_per_step": 250.0},
        "decode": {"steps": 40, "seconds": 3.0, "ms_per_step": 75.0},
    }
    assert run_bench.engine_steps([batch({})]) is None  # LLM.generate counts no steps
