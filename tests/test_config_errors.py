"""Every bad `dlm` setting fails while vLLM builds its config, before any engine starts,
with a message that names the setting."""

from __future__ import annotations

import json
import shutil

import pytest

from dlmspec_vllm.config import DlmConfigError, DlmSpeculativeConfig
from dlmspec_vllm.drafters.loading import DrafterLoadError


def build_config(tiny_pair, speculative_config, **engine_kwargs):
    from vllm.engine.arg_utils import EngineArgs

    args = EngineArgs(
        model=str(tiny_pair.target_dir),
        speculative_config=speculative_config,
        max_model_len=256,
        enforce_eager=True,
        dtype="float32",
        **engine_kwargs,
    )
    return args.create_engine_config()


def dlm(tiny_pair, **overrides):
    return {
        "method": "dlm",
        "draft_model": str(tiny_pair.drafter_dir),
        "num_speculative_tokens": 4,
        **overrides,
    }


def test_valid_config_becomes_our_proposer_with_settings_attached(tiny_pair):
    from dlmspec_vllm.integration.speculative_config import attached_settings

    config = build_config(tiny_pair, dlm(tiny_pair, draft_dtype="float32"))
    spec = config.speculative_config
    assert spec.method == "custom_class"
    assert spec.model == "dlmspec_vllm.proposer.DlmProposer"
    assert spec.num_speculative_tokens == 4
    settings = attached_settings(spec)
    assert settings == DlmSpeculativeConfig(
        draft_model=str(tiny_pair.drafter_dir), num_speculative_tokens=4, draft_dtype="float32"
    )


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        ({"bogus": 1}, "unknown field 'bogus'"),
        ({"num_speculative_tokens": 0}, "field 'num_speculative_tokens'"),
        ({"num_speculative_tokens": 129}, "field 'num_speculative_tokens'"),
        ({"draft_dtype": "int8"}, "field 'draft_dtype'"),
        ({"max_draft_context": -5}, "field 'max_draft_context'"),
        (
            {"context_lookup": {"min_ngram": 5, "max_ngram": 3}},
            r"context_lookup.min_ngram \(5\) is above context_lookup.max_ngram \(3\)",
        ),
        ({"context_lookup": {"max_ngram": 0}}, "field 'context_lookup.max_ngram'"),
    ],
)
def test_bad_values_name_the_field(tiny_pair, overrides, expected):
    with pytest.raises(DlmConfigError, match=expected):
        build_config(tiny_pair, dlm(tiny_pair, **overrides))


def test_missing_draft_model(tiny_pair):
    with pytest.raises(DlmConfigError, match="field 'draft_model' is required"):
        build_config(tiny_pair, {"method": "dlm", "num_speculative_tokens": 4})


def test_draft_model_that_does_not_exist(tiny_pair, tmp_path):
    with pytest.raises(DrafterLoadError, match="draft_model path .* does not exist"):
        build_config(tiny_pair, dlm(tiny_pair, draft_model=str(tmp_path / "nowhere")))


def test_autoregressive_checkpoint_is_not_a_drafter(tiny_pair):
    with pytest.raises(DrafterLoadError, match="autoregressive model.*diffusion"):
        build_config(tiny_pair, dlm(tiny_pair, draft_model=str(tiny_pair.target_dir)))


def test_drafter_without_weights(tiny_pair, tmp_path):
    broken = tmp_path / "drafter"
    shutil.copytree(tiny_pair.drafter_dir, broken)
    (broken / "model.safetensors").unlink()
    with pytest.raises(DrafterLoadError, match="has no weights"):
        build_config(tiny_pair, dlm(tiny_pair, draft_model=str(broken)))


def copy_drafter_with_tokenizer_edit(tiny_pair, tmp_path, edit) -> str:
    other = tmp_path / "drafter"
    shutil.copytree(tiny_pair.drafter_dir, other)
    tokenizer_file = other / "tokenizer.json"
    tokenizer = json.loads(tokenizer_file.read_text())
    edit(tokenizer)
    tokenizer_file.write_text(json.dumps(tokenizer))
    for stale in ("vocab.json", "merges.txt"):
        (other / stale).unlink(missing_ok=True)
    return str(other)


def swap_two_ids(tokenizer):
    vocab = tokenizer["model"]["vocab"]
    first, second = sorted(vocab, key=vocab.get)[300:302]
    vocab[first], vocab[second] = vocab[second], vocab[first]


def test_drafter_with_other_token_ids_is_bridged(tiny_pair, tmp_path, caplog):
    """Two regular tokens swap ids: text still round-trips, so the vocabulary bridge serves."""
    other = copy_drafter_with_tokenizer_edit(tiny_pair, tmp_path, swap_two_ids)
    config = build_config(tiny_pair, dlm(tiny_pair, draft_model=other))
    assert config.speculative_config.method == "custom_class"
    assert "vocabulary bridge" in caplog.text


def test_drafter_whose_tokenizer_cannot_carry_the_text(tiny_pair, tmp_path):
    """Other ids behind a lower-casing normalizer: ids cannot be shared and "Hello" comes back
    as "hello", so no bridge can work either; refused before the engine starts."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    other = tmp_path / "drafter"
    shutil.copytree(tiny_pair.drafter_dir, other)
    spec = json.loads((other / "tokenizer.json").read_text())
    swap_two_ids(spec)
    spec["normalizer"] = {"type": "Lowercase"}
    lossy = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(json.dumps(spec)), eos_token="<|endoftext|>"
    )
    lossy.save_pretrained(other)
    with pytest.raises(DlmConfigError, match="cannot reproduce the target's text"):
        build_config(tiny_pair, dlm(tiny_pair, draft_model=str(other)))


def test_other_methods_pass_through_untouched(tiny_pair):
    config = build_config(
        tiny_pair, {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 2}
    )
    assert config.speculative_config.method == "ngram"


def test_custom_class_settings_come_from_the_environment(monkeypatch, tiny_pair):
    monkeypatch.delenv("DLMSPEC_CONFIG", raising=False)
    with pytest.raises(DlmConfigError, match="DLMSPEC_CONFIG, which is not set"):
        DlmSpeculativeConfig.from_environment(4)
    monkeypatch.setenv("DLMSPEC_CONFIG", json.dumps({"draft_model": "x", "bogus": 1}))
    with pytest.raises(DlmConfigError, match="unknown field 'bogus'"):
        DlmSpeculativeConfig.from_environment(4)
    monkeypatch.setenv(
        "DLMSPEC_CONFIG", json.dumps({"draft_model": "x", "num_speculative_tokens": 8})
    )
    with pytest.raises(DlmConfigError, match="give it in one place"):
        DlmSpeculativeConfig.from_environment(4)
    monkeypatch.setenv("DLMSPEC_CONFIG", json.dumps({"draft_model": "x"}))
    assert DlmSpeculativeConfig.from_environment(4).num_speculative_tokens == 4


@pytest.mark.parametrize("value", ["1", "2", "01"])
def test_forcing_the_v2_model_runner_is_refused_in_every_spelling(monkeypatch, tiny_pair, value):
    """vLLM reads the variable with int(): whatever it takes as V2 is refused."""
    monkeypatch.setenv("VLLM_USE_V2_MODEL_RUNNER", value)
    with pytest.raises(DlmConfigError, match=f"V1 model runner.*VLLM_USE_V2_MODEL_RUNNER={value}"):
        build_config(tiny_pair, dlm(tiny_pair))


def test_a_v2_runner_setting_vllm_cannot_read_is_named(monkeypatch, tiny_pair):
    monkeypatch.setenv("VLLM_USE_V2_MODEL_RUNNER", "true")
    with pytest.raises(DlmConfigError, match="VLLM_USE_V2_MODEL_RUNNER='true' is not an integer"):
        build_config(tiny_pair, dlm(tiny_pair))


@pytest.mark.parametrize("value", ["0", "00"])
def test_the_v1_model_runner_asked_for_explicitly_is_accepted(monkeypatch, tiny_pair, value):
    monkeypatch.setenv("VLLM_USE_V2_MODEL_RUNNER", value)
    assert build_config(tiny_pair, dlm(tiny_pair)).speculative_config.method == "custom_class"


def test_watermarking_which_makes_vllm_pick_the_v2_runner_is_refused(tiny_pair):
    with pytest.raises(DlmConfigError, match="--watermark-config makes vLLM use its V2"):
        build_config(tiny_pair, dlm(tiny_pair), watermark_config={"key": 1})


def test_the_short_flags_build_a_dlm_config(tiny_pair):
    from dlmspec_vllm.integration.speculative_config import attached_settings

    config = build_config(
        tiny_pair, None, spec_method="dlm", spec_model=str(tiny_pair.drafter_dir), spec_tokens=3
    )
    settings = attached_settings(config.speculative_config)
    assert settings.draft_model == str(tiny_pair.drafter_dir)
    assert settings.num_speculative_tokens == config.speculative_config.num_speculative_tokens == 3
    # Beside a dlm JSON, a flag fills what the JSON leaves out.
    partial = {"method": "dlm", "draft_model": str(tiny_pair.drafter_dir)}
    config = build_config(tiny_pair, partial, spec_tokens=5)
    assert attached_settings(config.speculative_config).num_speculative_tokens == 5


def test_a_short_flag_and_the_same_setting_in_the_json_are_refused_together(tiny_pair):
    with pytest.raises(DlmConfigError, match="--spec-tokens and --speculative-config's"):
        build_config(tiny_pair, dlm(tiny_pair), spec_tokens=5)
    with pytest.raises(DlmConfigError, match="--spec-model and .*'draft_model'"):
        build_config(tiny_pair, dlm(tiny_pair), spec_model="elsewhere")


@pytest.mark.parametrize("speculative", ["dlm", "custom_class", "custom_class flags"])
def test_pipeline_parallelism_is_refused_naming_the_setting_and_the_fix(
    monkeypatch, tiny_pair, speculative
):
    """vLLM 0.32 builds proposers only on the last pipeline stage and then fails on the other
    stages with an AttributeError; we refuse before that, with the setting and the fix."""
    if speculative == "dlm":
        spec = dlm(tiny_pair)
    else:
        monkeypatch.setenv(
            "DLMSPEC_CONFIG", json.dumps({"draft_model": str(tiny_pair.drafter_dir)})
        )
        spec = {
            "method": "custom_class",
            "model": "dlmspec_vllm.proposer.DlmProposer",
            "num_speculative_tokens": 4,
        }
    flags = {}
    if speculative == "custom_class flags":
        spec, flags = None, {"spec_method": "custom_class", "spec_model": spec["model"]}
        flags["spec_tokens"] = 4
    with pytest.raises(DlmConfigError) as refused:
        build_config(tiny_pair, spec, pipeline_parallel_size=2, **flags)
    message = str(refused.value)
    assert "pipeline_parallel_size=2" in message
    assert "--pipeline-parallel-size 1" in message
    assert "--tensor-parallel-size" in message


def test_data_parallel_replicas_are_accepted(tiny_pair):
    """Each data-parallel replica is an engine of its own with its own proposer (served and
    checked for lossless output in test_vllm_parallel.py)."""
    config = build_config(tiny_pair, dlm(tiny_pair), data_parallel_size=2)
    assert config.parallel_config.data_parallel_size == 2
    assert config.speculative_config.method == "custom_class"
