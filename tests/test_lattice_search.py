"""Path search: exact DP against brute-force enumeration, beam search, the lam = 1 argmax
contract and select_paths end to end."""

from __future__ import annotations

import functools
import math

import pytest
import torch

from dlmspec_vllm.drafters.base import Drafts
from dlmspec_vllm.lattice import (
    ArpaNgramScorer,
    Lattice,
    OnlineNgramScorer,
    beam_search,
    build_edge_scores,
    dp_is_tractable,
    parse_arpa,
    prune_reference,
    select_paths,
    viterbi_reference,
)
from dlmspec_vllm.lattice.build_arpa import build_arpa

VOCAB, EOS = 24, 2


@functools.cache
def _causal(scorer, context: tuple[int, ...], token: int) -> float:
    return scorer.log_prob(list(context), token)


def _score(lat: Lattice, b: int, hist: list[int], scorer, lam: float, seq: tuple) -> float:
    """The module docstring's path score, recomputed from scratch in float64."""
    length = int(lat.lengths[b])
    tokens = [int(lat.token_ids[b, i, c]) for i, c in enumerate(seq)]
    argmax = lat.token_ids[b, :length, 0].tolist()

    def term(i: int, c: int, prefix: list[int]) -> float:
        lq = float(lat.log_probs[b, i, c])
        total = lam * lq if lam > 0 else 0.0
        if scorer is not None and lam < 1:
            ctx = (hist + prefix)[-(scorer.order - 1) :]
            ctx = [-1] * (scorer.order - 1 - len(ctx)) + ctx
            token = int(lat.token_ids[b, i, c])
            total += (1 - lam) * _causal(scorer, tuple(ctx), token)
        return total

    score = sum(term(i, c, tokens[:i]) for i, c in enumerate(seq))
    score += sum(term(j, 0, argmax[:j]) for j in range(len(seq), length))
    return score


def _all_paths(lat: Lattice, b: int):
    """Every candidate-index sequence that ends at its first EOS or at the block's end."""
    length = int(lat.lengths[b])

    def grow(prefix: tuple):
        i = len(prefix)
        if i == length:
            yield prefix
            return
        for c in range(int(lat.num_candidates[b, i])):
            if int(lat.token_ids[b, i, c]) == EOS:
                yield (*prefix, c)
            else:
                yield from grow((*prefix, c))

    yield from grow(())


def _random_case(seed: int, order: int, m_max: int = 4):
    gen = torch.Generator().manual_seed(seed)
    batch, max_len = 3, 5
    logits = torch.randn(batch, max_len, VOCAB, generator=gen) * 1.5
    logits[:, :, EOS] += 1.0
    lengths = [5, int(torch.randint(0, 6, (1,), generator=gen)), 3]
    second = logits.topk(2, dim=-1).indices[:, :, 1]
    histories, scorers = [], []
    for b in range(batch):
        # Histories that repeat the drafter's runner-up tokens make the n-gram disagree with
        # the drafter, so the searches have real trade-offs (and stops) to make.
        noise = torch.randint(0, VOCAB, (12,), generator=gen).tolist()
        stream = noise + second[b].tolist() + noise[:4] + second[b].tolist()
        histories.append(stream[-3:])
        scorers.append(OnlineNgramScorer(VOCAB, order=order, tokens=stream))
    return Drafts(logits, lengths), histories, scorers


def _brute_best(lat, b, hist, scorer, lam) -> tuple[float, float, tuple]:
    scored = sorted((-_score(lat, b, hist, scorer, lam, p), p) for p in _all_paths(lat, b))
    runner_up = -scored[1][0] if len(scored) > 1 else -math.inf
    return -scored[0][0], runner_up, scored[0][1]


@pytest.mark.parametrize("order", [2, 3])
@pytest.mark.parametrize("lam", [0.0, 0.5, 0.9])
@pytest.mark.parametrize("seed", range(3))
def test_dp_and_wide_beam_equal_brute_force(order: int, lam: float, seed: int) -> None:
    block, histories, scorers = _random_case(seed, order)
    lat = prune_reference(block.logits, block.lengths, tau=0.9, m_max=4, eos_id=EOS)
    edge, tail, is_eos, token_ids = build_edge_scores(
        lat, histories, scorers, lam=lam, eos_id=EOS, order=order
    )
    choices, path_len = viterbi_reference(edge, tail, is_eos, lat.lengths)
    beam = beam_search(lat, histories, scorers, lam=lam, eos_id=EOS, beam_width=10_000)
    for b in range(3):
        best, runner_up, best_path = _brute_best(lat, b, histories[b], scorers[b], lam)
        dp_path = tuple(choices[b, : int(path_len[b])].tolist())
        assert _score(lat, b, histories[b], scorers[b], lam, dp_path) == pytest.approx(
            best, abs=1e-4
        )
        beam_ids = [int(lat.token_ids[b, i, c]) for i, c in enumerate(best_path)]
        if best - runner_up > 1e-3:  # a clear winner must be found exactly
            assert dp_path == best_path
            assert beam[b] == beam_ids
        assert token_ids[b, torch.arange(len(dp_path)), list(dp_path)].tolist() == [
            int(lat.token_ids[b, i, c]) for i, c in enumerate(dp_path)
        ]


@pytest.mark.parametrize("method", ["dp", "beam"])
def test_lam_one_and_no_scorer_give_argmax_truncated_at_eos(method: str) -> None:
    block, histories, scorers = _random_case(5, order=3)
    block.logits[0, 2, EOS] = 50.0  # request 0 stops at position 2
    expected = [row[: row.index(EOS) + 1] if EOS in row else row for row in block.argmax_tokens()]
    assert expected[0][-1] == EOS and len(expected[0]) == 3
    for lam, scorer_list in [(1.0, scorers), (0.5, None), (0.5, [None] * 3)]:
        assert (
            select_paths(
                block,
                histories,
                tau=0.8,
                m_max=5,
                lam=lam,
                eos_id=EOS,
                scorers=scorer_list,
                beam_width=2,
                method=method,
            )
            == expected
        )
    # The searches themselves (not only select_paths' shortcut) honour lam = 1.
    lat = prune_reference(block.logits, block.lengths, tau=0.8, m_max=5, eos_id=EOS)
    edge, tail, is_eos, token_ids = build_edge_scores(
        lat, histories, scorers, lam=1.0, eos_id=EOS, order=3
    )
    choices, path_len = viterbi_reference(edge, tail, is_eos, lat.lengths)
    dp = [
        token_ids[b]
        .gather(-1, choices[b].clamp(min=0)[:, None])
        .squeeze(-1)[: int(path_len[b])]
        .tolist()
        for b in range(3)
    ]
    assert dp == expected
    for width in (1, 3):
        assert (
            beam_search(lat, histories, scorers, lam=1.0, eos_id=EOS, beam_width=width) == expected
        )


def test_causal_scorer_changes_the_path() -> None:
    # The drafter slightly prefers 7 7 7, a trigram LM built on "5 6 8" strongly prefers that.
    corpus = [[5, 6, 8]] * 20 + [[7, 9]]
    lm = ArpaNgramScorer(parse_arpa(build_arpa(corpus, 3).splitlines()))
    logits = torch.full((1, 3, 10), -5.0)
    for i, (a, b) in enumerate([(7, 5), (7, 6), (7, 8)]):
        logits[0, i, a], logits[0, i, b] = 1.2, 1.0
    block = Drafts(logits, [3])
    kwargs = dict(tau=0.9, m_max=3, eos_id=None, beam_width=3)
    assert select_paths(block, [[1]], lam=1.0, scorers=[lm], method="dp", **kwargs) == [[7, 7, 7]]
    for method in ("dp", "beam"):
        assert select_paths(block, [[1]], lam=0.5, scorers=[lm], method=method, **kwargs) == [
            [5, 6, 8]
        ]


def test_forced_eos_does_not_cut_confident_novel_drafts() -> None:
    # Every position has a confident token the history never saw, and a forced, unlikely EOS:
    # the completion term keeps the search from stopping just to skip causal costs.
    logits = torch.full((1, 8, VOCAB), -4.0)
    logits[0, torch.arange(8), torch.arange(8) + 10] = 6.0
    scorer = OnlineNgramScorer(VOCAB, tokens=[3, 4, 5] * 5)
    paths = select_paths(
        Drafts(logits, [8]),
        [[3, 4, 5]],
        tau=0.9,
        m_max=4,
        lam=0.5,
        eos_id=EOS,
        scorers=[scorer],
        beam_width=3,
        method="dp",
    )
    assert paths == [list(range(10, 18))]


def test_ragged_lengths_ties_and_fallback() -> None:
    block, histories, scorers = _random_case(9, order=3)
    block.lengths[:] = [0, 1, 5]
    block.logits[2, 1] = 0.0  # a flat position: ties broken towards lower ids
    out = select_paths(
        block,
        histories,
        tau=0.6,
        m_max=3,
        lam=0.5,
        eos_id=EOS,
        scorers=scorers,
        beam_width=2,
        method="dp",
    )
    assert out[0] == [] and len(out[1]) == 1 and 1 <= len(out[2]) <= 5
    assert all(EOS not in p[:-1] for p in out)
    # Order 5 over an 8-wide lattice is beyond the exact search: select_paths uses beam.
    big = [OnlineNgramScorer(VOCAB, order=5, tokens=[1, 2, 3])] * 3
    assert not dp_is_tractable(8, 5) and dp_is_tractable(16, 3)
    lat = prune_reference(block.logits, block.lengths, tau=0.999, m_max=8, eos_id=EOS)
    assert int(lat.num_candidates.max()) > 4
    assert select_paths(
        block,
        histories,
        tau=0.999,
        m_max=8,
        lam=0.5,
        eos_id=EOS,
        scorers=big,
        beam_width=2,
        method="dp",
    ) == beam_search(lat, histories, big, lam=0.5, eos_id=EOS, beam_width=2)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"lam": 1.5}, "lam"),
        ({"method": "greedy"}, "method"),
        ({"beam_width": 0}, "beam"),
        ({"histories": [[]]}, "history"),
        ({"scorers": [None]}, "scorer"),
    ],
)
def test_select_paths_argument_errors(kwargs: dict, message: str) -> None:
    args = (
        dict(
            histories=[[], []],
            tau=0.8,
            m_max=3,
            lam=0.5,
            eos_id=None,
            scorers=None,
            beam_width=2,
            method="dp",
        )
        | kwargs
    )
    with pytest.raises(ValueError, match=message):
        select_paths(Drafts(torch.zeros(2, 2, 8), [2, 2]), **args)
