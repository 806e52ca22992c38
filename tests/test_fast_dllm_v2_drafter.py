"""The Fast-dLLM v2 drafter: released layout, block-causal attention, shifted logits, batching.

The tiny checkpoint (fixtures/tiny_drafters.py) holds the tiny pair's drafter weights under a
Fast-dLLM v2 config.json and the pair's tokenizer.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from fixtures.tiny_drafters import TinyDrafter, heldout_ids, ragged_contexts
from safetensors.torch import load_file
from transformers import Qwen2Config, Qwen2ForCausalLM

from dlmspec_harness.tiny_pair import TinyPair
from dlmspec_vllm.drafters.fast_dllm_v2 import FastDllmV2Config, FastDllmV2Drafter
from dlmspec_vllm.drafters.loading import DrafterLoadError, load_drafter

NEG_INF = float("-inf")


@pytest.fixture(scope="module")
def drafter(tiny_fast_dllm: TinyDrafter, tiny_pair: TinyPair) -> FastDllmV2Drafter:
    loaded = load_drafter(tiny_fast_dllm.path, target_vocab_size=tiny_pair.vocab_size)
    assert isinstance(loaded, FastDllmV2Drafter)
    return loaded


@pytest.fixture(scope="module")
def ids(tiny_pair: TinyPair) -> list[int]:
    return heldout_ids(tiny_pair.target_dir)


def block_causal_logits(drafter: FastDllmV2Drafter, sequence: list[int]) -> torch.Tensor:
    """transformers' Qwen2 with the same weights and Fast-dLLM v2's mask, as a reference."""
    config = drafter.model.config
    qwen = Qwen2ForCausalLM(
        Qwen2Config(
            vocab_size=config.vocab_size,
            hidden_size=config.hidden_size,
            intermediate_size=config.intermediate_size,
            num_hidden_layers=config.num_hidden_layers,
            num_attention_heads=config.num_attention_heads,
            num_key_value_heads=config.num_key_value_heads,
            rms_norm_eps=config.rms_norm_eps,
            rope_theta=config.rope_theta,
            tie_word_embeddings=False,
        )
    ).eval()
    qwen.load_state_dict(drafter.model.state_dict())
    blocks = torch.arange(len(sequence)) // config.bd_size
    mask = (blocks[None, :] <= blocks[:, None])[None, None]
    with torch.no_grad():
        return qwen(input_ids=torch.tensor([sequence]), attention_mask=mask).logits[0]


def test_checkpoint_is_laid_out_like_the_released_one(tiny_fast_dllm: TinyDrafter) -> None:
    config = json.loads((tiny_fast_dllm.path / "config.json").read_text())
    assert config["model_type"] == "Fast_dLLM_Qwen"
    assert config["architectures"] == ["Fast_dLLM_QwenForCausalLM"]
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling.Fast_dLLM_QwenForCausalLM"
    assert config["bd_size"] == 32
    names = set(load_file(tiny_fast_dllm.path / "model.safetensors"))
    assert {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"} <= names
    assert "model.layers.1.self_attn.q_proj.bias" in names
    assert "model.layers.1.mlp.gate_proj.weight" in names


def test_block_causal_attention_and_shifted_logits_match_qwen2_with_its_mask(
    drafter: FastDllmV2Drafter, ids: list[int]
) -> None:
    """Drafted position j is the reference's output at len(context) + j - 1, the reference being
    Qwen2 where a token sees its own 32-token block and earlier ones; the draft crosses a block
    boundary."""
    context, n = ids[200:250], 20
    block = drafter.draft([context], [n])
    reference = block_causal_logits(drafter, context + [drafter.mask_token_id] * n)
    expected = reference[len(context) - 1 : len(context) - 1 + n].clone()
    expected[:, drafter.mask_token_id] = NEG_INF
    torch.testing.assert_close(block.logits[0], expected, atol=1e-4, rtol=1e-4)


def test_ragged_batch_equals_one_request_at_a_time(
    drafter: FastDllmV2Drafter, ids: list[int]
) -> None:
    contexts = ragged_contexts(ids, 5)
    lengths = [8, 3, 0, 17, 40]
    batched = drafter.draft(contexts, lengths)
    assert batched.logits.shape == (5, 40, drafter.target_vocab_size)
    assert [len(row) for row in batched.argmax_tokens()] == lengths
    assert torch.isneginf(batched.logits[2]).all() and torch.isneginf(batched.logits[1, 3:]).all()
    for b, (context, n) in enumerate(zip(contexts, lengths, strict=True)):
        alone = drafter.draft([context], [n])
        torch.testing.assert_close(batched.logits[b, :n], alone.logits[0], atol=1e-4, rtol=1e-4)


def test_mask_id_is_read_from_config_or_defaults_to_151665(
    tiny_fast_dllm: TinyDrafter, tmp_path: Path
) -> None:
    config = json.loads((tiny_fast_dllm.path / "config.json").read_text())
    assert FastDllmV2Config.from_dict(config).mask_token_id == tiny_fast_dllm.mask_token_id
    released = {**config, "vocab_size": 151936, "hidden_size": 1536, "num_attention_heads": 12}
    del released["mask_token_id"]
    assert FastDllmV2Config.from_dict(released).mask_token_id == 151665
    # Without the field a tiny vocabulary cannot hold the default: a clear error, not a crash.
    del config["mask_token_id"]
    shutil.copy(tiny_fast_dllm.path / "model.safetensors", tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(DrafterLoadError, match="mask_token_id 151665 is outside its vocabulary"):
        load_drafter(tmp_path, target_vocab_size=1024)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"use_sliding_window": True}, "sliding-window attention is not supported"),
        ({"bd_size": 12}, "not a multiple of its 8-token sub-blocks"),
        ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "RoPE scaling"),
    ],
)
def test_settings_it_would_ignore_are_refused(
    tiny_fast_dllm: TinyDrafter, change: dict, message: str
) -> None:
    config = json.loads((tiny_fast_dllm.path / "config.json").read_text())
    with pytest.raises(DrafterLoadError, match=message):
        FastDllmV2Config.from_dict({**config, **change})
