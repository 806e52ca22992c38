"""The DFlash drafter without vLLM: layout, per-request context cache, batching, and that the
training loss scores exactly what drafting computes.

A random network in the z-lab layout is enough for these: every check compares two ways of
computing the same numbers (incremental vs from scratch, batched vs alone, training vs drafting).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import dlmspec_vllm.drafters.dflash as dflash_module
from dlmspec_vllm.drafters.base import (
    DraftingOptions,
    StepFeatures,
    TargetConditionedDrafter,
    TargetFeatures,
)
from dlmspec_vllm.drafters.dflash import (
    CONSOLIDATE_CHUNKS,
    DFlashConfig,
    DFlashDrafter,
    DFlashNetwork,
    default_target_layer_ids,
    save_dflash_network,
)
from dlmspec_vllm.drafters.loading import DrafterLoadError, load_drafter
from dlmspec_vllm.training.dflash import (
    FeatureSequence,
    dflash_loss,
    draft_vocabulary,
    target_features,
    teacher_forced_acceptance,
)

VOCAB, HIDDEN, MASK = 96, 32, 95
CONFIG = DFlashConfig(
    hidden_size=HIDDEN,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
    rms_norm_eps=1e-6,
    rope_theta=10000.0,
    block_size=6,
    mask_token_id=MASK,
    target_layer_ids=(0, 2),
    num_target_layers=4,
    target_hidden_size=HIDDEN,
    vocab_size=VOCAB,
)
FEATURES = len(CONFIG.target_layer_ids) * HIDDEN


@pytest.fixture(scope="module")
def parts() -> tuple[DFlashNetwork, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    network = DFlashNetwork(CONFIG)
    for parameter in network.parameters():
        torch.nn.init.normal_(parameter, std=0.3)
    return network.eval(), torch.randn(VOCAB, HIDDEN), torch.randn(VOCAB, HIDDEN)


def make_drafter(parts, draft_to_target=None, **options) -> DFlashDrafter:
    network, embed, head = parts
    return DFlashDrafter(
        network,
        embed_weight=embed,
        head_weight=head,
        draft_to_target=draft_to_target,
        target_vocab_size=VOCAB,
        options=DraftingOptions(**options),
    )


def direct_logits(parts, tokens, features, anchor, n):
    """Block logits computed from scratch: context = features of positions < anchor."""
    network, embed, head = parts
    context = network.context_keys_values(features[None, :anchor], torch.arange(anchor)[None])
    ids = torch.full((1, CONFIG.block_size), MASK)
    ids[0, 0] = tokens[anchor]
    mask = torch.ones(1, CONFIG.block_size, anchor + CONFIG.block_size, dtype=torch.bool)
    positions = torch.arange(anchor, anchor + CONFIG.block_size)[None]
    with torch.no_grad():
        hidden = network.block_hidden(
            torch.nn.functional.embedding(ids, embed), positions, context, mask
        )
    return hidden[0, 1 : 1 + n] @ head.T


def test_incremental_context_with_rejected_drafts_equals_from_scratch(parts):
    drafter = make_drafter(parts)
    tokens = torch.randint(0, MASK, (30,)).tolist()
    features = torch.randn(30, FEATURES)
    # Prefill in two chunks, then a step whose features for positions 14..17 belong to drafts
    # the target rejected, then the step that replaces them from position 14 on.
    drafter.observe("r", TargetFeatures(torch.arange(0, 8), features[:8]))
    drafter.observe("r", TargetFeatures(torch.arange(8, 14), features[8:14]))
    drafter.observe("r", TargetFeatures(torch.arange(14, 18), torch.randn(4, FEATURES)))
    drafter.observe("r", TargetFeatures(torch.arange(14, 20), features[14:20]))
    block = drafter.draft([tokens[:21]], [4], req_ids=["r"])
    assert block.lengths == [4]
    torch.testing.assert_close(block.logits[0], direct_logits(parts, tokens, features, 20, 4))
    assert drafter.cached_tokens == 20


def test_a_batch_of_steps_one_token_each_equals_from_scratch(parts):
    """Two requests observed together, a token per step for more steps than a context keeps
    chunks, with one rejected draft's features replaced on the way."""
    drafter = make_drafter(parts)
    steps = CONSOLIDATE_CHUNKS + 8
    tokens = {r: torch.randint(0, MASK, (steps + 2,)).tolist() for r in ("a", "b")}
    features = {r: torch.randn(steps + 1, FEATURES) for r in ("a", "b")}
    for position in range(steps + 1):
        batch = {
            r: TargetFeatures(torch.tensor([position]), features[r][position : position + 1])
            for r in ("a", "b")
        }
        if position == 10:  # features for 10..11 that a later step replaces from 10 on
            batch["a"] = TargetFeatures(torch.arange(10, 12), torch.randn(2, FEATURES))
        if position == 11:
            batch["a"] = TargetFeatures(torch.arange(10, 12), features["a"][10:12])
        drafter.observe_step(StepFeatures.of_requests(batch))
    block = drafter.draft(
        [tokens["a"][: steps + 2], tokens["b"][: steps + 2]], [3, 3], req_ids=["a", "b"]
    )
    for row, r in enumerate(("a", "b")):
        expected = direct_logits(parts, tokens[r], features[r], steps + 1, 3)
        torch.testing.assert_close(block.logits[row], expected)
    assert drafter.cached_tokens == 2 * (steps + 1)


STEPS_KEPT = 16


def count_projected_rows(drafter: DFlashDrafter, monkeypatch) -> list[int]:
    """The rows of every projection the drafter runs from now on, one entry per pass."""
    projected: list[int] = []
    original = drafter.network.context_keys_values

    def counting(features, positions):
        projected.append(features.shape[1])
        return original(features, positions)

    monkeypatch.setattr(drafter.network, "context_keys_values", counting)
    return projected


def test_features_are_projected_only_for_requests_that_draft_until_steps_pile_up(
    parts, monkeypatch
):
    """A step's features cost nothing until a request drafts (its rows alone are projected)
    or the kept steps hold PROJECT_AFTER_BYTES of features (everyone's, in one pass)."""
    requests = ("a", "b", "c")
    step_bytes = len(requests) * FEATURES * torch.float32.itemsize
    monkeypatch.setattr(dflash_module, "PROJECT_AFTER_BYTES", STEPS_KEPT * step_bytes)
    drafter = make_drafter(parts)
    projected = count_projected_rows(drafter, monkeypatch)
    features = {r: torch.randn(STEPS_KEPT + 1, FEATURES) for r in requests}
    tokens = torch.randint(0, MASK, (STEPS_KEPT + 2,)).tolist()

    def step(position: int) -> None:
        batch = {
            r: TargetFeatures(torch.tensor([position]), features[r][position : position + 1])
            for r in requests
        }
        drafter.observe_step(StepFeatures.of_requests(batch))

    for position in range(4):
        step(position)
    assert projected == []
    early = drafter.draft([tokens[:5]], [2], req_ids=["a"])
    assert projected == [4]  # a's four rows, nobody else's
    for position in range(4, STEPS_KEPT):
        step(position)
    # The step that brings the kept features to the limit takes everyone in: b's and c's
    # sixteen rows each, a's twelve since its draft.
    assert projected == [4, 2 * STEPS_KEPT + STEPS_KEPT - 4]
    assert drafter.cached_tokens == 3 * STEPS_KEPT
    step(STEPS_KEPT)
    drafter.forget("c")
    block = drafter.draft([tokens[:18], tokens[:18]], [2, 2], req_ids=["a", "b"])
    assert projected[-1] == 2
    monkeypatch.undo()
    torch.testing.assert_close(early.logits[0], direct_logits(parts, tokens, features["a"], 4, 2))
    for row, r in enumerate(("a", "b")):
        expected = direct_logits(parts, tokens, features[r], STEPS_KEPT + 1, 2)
        torch.testing.assert_close(block.logits[row], expected)


def test_requests_that_finish_without_drafting_are_never_projected_and_free_their_steps(
    parts, monkeypatch
):
    drafter = make_drafter(parts)
    projected = count_projected_rows(drafter, monkeypatch)
    for position in range(8):
        batch = {
            r: TargetFeatures(torch.tensor([position]), torch.randn(1, FEATURES)) for r in "ab"
        }
        drafter.observe_step(StepFeatures.of_requests(batch))
    assert len(drafter._steps) == 8
    drafter.forget("a")
    assert len(drafter._steps) == 8, "b still waits on the steps"
    drafter.forget("b")
    assert (projected, len(drafter._steps), drafter._kept_bytes) == ([], 0, 0)


def test_batched_rows_of_different_context_lengths_equal_each_alone(parts):
    drafter = make_drafter(parts)
    features = torch.randn(25, FEATURES)
    tokens = torch.randint(0, MASK, (25,)).tolist()
    drafter.observe("long", TargetFeatures(torch.arange(20), features[:20]))
    drafter.observe("short", TargetFeatures(torch.arange(5), features[:5]))
    together = drafter.draft([tokens[:21], tokens[:6]], [5, 2], req_ids=["long", "short"])
    assert together.lengths == [5, 2]
    alone = drafter.draft([tokens[:6]], [2], req_ids=["short"])
    torch.testing.assert_close(together.logits[1, :2], alone.logits[0])
    assert torch.isinf(together.logits[1, 2:]).all()


def test_drafts_longer_than_a_block_continue_in_further_passes(parts):
    drafter = make_drafter(parts)
    features = torch.randn(12, FEATURES)
    drafter.observe("r", TargetFeatures(torch.arange(10), features[:10]))
    tokens = torch.randint(0, MASK, (14,)).tolist()
    # Block of 6: the anchor plus 5 masks; 12 tokens take three passes.
    long = drafter.draft([tokens[:11]], [12], req_ids=["r"])
    assert long.lengths == [12]
    first = drafter.draft([tokens[:11]], [5], req_ids=["r"])
    torch.testing.assert_close(long.logits[0, :5], first.logits[0])
    # The second pass's block holds the last half-block (3) of the drafted tokens, then masks.
    drafted = first.argmax_tokens()[0]
    second = drafter.draft([tokens[:11] + drafted], [3], req_ids=["r"])
    assert second.lengths == [3]
    torch.testing.assert_close(long.logits[0, 5:8], second.logits[0])
    assert drafter.draft([tokens[:11]], [0], req_ids=["r"]).lengths == [0]


def test_forget_and_token_budget_free_the_cache(parts):
    network, embed, head = parts
    from dlmspec_vllm.drafters.base import DraftingOptions

    drafter = DFlashDrafter(
        network, embed_weight=embed, head_weight=head, draft_to_target=None,
        target_vocab_size=VOCAB, options=DraftingOptions(cache_max_tokens=16),
    )  # fmt: skip
    drafter.observe("a", TargetFeatures(torch.arange(10), torch.randn(10, FEATURES)))
    drafter.observe("b", TargetFeatures(torch.arange(10), torch.randn(10, FEATURES)))
    assert drafter.num_cached_requests == 1 and drafter.cached_tokens == 10  # "a" evicted
    drafter.forget("b")
    assert drafter.num_cached_requests == 0 and drafter.cached_tokens == 0


def test_draft_vocabulary_scores_only_its_ids(parts):
    draft_ids = torch.tensor([3, 7, 8, 40])
    drafter = make_drafter(parts, draft_to_target=draft_ids - torch.arange(4))
    drafter.observe("r", TargetFeatures(torch.arange(5), torch.randn(5, FEATURES)))
    block = drafter.draft([[1, 2, 3, 4, 5, 6]], [3], req_ids=["r"])
    # The block is scored over the draft vocabulary alone, its columns named by vocab_ids.
    assert block.logits.shape[-1] == 4 and block.vocab_ids.tolist() == draft_ids.tolist()
    full = block.over_vocabulary(VOCAB)
    finite = torch.isfinite(full.logits[0]).nonzero()[:, 1].unique()
    assert finite.tolist() == draft_ids.tolist()
    assert block.argmax_tokens() == full.argmax_tokens()
    assert set(block.argmax_tokens()[0]) <= set(draft_ids.tolist())
    torch.testing.assert_close(torch.tensor(block.confidences()), torch.tensor(full.confidences()))


def test_training_loss_scores_what_drafting_computes(parts):
    """The loss's logits for an anchor are the drafter's logits for the same context: the
    recipe trains exactly the computation that drafts."""
    network, embed, head = parts
    tokens = torch.randint(0, MASK, (24,)).tolist()
    features = torch.randn(24, FEATURES)
    sequence = FeatureSequence(tokens, prompt_length=4, features=features)
    anchor = 12
    labels = tokens[anchor + 1 : anchor + CONFIG.block_size]
    logits = direct_logits(parts, tokens, features, anchor, CONFIG.block_size - 1)
    weights = torch.exp(-torch.arange(CONFIG.block_size - 1.0) / 7.0)
    ce = torch.nn.functional.cross_entropy(logits, torch.tensor(labels), reduction="none")
    expected = (ce * weights).sum() / weights.sum()
    # Two anchors in one row must not see each other's blocks.
    with torch.no_grad():
        alone = dflash_loss(
            network,
            [sequence],
            [[anchor]],
            embed_weight=embed,
            head_weight=head,
            target_to_draft=None,
            gamma=7.0,
        )
        paired = dflash_loss(
            network,
            [sequence, sequence],
            [[anchor, 5], [anchor, 5]],
            embed_weight=embed,
            head_weight=head,
            target_to_draft=None,
            gamma=7.0,
        )
        other = dflash_loss(
            network,
            [sequence],
            [[5]],
            embed_weight=embed,
            head_weight=head,
            target_to_draft=None,
            gamma=7.0,
        )
    torch.testing.assert_close(alone.loss, expected)
    torch.testing.assert_close(paired.loss, (alone.loss + other.loss) / 2, rtol=0.05, atol=0)


def test_soft_labels_score_the_targets_distribution_over_proposable_ids(parts):
    """Soft cross-entropy is -sum p log q over the target's top-k, renormalized over the ids
    the draft vocabulary holds; with all the mass on the greedy token it is the hard loss."""
    network, embed, head = parts
    tokens = torch.randint(0, MASK, (20,)).tolist()
    features = torch.randn(20, FEATURES)
    anchor, prompt = 10, 4
    outputs = len(tokens) - prompt
    one_hot_ids = torch.tensor(tokens[prompt:])[:, None].repeat(1, 2)
    one_hot_ids[:, 1] = (one_hot_ids[:, 0] + 1) % MASK
    one_hot = torch.tensor([[0.0, -math.inf]]).repeat(outputs, 1)
    spread_ids = torch.stack([torch.tensor(tokens[prompt:]), torch.full((outputs,), 7)], 1)
    spread = torch.log(torch.tensor([[0.75, 0.25]])).repeat(outputs, 1)

    def loss(top_ids, top_logprobs, soft_weight, target_to_draft=None, head_weight=head):
        sequence = FeatureSequence(tokens, prompt, features, top_ids, top_logprobs)
        with torch.no_grad():
            return dflash_loss(
                network, [sequence], [[anchor]], embed_weight=embed, head_weight=head_weight,
                target_to_draft=target_to_draft, gamma=7.0, soft_weight=soft_weight,
            ).loss  # fmt: skip

    hard = loss(one_hot_ids, one_hot, 0.0)
    torch.testing.assert_close(loss(one_hot_ids, one_hot, 1.0), hard)
    logits = direct_logits(parts, tokens, features, anchor, CONFIG.block_size - 1)
    logq = torch.log_softmax(logits, -1)
    labels = torch.tensor(tokens[anchor + 1 : anchor + CONFIG.block_size])
    soft_ce = -(0.75 * logq.gather(1, labels[:, None])[:, 0] + 0.25 * logq[:, 7])
    weights = torch.exp(-torch.arange(CONFIG.block_size - 1.0) / 7.0)
    expected = (soft_ce * weights).sum() / weights.sum()
    torch.testing.assert_close(loss(spread_ids, spread, 1.0), expected)
    # Token 7 outside the draft vocabulary: the greedy token keeps all of the mass.
    kept = torch.tensor(sorted({*tokens} - {7}))
    target_to_draft = torch.full((VOCAB,), -1)
    target_to_draft[kept] = torch.arange(len(kept))
    torch.testing.assert_close(
        loss(spread_ids, spread, 1.0, target_to_draft, head[kept]),
        loss(one_hot_ids, one_hot, 0.0, target_to_draft, head[kept]),
    )


def test_teacher_forced_acceptance_counts_leading_matches_from_every_anchor(parts):
    """Answers written by the drafter itself are accepted whole; a draft vocabulary without
    the answers' tokens accepts nothing."""
    network, embed, head = parts
    features = torch.randn(30, FEATURES)
    tokens = torch.randint(0, MASK, (30,)).tolist()
    sequence = FeatureSequence(tokens, 6, features)
    report = teacher_forced_acceptance(
        network, [sequence], embed_weight=embed, head_weight=head, target_to_draft=None
    )
    assert report["anchors"] == 30 - 6 - 1
    shares = report["position_acceptance"]
    assert len(shares) == CONFIG.block_size - 1 and shares == sorted(shares, reverse=True)
    # Make the answer the drafter's own greedy continuation from its first anchor.
    anchor, drafted = 10, CONFIG.block_size - 1
    logits = direct_logits(parts, tokens, features, anchor, drafted)
    tokens[anchor + 1 : anchor + 1 + drafted] = logits.argmax(-1).tolist()
    own = FeatureSequence(tokens[: anchor + 1 + drafted], anchor, features[: anchor + 1 + drafted])
    report = teacher_forced_acceptance(
        network, [own], embed_weight=embed, head_weight=head, target_to_draft=None,
        draft_lengths=(drafted,),
    )  # fmt: skip
    assert report["anchors"] == drafted
    assert report["position_acceptance"][-1] >= 1 / drafted
    assert report["mean_accepted_length"][str(drafted)] >= 1 + drafted / drafted
    # A decoder takes the whole block in its first step, and that is its only step.
    assert report["walked"][str(drafted)]["steps"] == 1
    assert report["walked"][str(drafted)]["mean_accepted_length"] == 1 + drafted
    nothing = torch.full((VOCAB,), -1)
    nothing[MASK] = 0
    none = teacher_forced_acceptance(
        network, [sequence], embed_weight=embed, head_weight=head[[MASK]], target_to_draft=nothing
    )
    assert none["position_acceptance"] == [0.0] * (CONFIG.block_size - 1)
    assert none["mean_accepted_length"] == {"4": 1.0, "8": 1.0}


def test_walked_steps_skip_the_anchors_an_accepted_run_covers():
    from dlmspec_vllm.training.dflash import _walked

    walk = _walked([torch.tensor([2, 0, 0, 3, 1, 0, 0]), torch.tensor([0, 5])], k=4)
    # Answer 1: steps at anchors 0 (2 right) and 3 (3 right); answer 2: anchors 0 and 1 (5 -> 4).
    assert walk["steps"] == 4
    assert walk["mean_accepted_length"] == 1 + (2 + 3 + 0 + 4) / 4
    assert walk["position_acceptance"] == [0.75, 0.75, 0.5, 0.25]


def test_batched_target_features_equal_each_row_alone(tiny_pair):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_pair.target_dir, dtype=torch.float32)
    model.eval()
    layers = model.config.num_hidden_layers
    rows = [torch.randint(0, 50, (n,)).tolist() for n in (5, 17, 9, 17, 3)]
    batched = target_features(model, rows, [0, layers - 1], storage_dtype=torch.float32)
    with torch.no_grad():
        for row, got in zip(rows, batched):
            states = model.model(torch.tensor([row]), output_hidden_states=True)
            expected = torch.cat([states.hidden_states[1][0], states.last_hidden_state[0]], -1)
            torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)


def test_draft_vocabulary_is_the_most_frequent_output_tokens():
    rows = [FeatureSequence([9, 9, 1, 1, 1, 2, 3, 3], 2, torch.zeros(8, 1))]
    assert draft_vocabulary(rows, 2).tolist() == [1, 3]  # prompt tokens (9) do not count


def test_default_target_layers_follow_dflash():
    assert default_target_layer_ids(36, 5) == (1, 9, 17, 25, 33)
    assert default_target_layer_ids(30, 1) == (15,)


def test_saved_checkpoint_is_the_zlab_layout_and_loads(parts, tmp_path, tiny_target_like):
    network, _, _ = parts
    save_dflash_network(network, tmp_path / "drafter", dtype=torch.float32)
    config = json.loads((tmp_path / "drafter" / "config.json").read_text())
    assert config["architectures"] == ["DFlashDraftModel"] and config["model_type"] == "qwen3"
    assert config["dflash_config"] == {"mask_token_id": MASK, "target_layer_ids": [0, 2]}
    names = set(load_file(tmp_path / "drafter" / "model.safetensors"))
    assert {"fc.weight", "hidden_norm.weight", "norm.weight"} <= names
    assert "layers.1.self_attn.k_norm.weight" in names and "layers.0.mlp.down_proj.weight" in names
    assert not any("embed" in n or "lm_head" in n for n in names)

    drafter = load_drafter(
        tmp_path / "drafter", target_vocab_size=VOCAB, target_dir=tiny_target_like
    )
    assert isinstance(drafter, TargetConditionedDrafter)
    assert drafter.target_layer_ids == (0, 2)


def test_a_draft_vocabulary_checkpoint_holds_its_own_head_in_vllms_layout(
    parts, tmp_path, tiny_target_like
):
    """d2t, the draft-sized lm_head and draft_vocab_size (what vLLM's dflash method loads);
    the drafter scores with that head exactly as with the target's rows at the draft ids."""
    network, _, _ = parts
    draft_ids = torch.tensor([3, 7, 8, 40, 41, 90])
    target_head = load_file(tiny_target_like / "model.safetensors")["lm_head.weight"]
    save_dflash_network(
        network,
        tmp_path / "drafter",
        draft_to_target=draft_ids - torch.arange(6),
        draft_head=target_head[draft_ids],
        dtype=torch.float32,
    )
    config = json.loads((tmp_path / "drafter" / "config.json").read_text())
    assert config["draft_vocab_size"] == 6
    saved = load_file(tmp_path / "drafter" / "model.safetensors")
    torch.testing.assert_close(saved["lm_head.weight"], target_head[draft_ids])
    assert (saved["d2t"] + torch.arange(6)).tolist() == draft_ids.tolist()

    loaded = load_drafter(
        tmp_path / "drafter", target_vocab_size=VOCAB, target_dir=tiny_target_like
    )
    features = torch.randn(5, FEATURES)
    loaded.observe("r", TargetFeatures(torch.arange(5), features))
    from_target = DFlashDrafter(
        loaded.network, embed_weight=loaded.embed_weight, head_weight=target_head,
        draft_to_target=draft_ids - torch.arange(6), target_vocab_size=VOCAB,
    )  # fmt: skip
    from_target.observe("r", TargetFeatures(torch.arange(5), features))
    ours = loaded.draft([[1, 2, 3, 4, 5, 6]], [3], req_ids=["r"])
    theirs = from_target.draft([[1, 2, 3, 4, 5, 6]], [3], req_ids=["r"])
    torch.testing.assert_close(ours.logits, theirs.logits)

    with pytest.raises(ValueError, match="one row"):
        save_dflash_network(
            network,
            tmp_path / "wrong",
            draft_to_target=draft_ids - torch.arange(6),
            draft_head=target_head[:5],
        )
    saved["lm_head.weight"] = target_head[:5]
    save_file(saved, str(tmp_path / "drafter" / "model.safetensors"))
    with pytest.raises(DrafterLoadError, match="one row per draft token"):
        load_drafter(tmp_path / "drafter", target_vocab_size=VOCAB, target_dir=tiny_target_like)


def test_wrong_target_or_no_target_is_a_clear_error(parts, tmp_path, tiny_target_like):
    network, _, _ = parts
    save_dflash_network(network, tmp_path / "drafter")
    with pytest.raises(DrafterLoadError, match="target's checkpoint directory"):
        load_drafter(tmp_path / "drafter", target_vocab_size=VOCAB)
    other = tmp_path / "other_target"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"tie_word_embeddings": True}))
    save_file(
        {"model.embed_tokens.weight": torch.zeros(VOCAB, HIDDEN * 2)},
        str(other / "model.safetensors"),
    )
    with pytest.raises(DrafterLoadError, match="trained for another target"):
        load_drafter(tmp_path / "drafter", target_vocab_size=VOCAB, target_dir=other)


def test_drafting_without_request_ids_says_why(parts):
    with pytest.raises(ValueError, match="hidden states"):
        make_drafter(parts).draft([[1, 2, 3]], [2])


@pytest.fixture
def tiny_target_like(tmp_path) -> Path:
    """A target checkpoint directory with just the tensors a DFlash drafter shares."""
    target = tmp_path / "target"
    target.mkdir()
    (target / "config.json").write_text(json.dumps({"tie_word_embeddings": False}))
    save_file(
        {
            "model.embed_tokens.weight": torch.randn(VOCAB, HIDDEN),
            "lm_head.weight": torch.randn(VOCAB, HIDDEN),
        },
        str(target / "model.safetensors"),
    )
    return target


def test_pairing_needs_no_tokenizer_of_its_own(parts, tmp_path, tiny_target_like):
    """The drafter embeds and scores with the target's weights, so its ids are the target's;
    released DFlash checkpoints ship no tokenizer."""
    from dlmspec_vllm.pairing import check_drafter_pairing

    network, _, _ = parts
    save_dflash_network(network, tmp_path / "drafter")
    assert not list((tmp_path / "drafter").glob("tokenizer*"))
    checked = check_drafter_pairing(str(tmp_path / "drafter"), target_tokenizer="unused")
    assert checked == tmp_path / "drafter"
    drafter = load_drafter(
        tmp_path / "drafter",
        target_vocab_size=VOCAB,
        target_tokenizer="unused",
        target_dir=tiny_target_like,
    )
    assert isinstance(drafter, DFlashDrafter)
