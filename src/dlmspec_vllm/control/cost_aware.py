"""Cost-aware draft length: pick the k that maximises expected tokens per second.

A step that drafts k tokens yields E[accepted(k)] + 1 tokens (the +1 is the target's bonus or
correction token) and takes draft(k) + verify(k) seconds. With a_i the probability that draft
position i is accepted given that positions before it were,

    E[accepted(k)] = sum_{i<k} prod_{j<=i} a_j,     choose k = argmax (E[accepted(k)] + 1) / time(k)

over k in [0, max_length], k = 0 being plain decoding (no draft pass at all). Fixed lengths,
ADL and FailFast each encode a guess of this trade-off; measuring both sides replaces the guess.

Acceptance a_i is estimated per request, online, as conditional rates with Beta-style priors:

* an engine-wide table (all requests pooled) gives each position's rate; positions nobody has
  drafted yet inherit the previous position's rate (the first inherits prior_acceptance), a
  geometric tail, so untried lengths are neither ruled out nor oversold;
* the request's own counts refine it, with a prior of the request's previous position scaled by
  the pooled table's position profile: the request sets the level, the pool the shape. So a
  request that is easier than average is allowed to extend beyond what others drafted;
* counts decay with history_decay per observed step, so the estimate follows a request moving
  between easy and hard stretches; the pooled table forgets more slowly (pooled_decay, per
  observation of any request), as it describes the drafter rather than one request's text.

The drafter's confidences enter in clip(), once the draft exists: each position's estimate is a
mix of the history rate and the confidence calibrated against past acceptance (ten confidence
bins, each shrunk toward its centre, so an uncalibrated drafter is taken at its word). The draft
pass is then already paid, so clip() keeps the prefix that maximises tokens per second with that
sunk cost, trimming tails that verification would waste time on.

Costs are those measured at the current batch size (BatchCostModel: one cost model per batch-size
bucket, whole-step timings). A request's share of a step is the verification's fixed part over
the batch, the verification's per-token slope for each token it drafts, and the drafter pass's
fixed part over the requests that draft this step: so the decision is made for the step's
requests together (initial_lengths), fewer drafters each paying more of the pass, until the
set that drafts is consistent. Where drafting loses at this batch size, nobody drafts; when the
batch shrinks (the end of a burst), the smaller bucket's costs apply again and drafting resumes.

A request whose best choice is k = 0 gets no new acceptance evidence, so it probes (drafts the
best k >= 1 anyway) to notice when drafting pays again: after probe_interval consecutive zero
decisions, and only while the probe budget, a share of the measured step time, pays for the
probe's drafter pass and verification. So probing never costs more than that share, whatever
the batch size; with no measurements yet there is no budget and no probe.

Costs come from record_step (the proposer's timing of every step); until then the relative
prior of CostModel applies.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import pairwise

from dlmspec_vllm.control.base import StatefulController, StepTiming, check_float, check_int
from dlmspec_vllm.control.cost_model import BatchCostModel, CostModel

_CONFIDENCE_BINS = 10


class _Counts:
    """Decayed per-position counts of acceptance, conditional on the prefix being accepted.

    Decay is lazy: a stored count times `scale` is the true count, so forgetting costs O(1) per
    step instead of a pass over every position.
    """

    __slots__ = ("successes", "trials", "scale")

    def __init__(self, length: int) -> None:
        self.successes = [0.0] * length
        self.trials = [0.0] * length
        self.scale = 1.0

    def add(self, drafted: int, accepted: int, decay: float) -> None:
        """Positions < accepted were accepted; position `accepted` (if sent) was the first
        rejection; later ones were never judged, so they get no count (censored, not failed)."""
        self.scale *= decay
        if self.scale < 1e-100:  # fold the scale in before the stored counts overflow
            self.successes = [x * self.scale for x in self.successes]
            self.trials = [x * self.scale for x in self.trials]
            self.scale = 1.0
        unit = 1.0 / self.scale
        successes, trials = self.successes, self.trials
        for i in range(accepted):
            successes[i] += unit
            trials[i] += unit
        if accepted < drafted:
            trials[accepted] += unit


@dataclass(slots=True)
class _History:
    """One request's counts plus what the current step left pending."""

    counts: _Counts
    pending: list[float] = field(default_factory=list)  # confidences sent, awaiting observe()
    zero_streak: int = 0
    probing: bool = False  # this step's draft is a probe: clip must send it whole


class CostAwareController(StatefulController[_History]):
    """Maximises expected (accepted + 1) tokens per second of draft + verify time, per request."""

    name = "cost_aware"

    def __init__(
        self,
        max_length: int,
        *,
        prior_acceptance: float = 0.6,
        prior_strength: float = 8.0,
        history_decay: float = 0.9,
        pooled_decay: float = 0.99,
        confidence_weight: float = 0.5,
        probe_interval: int = 16,
        probe_budget: float = 0.01,
        min_gain: float = 0.0,
        draft_cost_ratio: float = 0.2,
        draft_cost_slope: float = 0.02,
        verify_cost_slope: float = 0.01,
        cost_ema: float = 0.05,
    ) -> None:
        """Acceptance settings; cost settings are CostModel's (see there).

        prior_acceptance in (0, 1): first position's rate before any evidence (0.6: a single
            diffusion pass drafts the first position well and later ones worse).
        prior_strength in (0, 1000]: pseudo-observations behind each prior (8: comparable to
            the ~10 steps history_decay 0.9 remembers, which damps overreaction to short
            streaks; a simulator with steep verification cost preferred 8 to 4).
        history_decay in (0, 1]: weight kept by old counts per observed step (0.9: about the
            last 10 steps; 1 never forgets).
        pooled_decay in (0, 1]: the same for the pooled table, per observation of any request
            (0.99: the last ~100 observations describe the drafter's recent behaviour).
        confidence_weight in [0, 1]: share of the calibrated drafter confidence in clip().
        probe_interval >= 1: consecutive k = 0 decisions before a request may probe.
        probe_budget in [0, 1]: most share of the measured step time spent on probes (0.01:
            probing costs at most 1%; 0 never probes).
        min_gain in [0, 1]: how much faster than not drafting a draft's expected tokens per
            second must be before it is sent (0: any predicted gain). At batch 16 on a CPU a
            draft token costs about half a decode row, so copies sit near break-even, where a
            small predicted gain can be a measured loss.
        """
        super().__init__(max_length)
        self._prior = check_float(
            "prior_acceptance", prior_acceptance, 0.0, 1.0, low_open=True, high_open=True
        )
        self._strength = check_float("prior_strength", prior_strength, 0.0, 1000.0, low_open=True)
        self._decay = check_float("history_decay", history_decay, 0.0, 1.0, low_open=True)
        self._pooled_decay = check_float("pooled_decay", pooled_decay, 0.0, 1.0, low_open=True)
        self._conf_weight = check_float("confidence_weight", confidence_weight, 0.0, 1.0)
        self._probe_interval = check_int("probe_interval", probe_interval, 1)
        self._probe_budget = check_float("probe_budget", probe_budget, 0.0, 1.0)
        self._min_gain = check_float("min_gain", min_gain, 0.0, 1.0)
        self._probe_credit = 0.0  # seconds of probing the budget has paid for and not spent
        self._costs = BatchCostModel(
            draft_cost_ratio=draft_cost_ratio,
            draft_cost_slope=draft_cost_slope,
            verify_cost_slope=verify_cost_slope,
            cost_ema=cost_ema,
        )
        self._batch_size = 1
        self._pooled = _Counts(self.max_length)
        self._profile: tuple[float, list[float]] | None = None
        self._calib_successes = [0.0] * _CONFIDENCE_BINS
        self._calib_trials = [0.0] * _CONFIDENCE_BINS
        self._probes = 0
        self._trimmed = 0

    @property
    def costs(self) -> BatchCostModel:
        return self._costs

    def record_step(self, timing: StepTiming) -> None:
        self._costs.record(timing)
        spent = timing.verify_seconds + timing.draft_seconds
        # Credit is capped at one step's worth, so a long quiet stretch cannot buy a burst.
        self._probe_credit = min(self._probe_credit + self._probe_budget * spent, spent)

    def begin_step(self, batch_size: int) -> None:
        self._batch_size = max(1, batch_size)

    @property
    def _step_costs(self) -> CostModel:
        """The cost model of the current batch size."""
        return self._costs.model_for(self._batch_size)

    def _request_lines(self, drafting: int) -> tuple[tuple[float, float], tuple[float, float]]:
        """One request's share of this step's draft and verify cost lines, with `drafting`
        requests sharing the drafter pass and what a step with drafts costs beyond a plain
        one at zero draft tokens (vLLM's rejection sampling and speculative bookkeeping)."""
        costs, batch = self._step_costs, self._batch_size
        (draft_a, draft_b), (verify_a, verify_b) = costs.lines(batch)
        plain = min(costs.plain_step(batch), verify_a)
        shared = draft_a + verify_a - plain
        return (shared / max(1, drafting), draft_b), (plain / self._batch_size, verify_b)

    def _new_state(self) -> _History:
        return _History(_Counts(self.max_length))

    def _pooled_profile(self) -> tuple[float, list[float]]:
        """Pooled rate of position 0, and for each position the ratio of the next position's
        pooled rate to its own (the last ratio is unused).

        Cached until the next observe(): the proposer observes the whole batch, then decides for
        the whole batch, so one computation serves every request of a step.
        """
        if self._profile is None:
            pooled, tau = self._pooled, self._strength
            rates: list[float] = []
            prev = self._prior
            for s, t in zip(pooled.successes, pooled.trials, strict=True):
                prev = (s * pooled.scale + tau * prev) / (t * pooled.scale + tau)
                rates.append(prev)
            ratios = [nxt / max(cur, 1e-9) for cur, nxt in pairwise(rates)] + [1.0]
            self._profile = (rates[0], ratios)
        return self._profile

    def acceptance_rates(self, req_id: str) -> list[float]:
        """Estimated conditional acceptance rate of each draft position for this request."""
        counts = self._state(req_id).counts
        prior, ratios = self._pooled_profile()
        tau, scale = self._strength, counts.scale
        rates: list[float] = []
        for s, t, ratio in zip(counts.successes, counts.trials, ratios, strict=True):
            rate = (s * scale + tau * prior) / (t * scale + tau)
            rates.append(rate)
            prior = min(1.0, rate * ratio)  # next position: this request's level, pooled shape
        return rates

    def _initial_length(self, req_id: str) -> int:
        return self._initial_lengths([req_id])[0]

    def _initial_lengths(self, req_ids: Sequence[str]) -> list[int]:
        rates = [self.acceptance_rates(req_id) for req_id in req_ids]
        drafting = len(req_ids)
        while True:
            lines = self._request_lines(drafting)
            choices = [self._best_lengths(r, lines) for r in rates]
            now_drafting = sum(1 for best, _ in choices if best > 0)
            # Fewer drafters share the pass's fixed cost, so each pays more: decide again
            # until the set that drafts is the one the shares were computed for.
            if now_drafting in (0, drafting):
                break
            drafting = now_drafting
        lengths = [best for best, _ in choices]
        candidates = []
        for i, req_id in enumerate(req_ids):
            history = self._state(req_id)
            if lengths[i] > 0:
                history.zero_streak = 0
                continue
            history.zero_streak += 1
            if history.zero_streak >= self._probe_interval:
                candidates.append(i)
        self._probe(candidates, req_ids, choices, lengths, drafting=now_drafting)
        return lengths

    def _probe(
        self,
        candidates: list[int],
        req_ids: Sequence[str],
        choices: list[tuple[int, int]],
        lengths: list[int],
        *,
        drafting: int,
    ) -> None:
        """Let the longest-waiting candidates draft their best k >= 1 while the budget pays
        for it: the pass's fixed cost if nobody drafts yet, and each probe's tokens."""
        (draft_a, draft_b), (_, verify_b) = self._step_costs.lines(self._batch_size)
        candidates.sort(key=lambda i: -self._state(req_ids[i]).zero_streak)
        for i in candidates:
            k = choices[i][1]
            cost = (draft_a if drafting == 0 else 0.0) + (draft_b + verify_b) * k
            if cost > self._probe_credit:
                break
            self._probe_credit -= cost
            drafting += 1
            history = self._state(req_ids[i])
            history.zero_streak = 0
            history.probing = True
            self._probes += 1
            lengths[i] = k

    def _best_lengths(
        self,
        rates: Sequence[float],
        lines: tuple[tuple[float, float], tuple[float, float]],
    ) -> tuple[int, int]:
        """(best k over [0, max_length], best k over [1, max_length]) by tokens per second of
        one request's share of the step."""
        (draft_a, draft_b), (verify_a, verify_b) = lines
        no_draft = (1.0 + self._min_gain) / verify_a
        best_k, best = 1, -1.0
        prefix, expected = 1.0, 0.0
        for k in range(1, len(rates) + 1):
            prefix *= rates[k - 1]
            expected += prefix
            rate = (expected + 1.0) / (draft_a + verify_a + (draft_b + verify_b) * k)
            if rate > best:
                best_k, best = k, rate
        return (best_k if best > no_draft else 0), best_k

    def _clip(self, req_id: str, confidences: Sequence[float]) -> int:
        drafted = min(len(confidences), self.max_length)
        rates = self.acceptance_rates(req_id)
        calibrated = self._calibration()
        (draft_a, draft_b), (verify_a, verify_b) = self._request_lines(self._batch_size)
        sunk = draft_a + draft_b * drafted if drafted else 0.0
        weight = self._conf_weight
        keep, best = 0, (1.0 + self._min_gain) / (sunk + verify_a)
        prefix, expected = 1.0, 0.0
        for i in range(drafted):
            p = calibrated[_confidence_bin(confidences[i])]
            prefix *= (1.0 - weight) * rates[i] + weight * p
            expected += prefix
            rate = (expected + 1.0) / (sunk + verify_a + verify_b * (i + 1))
            if rate > best:
                keep, best = i + 1, rate
        history = self._state(req_id)
        if history.probing:
            # A probe exists to gather evidence; trimming it by the very estimates it is meant
            # to correct would leave a request that stopped drafting stuck at k = 0 for good.
            history.probing = False
            keep = drafted
        history.pending = list(confidences[:keep])
        self._trimmed += drafted - keep
        return keep

    def _calibration(self) -> list[float]:
        """Acceptance rate per confidence bin, shrunk toward the bin's centre confidence."""
        tau = self._strength
        return [
            (s + tau * (b + 0.5) / _CONFIDENCE_BINS) / (t + tau)
            for b, (s, t) in enumerate(zip(self._calib_successes, self._calib_trials, strict=True))
        ]

    def _observe(self, req_id: str, drafted: int, accepted: int, generated: int) -> None:
        history = self._state(req_id)
        pending, history.pending = history.pending, []
        if drafted == 0:
            return  # nothing was verified: no evidence about acceptance
        history.counts.add(drafted, accepted, self._decay)
        self._pooled.add(drafted, accepted, self._pooled_decay)
        self._profile = None
        if len(pending) == drafted:
            for i in range(min(accepted + 1, drafted)):
                b = _confidence_bin(pending[i])
                self._calib_trials[b] += 1.0
                self._calib_successes[b] += 1.0 if i < accepted else 0.0

    def _extra_stats(self) -> dict[str, float]:
        stats: dict[str, float] = {
            "probes": self._probes,
            "trimmed_tokens": self._trimmed,
            "cost_samples": self._costs.samples,
            "stalled_steps": self._costs.stalls,
        }
        # The fitted costs per batch-size bucket at the bucket's batch size, in ms: what the
        # decisions were made with.
        for bucket, model in sorted(self._costs.buckets.items()):
            (draft_a, draft_b), (verify_a, verify_b) = model.lines(bucket)
            for name, seconds in (
                ("plain_step", model.plain_step(bucket)),
                ("drafted_step_at_zero_tokens", verify_a),
                ("verify_per_token", verify_b),
                ("draft_pass", draft_a),
                ("draft_per_token", draft_b),
            ):
                stats[f"batch{bucket}_{name}_ms"] = 1000 * seconds
        return stats


def _confidence_bin(confidence: float) -> int:
    return min(max(int(confidence * _CONFIDENCE_BINS), 0), _CONFIDENCE_BINS - 1)
