"""The GPU check: kernels, the drafters' draft step and a DFlash training step, timed on CUDA.

    python benchmarks/gpu_check.py OUT_DIR            # one H100/H200, done within 8 minutes
    python benchmarks/gpu_check.py OUT_DIR --tiny     # the same code path at tiny shapes (CPU)

Needs torch, triton (optional on CPU), safetensors (a transformers dependency) and this
repository's src/; it never imports vLLM. Writes OUT_DIR/gpu_check.json (rewritten after every
case, so a run cut short still leaves what it measured) and OUT_DIR/gpu_check.log.

1. kernels: bench_kernels.py's bench_prune and bench_path_search, one (batch, k) case at a time,
   at that benchmark's CUDA shapes (vocab 152064, bf16 logits; trigram path search over 16
   candidates), torch twin vs Triton, each Triton result checked against its twin.
2. drafters, random weights in bfloat16, batch 1/16/64, contexts 128 and 4096 tokens:
   Dream-7B and Fast-dLLM-v2-1.5B draft 16 tokens per call after a context whose prefix cache
   is already filled (``cold_ms``: the same batch drafted with an empty cache, which is what a
   cache refresh costs; the timed calls do not refresh); the DFlash drafter for Qwen3-8B drafts
   one block (15 tokens after the anchor) with its per-request context cache already holding
   the context's target features (``fill_ms``: observing them and the first call, which
   projects them). Median ms per draft call (wall clock, synchronised) and drafted tokens per
   second.
3. training: one step of the DFlash recipe (dflash_loss forward + backward, grad clip,
   AdamW) at the Qwen3-8B drafter shapes on random features and tokens, in float32 as the recipe
   trains and under bfloat16 autocast; median seconds per step.

Every case catches its own OOM and errors and has a time limit; no case starts after
STOP_ADDING_S seconds, so the whole run ends before DEADLINE_S. A drafter case that runs out of
memory is run again at half the batch until it fits; the JSON keeps the "oom" row and marks the
smaller one with ``requested_batch``.
"""

from __future__ import annotations

import time

STARTED = time.monotonic()

import argparse  # noqa: E402
import contextlib  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402
import platform  # noqa: E402
import signal  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import traceback  # noqa: E402
from collections.abc import Callable, Iterator  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))
sys.path.insert(0, str(HERE))

import torch  # noqa: E402
from bench_kernels import _copy_bandwidth, _environment, bench_path_search, bench_prune  # noqa: E402
from torch import nn  # noqa: E402

from dlmspec_vllm.drafters.base import DraftingOptions, TargetFeatures  # noqa: E402
from dlmspec_vllm.drafters.dflash import (  # noqa: E402
    DFlashConfig,
    DFlashDrafter,
    DFlashNetwork,
    default_target_layer_ids,
)
from dlmspec_vllm.drafters.dream import DreamConfig, DreamDrafter, DreamModel  # noqa: E402
from dlmspec_vllm.drafters.fast_dllm_v2 import FastDllmV2Config, FastDllmV2Drafter  # noqa: E402
from dlmspec_vllm.drafters.qwen2_layout import Qwen2LayoutModel  # noqa: E402
from dlmspec_vllm.drafters.transformer import RotaryEmbedding  # noqa: E402
from dlmspec_vllm.training.dflash import AnchorSampler, FeatureSequence, dflash_loss  # noqa: E402

RESULTS_NAME = "gpu_check.json"
LOG_NAME = "gpu_check.log"
DEADLINE_S = 465.0  # the run is over by then (8 minutes allowed)
STOP_ADDING_S = 420.0  # no case starts after this
CASE_LIMIT_S = 75.0  # one case at most (priming included)
KERNEL_SECTION_S = 90.0  # kernel cases start only this long after the section began
PRIME_TOKENS = 32768  # an empty cache is filled this many context tokens per draft call


@dataclass(frozen=True)
class Shapes:
    """Everything that differs between the real run and --tiny."""

    dream: DreamConfig
    fast_dllm: FastDllmV2Config
    dflash: DFlashConfig
    batches: tuple[int, ...]
    contexts: tuple[int, ...]
    diffusion_draft_tokens: int
    draft_repeats: int
    kernel_batches: tuple[int, ...]
    kernel_ks: tuple[int, ...]
    kernel_vocab: int
    kernel_repeats: int
    train_batch: int
    train_length: int
    train_prompt: int
    train_anchors: int
    train_steps: int


def real_shapes() -> Shapes:
    dflash_layers = 1
    return Shapes(
        dream=DreamConfig(
            vocab_size=152064,
            hidden_size=3584,
            intermediate_size=18944,
            num_hidden_layers=28,
            num_attention_heads=28,
            num_key_value_heads=4,
            max_position_embeddings=32768,
            mask_token_id=151666,
            rms_norm_eps=1e-6,
            rope_theta=1e6,
        ),
        fast_dllm=FastDllmV2Config(
            vocab_size=151936,
            hidden_size=1536,
            intermediate_size=8960,
            num_hidden_layers=28,
            num_attention_heads=12,
            num_key_value_heads=2,
            max_position_embeddings=32768,
            mask_token_id=151665,
            rms_norm_eps=1e-6,
            rope_theta=1e6,
            bd_size=32,
        ),
        dflash=DFlashConfig(
            hidden_size=4096,
            intermediate_size=12288,
            num_hidden_layers=dflash_layers,
            num_attention_heads=32,
            num_key_value_heads=8,
            head_dim=128,
            rms_norm_eps=1e-6,
            rope_theta=1e6,
            block_size=16,
            mask_token_id=151669,
            target_layer_ids=default_target_layer_ids(36, 5),
            num_target_layers=36,
            target_hidden_size=4096,
            vocab_size=151936,
        ),
        batches=(1, 16, 64),
        contexts=(128, 4096),
        diffusion_draft_tokens=16,
        draft_repeats=10,
        kernel_batches=(1, 4, 16, 64),
        kernel_ks=(16, 32, 64),
        kernel_vocab=152064,
        kernel_repeats=20,
        train_batch=8,
        train_length=1024,
        train_prompt=128,
        train_anchors=12,
        train_steps=5,
    )


def tiny_shapes() -> Shapes:
    vocab = 512
    common = dict(
        vocab_size=vocab,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        rms_norm_eps=1e-6,
        rope_theta=1e6,
    )
    return Shapes(
        dream=DreamConfig(**common, mask_token_id=vocab - 2),
        fast_dllm=FastDllmV2Config(**common, mask_token_id=vocab - 3, bd_size=32),
        dflash=DFlashConfig(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=1,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            rms_norm_eps=1e-6,
            rope_theta=1e6,
            block_size=16,
            mask_token_id=vocab - 1,
            target_layer_ids=default_target_layer_ids(8, 5),
            num_target_layers=8,
            target_hidden_size=64,
            vocab_size=vocab,
        ),
        batches=(1, 4),
        contexts=(48, 96),
        diffusion_draft_tokens=16,
        draft_repeats=3,
        kernel_batches=(1, 2),
        kernel_ks=(8,),
        kernel_vocab=vocab,
        kernel_repeats=2,
        train_batch=2,
        train_length=64,
        train_prompt=16,
        train_anchors=3,
        train_steps=2,
    )


# --- bookkeeping -------------------------------------------------------------------------------


def elapsed() -> float:
    return time.monotonic() - STARTED


class CaseTimeout(Exception):
    pass


class Run:
    """The report being built, written out after every case."""

    def __init__(self, out_dir: Path, report: dict[str, Any]) -> None:
        self.out_dir = out_dir
        self.report = report
        self.log_file = (out_dir / LOG_NAME).open("a", encoding="utf-8")

    def log(self, message: str) -> None:
        line = f"[{elapsed():6.1f}s] {message}"
        print(line, file=sys.stderr, flush=True)
        self.log_file.write(line + "\n")
        self.log_file.flush()

    def save(self) -> None:
        self.report["elapsed_s"] = round(elapsed(), 2)
        self.report["vllm_imported"] = "vllm" in sys.modules
        path = self.out_dir / RESULTS_NAME
        scratch = path.with_suffix(".json.partial")
        scratch.write_text(json.dumps(self.report, indent=2, default=str) + "\n")
        scratch.replace(path)

    def may_start(self, name: str) -> bool:
        if elapsed() < STOP_ADDING_S:
            return True
        self.report["skipped_for_time"].append(name)
        self.log(f"skipped (time): {name}")
        return False

    def case_limit(self) -> float:
        return max(1.0, min(CASE_LIMIT_S, DEADLINE_S - elapsed()))


@contextlib.contextmanager
def time_limit(seconds: float) -> Iterator[None]:
    """Raise CaseTimeout in the main thread after ``seconds`` (checked between Python ops)."""
    if not hasattr(signal, "setitimer"):
        yield
        return

    def expire(signum, frame):
        raise CaseTimeout(f"over the {seconds:.0f} s case limit")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


# torch.OutOfMemoryError is torch 2.5+; torch.cuda's is its older name.
OOM_ERRORS = tuple({getattr(torch, "OutOfMemoryError", RuntimeError), torch.cuda.OutOfMemoryError})


def is_oom(err: BaseException) -> bool:
    return isinstance(err, OOM_ERRORS) and "out of memory" in str(err).lower()


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


def guarded(run: Run, device: torch.device, row: dict[str, Any], fn: Callable[[], dict]) -> dict:
    """Run one case into row: status ok / oom / timeout / error, never an exception."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    began = time.monotonic()
    try:
        with time_limit(run.case_limit()):
            row.update(fn())
        row["status"] = "ok"
    except CaseTimeout as err:
        row.update(status="timeout", error=str(err))
    except Exception as err:  # a case must never end the run
        row.update(status="oom" if is_oom(err) else "error", error=f"{type(err).__name__}: {err}")
        if row["status"] == "error":
            row["traceback"] = traceback.format_exc(limit=6)
    row["case_s"] = round(time.monotonic() - began, 3)
    if device.type == "cuda":
        with contextlib.suppress(Exception):
            row["peak_memory_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
    free_memory(device)
    shown = {k: v for k, v in row.items() if k not in ("times_ms", "traceback")}
    run.log(json.dumps(shown, default=str))
    return row


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def wall_ms(device: torch.device, fn: Callable[[], object]) -> float:
    sync(device)
    began = time.perf_counter()
    fn()
    sync(device)
    return (time.perf_counter() - began) * 1e3


def repeat_ms(
    device: torch.device, fn: Callable[[], object], repeats: int, budget_s: float
) -> list[float]:
    """Up to ``repeats`` timings of fn, fewer (at least 3) once budget_s is spent."""
    times: list[float] = []
    began = time.monotonic()
    while len(times) < repeats:
        times.append(wall_ms(device, fn))
        if len(times) >= 3 and time.monotonic() - began > budget_s:
            break
    return times


# --- random networks ---------------------------------------------------------------------------


def random_network(build: Callable[[], nn.Module], device: torch.device, dtype: torch.dtype):
    """build() with random weights straight on the device: made on the meta device in dtype,
    allocated there, matrices N(0, 0.02), biases 0, norm weights 1, RoPE recomputed."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device("meta"):
            model = build()
    finally:
        torch.set_default_dtype(previous)
    model = model.to_empty(device=device)
    generator = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if parameter.dim() > 1:
                parameter.normal_(0.0, 0.02, generator=generator)
            elif name.endswith("bias"):
                parameter.zero_()
            else:
                parameter.fill_(1.0)
    for module in model.modules():
        if isinstance(module, RotaryEmbedding):
            module.reset(device)
    if isinstance(model, Qwen2LayoutModel):
        model.tie_weights()
    return model


def random_matrix(
    rows: int, cols: int, device: torch.device, dtype: torch.dtype, seed: int
) -> torch.Tensor:
    generator = torch.Generator(device=device).manual_seed(seed)
    return (torch.randn(rows, cols, device=device, generator=generator) * 0.02).to(dtype)


def random_tokens(count: int, vocab: int, avoid: int, seed: int) -> list[int]:
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, vocab - 1, (count,), generator=generator)
    tokens[tokens == avoid] = vocab - 1 if avoid != vocab - 1 else 0
    return tokens.tolist()


# --- 1. kernels --------------------------------------------------------------------------------


def kernel_section(run: Run, device: torch.device, shapes: Shapes, with_triton: bool) -> None:
    kernels = run.report["kernels"]
    if device.type == "cuda":
        nbytes = max(shapes.kernel_batches) * max(shapes.kernel_ks) * shapes.kernel_vocab * 2
        with contextlib.suppress(Exception):
            kernels["copy_bandwidth_gbs"] = _copy_bandwidth(device, nbytes, shapes.kernel_repeats)
    began = time.monotonic()
    for name, bench, extra in (
        ("prune", bench_prune, dict(vocab=shapes.kernel_vocab, m_max=15, tau=0.8)),
        ("path_search", bench_path_search, dict(width=16, order=3)),
    ):
        for batch in shapes.kernel_batches:
            for k in shapes.kernel_ks:
                case = f"kernel {name} batch {batch} k {k}"
                if not run.may_start(case):
                    continue
                if time.monotonic() - began > KERNEL_SECTION_S:
                    run.report["skipped_for_time"].append(case)
                    continue
                row: dict[str, Any] = {"batch": batch, "k": k}

                def one(bench=bench, extra=extra, batch=batch, k=k) -> dict:
                    rows = bench(
                        device,
                        [batch],
                        [k],
                        **extra,
                        repeats=shapes.kernel_repeats,
                        with_triton=with_triton,
                    )
                    return rows[0]

                kernels[name].append(guarded(run, device, row, one))
                run.save()


# --- 2. drafters -------------------------------------------------------------------------------


def diffusion_case(
    drafter_cls, model, config, device, batch: int, context: int, shapes: Shapes
) -> dict[str, Any]:
    """Fill every request's prefix cache (timed: cold_ms), then time draft calls on it."""
    k = shapes.diffusion_draft_tokens
    options = DraftingOptions(
        cache_refresh_interval=10**9, cache_max_tokens=max(65536, batch * (context + 2 * k))
    )
    drafter = drafter_cls(model, target_vocab_size=config.vocab_size, options=options)
    contexts = [
        random_tokens(context, config.vocab_size, config.mask_token_id, seed=b)
        for b in range(batch)
    ]
    req_ids = [f"r{b}" for b in range(batch)]
    group = max(1, PRIME_TOKENS // context)
    cold = 0.0
    for start in range(0, batch, group):
        stop = min(batch, start + group)
        cold += wall_ms(
            device,
            lambda start=start, stop=stop: drafter.draft(
                contexts[start:stop], [k] * (stop - start), req_ids=req_ids[start:stop]
            ),
        )
    if drafter.cached_tokens < batch * (context - 1) // 2:
        raise RuntimeError(f"prefix cache holds only {drafter.cached_tokens} tokens")

    def step() -> None:
        drafter.draft(contexts, [k] * batch, req_ids=req_ids)

    wall_ms(device, step)  # warm-up
    times = repeat_ms(device, step, shapes.draft_repeats, budget_s=20.0)
    median = statistics.median(times)
    return {
        "draft_tokens": k,
        "median_ms": median,
        "drafted_tokens_per_s": batch * k / (median * 1e-3),
        "cold_ms": cold,
        "cold_prime_group": group,
        "cached_tokens": drafter.cached_tokens,
        "times_ms": times,
    }


def dflash_case(parts, device, batch: int, context: int, shapes: Shapes) -> dict[str, Any]:
    """Observe ``context`` positions of features per request, then draft one block each."""
    network, embed, head, config = parts
    k = config.block_size - 1
    options = DraftingOptions(cache_max_tokens=max(65536, batch * (context + 64)))
    drafter = DFlashDrafter(
        network,
        embed_weight=embed,
        head_weight=head,
        draft_to_target=None,
        target_vocab_size=config.vocab_size,
        options=options,
    )
    width = len(config.target_layer_ids) * config.target_hidden_size
    generator = torch.Generator(device=device).manual_seed(2)
    features = torch.randn(context, width, device=device, generator=generator).to(embed.dtype)
    positions = torch.arange(context)
    req_ids = [f"r{b}" for b in range(batch)]
    # The context ends with the token just sampled: features for every position but that one.
    contexts = [
        random_tokens(context + 1, config.vocab_size, config.mask_token_id, seed=b)
        for b in range(batch)
    ]

    def step():
        return drafter.draft(contexts, [k] * batch, req_ids=req_ids)

    def fill() -> None:
        for req_id in req_ids:
            drafter.observe(req_id, TargetFeatures(positions, features))
        step()  # projects what is still pending

    filled = wall_ms(device, fill)
    if drafter.cached_tokens != batch * context:
        raise RuntimeError(f"context cache holds {drafter.cached_tokens} positions")
    lengths = step().lengths
    if lengths != [k] * batch:
        raise RuntimeError(f"drafted {lengths[:4]}... tokens, not {k} per request")
    times = repeat_ms(device, step, shapes.draft_repeats, budget_s=20.0)
    median = statistics.median(times)
    return {
        "draft_tokens": k,
        "median_ms": median,
        "drafted_tokens_per_s": batch * k / (median * 1e-3),
        "fill_ms": filled,
        "cached_tokens": drafter.cached_tokens,
        "times_ms": times,
    }


def drafter_parts(family: str, shapes: Shapes, device: torch.device, dtype: torch.dtype) -> Any:
    """The family's random network (DFlash: with the target's embedding and head)."""
    if family == "dream":
        return random_network(lambda: DreamModel(shapes.dream), device, dtype).eval()
    if family == "fast_dllm":
        return random_network(lambda: Qwen2LayoutModel(shapes.fast_dllm), device, dtype).eval()
    config = shapes.dflash
    network = random_network(lambda: DFlashNetwork(config), device, dtype).eval()
    embed = random_matrix(config.vocab_size, config.hidden_size, device, dtype, seed=1)
    head = random_matrix(config.vocab_size, config.hidden_size, device, dtype, seed=2)
    return network, embed, head, config


def fitting_batch(
    run: Run,
    device: torch.device,
    label: str,
    batch: int,
    context: int,
    one: Callable[[int], dict],
) -> list[dict[str, Any]]:
    """The case at ``batch``; if it runs out of memory, again at half the batch until it fits
    (or batch 1 does not). Every attempt is a row of its own; a reduced one names the batch it
    stands for (``requested_batch``) and says why."""
    rows = []
    tried = batch
    while True:
        row: dict[str, Any] = {"drafter": label, "batch": tried, "context": context}
        if tried != batch:
            row["requested_batch"] = batch
            row["note"] = f"batch {batch} ran out of memory at context {context}: reduced"
        row = guarded(run, device, row, lambda tried=tried: one(tried))
        run.report["drafters"].append(row)
        run.save()
        rows.append(row)
        if row["status"] != "oom" or tried == 1:
            return rows
        tried //= 2
        if not run.may_start(f"{label} b{tried} ctx{context} (reduced from b{batch})"):
            return rows


def drafter_section(run: Run, device: torch.device, shapes: Shapes) -> None:
    dtype = torch.bfloat16
    families = (
        ("dflash-qwen3-8b", "dflash"),
        ("fast-dllm-v2-1.5b", "fast_dllm"),
        ("dream-7b", "dream"),
    )
    for label, family in families:
        cases = [(b, c) for c in shapes.contexts for b in shapes.batches]
        if not run.may_start(f"build {label}"):
            run.report["skipped_for_time"].extend(f"{label} b{b} ctx{c}" for b, c in cases)
            continue
        parts: Any = None
        try:
            with time_limit(run.case_limit()):
                parts = drafter_parts(family, shapes, device, dtype)
        except Exception as err:  # a network that does not fit fails its cases only
            status = "oom" if is_oom(err) else "error"
            status = "timeout" if isinstance(err, CaseTimeout) else status
            for batch, context in cases:
                run.report["drafters"].append(
                    {
                        "drafter": label,
                        "batch": batch,
                        "context": context,
                        "status": status,
                        "error": f"building the network: {type(err).__name__}: {err}",
                    }
                )
            run.log(f"{label}: building failed: {err}")
            parts = None
            free_memory(device)
            run.save()
            continue
        run.log(f"{label}: built")
        for batch, context in cases:
            if not run.may_start(f"{label} b{batch} ctx{context}"):
                continue
            if family == "dflash":

                def one(batch: int, context=context, parts=parts) -> dict:
                    return dflash_case(parts, device, batch, context, shapes)
            else:
                drafter_cls = DreamDrafter if family == "dream" else FastDllmV2Drafter
                config = shapes.dream if family == "dream" else shapes.fast_dllm

                def one(
                    batch: int, context=context, cls=drafter_cls, config=config, parts=parts
                ) -> dict:
                    return diffusion_case(cls, parts, config, device, batch, context, shapes)

            fitting_batch(run, device, label, batch, context, one)
        parts = None
        free_memory(device)


# --- 3. training -------------------------------------------------------------------------------


def training_section(run: Run, device: torch.device, shapes: Shapes) -> None:
    config = shapes.dflash
    width = len(config.target_layer_ids) * config.target_hidden_size
    for precision in ("float32", "bfloat16-autocast"):
        name = f"dflash train step {precision}"
        if not run.may_start(name):
            continue
        row: dict[str, Any] = {
            "case": name,
            "batch": shapes.train_batch,
            "length": shapes.train_length,
            "anchors": shapes.train_anchors,
            "block_size": config.block_size,
        }

        def one(precision=precision) -> dict:
            network = random_network(lambda: DFlashNetwork(config), device, torch.float32)
            embed = random_matrix(config.vocab_size, config.hidden_size, device, torch.float32, 1)
            head = random_matrix(config.vocab_size, config.hidden_size, device, torch.float32, 2)
            generator = torch.Generator(device=device).manual_seed(3)
            sequences = []
            for b in range(shapes.train_batch):
                feats = torch.randn(shapes.train_length, width, device=device, generator=generator)
                tokens = random_tokens(
                    shapes.train_length, config.vocab_size, config.mask_token_id, seed=100 + b
                )
                # Stored as the recipe stores them: on the host, in bfloat16.
                features = feats.to("cpu", torch.bfloat16)
                sequences.append(FeatureSequence(tokens, shapes.train_prompt, features))
            sampler = AnchorSampler(
                sequences, batch_size=shapes.train_batch, anchors=shapes.train_anchors, seed=0
            )
            optimizer = torch.optim.AdamW(
                network.parameters(), lr=3e-4, betas=(0.9, 0.95), weight_decay=0.0
            )
            network.train()
            losses: list[float] = []

            def step() -> None:
                rows, anchors = sampler.next_batch()
                autocast = (
                    torch.autocast(device.type, dtype=torch.bfloat16)
                    if precision != "float32"
                    else contextlib.nullcontext()
                )
                with autocast:
                    out = dflash_loss(
                        network,
                        rows,
                        anchors,
                        embed_weight=embed,
                        head_weight=head,
                        target_to_draft=None,
                        gamma=7.0,
                    )
                optimizer.zero_grad(set_to_none=True)
                out.loss.backward()
                nn.utils.clip_grad_norm_(network.parameters(), 1.0)
                optimizer.step()
                losses.append(out.loss.item())

            wall_ms(device, step)  # warm-up: AdamW state, kernels
            times = repeat_ms(device, step, shapes.train_steps, budget_s=25.0)
            median_s = statistics.median(times) * 1e-3
            return {
                "median_s": median_s,
                "times_s": [t * 1e-3 for t in times],
                "trainable_parameters": sum(p.numel() for p in network.parameters()),
                "loss_finite": all(math.isfinite(x) for x in losses),
                "optimizer": "AdamW(0.9, 0.95), grad clip 1.0",
            }

        run.report["training"].append(guarded(run, device, row, one))
        run.save()


# --- the run -----------------------------------------------------------------------------------


def environment(device: torch.device) -> dict[str, Any]:
    try:
        info = _environment(device)
    except Exception as err:  # no triton: report the rest
        info = {"machine": {"platform": platform.platform()}, "versions": {}, "error": str(err)}
    versions = info.setdefault("versions", {})
    versions.setdefault("torch", torch.__version__)
    versions["cuda"] = torch.version.cuda
    try:
        import triton

        versions["triton"] = triton.__version__
    except ImportError:
        versions["triton"] = None
    if device.type == "cuda":
        machine = info.setdefault("machine", {})
        machine["gpu"] = torch.cuda.get_device_name(device)
        machine["gpu_capability"] = ".".join(map(str, torch.cuda.get_device_capability(device)))
        machine["gpu_memory_gib"] = round(
            torch.cuda.get_device_properties(device).total_memory / 2**30, 1
        )
        versions["cudnn"] = torch.backends.cudnn.version()
    return info


def settings(shapes: Shapes, device: torch.device, tiny: bool, with_triton: bool) -> dict:
    def config_of(config) -> dict:
        return {k: v for k, v in config.__dict__.items()}

    return {
        "tiny": tiny,
        "device": str(device),
        "dtype": "bfloat16 (drafters), float32 / bf16 autocast (training)",
        "weights": "random (timing only)",
        "triton": with_triton,
        "timer": "wall clock around synchronised calls, median",
        "deadline_s": DEADLINE_S,
        "stop_adding_s": STOP_ADDING_S,
        "case_limit_s": CASE_LIMIT_S,
        "kernels": {
            "batches": shapes.kernel_batches,
            "ks": shapes.kernel_ks,
            "vocab": shapes.kernel_vocab,
            "m_max": 15,
            "tau": 0.8,
            "path_search": {"width": 16, "order": 3},
            "repeats": shapes.kernel_repeats,
        },
        "drafters": {
            "batches": shapes.batches,
            "contexts": shapes.contexts,
            "repeats": shapes.draft_repeats,
            "diffusion_draft_tokens": shapes.diffusion_draft_tokens,
            "diffusion_cache": "prefix cache filled first (cold_ms, in calls of at most "
            f"{PRIME_TOKENS} context tokens); timed calls reuse it, refresh disabled; one "
            "denoising pass",
            "dflash_draft_tokens": shapes.dflash.block_size - 1,
            "dflash_cache": "context cache holds the context's features; fill_ms: observing "
            "them for the batch and the first draft call, which projects what is pending",
            "dream": config_of(shapes.dream),
            "fast_dllm_v2": config_of(shapes.fast_dllm),
            "dflash": config_of(shapes.dflash),
        },
        "training": {
            "batch": shapes.train_batch,
            "length": shapes.train_length,
            "prompt_length": shapes.train_prompt,
            "anchors": shapes.train_anchors,
            "steps_timed": shapes.train_steps,
            "gamma": 7.0,
            "lr": 3e-4,
            "tf32_matmul": torch.backends.cuda.matmul.allow_tf32,
        },
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out_dir", type=Path, help="directory for gpu_check.json and its log")
    parser.add_argument("--tiny", action="store_true", help="tiny shapes, CPU is fine")
    parser.add_argument("--device", help="default: cuda when available, else cpu")
    parser.add_argument("--threads", type=int, help="torch CPU threads")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    args.out_dir.mkdir(parents=True, exist_ok=True)
    shapes = tiny_shapes() if args.tiny else real_shapes()
    with_triton = device.type == "cuda"
    if with_triton:
        try:
            import triton  # noqa: F401
        except ImportError:
            with_triton = False
    report: dict[str, Any] = {
        "check": "dlmspec gpu_check",
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "argv": sys.argv[1:] if argv is None else argv,
        **environment(device),
        "settings": settings(shapes, device, args.tiny, with_triton),
        "complete": False,
        "skipped_for_time": [],
        "kernels": {"prune": [], "path_search": []},
        "training": [],
        "drafters": [],
    }
    run = Run(args.out_dir, report)
    if device.type != "cuda" and not args.tiny:
        report["error"] = "no CUDA device: the real shapes need one (use --tiny on a CPU)"
        run.log(report["error"])
        run.save()
        return 2
    run.log(f"device {device}, tiny={args.tiny}, triton={with_triton}, pid {os.getpid()}")
    run.save()
    for section in (kernel_section, training_section, drafter_section):
        try:
            if section is kernel_section:
                section(run, device, shapes, with_triton)
            else:
                section(run, device, shapes)
        except Exception as err:  # a section's bug ends the section only
            report.setdefault("section_errors", []).append(
                f"{section.__name__}: {type(err).__name__}: {err}"
            )
            run.log(traceback.format_exc())
            free_memory(device)
        run.save()
    report["complete"] = not report["skipped_for_time"] and "section_errors" not in report
    run.save()
    statuses = [r.get("status") for r in (*report["drafters"], *report["training"])]
    run.log(f"done: {statuses.count('ok')}/{len(statuses)} drafter/training cases ok")
    return 0


if __name__ == "__main__":
    sys.exit(main())
