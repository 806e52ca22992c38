"""Let vLLM's `--speculative-config` accept `"method": "dlm"`.

vLLM has no proposer registry and its SpeculativeConfig forbids unknown methods and keys.
Its `custom_class` method does load a proposer class by path, so the `dlm` JSON is validated
by our own pydantic model and handed to vLLM as `custom_class` pointing at our proposer,
with the validated settings attached to the resulting config object (they travel with it
to the engine-core and worker processes).
"""

from __future__ import annotations

import os
from typing import Any

from vllm.engine.arg_utils import EngineArgs

from dlmspec_vllm.config import (
    METHOD_NAME,
    PROPOSER_CLASS_PATH,
    DlmConfigError,
    DlmSpeculativeConfig,
)
from dlmspec_vllm.integration.metrics import attach_metrics_dir
from dlmspec_vllm.integration.patching import MethodPatch
from dlmspec_vllm.pairing import check_drafter_pairing

SETTINGS_ATTRIBUTE = "dlmspec_settings"


def attached_settings(speculative_config: Any) -> DlmSpeculativeConfig | None:
    raw = getattr(speculative_config, SETTINGS_ATTRIBUTE, None)
    return None if raw is None else DlmSpeculativeConfig.model_validate_json(raw)


class EngineArgsSpeculativeConfigPatch(MethodPatch):
    target = EngineArgs
    methods = ("create_speculative_config",)
    expected_parameters = {
        "create_speculative_config": ("self", "target_model_config", "target_parallel_config"),
    }

    def create_speculative_config(self: Any, target_model_config, target_parallel_config):
        original = EngineArgsSpeculativeConfigPatch.original("create_speculative_config")
        given = self.speculative_config
        raw = _with_short_flags(self)
        if not (_names_our_method(raw) or _names_our_proposer(raw)):
            return original(self, target_model_config, target_parallel_config)
        check_v1_runner(self)
        check_parallel_layout(target_parallel_config)
        # vLLM would merge the short flags again; the merged dict stands for them here.
        short_flags = self.spec_method, self.spec_model, self.spec_tokens
        self.spec_method = self.spec_model = self.spec_tokens = None
        try:
            if _names_our_proposer(raw):
                self.speculative_config = raw
                config = original(self, target_model_config, target_parallel_config)
            else:
                config = _create_dlm_config(self, raw, target_model_config, target_parallel_config)
            attach_metrics_dir(config)
            return config
        finally:
            self.speculative_config = given
            self.spec_method, self.spec_model, self.spec_tokens = short_flags


def _create_dlm_config(
    engine_args: Any, raw: dict, target_model_config: Any, target_parallel_config: Any
) -> Any:
    """vLLM's speculative config for the dlm method: custom_class pointing at our proposer,
    our validated settings attached."""
    original = EngineArgsSpeculativeConfigPatch.original("create_speculative_config")
    settings = DlmSpeculativeConfig.from_user_dict(
        {key.replace("-", "_"): value for key, value in raw.items()}
    )
    check_drafter_pairing(
        settings.draft_model,
        target_tokenizer=target_model_config.tokenizer,
        trust_remote_code=target_model_config.trust_remote_code,
    )
    # EngineArgs may build its config more than once: the caller restores the user's dict.
    engine_args.speculative_config = {
        "method": "custom_class",
        "model": PROPOSER_CLASS_PATH,
        "num_speculative_tokens": settings.num_speculative_tokens,
    }
    speculative_config = original(engine_args, target_model_config, target_parallel_config)
    object.__setattr__(speculative_config, SETTINGS_ATTRIBUTE, settings.model_dump_json())
    return speculative_config


def _with_short_flags(engine_args: Any) -> Any:
    """The speculative config with vLLM's short flags (--spec-method, --spec-model,
    --spec-tokens) merged in by vLLM's rule: a flag and the same key in --speculative-config
    are refused together. For the dlm method --spec-model names the drafter (draft_model)."""
    raw = engine_args.speculative_config
    flags = (
        ("--spec-method", "method", engine_args.spec_method),
        ("--spec-model", "model", engine_args.spec_model),
        ("--spec-tokens", "num_speculative_tokens", engine_args.spec_tokens),
    )
    if all(value is None for _, _, value in flags):
        return raw
    merged = dict(raw) if isinstance(raw, dict) else {}
    method = merged.get("method", engine_args.spec_method)
    for flag, key, value in flags:
        if value is None:
            continue
        if key == "model" and method == METHOD_NAME:
            key = "draft_model"
        if key in merged:
            raise DlmConfigError(
                f"{flag} and --speculative-config's {key!r} both give the {key}: give it once "
                "(in --speculative-config, or with the flag alone)."
            )
        merged[key] = value
    return merged


def check_v1_runner(engine_args: Any) -> None:
    """Refuse every setting that makes vLLM run its V2 model runner, which has no
    custom_class proposers (it fails at worker start with NotImplementedError); by default
    vLLM picks V1 for custom_class."""
    import vllm.envs as envs

    route = None
    given = os.environ.get("VLLM_USE_V2_MODEL_RUNNER")
    try:
        forced = envs.VLLM_USE_V2_MODEL_RUNNER  # vLLM's own parse (an int): every spelling
    except ValueError:
        raise DlmConfigError(
            f"VLLM_USE_V2_MODEL_RUNNER={given!r} is not an integer, which is how vLLM reads it; "
            "method 'dlm' runs on the V1 model runner: unset it (or set it to 0)."
        ) from None
    if forced:
        route, fix = f"VLLM_USE_V2_MODEL_RUNNER={given}", "unset it (or set it to 0)"
    elif getattr(engine_args, "watermark_config", None) is not None:
        route, fix = "--watermark-config", "serve without watermarking"
    elif _hisparse_config(getattr(engine_args, "attention_config", None)) is not None:
        route, fix = "HiSparse attention (attention_config.hisparse_config)", "turn it off"
    if route is not None:
        raise DlmConfigError(
            f"method 'dlm' runs on vLLM's V1 model runner, but {route} makes vLLM use its V2 "
            f"model runner, which cannot run a dlm proposer: {fix}."
        )


def _hisparse_config(attention_config: Any) -> Any:
    if isinstance(attention_config, dict):
        return attention_config.get("hisparse_config")
    return getattr(attention_config, "hisparse_config", None)


def check_parallel_layout(parallel_config: Any) -> None:
    """Refuse the parallel layouts the dlm method does not run on, naming the setting and the fix.

    Tensor parallelism works (every rank drafts with its own drafter copy) and so do
    data-parallel replicas (independent engines, each with its own proposer). Pipeline
    parallelism does not: vLLM builds speculative proposers only on the last pipeline stage,
    and vLLM 0.32's V1 runner then fails on the other stages while it allocates the KV cache
    (`'CPUModelRunner' object has no attribute 'drafter'`), for every speculative method.
    """
    stages = getattr(parallel_config, "pipeline_parallel_size", 1) or 1
    if stages > 1:
        raise DlmConfigError(
            f"method 'dlm' does not support pipeline parallelism (pipeline_parallel_size="
            f"{stages}): vLLM drafts only on the last pipeline stage, and its V1 runner fails "
            "to start a speculative method with pipeline_parallel_size > 1. Set "
            "pipeline_parallel_size to 1 (--pipeline-parallel-size 1) and shard the target with "
            "tensor_parallel_size (--tensor-parallel-size N) instead; data-parallel replicas "
            "(--data-parallel-size N) also work."
        )


def _names_our_method(raw: Any) -> bool:
    return isinstance(raw, dict) and raw.get("method") == METHOD_NAME


def _names_our_proposer(raw: Any) -> bool:
    return (
        isinstance(raw, dict)
        and raw.get("method") == "custom_class"
        and raw.get("model") == PROPOSER_CLASS_PATH
    )
