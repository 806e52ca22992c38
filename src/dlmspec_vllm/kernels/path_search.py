"""Batched exact lattice path search (Viterbi) over precomputed transition scores (Triton).

Twin: ``dlmspec_vllm.lattice.search.viterbi_reference`` (the definition of the result).

Split between host and kernel: n-gram lookups are irregular (hash/sorted-table probes per
request), so ``lattice.search.build_edge_scores`` does them in torch, once per request for all
reachable (state, candidate) pairs, and hands the kernel a dense tensor
edge [B, K, S, W] (S = W^(n-1) states of the last n-1 candidate indices, W a power of two).
The kernel owns the sequential part: one program per request walks its positions backwards
holding the whole [W, S/W, W] transition tile and the value vector in registers (the next
state of (s, c) is (s mod S/W) * W + c, so the value vector is re-viewed, not gathered), stores
first-maximum choices in a scratch tensor, then follows them forward from state 0. Only
additions and max are done, in the twin's order, so kernel and twin agree bit for bit.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from dlmspec_vllm.kernels import check_launch_device


@triton.jit
def _viterbi_kernel(
    edge_ptr,
    tail_ptr,
    is_eos_ptr,
    lengths_ptr,
    choice_ptr,
    path_ptr,
    path_len_ptr,
    max_len,
    W: tl.constexpr,
    SUB: tl.constexpr,
):
    b = tl.program_id(0)
    length = tl.load(lengths_ptr + b)
    states: tl.constexpr = W * SUB
    hi = tl.arange(0, W)  # oldest state digit
    lo = tl.arange(0, SUB)  # the digits that survive one step
    cand = tl.arange(0, W)
    tile = (hi[:, None, None] * SUB + lo[None, :, None]) * W + cand[None, None, :]
    state_offs = hi[:, None] * SUB + lo[None, :]
    value = tl.zeros([SUB, W], dtype=tl.float32)  # value after position i, viewed (lo, c)
    completion = 0.0
    for t in range(0, length):
        i = length - 1 - t
        row = b.to(tl.int64) * max_len + i
        edge = tl.load(edge_ptr + row * (states * W) + tile)
        eos = tl.load(is_eos_ptr + row * W + cand) != 0
        following = tl.where(eos[None, None, :], completion, value[None, :, :])
        total = edge + following
        best = tl.max(total, axis=2)
        first = tl.min(tl.where(total == best[:, :, None], cand[None, None, :], W), axis=2)
        tl.store(choice_ptr + row * states + state_offs, first)
        value = tl.reshape(best, (SUB, W))
        completion = tl.load(tail_ptr + row) + completion
    tl.debug_barrier()  # the forward walk reads choices other threads stored
    state = 0
    running = length > 0
    count = 0
    for i in range(0, length):
        row = b.to(tl.int64) * max_len + i
        c = tl.load(choice_ptr + row * states + state)
        tl.store(path_ptr + row, c.to(tl.int64), mask=running)
        count += running.to(tl.int32)
        running = running & (tl.load(is_eos_ptr + row * W + c) == 0)
        state = (state % SUB) * W + c
    # Inside the kernel Triton makes `count` a scalar tensor; mypy sees the int it starts as.
    tl.store(path_len_ptr + b, count.to(tl.int64))  # type: ignore[attr-defined]


def viterbi_triton(
    edge: torch.Tensor, tail: torch.Tensor, is_eos: torch.Tensor, lengths: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton exact search with the same contract as ``viterbi_reference``.

    edge [B, K, S, W] float32 with W a power of two and S a power of W (S >= W);
    tail [B, K] float32; is_eos [B, K, W] bool; lengths [B] (<= K).
    Returns choices [B, K] int64 (-1 after the path) and path_len [B] int64.
    """
    if edge.dim() != 4 or edge.dtype != torch.float32:
        raise ValueError(
            f"edge must be a float32 [B, K, S, W] tensor, got {edge.dtype} {tuple(edge.shape)}"
        )
    batch, max_len, states, width = edge.shape
    if width & (width - 1) or states < width or states % width:
        raise ValueError(
            f"edge width {width} must be a power of two and states {states} a power of it"
        )
    sub = states // width
    if tail.shape != (batch, max_len) or is_eos.shape != (batch, max_len, width):
        raise ValueError("tail must be [B, K] and is_eos [B, K, W], matching edge")
    if lengths.shape != (batch,):
        raise ValueError(f"lengths must be [B], got {tuple(lengths.shape)}")
    check_launch_device(edge, tail, is_eos, lengths)
    if batch and int(lengths.max()) > max_len:
        raise ValueError(f"lengths must be <= {max_len}")
    edge = edge.contiguous()
    tail = tail.to(torch.float32).contiguous()
    is_eos = is_eos.to(torch.int8).contiguous()
    lengths_i32 = lengths.to(torch.int32).contiguous()
    device = edge.device
    choices = torch.full((batch, max_len), -1, dtype=torch.int64, device=device)
    path_len = torch.zeros(batch, dtype=torch.int64, device=device)
    if batch == 0:
        return choices, path_len
    scratch = torch.empty((batch, max_len, states), dtype=torch.int32, device=device)
    _viterbi_kernel[(batch,)](
        edge,
        tail,
        is_eos,
        lengths_i32,
        scratch,
        choices,
        path_len,
        max_len,
        W=width,
        SUB=sub,
        num_warps=4,
    )
    return choices, path_len
