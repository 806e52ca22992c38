"""The benchmark's engine settings are parameters, with this machine's CPU values as defaults,
so the same benchmark runs with CUDA graphs and bfloat16 on a GPU."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import run_bench  # noqa: E402

from dlmspec_harness.offline_run import engine_env  # noqa: E402


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
