"""Fused softmax + nucleus/top-M candidate pruning over the full vocabulary (Triton).

Twin: ``dlmspec_vllm.lattice.prune.prune_reference`` (the definition of the result).

Each drafted row is read once. The vocabulary is cut into ``num_splits`` contiguous ranges so
that small batches still fill the GPU; one program per (row, range) streams its range in
BLOCK_V chunks keeping an online max / sum-exp (the softmax normaliser) and a running top-M
list. A chunk only pays for selection while its best remaining element beats the list's worst,
so after the first chunks most cost nothing beyond the read. A second, tiny kernel per row
merges the partial normalisers and lists, extracts candidates in (logit desc, id asc) order,
applies the nucleus cut (mass of earlier candidates < tau) and forces in EOS, writing the
padded lattice directly. Logits are read in their own dtype (bf16 halves the bytes) and
computed in float32.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from dlmspec_vllm.kernels import check_launch_device
from dlmspec_vllm.lattice.types import PAD_ID, Lattice, check_prune_args

_NO_ID = 2147483647  # sorts after every real and placeholder id


@triton.jit
def _next_best(x, ids, eligible, prev_v, prev_i):
    """Best element in (value desc, id asc) order that comes strictly after (prev_v, prev_i).

    Returns (-inf, _NO_ID) when nothing is left.
    """
    after = eligible & ((x < prev_v) | ((x == prev_v) & (ids > prev_i)))
    best_v = tl.max(tl.where(after, x, float("-inf")), axis=0)
    best_i = tl.min(tl.where(after & (x == best_v), ids, 2147483647), axis=0)
    return best_v, best_i


@triton.jit
def _worst(top_v, top_i):
    """Last entry of the running list in (value desc, id asc) order."""
    worst_v = tl.min(top_v, axis=0)
    worst_i = tl.max(tl.where(top_v == worst_v, top_i, -1), axis=0)
    return worst_v, worst_i


@triton.jit
def _prune_partial_kernel(
    logits_ptr,
    lengths_ptr,
    part_max_ptr,
    part_sum_ptr,
    part_val_ptr,
    part_id_ptr,
    stride_b,
    stride_k,
    max_len,
    vocab,
    num_chunks,
    chunks_per_split,
    num_splits,
    M: tl.constexpr,
    MP: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    """Online max / sum-exp and top-M (value, id) list of one vocabulary range of one row."""
    row = tl.program_id(0)
    split = tl.program_id(1)
    b = row // max_len
    pos = row % max_len
    length = tl.load(lengths_ptr + b)
    if pos < length:
        base = logits_ptr + b.to(tl.int64) * stride_b + pos.to(tl.int64) * stride_k
        slots = tl.arange(0, MP)
        offs = tl.arange(0, BLOCK_V)
        # Empty slots hold -inf with distinct placeholder ids above the vocabulary, so that a
        # real -inf logit still outranks them; slots >= M are +inf and never replaced.
        top_v = tl.where(slots < M, float("-inf"), float("inf"))
        top_i = vocab + split * MP + slots
        worst_v, worst_i = _worst(top_v, top_i)
        run_max = float("-inf")
        run_sum = 0.0
        first = split * chunks_per_split
        last = tl.minimum(first + chunks_per_split, num_chunks)
        for chunk in range(first, last):
            ids = chunk * BLOCK_V + offs
            inside = ids < vocab
            x = tl.load(base + ids, mask=inside, other=float("-inf")).to(tl.float32)
            new_max = tl.maximum(run_max, tl.max(x, axis=0))
            ref = tl.where(new_max == float("-inf"), 0.0, new_max)
            run_sum = run_sum * tl.exp(run_max - ref) + tl.sum(tl.exp(x - ref), axis=0)
            run_max = new_max
            cand_v, cand_i = _next_best(x, ids, inside, float("inf"), -1)
            while (cand_v > worst_v) | ((cand_v == worst_v) & (cand_i < worst_i)):
                hit = (top_v == worst_v) & (top_i == worst_i)
                top_v = tl.where(hit, cand_v, top_v)
                top_i = tl.where(hit, cand_i, top_i)
                worst_v, worst_i = _worst(top_v, top_i)
                cand_v, cand_i = _next_best(x, ids, inside, cand_v, cand_i)
        out = row * num_splits + split
        tl.store(part_max_ptr + out, run_max)
        tl.store(part_sum_ptr + out, run_sum)
        used = slots < M
        tl.store(part_val_ptr + out * MP + slots, tl.where(used, top_v, float("-inf")))
        tl.store(part_id_ptr + out * MP + slots, tl.where(used, top_i, 2147483647))


@triton.jit(do_not_specialize=["eos_id"])
def _prune_finalize_kernel(
    logits_ptr,
    lengths_ptr,
    part_max_ptr,
    part_sum_ptr,
    part_val_ptr,
    part_id_ptr,
    out_ids_ptr,
    out_lq_ptr,
    out_n_ptr,
    stride_b,
    stride_k,
    max_len,
    num_splits,
    tau,
    eos_id,
    M: tl.constexpr,
    MP: tl.constexpr,
    SP: tl.constexpr,
    HAS_EOS: tl.constexpr,
):
    """Merge a row's partial results; write its sorted, nucleus-cut candidates and EOS."""
    row = tl.program_id(0)
    b = row // max_len
    pos = row % max_len
    length = tl.load(lengths_ptr + b)
    if pos < length:
        sp = tl.arange(0, SP)
        live = sp < num_splits
        part_max = tl.load(part_max_ptr + row * num_splits + sp, mask=live, other=float("-inf"))
        part_sum = tl.load(part_sum_ptr + row * num_splits + sp, mask=live, other=0.0)
        row_max = tl.max(part_max, axis=0)
        ref = tl.where(row_max == float("-inf"), 0.0, row_max)
        lse = ref + tl.log(tl.sum(part_sum * tl.exp(part_max - ref), axis=0))
        pool = (row * num_splits + sp[:, None]) * MP + tl.arange(0, MP)[None, :]
        pool_v = tl.load(part_val_ptr + pool, mask=live[:, None], other=float("-inf"))
        pool_i = tl.load(part_id_ptr + pool, mask=live[:, None], other=2147483647)
        pool_v = tl.reshape(pool_v, (SP * MP,))
        pool_i = tl.reshape(pool_i, (SP * MP,))
        pool_ok = pool_i < 2147483647
        prev_v = float("inf")
        prev_i = -1
        mass = 0.0
        count = 0
        eos_kept = 0
        for r in tl.static_range(M):
            v, i = _next_best(pool_v, pool_i, pool_ok, prev_v, prev_i)
            log_q = v - lse
            keep = (mass < tau) | (r == 0)
            tl.store(out_ids_ptr + row * M + r, i.to(tl.int64), mask=keep)
            tl.store(out_lq_ptr + row * M + r, log_q, mask=keep)
            count += keep.to(tl.int32)
            if HAS_EOS:
                eos_kept = eos_kept | (keep & (i == eos_id)).to(tl.int32)
            mass += tl.exp(log_q)
            prev_v = v
            prev_i = i
        if HAS_EOS:
            eos_ptr = logits_ptr + b.to(tl.int64) * stride_b + pos.to(tl.int64) * stride_k + eos_id
            eos_lq = tl.load(eos_ptr).to(tl.float32) - lse
            need = eos_kept == 0
            slot = tl.minimum(count, M - 1)
            tl.store(out_ids_ptr + row * M + slot, eos_id.to(tl.int64), mask=need)
            tl.store(out_lq_ptr + row * M + slot, eos_lq, mask=need)
            count = tl.where(need, tl.minimum(count + 1, M), count)
        tl.store(out_n_ptr + row, count)


def prune_triton(
    logits: torch.Tensor,
    lengths: Sequence[int] | torch.Tensor,
    *,
    tau: float,
    m_max: int,
    eos_id: int | None,
    block_v: int | None = None,
    num_splits: int | None = None,
) -> Lattice:
    """Triton pruning with the same contract as ``prune_reference``.

    block_v: vocabulary chunk per loop step (power of two; default min(4096, vocab rounded
    up)). num_splits: vocabulary ranges per row (default: enough programs for ~4 per SM, at
    most one range per chunk). Both only change speed, never the result.
    """
    lengths_t, width = check_prune_args(logits, lengths, tau, m_max, eos_id)
    check_launch_device(logits, lengths_t)
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    batch, max_len, vocab = logits.shape
    rows = batch * max_len
    device = logits.device
    if block_v is None:
        block_v = min(4096, triton.next_power_of_2(vocab))
    if block_v < 1 or block_v & (block_v - 1):
        raise ValueError(f"block_v must be a power of two, got {block_v}")
    num_chunks = triton.cdiv(vocab, block_v)
    if num_splits is None:
        programs = (
            4 * torch.cuda.get_device_properties(device).multi_processor_count
            if device.type == "cuda"
            else 1
        )
        num_splits = triton.cdiv(programs, max(rows, 1))
    if num_splits < 1:
        raise ValueError(f"num_splits must be >= 1, got {num_splits}")
    chunks_per_split = triton.cdiv(num_chunks, min(num_splits, num_chunks))
    num_splits = triton.cdiv(num_chunks, chunks_per_split)  # no empty ranges
    mp = triton.next_power_of_2(width)

    token_ids = torch.full((batch, max_len, width), PAD_ID, dtype=torch.int64, device=device)
    log_probs = torch.full((batch, max_len, width), float("-inf"), device=device)
    num_candidates = torch.zeros((batch, max_len), dtype=torch.int32, device=device)
    if rows == 0 or int(lengths_t.max()) == 0:
        return Lattice(token_ids, log_probs, num_candidates, lengths_t)
    lengths_i32 = lengths_t.to(torch.int32)
    part_max = torch.empty((rows, num_splits), dtype=torch.float32, device=device)
    part_sum = torch.empty_like(part_max)
    part_val = torch.empty((rows, num_splits, mp), dtype=torch.float32, device=device)
    part_id = torch.empty((rows, num_splits, mp), dtype=torch.int32, device=device)
    stride_b, stride_k = logits.stride(0), logits.stride(1)
    _prune_partial_kernel[(rows, num_splits)](
        logits,
        lengths_i32,
        part_max,
        part_sum,
        part_val,
        part_id,
        stride_b,
        stride_k,
        max_len,
        vocab,
        num_chunks,
        chunks_per_split,
        num_splits,
        M=width,
        MP=mp,
        BLOCK_V=block_v,
        num_warps=8 if block_v >= 4096 else 4,
    )
    _prune_finalize_kernel[(rows,)](
        logits,
        lengths_i32,
        part_max,
        part_sum,
        part_val,
        part_id,
        token_ids,
        log_probs,
        num_candidates,
        stride_b,
        stride_k,
        max_len,
        num_splits,
        float(tau),
        -1 if eos_id is None else eos_id,
        M=width,
        MP=mp,
        SP=triton.next_power_of_2(num_splits),
        HAS_EOS=eos_id is not None,
        num_warps=4,
    )
    return Lattice(token_ids, log_probs, num_candidates, lengths_t)
