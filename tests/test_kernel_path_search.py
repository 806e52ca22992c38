"""Triton exact path search (Viterbi) == its torch twin, under TRITON_INTERPRET=1 on the CPU.

Same harness as test_kernel_prune.py: the cases run in one child process started with
TRITON_INTERPRET=1 (this file is its script). Kernel and twin do the same float32 additions
and maxima, so choices and lengths must agree exactly, ties included.
"""

from __future__ import annotations

import pytest
import torch
from fixtures.interpreted import collect_cases, run_cases_here, run_file_interpreted


def _compare(
    edge: torch.Tensor, tail: torch.Tensor, is_eos: torch.Tensor, lengths: torch.Tensor
) -> None:
    from dlmspec_vllm.kernels.path_search import viterbi_triton
    from dlmspec_vllm.lattice.search import viterbi_reference

    want = viterbi_reference(edge, tail, is_eos, lengths)
    got = viterbi_triton(edge, tail, is_eos, lengths)
    assert torch.equal(got[0], want[0]), (got[0], want[0])
    assert torch.equal(got[1], want[1]), (got[1], want[1])


def _random_edges(
    batch: int,
    max_len: int,
    width: int,
    order: int,
    seed: int,
    holes: float = 0.2,
    eos_rate: float = 0.15,
):
    gen = torch.Generator().manual_seed(seed)
    states = width ** (order - 1)
    edge = torch.randn(batch, max_len, states, width, generator=gen)
    edge[torch.rand(edge.shape, generator=gen) < holes] = float("-inf")
    tail = torch.randn(batch, max_len, generator=gen)
    is_eos = torch.rand(batch, max_len, width, generator=gen) < eos_rate
    lengths = torch.randint(0, max_len + 1, (batch,), generator=gen)
    return edge, tail, is_eos, lengths


def case_random_trigram_states() -> None:
    _compare(*_random_edges(4, 5, 4, 3, seed=0))


def case_random_bigram_wide() -> None:
    _compare(*_random_edges(3, 6, 8, 2, seed=1))


def case_width_one_and_k1() -> None:
    _compare(*_random_edges(3, 4, 1, 3, seed=2))
    _compare(*_random_edges(3, 1, 4, 2, seed=3))


def case_ties_everywhere() -> None:
    edge, _, is_eos, _ = _random_edges(3, 5, 4, 3, seed=4, holes=0.0)
    _compare(torch.zeros_like(edge), torch.zeros(3, 5), is_eos, torch.tensor([5, 3, 0]))


def case_eos_first() -> None:
    edge, tail, is_eos, _ = _random_edges(2, 4, 4, 2, seed=5, eos_rate=0.0)
    is_eos[:, 0, 0] = True
    edge[:, 0, :, 0] = 10.0
    lengths = torch.tensor([4, 2])
    _compare(edge, tail, is_eos, lengths)
    from dlmspec_vllm.kernels.path_search import viterbi_triton

    choices, path_len = viterbi_triton(edge, tail, is_eos, lengths)
    assert path_len.tolist() == [1, 1] and choices[:, 0].tolist() == [0, 0]


def case_from_real_lattices() -> None:
    from dlmspec_vllm.lattice import OnlineNgramScorer, build_edge_scores, prune_reference

    gen = torch.Generator().manual_seed(6)
    logits = torch.randn(4, 6, 40, generator=gen) * 1.5
    lat = prune_reference(logits, [6, 0, 3, 1], tau=0.9, m_max=4, eos_id=2)
    for order in (2, 3):
        scorers = [
            OnlineNgramScorer(
                40, order=order, tokens=torch.randint(0, 40, (30,), generator=gen).tolist()
            )
            for _ in range(3)
        ] + [None]
        for lam in (0.0, 0.5, 1.0):
            edge, tail, is_eos, _ = build_edge_scores(
                lat, [[1, 2], [], [5], [3, 3, 3]], scorers, lam=lam, eos_id=2, order=order
            )
            _compare(edge, tail, is_eos, lat.lengths)


CASES = collect_cases(globals())


@pytest.fixture(scope="module")
def interpreted() -> dict[str, str]:
    return run_file_interpreted(__file__)


@pytest.mark.parametrize("case", sorted(CASES))
def test_kernel_matches_twin(case: str, interpreted: dict[str, str]) -> None:
    assert interpreted[case] == "ok", interpreted[case]


def test_launcher_checks_shapes_and_device(monkeypatch) -> None:
    pytest.importorskip("triton")
    from dlmspec_vllm.kernels.path_search import viterbi_triton

    edge, tail, is_eos, lengths = _random_edges(2, 3, 4, 2, seed=0)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        viterbi_triton(edge, tail, is_eos, lengths)
    with pytest.raises(ValueError, match="power"):
        viterbi_triton(edge[..., :3], tail, is_eos[..., :3], lengths)
    with pytest.raises(ValueError, match="float32"):
        viterbi_triton(edge.double(), tail, is_eos, lengths)


if __name__ == "__main__":
    run_cases_here(CASES)
