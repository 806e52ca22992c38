"""Every bad `dlm` setting fails while vLLM builds its config, before any engine starts,
with a message that names the setting."""

from __future__ import annotations

import json
import shutil

import pytest

from dlmspec_vllm.config import DlmConfigError, DlmSpeculativeConfig
from dlmspec_vllm.drafters.checkpoint import resolve_checkpoint_dir
from dlmspec_vllm.drafters.loading import DrafterLoadError, DraftVocabulary


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
        (
            {"drafting": {"shared_prefix_max_tokens": -1}},
            "field 'drafting.shared_prefix_max_tokens'",
        ),
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


def copy_drafter_with_lossy_tokenizer(tiny_pair, tmp_path) -> str:
    """Other ids behind a lower-casing normalizer: ids cannot be shared and "Hello" comes back
    as "hello", so no bridge can work either."""
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
    return str(other)


def test_drafter_whose_tokenizer_cannot_carry_the_text(tiny_pair, tmp_path):
    """Refused before the engine starts."""
    lossy = copy_drafter_with_lossy_tokenizer(tiny_pair, tmp_path)
    with pytest.raises(DlmConfigError, match="cannot reproduce the target's text"):
        build_config(tiny_pair, dlm(tiny_pair, draft_model=lossy))


def copy_drafter_without_tokenizer(tiny_pair, tmp_path) -> str:
    other = tmp_path / "drafter"
    shutil.copytree(tiny_pair.drafter_dir, other, ignore=shutil.ignore_patterns("*token*"))
    return str(other)


def untrained_dflash_drafter(tiny_pair, tmp_path) -> str:
    """A DFlash checkpoint for the pair's target: it reads the target's embeddings and head,
    so it ships no tokenizer."""
    from dlmspec_vllm.drafters.dflash import DFlashConfig, DFlashNetwork, save_dflash_network

    config = DFlashConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=32,
        rms_norm_eps=1e-6,
        rope_theta=10000.0,
        block_size=4,
        mask_token_id=tiny_pair.mask_token_id,
        target_layer_ids=(0,),
        num_target_layers=2,
        target_hidden_size=64,
        vocab_size=tiny_pair.vocab_size,
    )
    save_dflash_network(DFlashNetwork(config), tmp_path / "drafter")
    return str(tmp_path / "drafter")


# Each kind of pairing among the test checkpoints: its draft_model, and how it must pair.
PAIRINGS = {
    "Dream, the target's tokenizer": DraftVocabulary.SHARED_TOKENIZER,
    "LLaDA, a tokenizer of its own": DraftVocabulary.BRIDGED,
    "DFlash, the target's weights": DraftVocabulary.TARGET_WEIGHTS,
    "a tokenizer that loses text": DraftVocabulary.UNPAIRABLE,
    "no tokenizer": DraftVocabulary.UNPAIRABLE,
}


def drafter_of_pairing(pairing, tiny_pair, tiny_llada, tmp_path) -> str:
    if pairing == "Dream, the target's tokenizer":
        return str(tiny_pair.drafter_dir)
    if pairing == "LLaDA, a tokenizer of its own":
        return str(tiny_llada.path)
    if pairing == "DFlash, the target's weights":
        return untrained_dflash_drafter(tiny_pair, tmp_path)
    if pairing == "a tokenizer that loses text":
        return copy_drafter_with_lossy_tokenizer(tiny_pair, tmp_path)
    return copy_drafter_without_tokenizer(tiny_pair, tmp_path)


@pytest.mark.parametrize("pairing", PAIRINGS)
def test_the_front_end_and_the_worker_pair_by_one_plan(
    tiny_pair, tiny_llada, tmp_path, monkeypatch, pairing
):
    """The engine-config check and the worker's load_drafter each take plan_pairing's plan,
    the same one, and act on it: a second rule in either would fail here."""
    from dlmspec_vllm import pairing as front_end
    from dlmspec_vllm.drafters import loading
    from dlmspec_vllm.drafters.bridge import BridgedDrafter

    draft_model = drafter_of_pairing(pairing, tiny_pair, tiny_llada, tmp_path)
    vocabulary = PAIRINGS[pairing]
    plans = []

    def recorded_plan(*args, **kwargs):
        plans.append(plan_pairing(*args, **kwargs))
        return plans[-1]

    plan_pairing = loading.plan_pairing
    monkeypatch.setattr(loading, "plan_pairing", recorded_plan)
    monkeypatch.setattr(front_end, "plan_pairing", recorded_plan)

    front_end_refusal = worker_refusal = drafter = None
    try:
        build_config(tiny_pair, dlm(tiny_pair, draft_model=draft_model))
    except DlmConfigError as refused:
        front_end_refusal = str(refused)
    front_end_plans, plans = plans, []
    # As the proposer loads it: vLLM's model config names the target's directory for both.
    try:
        drafter = loading.load_drafter(
            resolve_checkpoint_dir(draft_model),
            target_vocab_size=tiny_pair.vocab_size,
            target_tokenizer=str(tiny_pair.target_dir),
            target_dir=str(tiny_pair.target_dir),
        )
    except DrafterLoadError as refused:
        worker_refusal = str(refused)

    (plan,) = plans
    assert front_end_plans and all(planned == plan for planned in front_end_plans)
    assert plan.vocabulary is vocabulary
    assert front_end_refusal == worker_refusal == plan.refusal
    assert (plan.refusal is None) == (vocabulary is not DraftVocabulary.UNPAIRABLE)
    assert isinstance(drafter, BridgedDrafter) == (vocabulary is DraftVocabulary.BRIDGED)


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
