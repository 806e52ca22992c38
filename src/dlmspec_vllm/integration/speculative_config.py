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

    def create_speculative_config(self, target_model_config, target_parallel_config):
        original = EngineArgsSpeculativeConfigPatch.original("create_speculative_config")
        raw = self.speculative_config
        if not (isinstance(raw, dict) and raw.get("method") == METHOD_NAME):
            if _names_our_proposer(raw):
                # vLLM's own custom_class hook pointed at our proposer: same layouts refused.
                check_parallel_layout(target_parallel_config)
            return original(self, target_model_config, target_parallel_config)

        if os.environ.get("VLLM_USE_V2_MODEL_RUNNER", "").lower() in ("1", "true"):
            # vLLM's V2 runner has no custom_class proposers; by default vLLM picks V1 for it.
            raise DlmConfigError(
                "method 'dlm' runs on vLLM's V1 model runner, but VLLM_USE_V2_MODEL_RUNNER=1 "
                "forces V2: unset it (or set it to 0)."
            )
        check_parallel_layout(target_parallel_config)
        settings = DlmSpeculativeConfig.from_user_dict(
            {key.replace("-", "_"): value for key, value in raw.items()}
        )
        check_drafter_pairing(
            settings.draft_model,
            target_tokenizer=target_model_config.tokenizer,
            trust_remote_code=target_model_config.trust_remote_code,
        )
        # EngineArgs may build its config more than once; keep the user's dict as given.
        self.speculative_config = {
            "method": "custom_class",
            "model": PROPOSER_CLASS_PATH,
            "num_speculative_tokens": settings.num_speculative_tokens,
        }
        try:
            speculative_config = original(self, target_model_config, target_parallel_config)
        finally:
            self.speculative_config = raw
        object.__setattr__(speculative_config, SETTINGS_ATTRIBUTE, settings.model_dump_json())
        return speculative_config


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


def _names_our_proposer(raw: Any) -> bool:
    return (
        isinstance(raw, dict)
        and raw.get("method") == "custom_class"
        and raw.get("model") == PROPOSER_CLASS_PATH
    )
