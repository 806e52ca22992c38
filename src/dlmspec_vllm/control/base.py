"""The contract between the proposer and a draft-length controller, plus what all share.

One controller object serves the whole engine and keeps per-request state keyed by vLLM's
request id: the length decision is per request (a request writing boilerplate accepts far more
than one doing arithmetic), while priors, cost measurements and counters are engine-wide.

Per engine step the proposer drives each request through:

    c.record_step(timing)                   # what the last step cost (cost-aware learns)
    c.begin_step(batch_size)                # requests decoding in the step being decided
    ks = c.initial_lengths(req_ids)         # 0 means: no draft for that request this step
    extra = c.extension(req_id, confs)      # after each drafter pass; > 0 asks for another pass
    n = c.clip(req_id, confs)               # how many drafted tokens to send for verification
    c.observe(req_id, drafted=n, accepted=a, generated=g)   # next step, from vLLM's acceptance
    c.forget(req_id)                        # request finished or preempted

Every length a controller returns lies in [0, max_length]: vLLM allocates at most
num_speculative_tokens draft slots per request, so exceeding it would break the engine, not just
waste work. The base class enforces that bound once, so no controller can forget it.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import ClassVar, Generic, TypeVar


def check_int(name: str, value: object, low: int, high: int | None = None) -> int:
    """Return value if it is an int in [low, high] (high None: unbounded), else raise.

    The message names the argument and the allowed range so a bad setting is fixable from the
    error alone. bool is rejected although it subclasses int: `True` as a length is a bug.
    """
    if (
        isinstance(value, bool)
        or not isinstance(value, int)
        or value < low
        or (high is not None and value > high)
    ):
        allowed = f"in [{low}, {high}]" if high is not None else f">= {low}"
        raise ValueError(f"{name} must be an integer {allowed}, got {value!r}")
    return value


def check_float(
    name: str,
    value: object,
    low: float,
    high: float,
    *,
    low_open: bool = False,
    high_open: bool = False,
) -> float:
    """Return value as float if it is a finite number in the given interval, else raise."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if ok:
        x = float(value)  # type: ignore[arg-type]
        ok = not math.isnan(x) and (x > low if low_open else x >= low)
        ok = ok and (x < high if high_open else x <= high)
    if not ok:
        interval = f"{'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
        raise ValueError(f"{name} must be a number in {interval}, got {value!r}")
    return float(value)  # type: ignore[arg-type]


@dataclass(frozen=True)
class ControllerStats:
    """Engine-wide totals a controller has seen, as of one moment; cheap to take each step.

    steps: observe() calls (one per request per verified step, drafted or not).
    length_histogram[n]: how many steps sent n draft tokens (n in [0, max_length]).
    extra: controller-specific counters (FailFast extensions, cost-aware probes, ...).
    """

    controller: str
    steps: int
    drafted_tokens: int
    accepted_tokens: int
    generated_tokens: int
    length_histogram: tuple[int, ...]
    extra: Mapping[str, float] = field(default_factory=dict)

    @property
    def mean_length(self) -> float:
        """Mean number of draft tokens sent per step (0-length steps included)."""
        return self.drafted_tokens / self.steps if self.steps else 0.0

    @property
    def mean_accepted(self) -> float:
        """Mean accepted draft tokens per step, without vLLM's bonus token."""
        return self.accepted_tokens / self.steps if self.steps else 0.0

    @property
    def acceptance_rate(self) -> float:
        """Accepted over sent draft tokens."""
        return self.accepted_tokens / self.drafted_tokens if self.drafted_tokens else 0.0

    def as_dict(self) -> dict[str, float | int | str]:
        """Flat mapping for logs and metrics exporters; the histogram stays out (use the field)."""
        out: dict[str, float | int | str] = {
            "controller": self.controller,
            "steps": self.steps,
            "drafted_tokens": self.drafted_tokens,
            "accepted_tokens": self.accepted_tokens,
            "generated_tokens": self.generated_tokens,
            "mean_length": self.mean_length,
            "mean_accepted": self.mean_accepted,
            "acceptance_rate": self.acceptance_rate,
        }
        out.update(self.extra)
        return out


@dataclass(frozen=True)
class StepTiming:
    """One engine step as a draft source saw it; the proposer measures it, controllers learn.

    batch_size: requests decoding in the step that verified the last drafts.
    verify_seconds: that step's time outside the proposer (the target's forward, sampling,
        vLLM's bookkeeping and scheduling), for the whole batch.
    verified_tokens: draft tokens it verified, over all requests and sources.
    draft_seconds: what this source spent drafting in the proposer call before it.
    drafted_tokens: tokens this source drafted in that call (0: it did not run).
    """

    batch_size: int
    verify_seconds: float
    verified_tokens: int
    draft_seconds: float = 0.0
    drafted_tokens: int = 0


class LengthController(ABC):
    """Decides, per request and step, how many tokens the diffusion drafter proposes.

    Subclasses implement `_initial_length` and optionally `_extension`, `_clip`, `_observe` and
    `_extra_stats`; the public methods clamp every answer into the engine's bounds and keep the
    shared counters, so those rules live in one place.
    """

    name: ClassVar[str]

    def __init__(self, max_length: int) -> None:
        """max_length: the engine's num_speculative_tokens, the most draft slots vLLM holds."""
        self._max_length = check_int("max_length", max_length, 1)
        self._steps = 0
        self._drafted = 0
        self._accepted = 0
        self._generated = 0
        self._histogram = [0] * (self._max_length + 1)

    @property
    def max_length(self) -> int:
        return self._max_length

    def record_step(self, timing: StepTiming) -> None:  # noqa: B027 (most controllers ignore cost)
        """What the engine step before cost; controllers that weigh cost learn from it."""

    def begin_step(self, batch_size: int) -> None:  # noqa: B027 (most controllers ignore batch size)
        """The step about to be decided has batch_size requests decoding."""

    def initial_lengths(self, req_ids: Sequence[str]) -> list[int]:
        """Tokens each request drafts in this step's first pass; 0 means no draft this step.

        Decided for the step's requests together: a drafter pass costs the same whether one
        request or many use it, so whether one request's draft pays depends on the others'.
        """
        return [max(0, min(k, self._max_length)) for k in self._initial_lengths(req_ids)]

    def initial_length(self, req_id: str) -> int:
        """initial_lengths for one request."""
        return self.initial_lengths([req_id])[0]

    def extension(self, req_id: str, confidences: Sequence[float]) -> int:
        """How many more positions to draft in a further pass (0: stop drafting this step).

        confidences: the drafter's confidence for every position drafted so far this step.
        The answer never lets the step's total exceed max_length.
        """
        room = self._max_length - len(confidences)
        return max(0, min(self._extension(req_id, confidences), room))

    def clip(self, req_id: str, confidences: Sequence[float]) -> int:
        """How many of the drafted tokens (a prefix) to send for verification."""
        limit = min(len(confidences), self._max_length)
        return max(0, min(self._clip(req_id, confidences), limit))

    def observe(self, req_id: str, drafted: int, accepted: int, generated: int) -> None:
        """Feed back one verified step: tokens sent, accepted by the target, raw EOS-aware length.

        generated: positions before the first EOS in the raw draft (all of them if none); it is
        what DiffuSpec's ADL calls L_gen. Invalid counts raise ValueError: they mean the proposer
        mis-attributed acceptance, and learning from them would silently skew every decision.
        """
        check_int("drafted", drafted, 0, self._max_length)
        check_int("accepted", accepted, 0, drafted)
        check_int("generated", generated, 0)
        self._steps += 1
        self._drafted += drafted
        self._accepted += accepted
        self._generated += generated
        self._histogram[drafted] += 1
        self._observe(req_id, drafted, accepted, generated)

    def forget(self, req_id: str) -> None:  # noqa: B027 (stateless: nothing to drop)
        """Drop the request's state (finished or preempted); unknown ids are ignored."""

    @property
    def num_tracked(self) -> int:
        """Number of requests with per-request state held."""
        return 0

    def stats(self) -> ControllerStats:
        """Snapshot of the totals since construction."""
        return ControllerStats(
            controller=self.name,
            steps=self._steps,
            drafted_tokens=self._drafted,
            accepted_tokens=self._accepted,
            generated_tokens=self._generated,
            length_histogram=tuple(self._histogram),
            extra=self._extra_stats(),
        )

    @abstractmethod
    def _initial_length(self, req_id: str) -> int:
        """Unclamped first-pass length."""

    def _initial_lengths(self, req_ids: Sequence[str]) -> list[int]:
        """Unclamped first-pass lengths; by default each request decides alone."""
        return [self._initial_length(req_id) for req_id in req_ids]

    def _extension(self, req_id: str, confidences: Sequence[float]) -> int:
        """Unclamped extension; only controllers that draft in several passes override it."""
        return 0

    def _clip(self, req_id: str, confidences: Sequence[float]) -> int:
        """Unclamped number of tokens to send; by default everything drafted."""
        return len(confidences)

    def _observe(  # noqa: B027 (a no-op hook: stateless controllers learn nothing)
        self, req_id: str, drafted: int, accepted: int, generated: int
    ) -> None:
        """Learn from a verified step; stateless controllers learn nothing."""

    def _extra_stats(self) -> dict[str, float]:
        """Controller-specific counters for stats()."""
        return {}


S = TypeVar("S")


class StatefulController(LengthController, Generic[S]):
    """A controller that keeps one state object per request, created on first sight."""

    def __init__(self, max_length: int) -> None:
        super().__init__(max_length)
        self._states: dict[str, S] = {}

    @abstractmethod
    def _new_state(self) -> S:
        """State for a request seen for the first time."""

    def _state(self, req_id: str) -> S:
        state = self._states.get(req_id)
        if state is None:
            state = self._states[req_id] = self._new_state()
        return state

    def forget(self, req_id: str) -> None:
        self._states.pop(req_id, None)

    @property
    def num_tracked(self) -> int:
        return len(self._states)
