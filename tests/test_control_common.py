"""Contract shared by every draft-length controller: bounds, validation, state lifetime, stats."""

from __future__ import annotations

import math
import random

import pytest

from dlmspec_vllm.control import (
    CONTROLLERS,
    ADLController,
    CostAwareController,
    FailFastController,
    FixedLengthController,
    LengthController,
    StepTiming,
    make_controller,
)

NAMES = ["fixed", "adl", "failfast", "cost_aware"]


def test_factory_builds_each_controller_by_name() -> None:
    expected = {
        "fixed": FixedLengthController,
        "adl": ADLController,
        "failfast": FailFastController,
        "cost_aware": CostAwareController,
    }
    assert sorted(CONTROLLERS) == sorted(expected)
    for name, cls in expected.items():
        controller = make_controller(name, 8)
        assert type(controller) is cls
        assert controller.max_length == 8
    assert make_controller("adl", 64, k_min=4, k_max=8).initial_length("r") == 8


def test_factory_rejects_unknown_name() -> None:
    with pytest.raises(ValueError, match=r"name must be one of .*'cost_aware'"):
        make_controller("eagle", 8)


INVALID = [
    ("fixed", {"k": -1}, "k"),
    ("fixed", {"k": True}, "k"),
    ("fixed", {"k": 2.0}, "k"),
    ("adl", {"rho": 0.0}, "rho"),
    ("adl", {"rho": 1.5}, "rho"),
    ("adl", {"rho": math.nan}, "rho"),
    ("adl", {"delta": -1}, "delta"),
    ("adl", {"k_min": 0}, "k_min"),
    ("adl", {"k_min": 30, "k_max": 20}, "k_max"),
    ("failfast", {"start_length": 0}, "start_length"),
    ("failfast", {"increment": 0}, "increment"),
    ("failfast", {"threshold": 1.2}, "threshold"),
    ("failfast", {"threshold": -0.1}, "threshold"),
    ("failfast", {"length_cap": 5}, "length_cap"),
    ("failfast", {"truncate": "yes"}, "truncate"),
    ("cost_aware", {"prior_acceptance": 1.0}, "prior_acceptance"),
    ("cost_aware", {"prior_acceptance": 0.0}, "prior_acceptance"),
    ("cost_aware", {"prior_strength": 0.0}, "prior_strength"),
    ("cost_aware", {"history_decay": 0.0}, "history_decay"),
    ("cost_aware", {"history_decay": 1.1}, "history_decay"),
    ("cost_aware", {"pooled_decay": 0.0}, "pooled_decay"),
    ("cost_aware", {"confidence_weight": -0.5}, "confidence_weight"),
    ("cost_aware", {"probe_interval": 0}, "probe_interval"),
    ("cost_aware", {"draft_cost_ratio": 0.0}, "draft_cost_ratio"),
    ("cost_aware", {"draft_cost_slope": -1.0}, "draft_cost_slope"),
    ("cost_aware", {"verify_cost_slope": math.inf}, "verify_cost_slope"),
    ("cost_aware", {"cost_ema": 0.0}, "cost_ema"),
]


@pytest.mark.parametrize(("name", "kwargs", "arg"), INVALID)
def test_invalid_settings_name_the_argument_and_range(
    name: str, kwargs: dict[str, object], arg: str
) -> None:
    with pytest.raises(ValueError, match=rf"^{arg} must be .*(\[|\(|>=|bool)"):
        make_controller(name, 8, **kwargs)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("max_length", [0, -3, 2.5])
def test_invalid_max_length(name: str, max_length: object) -> None:
    with pytest.raises(ValueError, match=r"^max_length must be an integer >= 1"):
        make_controller(name, max_length)  # type: ignore[arg-type]


@pytest.mark.parametrize("name", NAMES)
def test_observe_rejects_impossible_counts(name: str) -> None:
    controller = make_controller(name, 8)
    with pytest.raises(ValueError, match=r"^accepted must be an integer in \[0, 3\]"):
        controller.observe("r", drafted=3, accepted=4, generated=3)
    with pytest.raises(ValueError, match=r"^drafted must be an integer in \[0, 8\]"):
        controller.observe("r", drafted=9, accepted=0, generated=9)
    with pytest.raises(ValueError, match=r"^generated must be an integer >= 0"):
        controller.observe("r", drafted=1, accepted=0, generated=-1)
    assert controller.stats().steps == 0


@pytest.mark.parametrize("name", NAMES)
def test_every_length_stays_within_the_engine_cap(name: str) -> None:
    """Large defaults (ADL's 20..30, FailFast's 10/60) must bow to num_speculative_tokens = 3."""
    controller = make_controller(name, 3)
    for step in range(20):
        k = controller.initial_length("r")
        assert 0 <= k <= 3
        confidences = [0.99] * k
        assert controller.extension("r", confidences) == 0
        assert 0 <= controller.clip("r", [0.99] * 7) <= 3
        controller.observe("r", drafted=k, accepted=k if step % 2 else 0, generated=k)


def test_fixed_always_drafts_k_clamped() -> None:
    assert [FixedLengthController(16, k=5).initial_length(f"r{i}") for i in range(3)] == [5] * 3
    assert FixedLengthController(16).initial_length("r") == 16
    assert FixedLengthController(4, k=50).initial_length("r") == 4
    assert FixedLengthController(4, k=0).initial_length("r") == 0


def _drive(controller: LengthController, rng: random.Random, req_id: str) -> None:
    """One engine step for one request, with random acceptance and confidences."""
    k = controller.initial_length(req_id)
    confidences = [rng.random() for _ in range(k)]
    while (extra := controller.extension(req_id, confidences)) > 0:
        confidences += [rng.random() for _ in range(extra)]
    sent = controller.clip(req_id, confidences)
    accepted = rng.randint(0, sent)
    controller.observe(req_id, drafted=sent, accepted=accepted, generated=len(confidences))


@pytest.mark.parametrize("name", NAMES)
def test_forget_frees_all_request_state(name: str) -> None:
    rng = random.Random(7)
    controller = make_controller(name, 16)
    live: list[str] = []
    peak = 0
    for i in range(300):
        live.append(f"req-{i}")
        for req_id in live:
            _drive(controller, rng, req_id)
        peak = max(peak, controller.num_tracked)
        if len(live) > 8 or rng.random() < 0.3:  # finish or preempt a random request
            controller.forget(live.pop(rng.randrange(len(live))))
    for req_id in live:
        controller.forget(req_id)
    controller.forget("never-seen")
    assert controller.num_tracked == 0
    if name in ("adl", "cost_aware"):
        assert peak >= 8
    else:
        assert peak == 0  # fixed and failfast keep no per-request state at all


def test_stats_totals_and_histogram() -> None:
    controller = FixedLengthController(4, k=3)
    for accepted in (3, 1, 0):
        controller.observe(
            "a", drafted=controller.initial_length("a"), accepted=accepted, generated=3
        )
    controller.observe("b", drafted=0, accepted=0, generated=0)
    stats = controller.stats()
    assert (stats.steps, stats.drafted_tokens, stats.accepted_tokens) == (4, 9, 4)
    assert stats.generated_tokens == 9
    assert stats.length_histogram == (1, 0, 0, 3, 0)
    assert stats.mean_length == pytest.approx(9 / 4)
    assert stats.mean_accepted == pytest.approx(1.0)
    assert stats.acceptance_rate == pytest.approx(4 / 9)
    flat = stats.as_dict()
    assert flat["controller"] == "fixed" and flat["steps"] == 4


def test_stats_include_controller_counters() -> None:
    failfast = FailFastController(64)
    failfast.extension("r", [0.9] * 10)
    failfast.extension("r", [0.9] * 19 + [0.1])
    assert failfast.stats().as_dict()["extensions"] == 1
    assert failfast.stats().extra["low_confidence_stops"] == 1
    cost = CostAwareController(8)
    cost.record_step(StepTiming(1, 0.1, 4, 0.01, 4))
    assert cost.stats().extra["cost_samples"] == 1
