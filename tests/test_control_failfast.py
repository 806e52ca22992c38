"""FailFast: start at 10, extend by 10 while every drafted position is confident, cap 60."""

from __future__ import annotations

from collections.abc import Callable

from dlmspec_vllm.control import FailFastController

HIGH, LOW = 0.9, 0.2


def passes(controller: FailFastController, confidence: Callable[[int], float]) -> list[int]:
    """Lengths of each drafter pass in one step; confidence(i) is position i's confidence."""
    lengths = [controller.initial_length("r")]
    confidences = [confidence(i) for i in range(lengths[0])]
    while (extra := controller.extension("r", confidences)) > 0:
        lengths.append(extra)
        confidences += [confidence(len(confidences) + i) for i in range(extra)]
    return lengths


def test_all_confident_extends_to_the_cap() -> None:
    controller = FailFastController(128)
    assert passes(controller, lambda i: HIGH) == [10, 10, 10, 10, 10, 10]
    assert controller.stats().extra == {"extensions": 5, "low_confidence_stops": 0, "cap_stops": 1}


def test_low_confidence_in_first_pass_stops_at_start_length() -> None:
    controller = FailFastController(128)
    assert passes(controller, lambda i: LOW if i == 7 else HIGH) == [10]
    assert controller.clip("r", [HIGH] * 7 + [LOW] + [HIGH] * 2) == 10


def test_low_confidence_in_a_later_pass_stops_there() -> None:
    assert passes(FailFastController(128), lambda i: LOW if i == 33 else HIGH) == [10, 10, 10, 10]


def test_threshold_is_inclusive() -> None:
    controller = FailFastController(128)
    assert controller.extension("r", [0.45] * 10) == 10
    assert controller.extension("r", [0.45] * 9 + [0.4499]) == 0


def test_engine_cap_shortens_the_last_extension() -> None:
    assert passes(FailFastController(25), lambda i: HIGH) == [10, 10, 5]
    assert passes(FailFastController(6), lambda i: HIGH) == [6]


def test_custom_schedule() -> None:
    controller = FailFastController(128, start_length=4, increment=8, threshold=0.7, length_cap=30)
    assert passes(controller, lambda i: 0.8) == [4, 8, 8, 8, 2]
    assert passes(controller, lambda i: 0.69 if i == 15 else 0.8) == [4, 8, 8]


def test_default_sends_the_whole_draft() -> None:
    """As FailFast's reference code: low-confidence positions are verified too."""
    controller = FailFastController(64)
    assert controller.clip("r", [HIGH] * 12 + [LOW] + [HIGH] * 7) == 20
    assert controller.clip("r", [LOW] * 10) == 10


def test_truncate_sends_the_prefix_before_the_first_low_position_but_at_least_one() -> None:
    controller = FailFastController(64, truncate=True)
    assert controller.clip("r", [HIGH] * 12 + [LOW] + [HIGH] * 7) == 12
    assert controller.clip("r", [LOW] * 10) == 1
    assert controller.clip("r", [HIGH] * 20) == 20
    assert controller.clip("r", []) == 0


def test_stateless_across_steps() -> None:
    controller = FailFastController(64)
    for accepted in (0, 10, 3):
        assert controller.initial_length("r") == 10
        controller.observe("r", drafted=10, accepted=accepted, generated=10)
    assert controller.num_tracked == 0
    assert controller.stats().accepted_tokens == 13
