"""Cost-aware control: the cost model, the decisions it drives, and throughput on a simulator."""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence

import pytest

from dlmspec_vllm.control import CostAwareController, CostModel

Cost = Callable[[int], float]


def expected_accepted(k: int, rates: Sequence[float]) -> float:
    """E[accepted draft tokens] for length k under conditional acceptance rates."""
    prefix, total = 1.0, 0.0
    for rate in rates[:k]:
        prefix *= rate
        total += prefix
    return total


def throughput(k: int, rates: Sequence[float], draft: Cost, verify: Cost) -> float:
    """Expected tokens per second of a step drafting k tokens (k = 0: plain decoding)."""
    return (expected_accepted(k, rates) + 1.0) / ((draft(k) if k else 0.0) + verify(k))


# --- cost model --------------------------------------------------------------------------------


def test_cost_prior_is_in_decode_step_units() -> None:
    model = CostModel()
    assert model.verify_cost(0) == pytest.approx(1.0)
    assert model.verify_cost(10) == pytest.approx(1.1)
    assert model.draft_cost(0) == 0.0
    assert model.draft_cost(10) == pytest.approx(0.2 * 1.2)


def test_cost_model_learns_lines_from_varied_lengths() -> None:
    model = CostModel()
    for n in [4, 8, 16, 32] * 20:
        model.record(0.003 + 0.0001 * n, n, 0.02 + 0.001 * n, n)
    assert model.verify_cost(0) == pytest.approx(0.02, rel=0.02)
    assert model.verify_cost(64) == pytest.approx(0.02 + 0.064, rel=0.02)
    assert model.draft_cost(20) == pytest.approx(0.005, rel=0.02)
    assert model.samples == 80


def test_draft_prior_follows_measured_verify_level_until_a_draft_is_timed() -> None:
    model = CostModel(draft_cost_ratio=0.5, draft_cost_slope=0.0)
    for _ in range(5):
        model.record(0.0, 0, 0.04, 0)  # plain decode steps only: no drafter pass ran
    assert model.draft_cost(8) == pytest.approx(0.02)


def test_constant_length_falls_back_to_the_prior_slope() -> None:
    model = CostModel(verify_cost_slope=0.05)
    for _ in range(30):
        model.record(0.01, 8, 1.0, 8)
    assert model.verify_cost(8) == pytest.approx(1.0)
    assert model.verify_cost(16) > model.verify_cost(8) > model.verify_cost(0)


def test_cost_record_validates() -> None:
    with pytest.raises(ValueError, match="^draft_seconds must be"):
        CostModel().record(-1.0, 4, 0.1, 4)
    with pytest.raises(ValueError, match="^verify_tokens must be"):
        CostModel().record(0.1, 4, 0.1, -4)


# --- decisions ---------------------------------------------------------------------------------


def test_no_measurements_uses_the_documented_prior() -> None:
    """Fresh controller: every rate 0.6, verify 1 + 0.01 n, draft 0.2 (1 + 0.02 k)."""
    controller = CostAwareController(32)
    assert controller.acceptance_rates("r") == pytest.approx([0.6] * 32)
    rates = [0.6] * 32
    best = max(
        range(33),
        key=lambda k: throughput(k, rates, lambda k: 0.2 * (1 + 0.02 * k), lambda n: 1 + 0.01 * n),
    )
    assert controller.initial_length("r") == best > 0


def test_long_drafts_when_verification_is_cheap_and_acceptance_high() -> None:
    controller = CostAwareController(32)
    for step in range(40):
        k = controller.initial_length("r")
        controller.record_costs(0.002, k, 0.02 + 0.00002 * k, k)
        controller.observe("r", drafted=k, accepted=k, generated=k)
        if step >= 10:
            assert k == 32


def test_no_draft_when_nothing_is_accepted_and_drafting_costs() -> None:
    controller = CostAwareController(32, probe_interval=16)
    lengths = []
    for _ in range(80):
        k = controller.initial_length("r")
        lengths.append(k)
        controller.record_costs(0.3 if k else 0.0, k, 1.0 + 0.01 * k, k)
        controller.observe("r", drafted=k, accepted=0, generated=k)
    late = lengths[16:]
    probes = [k for k in late if k > 0]
    assert len(probes) <= len(late) // 16 + 1  # only the periodic probes draft
    assert all(k <= 3 for k in probes)  # probes are short: the best k >= 1 at ~0.2 acceptance
    assert controller.stats().extra["probes"] >= 3


def test_probe_notices_when_drafting_pays_again() -> None:
    controller = CostAwareController(16, probe_interval=4)
    for _ in range(30):  # a hard stretch: nothing accepted
        k = controller.initial_length("r")
        controller.record_costs(0.2 if k else 0.0, k, 1.0 + 0.01 * k, k)
        controller.observe("r", drafted=k, accepted=0, generated=k)
    assert controller.initial_length("r") == 0
    lengths = []
    for _ in range(30):  # an easy stretch: everything drafted is accepted
        k = controller.initial_length("r")
        lengths.append(k)
        controller.record_costs(0.2 if k else 0.0, k, 1.0 + 0.01 * k, k)
        controller.observe("r", drafted=k, accepted=k, generated=k)
    assert lengths[-5:] == [16] * 5


def test_new_request_starts_from_what_other_requests_saw() -> None:
    controller = CostAwareController(32)
    for i in range(20):
        req = f"r{i}"
        k = controller.initial_length(req)
        controller.record_costs(0.2, k, 1.0 + 0.01 * k, k)
        controller.observe(req, drafted=k, accepted=min(k, 2), generated=k)
        controller.forget(req)
    rates = controller.acceptance_rates("fresh")
    # pooled counts decay too (about the last 10 observations), so the prior keeps some weight
    assert rates[0] > 0.85 and rates[1] > 0.9 and rates[2] < 0.35
    assert 2 <= controller.initial_length("fresh") <= 4


def test_clip_trims_a_low_confidence_tail_when_verification_is_steep() -> None:
    confidences = [0.95] * 4 + [0.05] * 12
    steep = CostAwareController(16)
    flat = CostAwareController(16)
    for n in (4, 8, 16) * 5:
        steep.record_costs(0.1, 16, 1.0 + 0.1 * n, n)
        flat.record_costs(0.1, 16, 1.0 + 0.001 * n, n)
    kept_steep = steep.clip("r", confidences)
    kept_flat = flat.clip("r", confidences)
    assert 3 <= kept_steep <= 5 < kept_flat
    assert steep.stats().extra["trimmed_tokens"] == 16 - kept_steep


def test_clip_calibrates_an_overconfident_drafter() -> None:
    """With confidence_weight 1 only calibrated confidences count: a drafter claiming 0.95 on
    tokens the target always rejects is learned to be worth little."""
    controller = CostAwareController(16, confidence_weight=1.0)
    for n in (4, 8, 16):
        controller.record_costs(0.1, 16, 1.0 + 0.05 * n, n)
    confidences = [0.95] * 16
    before = controller.clip("r", confidences)
    for _ in range(30):
        sent = controller.clip("r", confidences)
        controller.observe("r", drafted=sent, accepted=0, generated=16)
    assert before >= 8
    assert controller.clip("r", confidences) <= 1


# --- simulator ---------------------------------------------------------------------------------

WORKLOADS = {
    # conditional acceptance per position, draft cost(k), verify cost(n), in seconds
    "cliff": ([0.92] * 10 + [0.55] * 22, lambda k: 0.015 + 0.0004 * k, lambda n: 0.1 + 0.003 * n),
    "declining": (
        [max(0.05, 0.95 - 0.03 * i) for i in range(32)],
        lambda k: 0.03,
        lambda n: 0.1 + 0.001 * n,
    ),
    "easy_memory_bound": ([0.97] * 32, lambda k: 0.02 + 0.001 * k, lambda n: 0.1 + 0.0005 * n),
    "steep_verify": ([0.8] * 32, lambda k: 0.01, lambda n: 0.1 + 0.015 * n),
}


@pytest.mark.parametrize("workload", sorted(WORKLOADS))
def test_converges_to_within_5_percent_of_the_best_fixed_length(workload: str) -> None:
    rates, draft, verify = WORKLOADS[workload]
    rng = random.Random(1234)
    controller = CostAwareController(32)
    tokens = seconds = 0.0
    for r in range(12):
        req = f"req-{r}"
        for _ in range(60):
            k = controller.initial_length(req)
            accepted = 0
            while accepted < k and rng.random() < rates[accepted]:
                accepted += 1
            jitter = 1.0 + 0.05 * rng.uniform(-1.0, 1.0)  # measured times are noisy
            draft_s = draft(k) * jitter if k else 0.0
            controller.record_costs(draft_s, k, verify(k) * jitter, k)
            controller.observe(req, drafted=k, accepted=accepted, generated=k)
            if r > 0:  # the first request is warm-up; judge the expected value of each choice
                tokens += expected_accepted(k, rates) + 1.0
                seconds += (draft(k) if k else 0.0) + verify(k)
        controller.forget(req)
    best_fixed = max(throughput(k, rates, draft, verify) for k in (4, 8, 16, 32))
    assert tokens / seconds >= 0.95 * best_fixed
    assert controller.num_tracked == 0


def test_a_probe_is_sent_whole_even_where_clip_would_trim_it() -> None:
    controller = CostAwareController(8, probe_interval=3)
    for _ in range(30):  # nothing accepted, unconfident drafts: drafting stops
        k = controller.initial_length("r")
        sent = controller.clip("r", [0.01] * k) if k else 0
        controller.record_costs(0.5 if k else 0.0, k, 1.0 + 0.01 * sent, sent)
        controller.observe("r", drafted=sent, accepted=0, generated=k)
    decisions = []
    for _ in range(3 * 3):
        k = controller.initial_length("r")
        if k == 0:
            controller.observe("r", drafted=0, accepted=0, generated=0)
            continue
        decisions.append((k, controller.clip("r", [0.01] * k)))
        controller.observe("r", drafted=k, accepted=0, generated=k)
    assert decisions, "no probe in three probe intervals"
    assert all(sent == k for k, sent in decisions)
