"""The dlm method's own Prometheus series, made in the workers, served at the server's /metrics.

vLLM serves /metrics from its API server process; the proposer runs in a worker process (with
the engine core in another, and one engine core per data-parallel replica). The numbers cross
over through files: when vLLM's config is built for the dlm method, the front end makes a
directory and attaches its path to the speculative config, which vLLM ships to every process.
In each engine, tensor-parallel rank 0's proposer writes its cumulative counters there as
`engine-<data-parallel rank>.json` (a background thread, twice a second when they changed, the
write atomic), and a collector in the front end reads every engine's file whenever /metrics is
scraped. vLLM creates that collector through its `vllm.stat_logger_plugins` entry point.

Series, each labelled with `engine` (the data-parallel rank) and, per source, `source`
(`drafter`: the diffusion drafter; `copied`: copied from the request's context):

    dlmspec:drafter_seconds                    histogram of the drafter's passes per step
    dlmspec:draft_tokens_total{source}         draft tokens vLLM verified
    dlmspec:drafted_request_steps_total{source} request-steps whose draft vLLM verified
    dlmspec:accepted_tokens_total{source}      draft tokens vLLM accepted
    dlmspec:undrafted_request_steps_total      request-steps whose controller chose no draft
    dlmspec:drafter_failures_total             steps whose drafter raised (no drafts sent)
    dlmspec:tracked_requests                   requests holding per-request state now

Only the default single API server is served; with `--api-server-count` above 1 vLLM collects
/metrics from its multiprocess registry, which these series are not in.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import shutil
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from prometheus_client import REGISTRY
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from vllm.v1.metrics.loggers import StatLoggerBase

logger = logging.getLogger(__name__)

METRICS_DIR_ATTRIBUTE = "dlmspec_metrics_dir"
PUBLISH_INTERVAL_SECONDS = 0.5


def attach_metrics_dir(speculative_config: Any) -> None:
    """Give this config a fresh directory for the engines' counters, removed when this (the
    front end's) process exits."""
    directory = tempfile.mkdtemp(prefix="dlmspec-metrics-")
    creator = os.getpid()

    def remove() -> None:
        if os.getpid() == creator:
            shutil.rmtree(directory, ignore_errors=True)

    atexit.register(remove)
    object.__setattr__(speculative_config, METRICS_DIR_ATTRIBUTE, directory)


def metrics_dir(speculative_config: Any) -> Path | None:
    directory = getattr(speculative_config, METRICS_DIR_ATTRIBUTE, None)
    return None if directory is None else Path(directory)


class MetricsPublisher:
    """Writes snapshot() to path whenever it changed, from a daemon thread, until stop()."""

    def __init__(self, path: Path, snapshot: Callable[[], dict[str, Any]]) -> None:
        self._path = path
        self._snapshot = snapshot
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name="dlmspec-metrics", daemon=True)
        self._last: dict[str, Any] | None = None
        self._thread.start()

    def _run(self) -> None:
        try:
            while True:
                self.publish()
                if self._stopped.wait(PUBLISH_INTERVAL_SECONDS):
                    self.publish()
                    return
        except FileNotFoundError:
            # The front end removed the directory on its way out (an in-process engine outlives
            # its atexit hook), possibly between writing the partial file and renaming it:
            # nobody reads these counters any more.
            return
        except Exception:
            # Metrics must never take serving down with them.
            logger.exception("dlm metrics stopped: writing %s failed", self._path)

    def publish(self) -> None:
        snapshot = self._snapshot()
        if snapshot == self._last:
            return
        partial = self._path.with_suffix(".tmp")
        partial.write_text(json.dumps(snapshot))
        os.replace(partial, self._path)
        self._last = snapshot

    def stop(self) -> None:
        self._stopped.set()
        self._thread.join(timeout=5)


def publish_for_this_engine(
    directory: Path, engine_index: int, snapshot: Callable[[], dict[str, Any]]
) -> MetricsPublisher | None:
    """Start publishing this engine's counters, on tensor-parallel rank 0 only: every rank
    proposes alike, so one speaks for the engine."""
    from vllm.distributed import get_tensor_model_parallel_rank

    if get_tensor_model_parallel_rank() != 0:
        return None
    return MetricsPublisher(directory / f"engine-{engine_index}.json", snapshot)


class DlmMetricsCollector:
    """The dlmspec: series of every engine whose counters are in the directory."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def collect(self) -> Iterator[Any]:
        by_source = ["engine", "source"]
        families: dict[str, CounterMetricFamily | GaugeMetricFamily] = {
            "drafted": CounterMetricFamily(
                "dlmspec:draft_tokens", "Draft tokens vLLM verified.", labels=by_source
            ),
            "steps": CounterMetricFamily(
                "dlmspec:drafted_request_steps",
                "Request-steps whose draft vLLM verified.",
                labels=by_source,
            ),
            "accepted": CounterMetricFamily(
                "dlmspec:accepted_tokens", "Draft tokens vLLM accepted.", labels=by_source
            ),
            "undrafted": CounterMetricFamily(
                "dlmspec:undrafted_request_steps",
                "Request-steps whose length controller chose not to draft.",
                labels=["engine"],
            ),
            "failures": CounterMetricFamily(
                "dlmspec:drafter_failures",
                "Steps whose drafter raised; they sent no drafts.",
                labels=["engine"],
            ),
            "tracked": GaugeMetricFamily(
                "dlmspec:tracked_requests",
                "Requests holding per-request state in the proposer.",
                labels=["engine"],
            ),
        }
        seconds = HistogramMetricFamily(
            "dlmspec:drafter_seconds",
            "Seconds of the drafter's passes per step that ran it.",
            labels=["engine"],
        )
        for path in sorted(self.directory.glob("engine-*.json")):
            try:
                counters = json.loads(path.read_text())
            except (OSError, ValueError):
                continue  # being replaced right now: the next scrape reads it
            engine = str(counters["engine"])
            for source, counts in counters["by_source"].items():
                families["drafted"].add_metric([engine, source], counts["draft_tokens"])
                families["steps"].add_metric([engine, source], counts["drafted_request_steps"])
                families["accepted"].add_metric([engine, source], counts["accepted_tokens"])
            families["undrafted"].add_metric([engine], counters["undrafted_request_steps"])
            families["failures"].add_metric([engine], counters["drafter_failures"])
            families["tracked"].add_metric([engine], counters["tracked_requests"])
            histogram = counters["drafter_seconds"]
            cumulative, buckets = 0, []
            for bound, count in zip(
                [*map(str, histogram["bounds"]), "+Inf"], histogram["counts"], strict=True
            ):
                cumulative += count
                buckets.append((bound, cumulative))
            seconds.add_metric([engine], buckets, histogram["sum"])
        yield from families.values()
        yield seconds


_collectors: dict[Path, DlmMetricsCollector] = {}


class DlmStatLogger(StatLoggerBase):
    """vLLM makes one per engine in the front end; the first for a config registers the
    collector of its metrics directory with the registry /metrics serves."""

    def __init__(self, vllm_config: Any, engine_index: int = 0) -> None:
        directory = metrics_dir(getattr(vllm_config, "speculative_config", None))
        if directory is not None and directory not in _collectors:
            _collectors[directory] = DlmMetricsCollector(directory)
            REGISTRY.register(_collectors[directory])

    def record(self, scheduler_stats, iteration_stats, mm_cache_stats=None, engine_idx=0):
        pass

    def log_engine_initialized(self) -> None:
        pass
