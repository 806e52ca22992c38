"""benchmarks/gpu_check.py --tiny: the GPU check's own code path at tiny shapes, on the CPU,
with vLLM made unimportable (the GPU machine has none)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"

# Any attempt to import vllm (directly or through a module the check imports) fails the case.
NO_VLLM = """
import runpy, sys

class NoVllm:
    def find_spec(self, name, path=None, target=None):
        if name == "vllm" or name.startswith("vllm."):
            raise ImportError("gpu_check must not import vllm (" + name + ")")
        return None

sys.meta_path.insert(0, NoVllm())
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def _positive(value) -> bool:
    return isinstance(value, int | float) and math.isfinite(value) and value > 0


def test_tiny_gpu_check_times_every_case(tmp_path):
    out = tmp_path / "out"
    done = subprocess.run(
        [sys.executable, "-c", NO_VLLM, str(SCRIPT), str(out), "--tiny", "--threads", "1"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    files = [p for p in out.rglob("*") if p.is_file()]
    assert 1 <= len(files) <= 8, files
    report = json.loads((out / "gpu_check.json").read_text())
    assert report["vllm_imported"] is False
    assert report["complete"] and not report["skipped_for_time"]
    assert "section_errors" not in report
    assert report["settings"]["tiny"] is True
    assert report["versions"]["torch"]

    drafters = report["drafters"]
    settings = report["settings"]["drafters"]
    expected = {
        (name, batch, context)
        for name in ("dream-7b", "fast-dllm-v2-1.5b", "dflash-qwen3-8b")
        for batch in settings["batches"]
        for context in settings["contexts"]
    }
    assert {(r["drafter"], r["batch"], r["context"]) for r in drafters} == expected
    for row in drafters:
        assert row["status"] == "ok", row
        assert _positive(row["median_ms"]) and _positive(row["drafted_tokens_per_s"]), row
        assert row["draft_tokens"] > 0

    training = report["training"]
    assert training, "no training step was timed"
    for row in training:
        assert row["status"] == "ok", row
        assert _positive(row["median_s"]) and row["loss_finite"], row

    kernels = report["kernels"]
    for name in ("prune", "path_search"):
        assert kernels[name] and all(r["status"] == "ok" for r in kernels[name])
        assert all(_positive(r["twin_ms"]) for r in kernels[name])


def test_a_drafter_case_that_runs_out_of_memory_is_rerun_at_a_smaller_batch(tmp_path):
    sys.path.insert(0, str(SCRIPT.parent))
    import gpu_check
    import torch

    run = gpu_check.Run(tmp_path, {"skipped_for_time": [], "drafters": []})

    def one(batch: int) -> dict:
        if batch > 16:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 14.00 GiB")
        return {"median_ms": 1.0 * batch}

    rows = gpu_check.fitting_batch(run, torch.device("cpu"), "dream-7b", 64, 4096, one)
    assert [(r["batch"], r["status"]) for r in rows] == [(64, "oom"), (32, "oom"), (16, "ok")]
    assert rows[-1]["requested_batch"] == 64 and "reduced" in rows[-1]["note"]
    assert "requested_batch" not in rows[0]
    saved = json.loads((tmp_path / "gpu_check.json").read_text())["drafters"]
    assert [r["batch"] for r in saved] == [64, 32, 16]
