"""Per-request prefix KV cache: exact for Fast-dLLM v2, measured and bounded for Dream, freed on
forget, capped with LRU eviction, refreshed on schedule, off when asked.

Decoding is simulated the way vLLM drives a drafter: each step a request's context grows by the
tokens the target accepted plus its own next token (random 1..9 tokens of held-out text here);
rejected draft tokens never enter the context.
"""

from __future__ import annotations

import random
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

REQS = ["a", "b", "c"]


@pytest.fixture(scope="module")
def ids(tiny_pair: TinyPair) -> list[int]:
    return heldout_ids(tiny_pair.target_dir)


def fast_dllm(tiny_fast_dllm: TinyDrafter, options: DraftingOptions) -> FastDllmV2Drafter:
    drafter = load_drafter(tiny_fast_dllm.path, target_vocab_size=1024, options=options)
    assert isinstance(drafter, FastDllmV2Drafter)
    return drafter


def dream(tiny_pair: TinyPair, options: DraftingOptions) -> DreamDrafter:
    drafter = load_drafter(tiny_pair.drafter_dir, target_vocab_size=1024, options=options)
    assert isinstance(drafter, DreamDrafter)
    return drafter


def decoding(ids: list[int], steps: int, *, seed: int = 0) -> Iterator[list[list[int]]]:
    """Contexts of len(REQS) requests over ``steps`` engine steps."""
    rng = random.Random(seed)
    starts, lengths = [100, 1500, 3000], [30, 47, 20]
    for _ in range(steps):
        yield [ids[s : s + n] for s, n in zip(starts, lengths, strict=True)]
        lengths = [n + rng.randint(1, 9) for n in lengths]


@contextmanager
def query_lengths(drafter: DiffusionDrafter) -> Iterator[list[int]]:
    """Positions computed per forward pass (the rest came from the cache)."""
    seen: list[int] = []
    backbone = drafter.model.model
    hook = backbone.register_forward_hook(lambda _m, args, _o: seen.append(args[0].shape[1]))
    try:
        yield seen
    finally:
        hook.remove()


def test_fast_dllm_cache_is_exact_and_computes_only_the_open_block(
    tiny_fast_dllm: TinyDrafter, ids: list[int]
) -> None:
    drafter = fast_dllm(tiny_fast_dllm, DraftingOptions())
    lengths = [8, 5, 12]
    for step, contexts in enumerate(decoding(ids, 10)):
        with query_lengths(drafter) as computed:
            cached = drafter.draft(contexts, lengths, req_ids=REQS)
        uncached = drafter.draft(contexts, lengths)
        torch.testing.assert_close(cached.logits, uncached.logits, atol=1e-5, rtol=1e-5)
        if step > 0:
            # The drafted positions, the open block (< 32 context tokens) and the block that
            # the last step's tokens (at most 9) may have finished: its keys were computed
            # while it was open, so they are not exact yet.
            assert computed[0] <= 32 + 9 + max(lengths)
        for req, context in zip(REQS, contexts, strict=True):
            entry = drafter.cache.get(req)
            finished_blocks = len(context) // 32 * 32
            assert (len(entry.tokens) if entry else 0) == finished_blocks
    assert min(len(c) for c in contexts) > 32 + 9  # so the bound above bites
    assert drafter.num_cached_requests == 3


def test_fast_dllm_reuses_only_blocks_before_a_changed_token(
    tiny_fast_dllm: TinyDrafter, ids: list[int]
) -> None:
    drafter = fast_dllm(tiny_fast_dllm, DraftingOptions())
    drafter.draft([ids[500:580]], [6], req_ids=["r"])  # caches blocks [0, 32) and [32, 64)
    changed = ids[500:540] + ids[900:935]  # differs from position 40 on
    with query_lengths(drafter) as computed:
        cached = drafter.draft([changed], [6], req_ids=["r"])
    assert computed == [len(changed) - 32 + 6]
    torch.testing.assert_close(cached.logits, drafter.draft([changed], [6]).logits)


def test_dream_cache_is_approximate_and_its_effect_bounded(
    tiny_pair: TinyPair, ids: list[int]
) -> None:
    """Reused keys were computed before later tokens existed; with the default refresh every 8
    calls, drafts still agree with fully computed ones almost everywhere."""
    drafter = dream(tiny_pair, DraftingOptions())
    agree = total = 0
    variation = []
    for contexts in decoding(ids, 12):
        cached = drafter.draft(contexts, [8] * 3, req_ids=REQS)
        uncached = drafter.draft(contexts, [8] * 3)
        for a, b in zip(cached.argmax_tokens(), uncached.argmax_tokens(), strict=True):
            agree += sum(x == y for x, y in zip(a, b, strict=True))
            total += len(a)
        p, q = cached.logits.softmax(-1), uncached.logits.softmax(-1)
        variation.append(float((p - q).abs().sum(-1).mean() / 2))
    agreement, mean_tv = agree / total, sum(variation) / len(variation)
    print(
        f"Dream prefix cache: top-1 agreement {agreement:.3f}, mean total variation {mean_tv:.4f}"
    )
    assert agreement >= 0.95 and mean_tv <= 0.02
    assert max(variation) > 0  # it is an approximation, and a reused one


def test_approximate_cache_is_rebuilt_after_interval_calls(
    tiny_pair: TinyPair, ids: list[int]
) -> None:
    drafter = dream(tiny_pair, DraftingOptions(cache_refresh_interval=2))
    states = list(decoding(ids, 4))
    computed_per_call = []
    for contexts in states:
        with query_lengths(drafter) as computed:
            last = drafter.draft(contexts[:1], [8], req_ids=REQS[:1])
        computed_per_call.append(computed[0])
    full = len(states[-1][0]) + 8
    # fresh, reused, reused, rebuilt from scratch (so exactly the uncached draft)
    assert computed_per_call[0] == len(states[0][0]) + 8 and computed_per_call[3] == full
    assert computed_per_call[1] < len(states[1][0]) and computed_per_call[2] < len(states[2][0])
    torch.testing.assert_close(last.logits, drafter.draft(states[-1][:1], [8]).logits)


def test_forget_frees_everything_and_bytes_are_counted(
    tiny_fast_dllm: TinyDrafter, ids: list[int]
) -> None:
    drafter = fast_dllm(tiny_fast_dllm, DraftingOptions())
    contexts = next(decoding(ids, 1))
    drafter.draft(contexts, [4, 4, 4], req_ids=REQS)
    config = drafter.model.config
    per_token = config.num_hidden_layers * 2 * config.num_key_value_heads * config.head_dim * 4
    assert drafter.cached_tokens == sum(len(c) // 32 * 32 for c in contexts) > 0
    assert drafter.cache_bytes == drafter.cached_tokens * per_token
    for req in REQS:
        drafter.forget(req)
    drafter.forget("never-seen")
    assert (drafter.num_cached_requests, drafter.cached_tokens, drafter.cache_bytes) == (0, 0, 0)


def test_least_recently_used_requests_are_evicted_to_stay_under_the_cap(
    tiny_pair: TinyPair, ids: list[int]
) -> None:
    drafter = dream(tiny_pair, DraftingOptions(cache_max_tokens=100))
    context = {req: ids[i * 200 : i * 200 + 40] for i, req in enumerate("wxyz")}
    drafter.draft([context["w"], context["x"]], [4, 4], req_ids=["w", "x"])
    drafter.draft([context["w"]], [4], req_ids=["w"])  # w is now the most recently used
    drafter.draft([context["y"]], [4], req_ids=["y"])
    assert drafter.cache.get("x") is None and drafter.cache.get("w") is not None
    assert drafter.cached_tokens == 80 and drafter.num_cached_requests == 2
    drafter.draft([ids[:150]], [4], req_ids=["z"])  # longer than the whole cap: not stored
    assert drafter.cache.get("z") is None and drafter.cached_tokens <= 100


def test_no_cache_without_req_ids_or_with_interval_zero(
    tiny_pair: TinyPair, ids: list[int]
) -> None:
    contexts = next(decoding(ids, 1))
    cached = dream(tiny_pair, DraftingOptions())
    off = dream(tiny_pair, DraftingOptions(cache_refresh_interval=0))
    plain = cached.draft(contexts, [5, 5, 5])
    assert cached.num_cached_requests == 0
    torch.testing.assert_close(off.draft(contexts, [5, 5, 5], req_ids=REQS).logits, plain.logits)
    assert off.num_cached_requests == 0


def test_the_token_budget_evicts_least_recently_used_and_reports_what_leaves_for_good():
    """The bookkeeping the diffusion drafters' prefix cache and DFlash's contexts share."""
    from dlmspec_vllm.drafters.cache import TokenBudgetLRU

    removed: list[str] = []
    lru: TokenBudgetLRU[str] = TokenBudgetLRU(10, len, removed.append)
    lru.put("a", "aaaa")
    lru.put("b", "bbbb")
    assert lru.get("a") == "aaaa"  # a is now the most recently used
    lru.put("c", "cccc")  # 12 tokens: b, the least recently used, goes
    assert removed == ["bbbb"] and "b" not in lru and lru.num_tokens == 8
    taken = lru.take("a")  # out to be changed: not removed, not counted
    assert taken == "aaaa" and removed == ["bbbb"] and lru.num_tokens == 4
    lru.put("a", "aaaaaa")
    assert lru.num_tokens == 10 and lru.num_requests == 2
    lru.put("a", "aa")  # a replaced: the old entry leaves
    assert removed == ["bbbb", "aaaaaa"] and lru.num_tokens == 6
    lru.put("d", "d" * 11)  # larger than the whole budget: never stored, nothing evicted
    assert removed[-1] == "d" * 11 and "d" not in lru and lru.num_requests == 2
    lru.forget("c")
    assert removed[-1] == "cccc" and lru.num_tokens == 2 and list(lru.values()) == ["aa"]
