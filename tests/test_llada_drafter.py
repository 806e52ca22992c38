"""The LLaDA drafter: released layout, LLaMA arithmetic with bidirectional attention, unshifted
logits, batching, config reading.

The tiny checkpoint (fixtures/tiny_drafters.py) has random weights and a tokenizer of its own.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from fixtures.tiny_drafters import TinyDrafter, build_tiny_llada, heldout_ids, ragged_contexts
from safetensors.torch import load_file
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from dlmspec_vllm.drafters.llada import LLaDAConfig, LLaDADrafter, LLaDAModel
from dlmspec_vllm.drafters.loading import DrafterLoadError, load_drafter

NEG_INF = float("-inf")
# Tensor names of one block, as in LLaDA-8B-Instruct's model.safetensors.index.json.
BLOCK_TENSORS = (
    "attn_norm",
    "q_proj",
    "k_proj",
    "v_proj",
    "attn_out",
    "ff_norm",
    "ff_proj",
    "up_proj",
    "ff_out",
)


@pytest.fixture(scope="module")
def drafter(tiny_llada: TinyDrafter) -> LLaDADrafter:
    loaded = load_drafter(tiny_llada.path, target_vocab_size=tiny_llada.vocab_size)
    assert isinstance(loaded, LLaDADrafter)
    return loaded


@pytest.fixture(scope="module")
def ids(tiny_llada: TinyDrafter) -> list[int]:
    return heldout_ids(tiny_llada.path)


def as_llama(model: LLaDAModel) -> LlamaForCausalLM:
    """transformers' Llama holding the same weights, renamed: the reference arithmetic."""
    config = model.config
    llama = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=config.embedding_size,
            hidden_size=config.d_model,
            intermediate_size=config.mlp_hidden_size,
            num_hidden_layers=config.n_layers,
            num_attention_heads=config.n_heads,
            num_key_value_heads=config.n_kv_heads,
            rms_norm_eps=config.rms_norm_eps,
            rope_theta=config.rope_theta,
            tie_word_embeddings=False,
        )
    ).eval()
    renames = {
        "attn_norm": "input_layernorm",
        "q_proj": "self_attn.q_proj",
        "k_proj": "self_attn.k_proj",
        "v_proj": "self_attn.v_proj",
        "attn_out": "self_attn.o_proj",
        "ff_norm": "post_attention_layernorm",
        "ff_proj": "mlp.gate_proj",
        "up_proj": "mlp.up_proj",
        "ff_out": "mlp.down_proj",
    }
    outside = {"wte": "model.embed_tokens", "ln_f": "model.norm", "ff_out": "lm_head"}
    state = {}
    for name, tensor in model.state_dict().items():
        parts = name.removeprefix("model.transformer.").split(".")
        if parts[0] == "blocks":
            state[f"model.layers.{parts[1]}.{renames[parts[2]]}.{parts[3]}"] = tensor
        else:
            state[f"{outside[parts[0]]}.weight"] = tensor
    llama.load_state_dict(state)
    return llama


def test_checkpoint_is_laid_out_like_the_released_one(tiny_llada: TinyDrafter) -> None:
    config = json.loads((tiny_llada.path / "config.json").read_text())
    assert (config["model_type"], config["architectures"]) == ("llada", ["LLaDAModelLM"])
    assert config["auto_map"]["AutoModel"] == "modeling_llada.LLaDAModelLM"
    assert {"d_model", "n_heads", "n_kv_heads", "n_layers", "mlp_hidden_size"} <= set(config)
    assert config["block_type"] == "llama" and config["weight_tying"] is False
    names = set(load_file(tiny_llada.path / "model.safetensors"))
    expected = {f"model.transformer.blocks.{i}.{t}.weight" for i in (0, 1) for t in BLOCK_TENSORS}
    expected |= {f"model.transformer.{t}.weight" for t in ("wte", "ln_f", "ff_out")}
    assert names == expected
    tokenizer = AutoTokenizer.from_pretrained(tiny_llada.path)
    assert tokenizer.convert_ids_to_tokens(config["mask_token_id"]) == "<|mdm_mask|>"


def test_network_is_llama_with_bidirectional_attention_and_logits_are_unshifted(
    drafter: LLaDADrafter, ids: list[int]
) -> None:
    """Drafted position j is the reference's output at len(context) + j itself."""
    context, n = ids[300:341], 7
    block = drafter.draft([context], [n])
    sequence = torch.tensor([context + [drafter.mask_token_id] * n])
    full = torch.ones(1, 1, sequence.shape[1], sequence.shape[1], dtype=torch.bool)
    with torch.no_grad():
        reference = as_llama(drafter.model)(input_ids=sequence, attention_mask=full).logits[0]
    expected = reference[len(context) : len(context) + n, : drafter.model.config.vocab_size]
    expected = expected.clone()
    expected[:, drafter.mask_token_id] = NEG_INF
    torch.testing.assert_close(block.logits[0], expected, atol=1e-4, rtol=1e-4)


def test_ragged_batch_equals_one_request_at_a_time(drafter: LLaDADrafter, ids: list[int]) -> None:
    contexts = ragged_contexts(ids, 4)
    lengths = [6, 0, 1, 12]
    batched = drafter.draft(contexts, lengths)
    assert [len(row) for row in batched.argmax_tokens()] == lengths
    for b, (context, n) in enumerate(zip(contexts, lengths, strict=True)):
        alone = drafter.draft([context], [n])
        torch.testing.assert_close(batched.logits[b, :n], alone.logits[0], atol=1e-4, rtol=1e-4)


def test_unshifted_drafter_drafts_after_an_empty_context(drafter: LLaDADrafter) -> None:
    block = drafter.draft([[]], [4])
    assert torch.isfinite(block.logits[0]).any(dim=-1).all()


def test_target_ids_outside_its_vocabulary_need_the_bridge(drafter: LLaDADrafter) -> None:
    with pytest.raises(ValueError, match="outside the drafter's vocabulary.*bridge"):
        drafter.draft([[5, drafter.model.vocab_size + 3]], [2])


def test_tied_head_checkpoint_has_no_output_tensor_and_uses_the_embeddings(
    tmp_path: Path,
) -> None:
    tied = build_tiny_llada(tmp_path, weight_tying=True)
    assert "model.transformer.ff_out.weight" not in load_file(tmp_path / "model.safetensors")
    loaded = load_drafter(tied.path, target_vocab_size=tied.vocab_size)
    hidden = torch.randn(1, 3, loaded.model.config.d_model)
    embeddings = loaded.model.model.transformer["wte"].weight
    torch.testing.assert_close(loaded.model.head(hidden), hidden @ embeddings.T)


def test_mask_id_defaults_to_llada_s_when_config_has_none(tiny_llada: TinyDrafter) -> None:
    config = json.loads((tiny_llada.path / "config.json").read_text())
    released = {**config, "vocab_size": 126464, "embedding_size": 126464}
    del released["mask_token_id"]
    assert LLaDAConfig.from_dict(released).mask_token_id == 126336
    del config["mask_token_id"]
    with pytest.raises(DrafterLoadError, match="mask_token_id 126336, vocab_size 704"):
        LLaDAConfig.from_dict(config)


@pytest.mark.parametrize(
    "change",
    [{"block_type": "sequential"}, {"scale_logits": True}, {"activation_type": "gelu"}],
)
def test_settings_it_would_ignore_are_refused(tiny_llada: TinyDrafter, change: dict) -> None:
    config = json.loads((tiny_llada.path / "config.json").read_text())
    (name,) = change
    with pytest.raises(DrafterLoadError, match=f"LLaDA {name}=.* is not supported"):
        LLaDAConfig.from_dict({**config, **change})
