"""Every ready --speculative-config in configs/ is valid for the `dlm` method as shipped.

Files are named <target>__<drafter>.json and name the drafter by its Hugging Face id (resolved
from the local Hugging Face cache at start-up; its existence is not checked here).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dlmspec_vllm.config import DlmSpeculativeConfig

CONFIGS = Path(__file__).parents[1] / "configs"
DRAFTERS = {
    "qwen2.5-7b-instruct__dream-v0-instruct-7b.json": "Dream-org/Dream-v0-Instruct-7B",
    "qwen2.5-7b-instruct__fast-dllm-v2-1.5b.json": "Efficient-Large-Model/Fast_dLLM_v2_1.5B",
    "qwen2.5-7b-instruct__llada-8b-instruct.json": "GSAI-ML/LLaDA-8B-Instruct",
}


def test_every_real_pairing_has_a_config() -> None:
    assert set(DRAFTERS) <= {path.name for path in CONFIGS.glob("*.json")}


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.json")), ids=lambda p: p.stem)
def test_config_validates_for_the_dlm_method(path: Path) -> None:
    raw = json.loads(path.read_text())
    settings = DlmSpeculativeConfig.model_validate(raw)
    assert settings.method == "dlm"
    assert "__" in path.stem, "name configs <target>__<drafter>.json"
    if path.name in DRAFTERS:
        assert settings.draft_model == DRAFTERS[path.name]
