"""Multi-pass drafting: which masks each pass fixes, and which logits a fixed position keeps.

The tests watch every forward pass's input ids (a hook on the network's backbone) and compare
with what the rule in DraftingOptions says: a pass fixes every masked position whose confidence
is >= unmask_threshold (at least the most confident one), or without a threshold an equal share
of the remaining positions; the last allowed pass fixes the rest; Fast-dLLM v2 only unmasks the
earliest 8-token sub-block that still has masks.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import torch
from fixtures.tiny_drafters import TinyDrafter, heldout_ids

from dlmspec_harness.tiny_pair import TinyPair
from dlmspec_vllm.drafters.base import DraftingOptions
from dlmspec_vllm.drafters.diffusion import DiffusionDrafter
from dlmspec_vllm.drafters.dream import DreamDrafter
from dlmspec_vllm.drafters.fast_dllm_v2 import FastDllmV2Drafter
from dlmspec_vllm.drafters.loading import load_drafter

# Passes recompute the whole sequence, so each pass's input is visible in full.
NO_CACHE = {"cache_refresh_interval": 0}


@pytest.fixture(scope="module")
def ids(tiny_pair: TinyPair) -> list[int]:
    return heldout_ids(tiny_pair.target_dir)


@pytest.fixture(scope="module")
def one_pass(tiny_pair: TinyPair) -> DreamDrafter:
    drafter = load_drafter(tiny_pair.drafter_dir, target_vocab_size=tiny_pair.vocab_size)
    assert isinstance(drafter, DreamDrafter)
    return drafter


def with_options(drafter: DiffusionDrafter, **options: object) -> DiffusionDrafter:
    return type(drafter)(
        drafter.model,
        target_vocab_size=drafter.target_vocab_size,
        options=DraftingOptions(**options),  # type: ignore[arg-type]
    )


@contextmanager
def pass_inputs(drafter: DiffusionDrafter) -> Iterator[list[torch.Tensor]]:
    seen: list[torch.Tensor] = []
    backbone = drafter.model.model
    hook = backbone.register_forward_hook(lambda _m, args, _o: seen.append(args[0].clone()))
    try:
        yield seen
    finally:
        hook.remove()


def test_threshold_fixes_confident_positions_and_at_least_one(
    one_pass: DreamDrafter, ids: list[int]
) -> None:
    n = 8
    candidates = [ids[offset : offset + 40] for offset in range(200, 4000, 380)]
    top2 = torch.tensor(one_pass.draft(candidates, [n] * len(candidates)).confidences()).topk(2)
    sure, unsure = int(top2.values[:, 1].argmax()), int(top2.values[:, 0].argmin())
    # Row 0 has at least two positions above the threshold, row 1 none (one is fixed anyway).
    threshold = float(top2.values[sure, 1] + top2.values[unsure, 0]) / 2
    assert top2.values[sure, 1] > threshold > top2.values[unsure, 0]
    contexts = [candidates[sure], candidates[unsure]]
    first = one_pass.draft(contexts, [n, n])
    confidence = torch.tensor(first.confidences())
    drafter = with_options(one_pass, denoising_steps=2, unmask_threshold=threshold, **NO_CACHE)
    with pass_inputs(drafter) as inputs:
        block = drafter.draft(contexts, [n, n])
    assert len(inputs) == 2
    mask = drafter.mask_token_id
    for b, context in enumerate(contexts):
        fixed = confidence[b] >= threshold
        fixed[confidence[b].argmax()] = True
        assert int(fixed.sum()) >= 2 if b == 0 else int(fixed.sum()) == 1
        second = inputs[1][b, len(context) : len(context) + n]
        expected = torch.where(fixed, first.logits[b].argmax(-1), mask)
        assert torch.equal(second, expected)
        # A position keeps the logits of the pass that fixed it.
        torch.testing.assert_close(block.logits[b][fixed], first.logits[b][fixed])
        # The others keep pass 2's, which saw the fixed tokens.
        with torch.no_grad():
            full = drafter.model(inputs[1][b : b + 1, : len(context) + n])
        read = full[0, len(context) - 1 : len(context) - 1 + n].float()
        read[:, mask] = float("-inf")
        torch.testing.assert_close(block.logits[b][~fixed], read[~fixed], atol=1e-5, rtol=1e-5)


def test_without_threshold_each_pass_fixes_an_equal_share_most_confident_first(
    one_pass: DreamDrafter, ids: list[int]
) -> None:
    context, n = ids[400:450], 6
    confidence = torch.tensor(one_pass.draft([context], [n]).confidences()[0])
    drafter = with_options(one_pass, denoising_steps=3, **NO_CACHE)
    with pass_inputs(drafter) as inputs:
        drafter.draft([context], [n])
    masks_left = [int((x[0, len(context) :] == drafter.mask_token_id).sum()) for x in inputs]
    assert masks_left == [6, 4, 2]
    fixed_first = inputs[1][0, len(context) :] != drafter.mask_token_id
    assert set(fixed_first.nonzero().flatten().tolist()) == set(confidence.topk(2).indices.tolist())


def test_last_allowed_pass_fixes_whatever_is_left(one_pass: DreamDrafter, ids: list[int]) -> None:
    context, n = ids[600:640], 5
    drafter = with_options(one_pass, denoising_steps=3, unmask_threshold=1.0, **NO_CACHE)
    with pass_inputs(drafter) as inputs:
        block = drafter.draft([context], [n])
    masks_left = [int((x[0, len(context) :] == drafter.mask_token_id).sum()) for x in inputs]
    assert masks_left == [5, 4, 3]  # one per pass (nothing is that confident), then the rest
    assert torch.isfinite(block.logits[0]).any(dim=-1).all()


def test_fast_dllm_unmasks_its_sub_blocks_in_order(
    tiny_fast_dllm: TinyDrafter, ids: list[int]
) -> None:
    """Context of 28 tokens, 12 drafted: positions 28..31 end sub-block [24, 32), 32..39 fill
    sub-block [32, 40). With every position confident enough, pass 1 fixes exactly 28..31 and
    pass 2 exactly 32..39."""
    drafter = load_drafter(
        tiny_fast_dllm.path,
        target_vocab_size=1024,
        options=DraftingOptions(denoising_steps=4, unmask_threshold=1e-9),
    )
    assert isinstance(drafter, FastDllmV2Drafter)
    context = ids[1000:1028]
    with pass_inputs(drafter) as inputs:
        block = drafter.draft([context], [12])
    assert len(inputs) == 2
    # Pass 2 starts at the open block (position 0 here, the context has no finished block).
    drafted_in_pass_2 = inputs[1][0, 28:]
    assert (drafted_in_pass_2[:4] != drafter.mask_token_id).all()
    assert (drafted_in_pass_2[4:] == drafter.mask_token_id).all()
    assert block.lengths == [12] and torch.isfinite(block.logits[0]).any(dim=-1).all()


def test_exact_cache_makes_later_passes_cheap_and_changes_nothing(
    tiny_fast_dllm: TinyDrafter, ids: list[int]
) -> None:
    """Later passes of a Fast-dLLM v2 draft reuse the first pass's finished blocks: same logits
    as recomputing the whole sequence every pass, for a fraction of the positions."""
    options = DraftingOptions(denoising_steps=3)
    reusing = load_drafter(tiny_fast_dllm.path, target_vocab_size=1024, options=options)
    recomputing = load_drafter(tiny_fast_dllm.path, target_vocab_size=1024, options=options)
    recomputing._advance = lambda rows, present: None  # type: ignore[method-assign]
    contexts, lengths = [ids[100:175], ids[2000:2090]], [10, 6]
    with pass_inputs(reusing) as short, pass_inputs(recomputing) as full:
        torch.testing.assert_close(
            reusing.draft(contexts, lengths).logits, recomputing.draft(contexts, lengths).logits
        )
    assert [x.shape[1] for x in full] == [90 + 6] * 3
    assert short[0].shape[1] == 96 and all(x.shape[1] <= 32 + 10 for x in short[1:])


@pytest.mark.parametrize(
    "options",
    [
        {"denoising_steps": 0},
        {"unmask_threshold": 0.0},
        {"unmask_threshold": 1.5},
        {"cache_refresh_interval": -1},
        {"cache_max_tokens": -5},
    ],
)
def test_invalid_options_are_refused(options: dict) -> None:
    (name,) = options
    with pytest.raises(ValueError, match=name):
        DraftingOptions(**options)
