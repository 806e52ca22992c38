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


def test_demo_pair_drafter_ships_with_the_repository() -> None:
    """`make demo` serves SmolLM2 with the DFlash drafter in demo-pair/: it must be there, be a
    DFlash checkpoint readable for SmolLM2's 30 layers, and stay small enough to commit."""
    from dlmspec_harness.demo import demo_speculative_config
    from dlmspec_vllm.drafters.loading import describe_checkpoint

    config = demo_speculative_config()
    drafter = Path(config["draft_model"])
    assert describe_checkpoint(drafter) == "dlmspec_vllm.drafters.dflash:DFlashDrafter"
    layout = json.loads((drafter / "config.json").read_text())
    assert max(layout["dflash_config"]["target_layer_ids"]) <= 30 - 1
    assert sum(f.stat().st_size for f in drafter.iterdir()) <= 20 * 2**20
    recipe = json.loads((drafter / "training_recipe.json").read_text())
    assert recipe["kind"] == "dflash" and recipe["data"]["answer_store"]["training_answers"] > 0
