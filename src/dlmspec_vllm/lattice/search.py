"""Causal-consistency path search (CPS) over a pruned lattice.

A path picks one candidate per drafted position, left to right, and stops at the first EOS it
picks (the EOS is the path's last token). With a_j the drafter's argmax token at position j
(candidate 0), its score is

    sum_{i <= e} [lam * log q_i(x_i) + (1 - lam) * log p(x_i | history, x_<i)]
      + sum_{i > e}  [lam * log q_i(a_i) + (1 - lam) * log p(a_i | history, a_<i)]

where e is the stopping position (the last position if no EOS is picked). The second line is
a completion term, the same for every path that stops before i: the positions a stopped path
does not draft are credited with what the drafter's own argmax continuation scores there. Without
it, stopping would be rewarded for summing fewer negative terms; with it, an EOS is chosen when
it beats the alternatives at its own position. It also makes lam = 1 select exactly the argmax
draft truncated after its first EOS. Requests whose scorer is None use lam = 1.

Two searches:

* ``dp``: exact Viterbi. The state before position i is the candidate index of each of the last
  n - 1 positions (n = the largest scorer order, at least 2), so the n-gram term of every
  transition is fixed by (state, candidate). The host (torch) precomputes every transition score
  into ``edge`` [B, K, S, W] (W = lattice width rounded up to a power of two, S = W^(n-1)),
  querying the scorers once per request with all reachable (context, token) pairs; the backward
  max-plus recursion over ``edge`` is the Triton kernel ``kernels/path_search.py`` on CUDA and
  ``viterbi_reference`` here otherwise. Exact while W^n <= MAX_DP_TRANSITIONS (trigram with up
  to 16 candidates); beyond that ``select_paths`` falls back to beam search.
* ``beam``: keeps the ``beam_width`` best live prefixes per position and the best finished
  (EOS) path; scorer queries are made per step, so any order works. Host-only.

Ties are broken towards the lexicographically smallest sequence of candidate indices (lower
index = higher drafter probability, then lower token id), in both searches and in the kernel,
so results are deterministic.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Literal

import torch

from dlmspec_vllm.lattice.prune import prune
from dlmspec_vllm.lattice.scorers import CausalScorer
from dlmspec_vllm.lattice.types import Lattice

if TYPE_CHECKING:
    from dlmspec_vllm.drafters.base import Drafts

MAX_DP_TRANSITIONS = 4096
"""Largest W^n (padded width to the power of the order) that the exact search accepts: per
position the kernel holds the whole [S, W] transition tile in registers."""


def _next_pow2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def dp_is_tractable(width: int, order: int) -> bool:
    """Whether exact search fits: padded width to the power of max(order, 2)."""
    return _next_pow2(width) ** max(order, 2) <= MAX_DP_TRANSITIONS


def _effective_lams(scorers: Sequence[CausalScorer | None], lam: float) -> list[float]:
    return [lam if scorer is not None else 1.0 for scorer in scorers]


def _drafter_term(log_q: torch.Tensor, lam: float) -> torch.Tensor:
    """lam * log q, with lam = 0 giving 0 (not NaN) for candidates of probability 0."""
    return lam * log_q if lam > 0 else torch.zeros_like(log_q)


def _context(tokens: Sequence[int], width: int) -> list[int]:
    """Last ``width`` tokens, left-padded with -1 (the scorers' "no token")."""
    tail = list(tokens[len(tokens) - width :]) if width else []
    return [-1] * (width - len(tail)) + tail


def _tail_scores(
    lattice: Lattice,
    drafter: torch.Tensor,
    histories: Sequence[Sequence[int]],
    scorers: Sequence[CausalScorer | None],
    lam: float,
) -> torch.Tensor:
    """[B, K] score of the argmax continuation at each position (the completion term).

    drafter: [B, K, >=1] drafter terms; the causal part is asked once per request, with the
    same float32 operations as the transition scores, so the all-argmax path's transitions and
    these tails are equal bit for bit.
    """
    tail = torch.where(lattice.num_candidates > 0, drafter[:, :, 0], 0.0)
    for b, scorer in enumerate(scorers):
        length = int(lattice.lengths[b])
        if scorer is None or lam >= 1.0 or length == 0:
            continue
        argmax = lattice.token_ids[b, :length, 0].tolist()
        seq = list(histories[b]) + argmax
        start = len(histories[b])
        contexts = torch.tensor(
            [_context(seq[: start + j], scorer.order - 1) for j in range(length)],
            dtype=torch.int64,
        ).reshape(length, scorer.order - 1)
        causal = scorer.log_probs(contexts, torch.tensor(argmax, dtype=torch.int64))
        tail[b, :length] = drafter[b, :length, 0] + (1.0 - lam) * causal.to(tail.device)
    return tail


def build_edge_scores(
    lattice: Lattice,
    histories: Sequence[Sequence[int]],
    scorers: Sequence[CausalScorer | None],
    *,
    lam: float,
    eos_id: int | None,
    order: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Precompute every transition score of the exact search (the host half of the DP).

    Returns, on the lattice's device:
      edge [B, K, S, W] float32: edge[b, i, s, c] = lam * log q + (1 - lam) * log p of
        candidate c at position i after state s; state s = sum_j d_j * W^(n-2-j) over the
        candidate indices d_0 (position i-n+1, oldest) .. d_{n-2} (position i-1); positions
        before the block are the history, always digit 0. -inf for padding and for states that
        cannot occur (a digit past that position's candidates, or an EOS inside the state).
      tail [B, K] float32: the completion term of each position (see the module docstring).
      is_eos [B, K, W] bool: candidate c at position i is the EOS id.
      token_ids [B, K, W] int64: the lattice's ids padded or trimmed to width W.
    """
    if order < 2:
        raise ValueError(f"order must be >= 2 (a state of at least one token), got {order}")
    batch, max_len, _ = lattice.token_ids.shape
    device = lattice.token_ids.device
    most = int(lattice.num_candidates.max()) if lattice.num_candidates.numel() else 1
    width = _next_pow2(max(most, 1))
    ctx_len = order - 1
    states = width**ctx_len

    token_ids = torch.full((batch, max_len, width), -1, dtype=torch.int64, device=device)
    log_q = torch.full((batch, max_len, width), float("-inf"), device=device)
    keep = min(width, lattice.token_ids.shape[2])
    token_ids[:, :, :keep] = lattice.token_ids[:, :, :keep]
    log_q[:, :, :keep] = lattice.log_probs[:, :, :keep]
    num_cand = lattice.num_candidates.to(torch.int64)
    cand_ok = torch.arange(width, device=device) < num_cand[:, :, None]
    lams = _effective_lams(scorers, lam)
    drafter = torch.stack([_drafter_term(log_q[b], lam_b) for b, lam_b in enumerate(lams)])
    drafter = torch.where(cand_ok, drafter, float("-inf"))
    tail = _tail_scores(lattice, drafter, histories, scorers, lam)
    is_eos = cand_ok & (token_ids == eos_id) if eos_id is not None else torch.zeros_like(cand_ok)

    # Context tokens of every (position, state): extended positions 0..n-2 are the history.
    digits = torch.tensor(
        [
            [(s // width ** (ctx_len - 1 - j)) % width for j in range(ctx_len)]
            for s in range(states)
        ],
        dtype=torch.int64,
        device=device,
    )  # [S, n-1]
    hist = torch.tensor([_context(h, ctx_len) for h in histories], dtype=torch.int64)
    hist_slots = torch.full((batch, ctx_len, width), -1, dtype=torch.int64, device=device)
    hist_slots[:, :, 0] = hist.reshape(batch, ctx_len).to(device)
    ext_tokens = torch.cat([hist_slots, token_ids], dim=1)  # [B, K+n-1, W]
    ext_counts = torch.cat(
        [torch.ones((batch, ctx_len), dtype=torch.int64, device=device), num_cand], dim=1
    )
    window = torch.arange(max_len, device=device)[:, None] + torch.arange(ctx_len, device=device)
    ctx_tokens = ext_tokens[:, window[:, None, :], digits[None, :, :]]  # [B, K, S, n-1]
    state_ok = (digits[None, None] < ext_counts[:, window][:, :, None, :]).all(-1)
    if eos_id is not None:
        in_block = (window >= ctx_len)[None, :, None, :]
        state_ok &= ~((ctx_tokens == eos_id) & in_block).any(-1)
    valid = state_ok[..., None] & cand_ok[:, :, None, :]  # [B, K, S, W]

    edge = torch.where(valid, drafter[:, :, None, :], float("-inf"))
    for b, scorer in enumerate(scorers):
        if scorer is None or lam >= 1.0:
            continue
        pos, state, cand = valid[b].nonzero(as_tuple=True)
        if pos.numel() == 0:
            continue
        contexts = ctx_tokens[b, pos, state].cpu()
        causal = scorer.log_probs(contexts, token_ids[b, pos, cand].cpu()).to(device)
        edge[b, pos, state, cand] = drafter[b, pos, cand] + (1.0 - lam) * causal
    return edge, tail, is_eos, token_ids


def viterbi_reference(
    edge: torch.Tensor, tail: torch.Tensor, is_eos: torch.Tensor, lengths: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Torch twin of the DP kernel: exact best path through precomputed transition scores.

    Backward recursion from the last drafted position: value[i][s] = max_c edge[i, s, c] +
    (completion[i+1] if c is EOS else value[i+1][next state]), with value = completion = 0 past
    the request's length; completion[i] = tail[i] + completion[i+1], accumulated in that
    order so that, with lam = 1, continuing and stopping compare bit-exactly. The forward pass
    follows the stored first-maximum choices from state 0 (which gives the lexicographically
    smallest optimal path).

    Returns choices [B, K] int64 (candidate index per position, -1 after the path ends) and
    path_len [B] int64.
    """
    batch, max_len, states, width = edge.shape
    sub = states // width  # W^(n-2): the state digits that survive one step
    device = edge.device
    lengths = lengths.to(device)
    value = torch.zeros((batch, states), device=device)
    completion = torch.zeros(batch, device=device)
    choice = torch.zeros((batch, max_len, states), dtype=torch.int64, device=device)
    cand = torch.arange(width, device=device)
    for i in range(max_len - 1, -1, -1):
        active = i < lengths
        following = torch.where(
            is_eos[:, i, None, None, :],
            completion[:, None, None, None],
            value.view(batch, 1, sub, width),
        )
        total = (edge[:, i].view(batch, width, sub, width) + following).view(batch, states, width)
        best = total.amax(-1)
        first = torch.where(total == best[..., None], cand, width).amin(-1)
        choice[:, i] = first
        value = torch.where(active[:, None], best, value)
        completion = torch.where(active, tail[:, i] + completion, completion)
    choices = torch.full((batch, max_len), -1, dtype=torch.int64, device=device)
    path_len = torch.zeros(batch, dtype=torch.int64, device=device)
    state = torch.zeros(batch, dtype=torch.int64, device=device)
    running = lengths > 0
    rows = torch.arange(batch, device=device)
    for i in range(max_len):
        running &= i < lengths
        c = choice[rows, i, state]
        choices[:, i] = torch.where(running, c, -1)
        path_len += running.long()
        running &= ~is_eos[rows, i, c]
        state = (state % sub) * width + c
    return choices, path_len


def viterbi(
    edge: torch.Tensor, tail: torch.Tensor, is_eos: torch.Tensor, lengths: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact search with the Triton kernel for CUDA tensors and the torch twin otherwise."""
    if edge.is_cuda:
        from dlmspec_vllm.kernels.path_search import viterbi_triton

        return viterbi_triton(edge, tail, is_eos, lengths)
    return viterbi_reference(edge, tail, is_eos, lengths)


def beam_search(
    lattice: Lattice,
    histories: Sequence[Sequence[int]],
    scorers: Sequence[CausalScorer | None],
    *,
    lam: float,
    eos_id: int | None,
    beam_width: int,
) -> list[list[int]]:
    """Beam search over the lattice with the same score and tie rule as the exact search.

    Per position every live prefix is extended by every candidate; a prefix ending in EOS is
    finished and scored with its completion term, the best ``beam_width`` others stay live
    (ranked by score, then by candidate-index sequence). The answer is the best of the finished
    and the surviving full-length paths. Scores are summed in float64 from the same float32
    per-transition terms as ``edge``.
    """
    if beam_width < 1:
        raise ValueError(f"beam_width must be >= 1, got {beam_width}")
    lattice = Lattice(
        *(
            t.cpu()
            for t in (lattice.token_ids, lattice.log_probs, lattice.num_candidates, lattice.lengths)
        )
    )
    lams = _effective_lams(scorers, lam)
    drafter = torch.stack(
        [_drafter_term(lattice.log_probs[b], lam_b) for b, lam_b in enumerate(lams)]
    )
    tails = _tail_scores(lattice, drafter, histories, scorers, lam).tolist()
    paths: list[list[int]] = []
    for b, length in enumerate(lattice.lengths.tolist()):
        tokens = lattice.token_ids[b]
        num_cand = lattice.num_candidates[b].tolist()
        scorer = scorers[b] if lams[b] < 1.0 else None
        completion = [0.0] * (length + 1)
        for i in range(length - 1, -1, -1):
            completion[i] = tails[b][i] + completion[i + 1]
        live: list[tuple[float, tuple[int, ...]]] = [(0.0, ())]
        finished: list[tuple[float, tuple[int, ...]]] = []
        for i in range(length):
            pairs = [(score, seq, c) for score, seq in live for c in range(num_cand[i])]
            cands = [c for _, _, c in pairs]
            terms = drafter[b, i, cands]
            if scorer is not None:
                history = list(histories[b])
                contexts = torch.tensor(
                    [
                        _context(
                            history + [int(tokens[j, d]) for j, d in enumerate(seq)],
                            scorer.order - 1,
                        )
                        for _, seq, _ in pairs
                    ],
                    dtype=torch.int64,
                ).reshape(len(pairs), scorer.order - 1)
                terms = terms + (1.0 - lam) * scorer.log_probs(contexts, tokens[i, cands])
            grown = []
            for (score, seq, c), term in zip(pairs, terms.tolist()):
                if int(tokens[i, c]) == eos_id:
                    finished.append((score + term + completion[i + 1], seq + (c,)))
                else:
                    grown.append((score + term, seq + (c,)))
            live = sorted(grown, key=_rank)[:beam_width]
            if not live:
                break
        _, best = min(live + finished, key=_rank)
        paths.append([int(tokens[i, c]) for i, c in enumerate(best)])
    return paths


def _rank(item: tuple[float, tuple[int, ...]]) -> tuple[float, tuple[int, ...]]:
    """Sort key: higher score first, then the smaller candidate-index sequence."""
    return -item[0], item[1]


def _argmax_paths(block: Drafts, eos_id: int | None) -> list[list[int]]:
    paths = block.argmax_tokens()
    if eos_id is None:
        return paths
    return [path[: path.index(eos_id) + 1] if eos_id in path else path for path in paths]


def select_paths(
    block: Drafts,
    histories: Sequence[Sequence[int]],
    *,
    tau: float,
    m_max: int,
    lam: float,
    eos_id: int | None,
    scorers: Sequence[CausalScorer | None] | None,
    beam_width: int,
    method: Literal["dp", "beam"],
) -> list[list[int]]:
    """Pick one draft per request from a drafter's block (the proposer's entry point).

    histories[b]: the request's token ids so far (prompt + output), the causal context of the
    first drafted position. scorers: one per request (None = no causal term for that request),
    or None for all; they are read, not updated (the caller extends an ``OnlineNgramScorer``
    with each request's new tokens). With lam = 1 or no scorer at all the result is the argmax
    draft truncated after its first EOS, computed without building a lattice. Returned drafts
    have at most lengths[b] tokens and end at their first EOS, if any. method "dp" falls back to
    beam search when the exact state space is too large (see ``dp_is_tractable``).
    """
    batch = block.logits.shape[0]
    if len(histories) != batch:
        raise ValueError(f"need one history per request ({batch}), got {len(histories)}")
    if scorers is not None and len(scorers) != batch:
        raise ValueError(f"need one scorer (or None) per request ({batch}), got {len(scorers)}")
    if not 0.0 <= lam <= 1.0:
        raise ValueError(f"lam must lie in [0, 1], got {lam}")
    if method not in ("dp", "beam"):
        raise ValueError(f"method must be 'dp' or 'beam', got {method!r}")
    if beam_width < 1:
        raise ValueError(f"beam_width must be >= 1, got {beam_width}")
    scorer_list = list(scorers) if scorers is not None else [None] * batch
    if batch == 0:
        return []
    if lam >= 1.0 or all(scorer is None for scorer in scorer_list):
        return _argmax_paths(block, eos_id)

    lattice = prune(block.logits, block.lengths, tau=tau, m_max=m_max, eos_id=eos_id)
    order = max([2] + [scorer.order for scorer in scorer_list if scorer is not None])
    width = int(lattice.num_candidates.max()) if lattice.num_candidates.numel() else 1
    if method == "beam" or not dp_is_tractable(width, order):
        return beam_search(
            lattice, histories, scorer_list, lam=lam, eos_id=eos_id, beam_width=beam_width
        )
    edge, tail, is_eos, token_ids = build_edge_scores(
        lattice, histories, scorer_list, lam=lam, eos_id=eos_id, order=order
    )
    choices, path_len = viterbi(edge, tail, is_eos, lattice.lengths)
    picked = token_ids.gather(-1, choices.clamp(min=0)[..., None]).squeeze(-1).cpu().tolist()
    return [row[:n] for row, n in zip(picked, path_len.tolist())]
