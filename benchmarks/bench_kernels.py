"""Time the lattice kernels against their torch twins.

    python benchmarks/bench_kernels.py            # CUDA if available, else a reduced CPU run

On CUDA: candidate pruning (fused softmax + nucleus/top-M) at vocab 152064, M 15, batch
1..64, k 16..64, bf16 logits, torch twin vs Triton; the pruning kernel's achieved read
bandwidth (logit bytes / time) beside a measured device-to-device copy bandwidth (read + write
bytes / time of a same-sized copy), the ceiling a one-read kernel can approach; and the exact
path search (trigram, 16 candidates) twin vs Triton. Every Triton result is checked against the
twin. JSON goes to benchmarks/results/ with machine, versions and settings.

On CPU there is no Triton to time: the twins run at reduced shapes, the JSON is printed and no
results file is written (CPU numbers are not the ones this benchmark exists for).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import socket
import statistics
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch

from dlmspec_vllm.lattice.prune import prune_reference
from dlmspec_vllm.lattice.search import viterbi_reference

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def _timer(device: torch.device, fn: Callable[[], object], repeats: int, warmup: int) -> float:
    """Median wall time of fn in milliseconds (CUDA events on GPU)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            began = time.perf_counter()
            fn()
            times.append((time.perf_counter() - began) * 1e3)
    return statistics.median(times)


def _copy_bandwidth(device: torch.device, nbytes: int, repeats: int) -> float:
    """Device-to-device copy bandwidth in GB/s, counting bytes read plus bytes written."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    ms = _timer(device, lambda: dst.copy_(src), repeats, warmup=3)
    return 2 * nbytes / (ms * 1e-3) / 1e9


def bench_prune(
    device: torch.device,
    batches: list[int],
    ks: list[int],
    vocab: int,
    m_max: int,
    tau: float,
    repeats: int,
    with_triton: bool,
) -> list[dict]:
    rows = []
    gen = torch.Generator(device=device).manual_seed(0)
    for batch in batches:
        for k in ks:
            logits = (
                torch.randn(batch, k, vocab, device=device, generator=gen, dtype=torch.float32)
                .mul_(3)
                .to(torch.bfloat16)
            )
            lengths = [k] * batch
            args = dict(tau=tau, m_max=m_max, eos_id=vocab - 1)
            row = {
                "batch": batch,
                "k": k,
                "vocab": vocab,
                "m_max": m_max,
                "dtype": "bfloat16",
                "logit_bytes": logits.numel() * logits.element_size(),
            }
            twin = prune_reference(logits, lengths, **args)
            row["twin_ms"] = _timer(
                device, partial(prune_reference, logits, lengths, **args), repeats, warmup=1
            )
            if with_triton:
                from dlmspec_vllm.kernels.prune import prune_triton

                got = prune_triton(logits, lengths, **args)
                row["triton_matches_twin"] = bool(
                    torch.equal(got.token_ids, twin.token_ids)
                    and torch.equal(got.num_candidates, twin.num_candidates)
                )
                row["triton_ms"] = _timer(
                    device, partial(prune_triton, logits, lengths, **args), repeats, warmup=3
                )
                row["triton_read_gbs"] = row["logit_bytes"] / (row["triton_ms"] * 1e-3) / 1e9
                row["speedup"] = row["twin_ms"] / row["triton_ms"]
            rows.append(row)
            print(json.dumps(row), file=sys.stderr)
    return rows


def bench_path_search(
    device: torch.device,
    batches: list[int],
    ks: list[int],
    width: int,
    order: int,
    repeats: int,
    with_triton: bool,
) -> list[dict]:
    rows = []
    gen = torch.Generator(device=device).manual_seed(1)
    states = width ** (order - 1)
    for batch in batches:
        for k in ks:
            edge = torch.randn(batch, k, states, width, device=device, generator=gen)
            tail = torch.randn(batch, k, device=device, generator=gen)
            is_eos = torch.zeros(batch, k, width, dtype=torch.bool, device=device)
            is_eos[:, :, width - 1] = True
            lengths = torch.full((batch,), k, dtype=torch.int64, device=device)
            row = {"batch": batch, "k": k, "width": width, "order": order}
            twin = viterbi_reference(edge, tail, is_eos, lengths)
            inputs = (edge, tail, is_eos, lengths)
            row["twin_ms"] = _timer(device, partial(viterbi_reference, *inputs), repeats, warmup=1)
            if with_triton:
                from dlmspec_vllm.kernels.path_search import viterbi_triton

                got = viterbi_triton(edge, tail, is_eos, lengths)
                row["triton_matches_twin"] = bool(
                    torch.equal(got[0], twin[0]) and torch.equal(got[1], twin[1])
                )
                row["triton_ms"] = _timer(
                    device, partial(viterbi_triton, *inputs), repeats, warmup=3
                )
                row["speedup"] = row["twin_ms"] / row["triton_ms"]
            rows.append(row)
            print(json.dumps(row), file=sys.stderr)
    return rows


def _environment(device: torch.device) -> dict:
    import dlmspec_vllm

    info = {
        "machine": {
            "hostname": socket.gethostname(),
            "platform": platform.platform(),
            "processor": platform.processor(),
            "cpu_count": os.cpu_count(),
        },
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "dlmspec_vllm": dlmspec_vllm.__version__,
        },
    }
    if device.type == "cuda":
        import triton

        props = torch.cuda.get_device_properties(device)
        info["machine"]["gpu"] = props.name
        info["machine"]["gpu_sms"] = props.multi_processor_count
        info["machine"]["gpu_memory_gib"] = round(props.total_memory / 2**30, 1)
        info["versions"]["cuda"] = torch.version.cuda
        info["versions"]["triton"] = triton.__version__
    return info


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",")]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batches", type=_ints, help="comma-separated batch sizes")
    parser.add_argument("--ks", type=_ints, help="comma-separated drafted lengths")
    parser.add_argument("--vocab", type=int, help="vocabulary size")
    parser.add_argument("--m-max", type=int, default=15)
    parser.add_argument("--tau", type=float, default=0.8)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args(argv)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    # Real shapes on CUDA; reduced ones on CPU, where only the twins run.
    batches = args.batches or ([1, 4, 16, 64] if cuda else [1, 4])
    ks = args.ks or ([16, 32, 64] if cuda else [16])
    vocab = args.vocab or (152064 if cuda else 32768)
    repeats = args.repeats if cuda else min(args.repeats, 3)
    if not cuda:
        print(
            "no CUDA device: timing the torch twins only, at reduced shapes; no results file "
            "is written",
            file=sys.stderr,
        )
    report = {
        "timestamp": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        **_environment(device),
        "settings": {
            "device": device.type,
            "batches": batches,
            "ks": ks,
            "vocab": vocab,
            "m_max": args.m_max,
            "tau": args.tau,
            "repeats": repeats,
            "triton": cuda,
            "timer": "cuda events, median" if cuda else "perf_counter, median",
        },
    }
    if cuda:
        largest = max(batches) * max(ks) * vocab * 2
        report["copy_bandwidth_gbs"] = _copy_bandwidth(device, largest, repeats)
    report["prune"] = bench_prune(
        device, batches, ks, vocab, args.m_max, args.tau, repeats, with_triton=cuda
    )
    report["path_search"] = bench_path_search(
        device, batches, ks, width=16, order=3, repeats=repeats, with_triton=cuda
    )
    text = json.dumps(report, indent=2)
    if cuda:
        RESULTS_DIR.mkdir(parents=True, exist_ok=True)
        stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
        out = RESULTS_DIR / f"bench_kernels-{socket.gethostname()}-{stamp}.json"
        out.write_text(text + "\n")
        print(f"wrote {out}", file=sys.stderr)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
