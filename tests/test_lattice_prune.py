"""Candidate pruning (torch twin): the definition, its properties and adversarial rows."""

from __future__ import annotations

import math

import pytest
import torch

from dlmspec_vllm.lattice import PAD_ID, prune, prune_reference


def _definition(row: list[float], tau: float, m_max: int, eos: int | None) -> list[int]:
    """Pruning of one row written from the spec, in float64 with Python sorting."""
    top = max(row)
    weights = [math.exp(x - top) if x != -math.inf else 0.0 for x in row]
    total = sum(weights)
    order = sorted(range(len(row)), key=lambda i: (-row[i], i))
    width = min(m_max, len(row))
    kept, mass = [], 0.0
    for rank, token in enumerate(order[:width]):
        if rank > 0 and mass >= tau:
            break
        kept.append(token)
        mass += weights[token] / total
    if eos is not None and eos not in kept:
        if len(kept) == width:
            kept[-1] = eos
        else:
            kept.append(eos)
    return kept


def _kept(lattice, b: int, i: int) -> list[int]:
    n = int(lattice.num_candidates[b, i])
    return lattice.token_ids[b, i, :n].tolist()


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("eos", [None, 3])
def test_matches_definition_on_random_rows(seed: int, eos: int | None) -> None:
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(3, 6, 50, generator=gen) * (1 + seed)
    lengths = [6, 0, 4]
    lattice = prune_reference(logits, lengths, tau=0.8, m_max=7, eos_id=eos)
    for b, length in enumerate(lengths):
        for i in range(6):
            expected = _definition(logits[b, i].tolist(), 0.8, 7, eos) if i < length else []
            assert _kept(lattice, b, i) == expected
    log_softmax = torch.log_softmax(logits, -1)
    ids = lattice.token_ids.clamp(min=0)
    used = lattice.token_ids != PAD_ID
    assert torch.allclose(lattice.log_probs[used], log_softmax.gather(-1, ids)[used], atol=1e-5)


def test_properties_mass_order_eos_padding() -> None:
    gen = torch.Generator().manual_seed(7)
    logits = torch.randn(4, 5, 80, generator=gen) * 2.5
    lengths = [5, 3, 0, 1]
    tau, m_max, eos = 0.9, 6, 11
    lat = prune_reference(logits, lengths, tau=tau, m_max=m_max, eos_id=eos)
    plain = prune_reference(logits, lengths, tau=tau, m_max=m_max, eos_id=None)
    assert lat.token_ids.shape == (4, 5, 6) and lat.token_ids.dtype == torch.int64
    assert lat.log_probs.dtype == torch.float32 and lat.num_candidates.dtype == torch.int32
    assert lat.lengths.tolist() == lengths
    for b, length in enumerate(lengths):
        for i in range(5):
            n = int(lat.num_candidates[b, i])
            if i >= length:
                assert n == 0 and (lat.token_ids[b, i] == PAD_ID).all()
                assert torch.isneginf(lat.log_probs[b, i]).all()
                continue
            ids = lat.token_ids[b, i, :n].tolist()
            lq = lat.log_probs[b, i, :n]
            assert eos in ids and len(set(ids)) == n
            assert (lat.token_ids[b, i, n:] == PAD_ID).all()
            assert (lq[1:] <= lq[:-1]).all(), "candidates sorted by descending probability"
            k = int(plain.num_candidates[b, i])
            nucleus = plain.log_probs[b, i, :k].exp()
            if k < m_max:
                assert float(nucleus.sum()) >= tau - 1e-6
            assert float(nucleus[:-1].sum()) < tau  # the smallest such set
            base = plain.token_ids[b, i, :k].tolist()
            with_eos = base + [eos] if k < m_max else base[:-1] + [eos]
            assert ids == (base if eos in base else with_eos)


def test_ties_prefer_lower_ids_and_argmax_is_first() -> None:
    logits = torch.tensor([[[0.0, 2.0, 2.0, 1.0, 2.0, 1.0]]])
    lat = prune_reference(logits, [1], tau=1.1, m_max=4, eos_id=None)
    assert lat.token_ids[0, 0].tolist() == [1, 2, 4, 3]
    # A tie straddling the m_max boundary keeps the lower ids.
    lat = prune_reference(logits, [1], tau=1.1, m_max=2, eos_id=None)
    assert lat.token_ids[0, 0].tolist() == [1, 2]
    flat = torch.zeros(2, 3, 9)
    lat = prune_reference(flat, [3, 2], tau=0.5, m_max=4, eos_id=None)
    assert lat.token_ids[0, 0].tolist() == [0, 1, 2, 3, 4][: lat.num_candidates[0, 0]]
    rand = torch.randint(0, 3, (2, 4, 30), generator=torch.Generator().manual_seed(1)).float()
    lat = prune_reference(rand, [4, 4], tau=0.3, m_max=5, eos_id=None)
    assert torch.equal(lat.token_ids[:, :, 0], rand.argmax(-1))


def test_adversarial_rows() -> None:
    vocab, eos = 20, 4
    peaked = torch.zeros(1, 1, vocab)
    peaked[0, 0, 9] = 60.0  # all mass on one token
    lat = prune_reference(peaked, [1], tau=0.8, m_max=5, eos_id=eos)
    assert _kept(lat, 0, 0) == [9, eos]
    eos_first = torch.zeros(1, 1, vocab)
    eos_first[0, 0, eos] = 5.0
    lat = prune_reference(eos_first, [1], tau=0.5, m_max=5, eos_id=eos)
    assert _kept(lat, 0, 0) == [eos]
    # m_max reached: EOS replaces the lowest kept candidate.
    spread = torch.arange(vocab, dtype=torch.float32).flip(0).view(1, 1, vocab) * 0.01
    lat = prune_reference(spread, [1], tau=0.99, m_max=3, eos_id=eos)
    assert _kept(lat, 0, 0) == [0, 1, eos]
    lat = prune_reference(spread, [1], tau=0.99, m_max=1, eos_id=eos)
    assert _kept(lat, 0, 0) == [eos]
    # m_max above the vocabulary, tau <= 0, a -inf (masked) EOS logit.
    masked = torch.randn(1, 2, 5)
    masked[0, :, eos] = float("-inf")
    lat = prune_reference(masked, [2], tau=0.0, m_max=15, eos_id=eos)
    assert lat.token_ids.shape[-1] == 5
    assert lat.num_candidates.tolist() == [[2, 2]]
    assert torch.isneginf(lat.log_probs[0, :, 1]).all()


def test_bf16_and_dispatch_on_cpu() -> None:
    logits = torch.randn(2, 3, 64, generator=torch.Generator().manual_seed(3)).bfloat16()
    a = prune(logits, [3, 1], tau=0.7, m_max=5, eos_id=2)
    b = prune_reference(logits.float(), [3, 1], tau=0.7, m_max=5, eos_id=2)
    assert torch.equal(a.token_ids, b.token_ids)
    assert torch.equal(a.num_candidates, b.num_candidates)
    assert torch.allclose(a.log_probs, b.log_probs, equal_nan=True)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"m_max": 0}, "m_max"),
        ({"eos_id": 64}, "eos_id"),
        ({"lengths": [4, 1]}, "lengths"),
        ({"lengths": [1]}, "one entry per request"),
    ],
)
def test_argument_errors(kwargs: dict, message: str) -> None:
    args = {"lengths": [1, 1], "tau": 0.8, "m_max": 3, "eos_id": None} | kwargs
    lengths = args.pop("lengths")
    with pytest.raises(ValueError, match=message):
        prune_reference(torch.zeros(2, 3, 64), lengths, **args)
