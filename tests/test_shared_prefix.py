"""A DFlash drafter's context shared per block of a token prefix (drafters/shared_prefix.py).

vLLM's prefix cache serves a prefix another request computed without running the target over
it, so no features for it reach the drafter; the drafter's own shared blocks must stand in, and
drafting must come out exactly as if the request had brought the prefix's features itself.
"""

from __future__ import annotations

import pytest
import torch
from test_dflash_drafter import FEATURES, MASK, direct_logits, make_drafter, parts  # noqa: F401

from dlmspec_vllm.drafters.base import DraftingOptions, StepFeatures
from dlmspec_vllm.drafters.dflash import DFlashDrafter
from dlmspec_vllm.drafters.shared_prefix import SharedPrefixStore

BLOCK = 4


def drafter_with(parts, **options) -> DFlashDrafter:  # noqa: F811
    return make_drafter(parts, kv_block_tokens=BLOCK, **options)


class Requests:
    """Token sequences and target features per request, handed over as vLLM's runner would."""

    def __init__(self, drafter: DFlashDrafter) -> None:
        self.drafter = drafter
        self.tokens: dict[str, list[int]] = {}
        self.features: dict[str, torch.Tensor] = {}

    def add(self, req_id: str, tokens: list[int], features: torch.Tensor) -> None:
        self.tokens[req_id], self.features[req_id] = tokens, features

    def step(self, rows: dict[str, range]) -> None:
        """One engine step: each request's features at these positions."""
        req_ids = list(rows)
        positions = torch.cat([torch.tensor(list(rows[r])) for r in req_ids])
        self.drafter.observe_step(
            StepFeatures(
                req_ids=req_ids,
                counts=[len(rows[r]) for r in req_ids],
                positions=positions,
                hidden=torch.cat([self.features[r][list(rows[r])] for r in req_ids]),
                token_ids=torch.tensor([self.tokens[r][p] for r in req_ids for p in rows[r]]),
                prefix_tokens=lambda req_id, count: self.tokens[req_id][:count],
            )
        )

    def draft(self, req_id: str, known: int, n: int = 3) -> torch.Tensor:
        """The block drafted after the first `known` tokens (features for all but the last)."""
        block = self.drafter.draft([self.tokens[req_id][:known]], [n], req_ids=[req_id])
        return block.logits[0]


def shared_system_prompt(drafter: DFlashDrafter) -> tuple[Requests, torch.Tensor]:
    """Requests "a" and "b" share their first 12 tokens (3 blocks); "a" is prefilled whole, and
    drafts so its features are taken in; "b" then arrives with its first 12 positions served
    from vLLM's cache. Returns the requests and the features "b" would have had without it."""
    torch.manual_seed(1)
    system = torch.randint(0, MASK, (12,)).tolist()
    requests = Requests(drafter)
    requests.add("a", system + torch.randint(0, MASK, (8,)).tolist(), torch.randn(20, FEATURES))
    requests.add("b", system + torch.randint(0, MASK, (8,)).tolist(), torch.randn(20, FEATURES))
    requests.step({"a": range(0, 14)})
    requests.draft("a", 15)
    requests.step({"b": range(12, 18)})
    whole = torch.cat([requests.features["a"][:12], requests.features["b"][12:]])
    return requests, whole


def test_a_prefix_served_from_vllms_cache_drafts_as_if_the_request_had_computed_it(parts):  # noqa: F811
    drafter = drafter_with(parts)
    requests, whole = shared_system_prompt(drafter)
    logits = requests.draft("b", 19)
    torch.testing.assert_close(logits, direct_logits(parts, requests.tokens["b"], whole, 18, 3))
    store = drafter.shared_prefixes
    assert store is not None
    assert store.stats.reused_blocks == 3 and store.stats.missed_requests == 0
    assert store.num_held == 3  # "b" holds the three blocks it shares, not copies of them


def test_without_sharing_the_request_drafts_without_its_prefix(parts):  # noqa: F811
    drafter = drafter_with(parts, shared_prefix_max_tokens=0)
    requests, whole = shared_system_prompt(drafter)
    assert drafter.shared_prefixes is None
    logits = requests.draft("b", 19)
    expected = direct_logits(parts, requests.tokens["b"], whole, 18, 3)
    assert not torch.allclose(logits, expected, atol=1e-3)


def test_a_second_turn_reuses_the_blocks_the_first_completed_while_decoding(parts):  # noqa: F811
    """Turn one is prefilled (10 tokens), then decodes a token per step; its blocks complete
    on the way. Turn two's prompt is turn one's 16 tokens and more: vLLM serves 16 of them."""
    drafter = drafter_with(parts)
    torch.manual_seed(2)
    requests = Requests(drafter)
    first = torch.randint(0, MASK, (17,)).tolist()
    requests.add("turn1", first, torch.randn(17, FEATURES))
    requests.step({"turn1": range(0, 10)})
    for position in range(10, 16):
        requests.step({"turn1": range(position, position + 1)})
        requests.draft("turn1", position + 2)
    drafter.forget("turn1")  # the first turn ended
    second = first[:16] + torch.randint(0, MASK, (8,)).tolist()
    requests.add("turn2", second, torch.randn(24, FEATURES))
    requests.step({"turn2": range(16, 22)})
    whole = torch.cat([requests.features["turn1"][:16], requests.features["turn2"][16:]])
    logits = requests.draft("turn2", 23)
    torch.testing.assert_close(logits, direct_logits(parts, second, whole, 22, 3))
    assert drafter.shared_prefixes is not None
    assert drafter.shared_prefixes.stats.reused_blocks == 4


def test_an_evicted_block_is_a_counted_miss_and_drafting_goes_on(parts):  # noqa: F811
    """A store of two blocks: "a"'s third block evicts its first (nobody holds it), so "b"
    finds no prefix from position 0 and drafts from what it has."""
    drafter = drafter_with(parts, shared_prefix_max_tokens=2 * BLOCK)
    requests, _ = shared_system_prompt(drafter)
    store = drafter.shared_prefixes
    assert store is not None
    assert store.stats.evicted_blocks >= 1 and store.num_tokens <= 2 * BLOCK
    assert store.stats.missed_requests == 1 and store.stats.missed_tokens == 12
    logits = requests.draft("b", 19)
    assert logits.shape == (3, parts[1].shape[0]) and torch.isfinite(logits).all()


def test_held_blocks_stay_and_everything_is_let_go_when_the_requests_end(parts):  # noqa: F811
    drafter = drafter_with(parts, shared_prefix_max_tokens=3 * BLOCK)
    requests, _ = shared_system_prompt(drafter)
    store = drafter.shared_prefixes
    assert store is not None and store.num_held == 3
    # A new block wants room, but all three are held by "b": it is not kept.
    store.put(12345, 0, [torch.zeros(2, BLOCK, 8)], [torch.zeros(2, BLOCK, 8)])
    assert store.stats.full_store_skips == 1 and store.num_held == 3
    drafter.forget("a")
    drafter.forget("b")
    assert drafter.num_cached_requests == 0 and drafter.cached_tokens == 0
    assert store.num_held == 0 and store.num_tokens <= 3 * BLOCK


def test_settings_out_of_range_are_refused():
    with pytest.raises(ValueError, match="shared_prefix_max_tokens"):
        DraftingOptions(shared_prefix_max_tokens=-1)
    with pytest.raises(ValueError, match="kv_block_tokens"):
        DraftingOptions(kv_block_tokens=0)
    with pytest.raises(ValueError, match="kv_block_tokens"):
        SharedPrefixStore(0, 16)


def test_a_context_cut_to_its_token_budget_lets_go_of_the_shared_head(parts):  # noqa: F811
    """The per-request budget keeps the most recent positions: once "b" outgrows it, the
    shared blocks at its start are no longer attended to, and no longer held."""
    drafter = drafter_with(parts, cache_max_tokens=6)
    requests, _ = shared_system_prompt(drafter)
    store = drafter.shared_prefixes
    assert store is not None and store.num_held == 3
    requests.step({"b": range(18, 20)})
    logits = requests.draft("b", 20)
    assert store.num_held == 0 and drafter.cached_tokens == 6
    assert torch.isfinite(logits).all()
