"""DiffuSpec's ADL rule, step by step on scripted acceptance sequences."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from dlmspec_vllm.control import ADLController

# (k sent this step) -> (accepted, generated)
Outcome = Callable[[int], tuple[int, int]]


def run(controller: ADLController, outcomes: list[Outcome]) -> list[int]:
    """Lengths chosen at each step when step i's verification goes as outcomes[i] says."""
    lengths = []
    for outcome in outcomes:
        k = controller.initial_length("r")
        lengths.append(k)
        accepted, generated = outcome(k)
        controller.observe("r", drafted=k, accepted=accepted, generated=generated)
    lengths.append(controller.initial_length("r"))
    return lengths


def all_accepted(k: int) -> tuple[int, int]:
    return k, k


def none_accepted(k: int) -> tuple[int, int]:
    return 0, k


def test_all_accepted() -> None:
    # EMAs start at 0: gen=acc=15 -> 15+10=25; 20 -> 30; 25 -> 35 clipped to 30; ...
    assert run(ADLController(64), [all_accepted] * 5) == [30, 25, 30, 30, 30, 30]


def test_none_accepted() -> None:
    # gen 15, acc 0 -> floor(15) = 15 -> k_min 20; gen 17.5 -> 17 -> 20; ...
    assert run(ADLController(64), [none_accepted] * 4) == [30, 20, 20, 20, 20]


def test_alternating_acceptance() -> None:
    # full: gen=acc=15 -> 25; none: gen 20, acc 7.5 -> 20; full: gen 20, acc 13.75 -> 20; ...
    outcomes = [all_accepted, none_accepted] * 3
    assert run(ADLController(64), outcomes) == [30, 25, 20, 20, 20, 20, 20]


def test_alternating_with_small_bounds_shows_the_growth_term() -> None:
    controller = ADLController(64, k_min=2, k_max=40, delta=4)
    # full 40: gen=acc=20 -> 24; none 24: gen 22, acc 10 -> 22; full 22: gen=22, acc=16 -> 22;
    # none 22: gen 22, acc 8 -> 22; full 22: gen 22, acc 15 -> 22
    outcomes = [all_accepted, none_accepted] * 2 + [all_accepted]
    assert run(controller, outcomes) == [40, 24, 22, 22, 22, 22]


def test_eos_early_shrinks_to_what_the_drafter_generates() -> None:
    controller = ADLController(64, k_min=2, k_max=30, delta=4)

    def eos_at_3(k: int) -> tuple[int, int]:
        return 3, 3  # the drafter emits EOS after 3 tokens; all 3 are accepted

    # gen=acc: 1.5 -> 1+4=5; 2.25 -> 2+4=6; 2.625 -> 6; 2.8125 -> 6
    assert run(controller, [eos_at_3] * 4) == [30, 5, 6, 6, 6]


def test_eos_early_with_poor_acceptance_does_not_grow() -> None:
    controller = ADLController(64, k_min=2, k_max=30, delta=4)

    def eos_at_8_two_accepted(k: int) -> tuple[int, int]:
        return 2, 8

    # gen 4, acc 1 -> 4; gen 6, acc 1.5 -> 6; gen 7, acc 1.75 -> 7; gen 7.5 -> 7
    assert run(controller, [eos_at_8_two_accepted] * 4) == [30, 4, 6, 7, 7]


def test_step_without_draft_leaves_state_alone() -> None:
    controller = ADLController(64)
    controller.observe("r", drafted=30, accepted=30, generated=30)
    assert controller.initial_length("r") == 25
    controller.observe("r", drafted=0, accepted=0, generated=0)
    assert controller.initial_length("r") == 25


def test_requests_are_independent() -> None:
    controller = ADLController(64)
    controller.observe("easy", drafted=30, accepted=30, generated=30)
    controller.observe("hard", drafted=30, accepted=0, generated=30)
    assert (controller.initial_length("easy"), controller.initial_length("hard")) == (25, 20)
    assert controller.initial_length("new") == 30
    assert controller.num_tracked == 3


@pytest.mark.parametrize(
    ("max_length", "expected"),
    [
        (8, [8] * 7),
        # 30 is sent as 24, so gen=acc=24 -> 12+10 = 22; none: gen 17 -> 20; ...
        (24, [24, 22, 20, 20, 20, 20, 20]),
    ],
)
def test_engine_cap_bounds_every_length(max_length: int, expected: list[int]) -> None:
    assert run(ADLController(max_length), [all_accepted, none_accepted] * 3) == expected


def test_rho_one_follows_the_last_step() -> None:
    controller = ADLController(64, rho=1.0, k_min=1, k_max=40, delta=5)
    # rho = 1, EMA = last value: gen=acc=40 -> 45 -> 40; gen 40, acc 2 -> 40; gen=acc=12 -> 17
    outcomes: list[Outcome] = [all_accepted, lambda k: (2, k), lambda k: (12, 12)]
    assert run(controller, outcomes) == [40, 40, 40, 17]
