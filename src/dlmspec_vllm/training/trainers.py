"""Training loops for drafters and their tiny test targets: fp32, seeded, fixed step count.

Both trainers share one optimisation loop (AdamW, linear warmup then cosine decay, gradient
clipping) and stop after exactly ``steps`` batches, so two runs with the same seed, data and
torch build produce the same weights; no loss-based early stopping that would make that depend
on timing. They are library functions: the `dlmspec train-drafter` command and the test fixtures
call the same code.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from dlmspec_vllm.drafters.dream import DreamModel


@contextmanager
def deterministic_algorithms() -> Iterator[None]:
    """Run the body with torch's deterministic kernels, restoring the caller's setting after."""
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous)


def masked_diffusion_loss(
    model: DreamModel,
    tokens: torch.Tensor,
    *,
    block_size: int,
    mask_token_id: int,
    generator: torch.Generator,
    inverse_t_weighting: bool = False,
    teacher_logits: torch.Tensor | None = None,
) -> torch.Tensor:
    """Masked-diffusion loss on the last ``block_size`` tokens of each row, Dream's shifted way.

    Per row, a noise level t ~ U(0, 1] masks each block token with probability t; the prefix stays
    clean, as a drafting context does. Token i is predicted from the output at i - 1 (Dream's
    shift), so the block's first token is read from the last clean prefix position, exactly where
    drafting reads it. The loss is cross-entropy over masked tokens: their mean, or, with
    ``inverse_t_weighting``, the masked-diffusion ELBO's sum of CE / t over all block positions.

    ``teacher_logits`` ([batch, block_size, vocab], the target's next-token logits for the block
    tokens given the clean text before each) replace the data tokens as labels: a drafter is
    judged by agreeing with its target, not with the data, so distilling the target's
    distribution trains exactly what speculative decoding accepts.
    """
    batch, seq = tokens.shape
    prefix = seq - block_size
    if prefix < 1:
        raise ValueError(f"rows of {seq} tokens leave no prefix before a block of {block_size}")
    t = torch.rand(batch, 1, generator=generator).clamp_min(1e-3)
    masked = torch.rand(batch, block_size, generator=generator) < t
    noisy = tokens.clone()
    noisy[:, prefix:] = tokens[:, prefix:].masked_fill(masked, mask_token_id)
    hidden = model.hidden_states(noisy)[:, prefix - 1 : seq - 1]
    logits = model.lm_head(hidden)
    if teacher_logits is None:
        labels = tokens[:, prefix:].flatten()
    else:
        labels = teacher_logits.flatten(0, 1).float().softmax(dim=-1)
    ce = F.cross_entropy(logits.flatten(0, 1).float(), labels, reduction="none")
    ce = ce.view(batch, block_size) * masked
    if inverse_t_weighting:
        return (ce / t).sum() / (batch * block_size)
    return ce.sum() / masked.sum().clamp_min(1)


def train_masked_diffusion(
    model: DreamModel,
    batches: Iterator[torch.Tensor],
    *,
    steps: int,
    lr: float,
    seed: int,
    block_size: int,
    inverse_t_weighting: bool = False,
    teacher: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> list[float]:
    """Train a Dream model with :func:`masked_diffusion_loss`; returns the loss of every step.

    ``seed`` drives the masking only; the data order is the iterator's own. ``teacher``, if
    given, maps clean token rows [batch, seq] to the target's shifted logits [batch, seq, vocab]
    (index i predicts token i + 1) and turns the loss into distillation of the target.
    """
    generator = torch.Generator().manual_seed(seed)
    mask_token_id = model.config.mask_token_id

    def loss_of(batch: torch.Tensor) -> torch.Tensor:
        teacher_logits = None
        if teacher is not None:
            prefix = batch.shape[1] - block_size
            with torch.no_grad():
                teacher_logits = teacher(batch)[:, prefix - 1 : -1, : model.config.vocab_size]
        return masked_diffusion_loss(
            model,
            batch,
            block_size=block_size,
            mask_token_id=mask_token_id,
            generator=generator,
            inverse_t_weighting=inverse_t_weighting,
            teacher_logits=teacher_logits,
        )

    return optimize(model, loss_of, batches, steps=steps, lr=lr)


def train_causal_lm(
    model: nn.Module, batches: Iterator[torch.Tensor], *, steps: int, lr: float
) -> list[float]:
    """Next-token training of a transformers causal LM (``model(input_ids=...).logits``).

    Deterministic without a seed of its own: no dropout is assumed and the batches carry all the
    randomness.
    """

    def loss_of(batch: torch.Tensor) -> torch.Tensor:
        logits = model(input_ids=batch).logits[:, :-1]
        return F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten())

    return optimize(model, loss_of, batches, steps=steps, lr=lr)


def lr_factor(step: int, steps: int, warmup_fraction: float = 0.05) -> float:
    """Learning-rate multiplier: linear warmup, then cosine decay to 10% of the peak."""
    warmup = max(1, int(steps * warmup_fraction))
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress))


def optimize(
    model: nn.Module,
    loss_of: Callable[[torch.Tensor], torch.Tensor],
    batches: Iterator[torch.Tensor],
    *,
    steps: int,
    lr: float,
    warmup_fraction: float = 0.05,
    max_grad_norm: float = 1.0,
) -> list[float]:
    """Minimise ``loss_of(batch)`` for exactly ``steps`` batches; returns the per-step losses."""
    device = next(model.parameters()).device
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, steps, warmup_fraction)
    )
    model.train()
    losses = []
    for _ in range(steps):
        loss = loss_of(next(batches).to(device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
    model.eval()
    return losses
