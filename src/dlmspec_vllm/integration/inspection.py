"""Read our proposer's state out of a vLLM worker, through `LLM.collective_rpc`."""

from __future__ import annotations

from typing import Any

from dlmspec_vllm.proposer import DlmProposer


def proposer_report(worker: Any) -> dict[str, Any] | None:
    """Run inside a worker: the dlm proposer's report, or None if this worker has none."""
    drafter = getattr(getattr(worker, "model_runner", None), "drafter", None)
    return drafter.report() if isinstance(drafter, DlmProposer) else None
