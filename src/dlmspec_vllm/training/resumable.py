"""Drafter training that can stop and resume with the same result as one run.

trainers.py's loops run start to finish in one call, which suits the test fixtures' seconds-long
builds. A drafter for a real target trains for minutes to hours on a shared CPU, so this loop
keeps every source of state (weights, AdamW moments, the schedule, the data sampler's and the
masking's random generators) in a checkpoint; a resumed run computes the same steps, bit for
bit on the same torch build and thread count, as an uninterrupted one.

The loop is the same for every drafter kind; the kind brings its batches (a sampler with a
saveable state) and its loss. The optimiser and schedule are trainers.optimize's: AdamW (0.9,
0.95), linear warmup over 5% of the steps, cosine decay to 10% of ``lr``, gradients clipped to
norm 1.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from dlmspec_vllm.training.trainers import lr_factor

CHECKPOINT_NAME = "last.pt"


class WindowSampler:
    """Batches of token windows cut from one or more streams, with a state that can be saved.

    Each row picks its stream with the given weights (so a small stream of target generations is
    not drowned by a large one of library code), then a random offset in it; the window length
    is drawn per batch from ``seq_len`` (low, high), as trainers' ``random_windows`` does.
    """

    def __init__(
        self,
        streams: Sequence[torch.Tensor],
        weights: Sequence[float],
        *,
        batch_size: int,
        seq_len: tuple[int, int],
        seed: int,
    ) -> None:
        low, high = seq_len
        shortest = min(stream.numel() for stream in streams)
        if not 1 <= low <= high <= shortest:
            raise ValueError(f"seq_len {seq_len} does not fit a stream of {shortest} tokens")
        self.streams = list(streams)
        self.weights = torch.tensor(weights, dtype=torch.float64)
        self.batch_size = batch_size
        self.low, self.high = low, high
        self.generator = torch.Generator().manual_seed(seed)

    def next_batch(self) -> torch.Tensor:
        n = int(torch.randint(self.low, self.high + 1, (), generator=self.generator))
        picks = torch.multinomial(self.weights, self.batch_size, True, generator=self.generator)
        rows = []
        for pick in picks.tolist():
            stream = self.streams[pick]
            start = int(torch.randint(0, stream.numel() - n + 1, (), generator=self.generator))
            rows.append(stream[start : start + n])
        return torch.stack(rows)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.generator.set_state(state["generator"])


class Sampler(Protocol):
    """Where batches come from: deterministic given its saved state."""

    def next_batch(self) -> Any: ...

    def state_dict(self) -> dict[str, torch.Tensor]: ...

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None: ...


# A batch and the run's seeded generator (on the model's device) -> the loss, and optionally
# figures worth showing beside it on the progress bar.
LossFunction = Callable[[Any, torch.Generator], "torch.Tensor | tuple[torch.Tensor, dict]"]


@dataclass
class RunResult:
    """Where a call to :func:`train_resumable` stopped, and every step's loss so far."""

    step: int
    losses: list[float] = field(default_factory=list)
    resumed_from: int | None = None


def train_resumable(
    model: nn.Module,
    sampler: Sampler,
    loss_of: LossFunction,
    *,
    steps: int,
    lr: float,
    seed: int,
    checkpoint_dir: Path,
    save_every: int,
    settings: dict[str, Any],
    resume: bool,
    stop_at: int | None = None,
    progress: bool = True,
) -> RunResult:
    """Train ``model`` for ``steps`` steps of ``loss_of``, checkpointing every ``save_every``.

    ``settings``: everything that defines the run; a checkpoint made under other settings is
    refused rather than silently continued. ``stop_at``: stop after this step (checkpointed),
    to continue later with ``resume``: training in slices on a shared machine. ``seed`` seeds
    the generator handed to ``loss_of`` (masking noise), saved with the run.
    """
    from tqdm.auto import tqdm

    device = next(model.parameters()).device
    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad],
        lr=lr,
        betas=(0.9, 0.95),
        weight_decay=0.0,
    )
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, steps))
    generator = torch.Generator(device=device).manual_seed(seed)
    checkpoint = checkpoint_dir / CHECKPOINT_NAME
    result = RunResult(step=0)
    if checkpoint.is_file():
        if not resume:
            raise FileExistsError(
                f"{checkpoint} exists: pass --resume to continue that run, or choose an empty "
                "output directory"
            )
        state = torch.load(checkpoint, map_location=device, weights_only=False)
        if state["settings"] != settings:
            changed = sorted(
                k
                for k in settings.keys() | state["settings"].keys()
                if settings.get(k) != state["settings"].get(k)
            )
            raise ValueError(f"{checkpoint} was made with other settings ({', '.join(changed)})")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["schedule"])
        sampler.load_state_dict(state["sampler"])
        generator.set_state(state["mask_generator"])
        result = RunResult(step=state["step"], losses=state["losses"], resumed_from=state["step"])

    last = steps if stop_at is None else min(stop_at, steps)
    model.train()
    bar = tqdm(total=steps, initial=result.step, desc="train-drafter", disable=not progress)
    while result.step < last:
        # Losses draw their noise with torch's default device: the model's.
        with device:
            outcome = loss_of(sampler.next_batch(), generator)
        loss, shown = outcome if isinstance(outcome, tuple) else (outcome, {})
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        result.step += 1
        result.losses.append(loss.item())
        bar.update(1)
        bar.set_postfix(
            loss=f"{result.losses[-1]:.3f}", **{k: f"{v:.3f}" for k, v in shown.items()}
        )
        if result.step % save_every == 0 or result.step == last:
            _save(checkpoint, model, optimizer, schedule, sampler, generator, result, settings)
    bar.close()
    model.eval()
    return result


def _save(
    path: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    schedule: torch.optim.lr_scheduler.LRScheduler,
    sampler: Sampler,
    mask_generator: torch.Generator,
    result: RunResult,
    settings: dict[str, Any],
) -> None:
    """Write the checkpoint beside its final name, then rename: a crash never leaves half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {
        "step": result.step,
        "losses": result.losses,
        "settings": settings,
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "schedule": schedule.state_dict(),
        "sampler": sampler.state_dict(),
        "mask_generator": mask_generator.get_state(),
    }
    partial = path.with_suffix(".partial")
    torch.save(state, partial)
    os.replace(partial, path)
