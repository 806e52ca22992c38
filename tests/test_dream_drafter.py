"""The Dream drafter: architecture, batching, the logit shift, never-draftable ids, loading errors.

Most tests use the tiny pair from conftest.py: a Qwen2 target and a Dream drafter trained from it.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import (
    AutoConfig,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from dlmspec_harness.tiny_pair import HELDOUT_FILES, TinyPair
from dlmspec_vllm.drafters.base import Drafts
from dlmspec_vllm.drafters.dream import DreamDrafter, DreamModel
from dlmspec_vllm.drafters.loading import DrafterLoadError, load_drafter
from dlmspec_vllm.training import dream_from_causal_lm
from dlmspec_vllm.training.corpus import stdlib_documents

NEG_INF = float("-inf")


@pytest.fixture(scope="module")
def drafter(tiny_pair: TinyPair) -> DreamDrafter:
    loaded = load_drafter(tiny_pair.drafter_dir, target_vocab_size=tiny_pair.vocab_size)
    assert isinstance(loaded, DreamDrafter)
    return loaded


@pytest.fixture(scope="module")
def heldout_ids(tiny_pair: TinyPair) -> list[int]:
    tokenizer = AutoTokenizer.from_pretrained(tiny_pair.target_dir)
    return tokenizer(stdlib_documents(HELDOUT_FILES)[0], verbose=False)["input_ids"]


def contexts_from(ids: list[int], count: int) -> list[list[int]]:
    """count contexts of 24..96 tokens at evenly spaced offsets of a held-out token stream."""
    stride = (len(ids) - 100) // count
    return [ids[i * stride : i * stride + 24 + (i * 11) % 73] for i in range(count)]


def test_fixture_checkpoints_load_like_real_ones(tiny_pair: TinyPair) -> None:
    for directory in (tiny_pair.target_dir, tiny_pair.drafter_dir):
        # The drafter's auto_map names remote code, as the released Dream's does; refusing it
        # must still load the tokenizer (and never prompt).
        tokenizer = AutoTokenizer.from_pretrained(directory, trust_remote_code=False)
        assert tokenizer.mask_token_id == tiny_pair.mask_token_id
        assert tokenizer.eos_token_id == tokenizer.pad_token_id == tiny_pair.eos_token_id
        chat = tokenizer.apply_chat_template(
            [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
        )
        assert chat == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert AutoConfig.from_pretrained(tiny_pair.target_dir).model_type == "qwen2"
    config = json.loads((tiny_pair.drafter_dir / "config.json").read_text())
    assert (config["model_type"], config["architectures"]) == ("Dream", ["DreamModel"])
    assert config["auto_map"]["AutoModel"] == "modeling_dream.DreamModel"
    assert config["mask_token_id"] == tiny_pair.mask_token_id
    assert config["vocab_size"] == tiny_pair.vocab_size


def test_network_is_qwen2_with_bidirectional_attention(drafter: DreamDrafter) -> None:
    """Same weights in transformers' Qwen2, run with a full attention mask, give the same logits."""
    config = drafter.model.config
    qwen = Qwen2ForCausalLM(
        Qwen2Config(
            vocab_size=config.vocab_size,
            hidden_size=config.hidden_size,
            intermediate_size=config.intermediate_size,
            num_hidden_layers=config.num_hidden_layers,
            num_attention_heads=config.num_attention_heads,
            num_key_value_heads=config.num_key_value_heads,
            max_position_embeddings=config.max_position_embeddings,
            rms_norm_eps=config.rms_norm_eps,
            rope_theta=config.rope_theta,
            tie_word_embeddings=False,
        )
    ).eval()
    qwen.load_state_dict(drafter.model.state_dict())
    ids = torch.randint(0, config.vocab_size, (2, 19), generator=torch.Generator().manual_seed(0))
    keys = torch.ones(2, 19, dtype=torch.bool)
    keys[1, 13:] = False
    with torch.no_grad():
        # A 4-D boolean mask is used as given by transformers: here, every real key, both ways.
        expected = qwen(input_ids=ids, attention_mask=keys[:, None, None, :].expand(2, 1, 19, 19))
        actual = drafter.model(ids, keys)
    torch.testing.assert_close(actual, expected.logits, atol=1e-5, rtol=1e-5)


def test_shapes_ragged_lengths_and_zero_length_requests_skip_the_forward(
    drafter: DreamDrafter, heldout_ids: list[int]
) -> None:
    contexts = contexts_from(heldout_ids, 4)
    batch_sizes: list[int] = []
    hook = drafter.model.model.register_forward_hook(
        lambda _module, args, _out: batch_sizes.append(args[0].shape[0])
    )
    try:
        block = drafter.draft(contexts, [3, 0, 5, 1])
        empty = drafter.draft(contexts[:2], [0, 0])
    finally:
        hook.remove()
    assert isinstance(block, Drafts)
    assert block.logits.shape == (4, 5, drafter.target_vocab_size)
    assert block.lengths == [3, 0, 5, 1]
    assert [len(row) for row in block.argmax_tokens()] == [3, 0, 5, 1]
    assert torch.isneginf(block.logits[1]).all()
    assert torch.isneginf(block.logits[0, 3:]).all() and torch.isneginf(block.logits[3, 1:]).all()
    assert torch.isfinite(block.logits[2]).any(dim=-1).all()
    assert empty.logits.shape == (2, 0, drafter.target_vocab_size)
    assert batch_sizes == [3]  # one forward pass, for the three requests that draft


def test_batched_draft_equals_per_request_draft(
    drafter: DreamDrafter, heldout_ids: list[int]
) -> None:
    contexts = contexts_from(heldout_ids, 5)
    lengths = [8, 2, 0, 5, 8]
    batched = drafter.draft(contexts, lengths)
    for b, (context, n) in enumerate(zip(contexts, lengths, strict=True)):
        alone = drafter.draft([context], [n])
        torch.testing.assert_close(batched.logits[b, :n], alone.logits[0], atol=1e-4, rtol=1e-4)


def test_ids_the_target_cannot_emit_are_never_drafted(
    drafter: DreamDrafter, heldout_ids: list[int], tiny_pair: TinyPair
) -> None:
    contexts, lengths = contexts_from(heldout_ids, 3), [4, 4, 4]
    mask = tiny_pair.mask_token_id
    block = drafter.draft(contexts, lengths)
    assert torch.isneginf(block.logits[..., mask]).all()

    vocab = drafter.model.config.vocab_size
    wider = DreamDrafter(drafter.model, target_vocab_size=vocab + 40).draft(contexts, lengths)
    assert wider.logits.shape[-1] == vocab + 40
    assert torch.isneginf(wider.logits[..., vocab:]).all()
    torch.testing.assert_close(wider.logits[..., :vocab], block.logits)

    narrower = DreamDrafter(drafter.model, target_vocab_size=mask).draft(contexts, lengths)
    assert narrower.logits.shape[-1] == mask
    torch.testing.assert_close(narrower.logits, block.logits[..., :mask])
    assert all(t < mask for row in narrower.argmax_tokens() for t in row)


def test_drafted_position_j_is_read_from_index_context_plus_j_minus_1(
    drafter: DreamDrafter, heldout_ids: list[int]
) -> None:
    context, n = heldout_ids[100:137], 6
    block = drafter.draft([context], [n])
    ids = torch.tensor([context + [drafter.mask_token_id] * n])
    with torch.no_grad():
        full = drafter.model(ids)[0, :, : drafter.target_vocab_size].float()
    full[:, drafter.mask_token_id] = NEG_INF
    torch.testing.assert_close(block.logits[0], full[len(context) - 1 : len(context) - 1 + n])


def test_long_context_keeps_its_last_tokens(drafter: DreamDrafter, heldout_ids: list[int]) -> None:
    n = 8
    long_context = heldout_ids[: drafter.max_context_length + 100]
    kept = long_context[-(drafter.max_context_length - n) :]
    torch.testing.assert_close(
        drafter.draft([long_context], [n]).logits, drafter.draft([kept], [n]).logits
    )


def test_empty_context_is_refused(drafter: DreamDrafter) -> None:
    with pytest.raises(ValueError, match="empty context"):
        drafter.draft([[]], [3])


def test_first_drafted_token_agrees_with_target_greedy(
    drafter: DreamDrafter, heldout_ids: list[int], tiny_pair: TinyPair
) -> None:
    """docs/design.md, Facts: a shifted drafter from the target's weights drafts position 0 well.

    Each context is a held-out prompt followed by 4..16 of the target's own greedy tokens: the
    state a drafter is in during speculative decoding. (On raw held-out text this tiny target is
    so unsure, top-1 probability ~0.3, that agreement measures near-ties more than the drafter.)
    """
    target = Qwen2ForCausalLM.from_pretrained(tiny_pair.target_dir).eval()
    contexts, greedy_next = [], []
    for i, prompt in enumerate(contexts_from(heldout_ids, 20)):
        with torch.no_grad():
            out = target.generate(
                torch.tensor([prompt]),
                attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                max_new_tokens=17,
                do_sample=False,
            )[0].tolist()
        cut = len(prompt) + 4 + i % 13
        contexts.append(out[:cut])
        greedy_next.append(out[cut])
    first = [row[0] for row in drafter.draft(contexts, [8] * len(contexts)).argmax_tokens()]
    agreement = sum(a == b for a, b in zip(first, greedy_next, strict=True)) / len(contexts)
    print(f"first-token agreement on {len(contexts)} held-out decoding states: {agreement:.2f}")
    assert agreement >= 0.6


def test_sharded_checkpoint_loads_the_same(
    drafter: DreamDrafter, tiny_pair: TinyPair, tmp_path: Path
) -> None:
    state = load_file(tiny_pair.drafter_dir / "model.safetensors")
    names = sorted(state)
    shards = {"model-00001-of-00002.safetensors": names[::2]}
    shards["model-00002-of-00002.safetensors"] = names[1::2]
    weight_map = {}
    for shard, shard_names in shards.items():
        save_file({name: state[name] for name in shard_names}, str(tmp_path / shard))
        weight_map.update(dict.fromkeys(shard_names, shard))
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    shutil.copy(tiny_pair.drafter_dir / "config.json", tmp_path)
    sharded = load_drafter(tmp_path, target_vocab_size=tiny_pair.vocab_size)
    for name, tensor in drafter.model.state_dict().items():
        assert torch.equal(sharded.model.state_dict()[name], tensor), name


@pytest.mark.parametrize("source", ["qwen2", "llama"])
def test_dream_from_causal_lm_keeps_the_ar_models_function(source: str) -> None:
    """Converted weights compute what the AR model computes when it sees the whole sequence."""
    torch.manual_seed(0)
    shapes = dict(
        vocab_size=96,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    if source == "qwen2":
        ar = Qwen2ForCausalLM(Qwen2Config(**shapes, tie_word_embeddings=False)).eval()
    else:
        ar = LlamaForCausalLM(LlamaConfig(**shapes, tie_word_embeddings=True)).eval()
    dream = dream_from_causal_lm(ar.config.to_dict(), ar.state_dict(), mask_token_id=95)
    assert isinstance(dream, DreamModel)
    ids = torch.randint(0, 95, (1, 10))
    with torch.no_grad():
        full = torch.ones(1, 1, 10, 10, dtype=torch.bool)
        torch.testing.assert_close(dream(ids), ar(input_ids=ids, attention_mask=full).logits)


# --- loading errors: each names the `draft_model` setting and what is wrong -------------------


def test_missing_path(tmp_path: Path) -> None:
    with pytest.raises(DrafterLoadError, match=r"draft_model path .* does not exist"):
        load_drafter(tmp_path / "nowhere", target_vocab_size=1024)


def test_directory_without_config_json(tmp_path: Path) -> None:
    with pytest.raises(DrafterLoadError, match="has no config.json"):
        load_drafter(tmp_path, target_vocab_size=1024)


def test_autoregressive_checkpoint_is_refused(tiny_pair: TinyPair) -> None:
    with pytest.raises(DrafterLoadError) as caught:
        load_drafter(tiny_pair.target_dir, target_vocab_size=tiny_pair.vocab_size)
    message = str(caught.value)
    assert "autoregressive" in message and "'qwen2'" in message
    assert "method 'dlm' needs a diffusion LM" in message and "`draft_model`" in message


def test_unknown_model_type_is_refused(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(DrafterLoadError, match="not a supported diffusion drafter.*Dream"):
        load_drafter(tmp_path, target_vocab_size=1024)


def test_missing_weights(tiny_pair: TinyPair, tmp_path: Path) -> None:
    shutil.copy(tiny_pair.drafter_dir / "config.json", tmp_path)
    (tmp_path / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(DrafterLoadError, match="has no weights.*pytorch_model.bin"):
        load_drafter(tmp_path, target_vocab_size=tiny_pair.vocab_size)


def test_missing_shard(tiny_pair: TinyPair, tmp_path: Path) -> None:
    shutil.copy(tiny_pair.drafter_dir / "config.json", tmp_path)
    index = {"weight_map": {"lm_head.weight": "model-00001-of-00001.safetensors"}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(DrafterLoadError, match="missing shards"):
        load_drafter(tmp_path, target_vocab_size=tiny_pair.vocab_size)


def test_weights_that_do_not_match_the_config(tiny_pair: TinyPair, tmp_path: Path) -> None:
    shutil.copy(tiny_pair.drafter_dir / "model.safetensors", tmp_path)
    config = json.loads((tiny_pair.drafter_dir / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 3}))
    with pytest.raises(DrafterLoadError, match="do not match its config.json"):
        load_drafter(tmp_path, target_vocab_size=tiny_pair.vocab_size)
