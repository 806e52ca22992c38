"""Read our proposer's state out of a vLLM worker.

Offline, `LLM.collective_rpc(proposer_report)` ships the function to every worker. A running
OpenAI server accepts only worker *method names* on its `/collective_rpc` route (present when the
server runs with `VLLM_SERVER_DEV_MODE=1`), so `install_report_method` adds one method,
`dlmspec_proposer_report`, to vLLM's worker base class:

    curl -X POST http://HOST/collective_rpc -d '{"method": "dlmspec_proposer_report"}'

answers `{"results": [report of rank 0, ...]}`. It only reads; a worker without a dlm proposer
answers null.
"""

from __future__ import annotations

from typing import Any

from dlmspec_vllm.proposer import DlmProposer

REPORT_METHOD = "dlmspec_proposer_report"


def proposer_report(worker: Any) -> dict[str, Any] | None:
    """Run inside a worker: the dlm proposer's report, or None if this worker has none.

    Besides `DlmProposer.report()`, `state` counts every per-request entry the proposer and
    its drafter hold, each of which must fall back to zero once no request is in flight.
    """
    proposer = getattr(getattr(worker, "model_runner", None), "drafter", None)
    if not isinstance(proposer, DlmProposer):
        return None
    report = proposer.report()
    drafter = proposer.drafter
    report["state"] = {
        "tracked_requests": proposer.num_tracked_requests,
        "controller_requests": proposer.controller.num_tracked,
        "lattice_requests": proposer.chooser.num_tracked,
        "drafter_cached_requests": getattr(drafter, "num_cached_requests", 0),
        "drafter_cached_tokens": getattr(drafter, "cached_tokens", None),
    }
    return report


def install_report_method() -> None:
    """Give vLLM's workers the `dlmspec_proposer_report` method (idempotent)."""
    from vllm.v1.worker.worker_base import WorkerBase

    existing = getattr(WorkerBase, REPORT_METHOD, None)
    if existing is not None and existing is not proposer_report:
        raise RuntimeError(f"vLLM's WorkerBase already has a {REPORT_METHOD} attribute")
    setattr(WorkerBase, REPORT_METHOD, proposer_report)
