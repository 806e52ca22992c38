"""Online estimate of what drafting k tokens and verifying n tokens cost, in seconds.

Both costs are modelled as lines, draft(k) = a + b*k for k >= 1 (draft(0) = 0: no pass runs) and
verify(n) = a + b*n (verify(0) is a plain decode step), fitted by exponentially weighted least
squares so they follow drift (context growth, batch changes). Lines, because that is what these
costs look like over the range that matters: a diffusion pass or a memory-bound target pass has
a large fixed part and a small per-token part; a compute-bound target has a steeper slope.

The fit is pulled toward a prior slope expressed as a fraction of the cost level. When all
recent steps used the same length the data say nothing about the slope, and the prior keeps the
model usable (ridge regression whose prior weighs as much as one sample one token away from the
mean length, so a few steps of varied lengths outweigh it). The prior is relative, so it holds
in any time unit.

Before any measurement, costs are in units of one plain decode step: verify(n) = 1 + s_v * n and
draft(k) = r * (1 + s_d * k). Until a step with a draft pass is measured, the draft line is that
prior scaled by the measured verify(0), so the two costs stay in the same unit.

What a step costs depends on how many requests share it: at batch 1 a CPU or GPU step is
memory-bound and verifying a few more tokens is nearly free, at batch 64 it is compute-bound and
every drafted token costs about what a request's own token does. BatchCostModel therefore keeps
one CostModel per batch-size bucket (powers of two), fitted on whole-step timings, and answers
for the bucket of the batch at hand. Within a bucket the batch still varies (a burst ends, a
closed loop's requests finish unevenly), and the steps that verify the most drafts tend to be
those with the fewest requests left: a line over draft tokens alone then finds drafting free. So
the step lines are over all the tokens a step computes, batch size plus draft tokens, and plain
steps (no draft verified) and steps that verified drafts share one slope, a token costing what
it costs whichever it is, each kind with its own intercept (a drafted step also pays rejection
sampling); both are evaluated at the batch at hand.

A bucket's first steps teach it the most and may be the least typical: on a CPU oneDNN builds
its kernels per shape, so the first step that computes a given number of tokens can run slower,
and drafts of varied lengths bring new counts one after another (the likeliest reading of the
lock-out the prefix-caching benchmark showed; not timed step by step). Three rules keep a few
such steps from pricing drafting out for good (once nobody drafts, no drafted step comes to
correct the fit): the slope never exceeds either kind's mean cost per token, so neither
intercept falls below zero and makes every later step look a stall; a drafted step costs at
least a plain one, and where the two intercepts disagree the kind seen more recently is
believed; and both kinds age with every step, so the next drafted step, a probe, outweighs
stale ones.
"""

from __future__ import annotations

import math

from dlmspec_vllm.control.base import StepTiming, check_float, check_int

_RIDGE = 1.0  # prior weight on the slope: one sample one token off the mean length
# A step that took this many times what its bucket predicts, once the bucket has this many
# samples, is the engine standing still (a paused engine, the host), not what the step cost.
_STALL_FACTOR = 4.0
_STALL_MIN_SAMPLES = 8
_MIN_COST = 1e-9  # keeps costs positive whatever noise the fit sees


class _WeightedLine:
    """Exponentially weighted least-squares line y = a + b*x with a relative slope prior."""

    __slots__ = ("_keep", "_w", "_x", "_y", "_xx", "_xy")

    def __init__(self, ema: float) -> None:
        self._keep = 1.0 - ema
        self._w = self._x = self._y = self._xx = self._xy = 0.0

    @property
    def empty(self) -> bool:
        return self._w == 0.0

    def add(self, x: float, y: float) -> None:
        self.fade()
        self._w += 1.0
        self._x += x
        self._y += y
        self._xx += x * x
        self._xy += x * y

    def fade(self) -> None:
        """One step older: the line stays where it is (its means do not move), but weighs less
        against the next sample."""
        keep = self._keep
        self._w *= keep
        self._x *= keep
        self._y *= keep
        self._xx *= keep
        self._xy *= keep

    def moments(self) -> tuple[float, float, float, float, float]:
        """(weight, mean x, mean y, spread of x, co-spread of x and y): spreads summed over the
        (decayed) samples, not averaged, so a prior's fixed weight washes out as evidence
        accumulates."""
        w = self._w
        mx, my = self._x / w, self._y / w
        return w, mx, my, max(self._xx - w * mx * mx, 0.0), self._xy - w * mx * my

    def coefficients(self, rel_slope: float) -> tuple[float, float]:
        """(a, b) with b >= 0 (cost never falls with length) and a > 0."""
        _, mx, my, spread, co_spread = self.moments()
        b = _ridge_slope(spread, co_spread, rel_slope * my / (1.0 + rel_slope * mx))
        return max(my - b * mx, _MIN_COST), b


def _ridge_slope(spread: float, co_spread: float, prior: float) -> float:
    """Least-squares slope pulled toward `prior` (a slope b0 = rel_slope * a, with a the
    intercept implied by the mean point), never negative."""
    return max(0.0, (co_spread + _RIDGE * prior) / (spread + _RIDGE))


class CostModel:
    """Draft and verify cost lines, learned from the proposer's step timings."""

    def __init__(
        self,
        *,
        draft_cost_ratio: float = 0.2,
        draft_cost_slope: float = 0.02,
        verify_cost_slope: float = 0.01,
        cost_ema: float = 0.05,
    ) -> None:
        """Priors are relative; see the module docstring.

        draft_cost_ratio in (0, 100]: one drafter pass over a plain decode step (0.2: a diffusion
            drafter several times smaller than the target).
        draft_cost_slope, verify_cost_slope in [0, 10]: extra cost per token as a fraction of the
            fixed part (0.01 for verify: at small batch a target step is memory-bound, so
            verifying k tokens costs little more than one).
        cost_ema in (0, 1]: weight of the newest timing (0.05: about the last 20 steps count).
        """
        self._ratio = check_float("draft_cost_ratio", draft_cost_ratio, 0.0, 100.0, low_open=True)
        self._draft_slope = check_float("draft_cost_slope", draft_cost_slope, 0.0, 10.0)
        self._verify_slope = check_float("verify_cost_slope", verify_cost_slope, 0.0, 10.0)
        ema = check_float("cost_ema", cost_ema, 0.0, 1.0, low_open=True)
        self._draft = _WeightedLine(ema)
        # Step seconds over the tokens the step computes (batch size plus draft tokens), one
        # line per kind of step sharing one slope: a token costs what it costs, whether a
        # request's own or a draft's, but a step that verified drafts pays rejection sampling
        # too, so each kind has its own intercept. Both kinds age with every step: a stretch
        # without drafts keeps what drafting was seen to cost, but the next drafted step
        # outweighs it, so a few early steps that ran slow cannot keep drafting priced out when
        # no drafted step comes to correct them.
        self._verify = _WeightedLine(ema)
        self._plain = _WeightedLine(ema)
        self._samples = 0
        self._lines: dict[int, tuple[tuple[float, float], tuple[float, float]]] = {}

    def record(
        self,
        draft_seconds: float,
        draft_len: int,
        verify_seconds: float,
        verify_tokens: int,
        batch_size: int = 1,
    ) -> None:
        """Add one step's timings: a draft pass of draft_len positions (0: none ran, its time is
        ignored) and a verification of verify_tokens draft tokens (0: a plain decode step) for
        batch_size requests."""
        for name, seconds in (("draft_seconds", draft_seconds), ("verify_seconds", verify_seconds)):
            check_float(name, seconds, 0.0, math.inf, high_open=True)
        check_int("draft_len", draft_len, 0)
        check_int("verify_tokens", verify_tokens, 0)
        check_int("batch_size", batch_size, 1)
        if draft_len > 0:
            self._draft.add(draft_len, draft_seconds)
        if verify_tokens > 0:
            self._verify.add(batch_size + verify_tokens, verify_seconds)
            self._plain.fade()
        else:
            self._plain.add(batch_size, verify_seconds)
            self._verify.fade()
        self._samples += 1
        self._lines.clear()

    @property
    def samples(self) -> int:
        """Timings recorded so far."""
        return self._samples

    def lines(self, batch_size: int = 1) -> tuple[tuple[float, float], tuple[float, float]]:
        """((draft_a, draft_b), (verify_a, verify_b)) at batch_size: a drafter pass over k
        positions costs draft_a + draft_b * k, a step of batch_size requests verifying n draft
        tokens verify_a + verify_b * n. Cached per batch size until the next record()."""
        cached = self._lines.get(batch_size)
        if cached is not None:
            return cached
        _, drafted, slope = self._step_lines()
        verify = (max(drafted + slope * batch_size, _MIN_COST), slope)
        if self._draft.empty:
            a = self._ratio * verify[0]
            draft = (a, a * self._draft_slope)
        else:
            draft = self._draft.coefficients(self._draft_slope)
        self._lines[batch_size] = (draft, verify)
        return draft, verify

    def _step_lines(self) -> tuple[float, float, float]:
        """(plain intercept, drafted intercept, shared slope) over the tokens a step computes.
        A kind not yet seen takes the other's intercept; with nothing seen, the prior of one
        plain-step unit at batch 1."""
        plain, drafted = (
            None if line.empty else line.moments() for line in (self._plain, self._verify)
        )
        kinds = [m for m in (plain, drafted) if m is not None]
        if not kinds:
            # One unit at batch 1 and no draft, s_v more per token: verify(n) = 1 + s_v * n.
            return 1.0 - self._verify_slope, 1.0 - self._verify_slope, self._verify_slope
        weight = sum(w for w, *_ in kinds)
        mx = sum(w * x for w, x, *_ in kinds) / weight
        my = sum(w * y for w, _, y, *_ in kinds) / weight
        slope = _ridge_slope(
            sum(spread for *_, spread, _ in kinds),
            sum(co_spread for *_, co_spread in kinds),
            self._verify_slope * my / (1.0 + self._verify_slope * mx),
        )
        # No step costs less than nothing at zero tokens: a token costs at most a kind's mean
        # cost per token. (A line of one kind through a few slow early steps can otherwise
        # put the other kind's intercept below zero, and every step after it looks a stall.)
        slope = min(slope, *(y / x for _, x, y, *_ in kinds if x > 0))
        if plain is None or drafted is None:
            ((_, x, y, *_),) = kinds
            return y - slope * x, y - slope * x, slope
        plain_a, drafted_a = plain[2] - slope * plain[1], drafted[2] - slope * drafted[1]
        # A step that verifies drafts does all a plain step does, and more. Where the two
        # intercepts say otherwise, the kind seen more recently (the heavier, as both age every
        # step) is believed.
        if plain[0] >= drafted[0]:
            return plain_a, max(drafted_a, plain_a), slope
        return min(plain_a, drafted_a), drafted_a, slope

    def plain_step(self, batch_size: int = 1) -> float:
        """What a step of batch_size requests that verifies no draft costs: measured where such
        steps were seen, else a drafted step's cost at 0 draft tokens."""
        plain, _, slope = self._step_lines()
        return max(plain + slope * batch_size, _MIN_COST)

    def draft_cost(self, k: int) -> float:
        """Cost of one drafter pass over k positions (0 for k == 0: no pass)."""
        if k <= 0:
            return 0.0
        a, b = self.lines()[0]
        return a + b * k

    def verify_cost(self, n: int, batch_size: int = 1) -> float:
        """Cost of a step of batch_size requests verifying n draft tokens."""
        a, b = self.lines(batch_size)[1]
        return a + b * n


def batch_bucket(batch_size: int) -> int:
    """The power of two at or above batch_size: the buckets costs are kept in."""
    return 1 << (max(1, batch_size) - 1).bit_length()


class BatchCostModel:
    """A CostModel per batch-size bucket, each fitted on whole-step timings."""

    def __init__(self, **cost_settings: float) -> None:
        """cost_settings: CostModel's keyword settings, shared by every bucket."""
        self._settings = cost_settings
        self._prior = CostModel(**cost_settings)  # checks the settings once, up front
        self._models: dict[int, CostModel] = {}
        self.stalls = 0  # timings left out as stalls

    def record(self, timing: StepTiming) -> None:
        """Add a step's timing to its bucket, unless it is a stall (see _STALL_FACTOR)."""
        check_int("batch_size", timing.batch_size, 1)
        bucket = batch_bucket(timing.batch_size)
        model = self._models.get(bucket)
        if model is None:
            model = self._models[bucket] = CostModel(**self._settings)
        elif model.samples >= _STALL_MIN_SAMPLES:
            expected = model.verify_cost(timing.verified_tokens, timing.batch_size)
            if timing.verified_tokens == 0:
                expected = model.plain_step(timing.batch_size)
            if timing.verify_seconds > _STALL_FACTOR * expected:
                self.stalls += 1
                return
        model.record(
            timing.draft_seconds,
            timing.drafted_tokens,
            timing.verify_seconds,
            timing.verified_tokens,
            timing.batch_size,
        )

    def model_for(self, batch_size: int) -> CostModel:
        """The bucket's model; a bucket not yet measured borrows the nearest measured one (the
        smaller on a tie), and with nothing measured the relative prior answers."""
        if not self._models:
            return self._prior
        bucket = batch_bucket(batch_size)
        return (
            self._models.get(bucket)
            or self._models[
                min(self._models, key=lambda b: (abs(b.bit_length() - bucket.bit_length()), b))
            ]
        )

    @property
    def samples(self) -> int:
        return sum(model.samples for model in self._models.values())

    @property
    def buckets(self) -> dict[int, CostModel]:
        """The measured buckets by their batch size."""
        return dict(self._models)
