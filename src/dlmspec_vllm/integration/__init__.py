"""Every place this package touches vLLM internals, applied from one function."""

from __future__ import annotations

import logging

from dlmspec_vllm.integration.patching import MethodPatch
from dlmspec_vllm.integration.version import check_vllm_version

logger = logging.getLogger(__name__)


def all_patches() -> list[type[MethodPatch]]:
    """The patches, imported only once the vLLM version is known to be supported."""
    from dlmspec_vllm.integration import cpu_sampling
    from dlmspec_vllm.integration.model_runner import GPUModelRunnerPatch
    from dlmspec_vllm.integration.speculative_config import EngineArgsSpeculativeConfigPatch

    patches: list[type[MethodPatch]] = [EngineArgsSpeculativeConfigPatch, GPUModelRunnerPatch]
    if cpu_sampling.on_cpu_platform():
        patches += [cpu_sampling.CpuExpandKernelPatch, cpu_sampling.CpuGeneratorRewindPatch]
    return patches


def install() -> None:
    """Apply every patch once per process; vLLM may load a plugin several times."""
    check_vllm_version()
    for patch in all_patches():
        if not patch.is_applied():
            problems = patch.signature_mismatches()
            if problems:
                raise RuntimeError(
                    "dlmspec-vllm cannot patch this vLLM build: " + "; ".join(problems)
                )
            patch.apply()
    from dlmspec_vllm.integration.inspection import install_report_method
    from dlmspec_vllm.integration.logs import use_vllm_log_handlers

    install_report_method()
    use_vllm_log_handlers()
