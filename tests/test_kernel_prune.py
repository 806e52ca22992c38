"""Triton pruning kernel == its torch twin, under TRITON_INTERPRET=1 on the CPU.

Triton decides whether a kernel is interpreted when the kernel module is imported, so the
cases run in one child process started with TRITON_INTERPRET=1 (this file is also its script);
the parent reports one test per case. Shapes are small: the interpreter is slow.
"""

from __future__ import annotations

import pytest
import torch
from fixtures.interpreted import collect_cases, run_cases_here, run_file_interpreted

EOS = 7


def _compare(logits: torch.Tensor, lengths: list[int], **kwargs) -> None:
    from dlmspec_vllm.kernels.prune import prune_triton
    from dlmspec_vllm.lattice.prune import prune_reference

    launch = {k: kwargs.pop(k) for k in ("block_v", "num_splits") if k in kwargs}
    want = prune_reference(logits, lengths, **kwargs)
    got = prune_triton(logits, lengths, **kwargs, **launch)
    assert torch.equal(got.num_candidates, want.num_candidates), (
        got.num_candidates,
        want.num_candidates,
    )
    assert torch.equal(got.token_ids, want.token_ids), (got.token_ids, want.token_ids)
    assert torch.equal(got.lengths, want.lengths)
    assert torch.equal(torch.isneginf(got.log_probs), torch.isneginf(want.log_probs))
    finite = torch.isfinite(want.log_probs)
    assert torch.allclose(got.log_probs[finite], want.log_probs[finite], atol=1e-5, rtol=1e-5)


def _randn(*shape: int, seed: int = 0, scale: float = 2.0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale


def case_random_ragged() -> None:
    _compare(_randn(3, 4, 300), [4, 0, 2], tau=0.8, m_max=6, eos_id=EOS, block_v=64)


def case_random_split_vocab() -> None:
    logits = _randn(2, 2, 200, seed=1, scale=1.0)
    for splits in (3, 50):  # 50 > chunks: clamped to one range per chunk
        _compare(logits, [2, 1], tau=0.95, m_max=9, eos_id=EOS, block_v=64, num_splits=splits)


def case_many_chunks() -> None:
    _compare(
        _randn(1, 2, 3000, seed=2, scale=0.5),
        [2],
        tau=0.5,
        m_max=15,
        eos_id=EOS,
        block_v=256,
        num_splits=3,
    )


def case_bf16() -> None:
    _compare(
        _randn(2, 3, 200, seed=3).bfloat16(),
        [3, 1],
        tau=0.8,
        m_max=5,
        eos_id=EOS,
        block_v=64,
        num_splits=2,
    )


def case_ties() -> None:
    gen = torch.Generator().manual_seed(4)
    logits = torch.randint(0, 3, (2, 4, 130), generator=gen).float()
    _compare(logits, [4, 3], tau=0.3, m_max=6, eos_id=EOS, block_v=32, num_splits=3)
    _compare(torch.zeros(1, 2, 100), [2], tau=0.9, m_max=4, eos_id=None, block_v=32, num_splits=2)


def case_all_mass_on_one_token() -> None:
    logits = torch.zeros(1, 3, 90)
    logits[0, :, 50] = 80.0
    _compare(logits, [3], tau=0.8, m_max=5, eos_id=EOS, block_v=32, num_splits=2)


def case_eos_first_and_masked_eos() -> None:
    logits = _randn(2, 3, 70, seed=5)
    logits[0, :, EOS] = 30.0
    logits[1, :, EOS] = float("-inf")
    logits[1, 1, :60] = float("-inf")
    _compare(logits, [3, 3], tau=0.9, m_max=5, eos_id=EOS, block_v=16, num_splits=2)


def case_k1_m1_and_caps() -> None:
    logits = _randn(2, 1, 40, seed=6)
    _compare(logits, [1, 1], tau=0.8, m_max=1, eos_id=EOS, block_v=16)
    _compare(logits, [1, 0], tau=0.8, m_max=1, eos_id=None, block_v=16)
    _compare(logits, [1, 1], tau=2.0, m_max=4, eos_id=EOS, block_v=16)  # always capped
    _compare(logits, [1, 1], tau=0.0, m_max=4, eos_id=EOS, block_v=16)  # argmax only
    _compare(_randn(1, 2, 5, seed=7), [2], tau=0.99, m_max=15, eos_id=3)  # m_max > vocab


def case_strided_logits_and_all_empty() -> None:
    big = _randn(2, 6, 120, seed=8)
    _compare(big[:, ::2], [3, 2], tau=0.8, m_max=4, eos_id=EOS, block_v=32, num_splits=2)
    _compare(big, [0, 0], tau=0.8, m_max=4, eos_id=EOS, block_v=32)


CASES = collect_cases(globals())


@pytest.fixture(scope="module")
def interpreted() -> dict[str, str]:
    return run_file_interpreted(__file__)


@pytest.mark.parametrize("case", sorted(CASES))
def test_kernel_matches_twin(case: str, interpreted: dict[str, str]) -> None:
    assert interpreted[case] == "ok", interpreted[case]


def test_launcher_refuses_cpu_tensors_without_interpreter(monkeypatch) -> None:
    pytest.importorskip("triton")
    from dlmspec_vllm.kernels.prune import prune_triton

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        prune_triton(torch.zeros(1, 1, 8), [1], tau=0.8, m_max=2, eos_id=None)


if __name__ == "__main__":
    run_cases_here(CASES)
