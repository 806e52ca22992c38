"""The vocabulary bridge: when it is used, the start-up pairing check, the text round trip, the
confidence carried to target tokens, and the bridged Drafts.

Target: the tiny pair's Qwen2 tokenizer. Drafter: the tiny LLaDA, whose byte-level BPE was
trained on other files to another size, so the two number their tokens differently.
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import pytest
import torch
from fixtures.tiny_drafters import TinyDrafter, heldout_ids, ragged_contexts
from tokenizers import Tokenizer, normalizers
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from dlmspec_harness.tiny_pair import HELDOUT_FILES, TinyPair
from dlmspec_vllm.drafters.bridge import (
    BridgedDrafter,
    BridgePairingError,
    check_bridge_pairing,
    shares_vocabulary,
)
from dlmspec_vllm.drafters.fast_dllm_v2 import FastDllmV2Drafter
from dlmspec_vllm.drafters.llada import LLaDADrafter
from dlmspec_vllm.drafters.loading import DrafterLoadError, load_drafter
from dlmspec_vllm.training.corpus import stdlib_documents


@pytest.fixture(scope="module")
def target_tok(tiny_pair: TinyPair) -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(tiny_pair.target_dir)


@pytest.fixture(scope="module")
def drafter_tok(tiny_llada: TinyDrafter) -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(tiny_llada.path)


@pytest.fixture(scope="module")
def bridged(tiny_pair: TinyPair, tiny_llada: TinyDrafter) -> BridgedDrafter:
    loaded = load_drafter(
        tiny_llada.path,
        target_vocab_size=tiny_pair.vocab_size,
        target_tokenizer=tiny_pair.target_dir,
    )
    assert isinstance(loaded, BridgedDrafter) and isinstance(loaded.inner, LLaDADrafter)
    return loaded


def lower_casing(tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerFast:
    """The same BPE behind a lower-casing normalizer: it cannot give back "Hello"."""
    backend = Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())
    backend.normalizer = normalizers.Lowercase()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token=tokenizer.bos_token, eos_token=tokenizer.eos_token
    )


def test_a_bridge_is_used_only_when_the_vocabularies_differ(
    tiny_pair: TinyPair,
    tiny_fast_dllm: TinyDrafter,
    tiny_llada: TinyDrafter,
    target_tok,
    drafter_tok,
) -> None:
    assert shares_vocabulary(target_tok, AutoTokenizer.from_pretrained(tiny_fast_dllm.path))
    assert not shares_vocabulary(target_tok, drafter_tok)
    shared = load_drafter(
        tiny_fast_dllm.path, target_vocab_size=tiny_pair.vocab_size, target_tokenizer=target_tok
    )
    assert isinstance(shared, FastDllmV2Drafter)
    assert isinstance(load_drafter(tiny_llada.path, target_vocab_size=704), LLaDADrafter)


def test_pairing_check_passes_for_byte_level_tokenizers(target_tok, drafter_tok) -> None:
    check_bridge_pairing(target_tok, drafter_tok)
    check_bridge_pairing(drafter_tok, target_tok)


def test_pairing_that_cannot_carry_text_fails_at_load(
    tiny_pair: TinyPair, tiny_llada: TinyDrafter, drafter_tok, target_tok, tmp_path: Path
) -> None:
    lossy = lower_casing(drafter_tok)
    with pytest.raises(BridgePairingError, match="cannot reproduce the target's text") as caught:
        check_bridge_pairing(target_tok, lossy)
    message = str(caught.value)
    assert "The quick brown fox" in message and "the quick brown fox" in message
    shutil.copytree(tiny_llada.path, tmp_path, dirs_exist_ok=True)
    lossy.save_pretrained(tmp_path)
    with pytest.raises(DrafterLoadError, match="no vocabulary bridge"):
        load_drafter(tmp_path, target_vocab_size=tiny_pair.vocab_size, target_tokenizer=target_tok)


def test_contexts_and_drafts_survive_the_round_trip(
    bridged: BridgedDrafter, target_tok, drafter_tok
) -> None:
    text = stdlib_documents(HELDOUT_FILES)[0]
    context, continuation = text[1000:1400], text[1400:1480]
    drafter_ids = bridged.to_drafter_ids(target_tok(context)["input_ids"])
    assert drafter_ids[0] == drafter_tok.bos_token_id
    assert drafter_tok.decode(drafter_ids[1:]) == context

    drafted = drafter_tok(continuation, add_special_tokens=False)["input_ids"]
    expected = target_tok(continuation)["input_ids"]
    mapped = bridged.to_target_ids(drafted, [0.9] * len(drafted), limit=100)
    # The token touching the end of the drafted text may be the front of an unfinished word.
    assert [t for t, _ in mapped] == expected[:-1]
    ended = bridged.to_target_ids([*drafted, drafter_tok.eos_token_id, 7], [0.9] * 99, limit=100)
    assert [t for t, _ in ended] == expected  # a special token ends the text: nothing is cut
    assert len(bridged.to_target_ids(drafted, [0.9] * len(drafted), limit=3)) == 3


def test_a_target_token_carries_the_product_of_the_confidences_it_covers(
    bridged: BridgedDrafter, target_tok, drafter_tok
) -> None:
    text = stdlib_documents(HELDOUT_FILES)[0][2000:2300]
    drafted = drafter_tok(text, add_special_tokens=False, return_offsets_mapping=True)
    confidences = [0.5 + 0.4 * math.sin(i) ** 2 for i in range(len(drafted["input_ids"]))]
    mapped = bridged.to_target_ids(drafted["input_ids"], confidences, limit=1000)
    target = target_tok(text, return_offsets_mapping=True)
    spans_differ = 0
    for (_, confidence), (start, end) in zip(mapped, target["offset_mapping"]):
        covering = [
            c for c, (s, e) in zip(confidences, drafted["offset_mapping"]) if s < end and e > start
        ]
        spans_differ += len(covering) > 1
        assert confidence == pytest.approx(math.prod(covering))
    assert spans_differ > 0  # the tokenizers really do cut this text differently


def test_bridged_block_has_target_logits_and_at_most_the_requested_length(
    bridged: BridgedDrafter, tiny_pair: TinyPair
) -> None:
    contexts = ragged_contexts(heldout_ids(tiny_pair.target_dir), 3)
    lengths = [6, 0, 10]
    block = bridged.draft(contexts, lengths)
    assert block.logits.shape == (3, 10, tiny_pair.vocab_size)
    assert all(0 < got <= asked for got, asked in zip(block.lengths, lengths) if asked)
    assert block.lengths[1] == 0 and torch.isneginf(block.logits[1]).all()
    for b, n in enumerate(block.lengths):
        assert torch.isneginf(block.logits[b, n:]).all()
    # Each row gives its mapped token the confidence it carries, the rest evenly.
    for row, confidences in zip(block.logits, block.confidences()):
        for j, confidence in enumerate(confidences):
            probabilities = row[j].softmax(-1)
            others = (1 - confidence) / (tiny_pair.vocab_size - 1)
            assert float(probabilities.min()) == pytest.approx(others, rel=1e-3, abs=1e-9)


def test_bridged_drafts_use_and_free_the_drafters_cache(
    bridged: BridgedDrafter, tiny_pair: TinyPair
) -> None:
    contexts = ragged_contexts(heldout_ids(tiny_pair.target_dir), 2)
    first = bridged.draft(contexts, [5, 5], req_ids=["p", "q"])
    assert bridged.num_cached_requests == 2 and bridged.cache_bytes > 0
    assert bridged.cached_tokens == bridged.inner.cached_tokens > 0
    again = bridged.draft(contexts, [5, 5], req_ids=["p", "q"])
    assert again.argmax_tokens() == first.argmax_tokens()
    bridged.forget("p")
    bridged.forget("q")
    assert bridged.num_cached_requests == 0 and bridged.cache_bytes == 0
    assert bridged.cached_tokens == 0
