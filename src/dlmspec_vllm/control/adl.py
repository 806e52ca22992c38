"""DiffuSpec's Adaptive Draft Length (ADL) controller.

A diffusion drafter must be told its block length up front. Too short caps progress; too long
makes the drafter saturate and emit EOS early, and piles up off-path tokens the verifier
rejects. ADL follows two smoothed signals per request:

    Lgen_ema <- (1 - rho) * Lgen_ema + rho * L_gen     (EOS-aware raw draft length)
    Lacc_ema <- (1 - rho) * Lacc_ema + rho * L_acc     (accepted length)
    k_next = clip(floor(Lgen_ema) + delta * [Lacc_ema >= Lgen_ema], k_min, k_max)

so the draft grows by delta only while acceptance keeps pace with what the drafter is willing to
generate, and otherwise shrinks to what it actually generates.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from dlmspec_vllm.control.base import StatefulController, check_float, check_int


@dataclass(slots=True)
class _ADLState:
    k: int
    ema_gen: float = 0.0
    ema_acc: float = 0.0


class ADLController(StatefulController[_ADLState]):
    """Per-request ADL (DiffuSpec, defaults from its appendix: rho 0.5, delta 10, k in [20, 30]).

    Initial state: k_1 = k_max and both EMAs start at 0, as DiffuSpec's Algorithm 1 does (read
    from a public reimplementation; our paper notes do not state it). Starting at k_max lets a
    fresh request show what the drafter can do at full length; the zero EMAs then pull the next
    length down (first update gives Lgen_ema = rho * L_gen) unless acceptance keeps up. The
    engine cap max_length bounds every length, k_min included.
    """

    name = "adl"

    def __init__(
        self,
        max_length: int,
        *,
        rho: float = 0.5,
        delta: int = 10,
        k_min: int = 20,
        k_max: int = 30,
    ) -> None:
        """rho in (0, 1]: weight of the newest step; delta >= 0; 1 <= k_min <= k_max."""
        super().__init__(max_length)
        self._rho = check_float("rho", rho, 0.0, 1.0, low_open=True)
        self._delta = check_int("delta", delta, 0)
        self._k_min = check_int("k_min", k_min, 1)
        self._k_max = check_int("k_max", k_max, self._k_min)

    def _new_state(self) -> _ADLState:
        return _ADLState(k=self._k_max)

    def _initial_length(self, req_id: str) -> int:
        return self._state(req_id).k

    def _observe(self, req_id: str, drafted: int, accepted: int, generated: int) -> None:
        # A step with nothing drafted carries no evidence about the drafter: leave the EMAs be.
        if drafted == 0:
            return
        state = self._state(req_id)
        rho = self._rho
        state.ema_gen = (1.0 - rho) * state.ema_gen + rho * generated
        state.ema_acc = (1.0 - rho) * state.ema_acc + rho * accepted
        grow = self._delta if state.ema_acc >= state.ema_gen else 0
        state.k = max(self._k_min, min(math.floor(state.ema_gen) + grow, self._k_max))
