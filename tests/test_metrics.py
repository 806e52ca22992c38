"""The dlmspec: Prometheus series as the API server serves them, from an engine's counters
file (the way through vLLM's processes is tested in test_openai_server.py and
test_vllm_parallel.py)."""

from __future__ import annotations

import json
import logging
import shutil
import time

from fixtures.metrics_text import series
from prometheus_client import CollectorRegistry, generate_latest

from dlmspec_vllm.integration.metrics import DlmMetricsCollector, MetricsPublisher


def counters(engine: int, drafter_accepted: int) -> dict:
    return {
        "engine": engine,
        "tracked_requests": 3,
        "by_source": {
            "drafter": {
                "draft_tokens": 40,
                "drafted_request_steps": 10,
                "accepted_tokens": drafter_accepted,
            },
            "copied": {"draft_tokens": 8, "drafted_request_steps": 2, "accepted_tokens": 5},
        },
        "undrafted_request_steps": 7,
        "drafter_failures": 1,
        "drafter_seconds": {"bounds": [0.001, 0.01], "counts": [2, 5, 1], "sum": 0.2},
    }


def exposition(directory) -> str:
    registry = CollectorRegistry()
    registry.register(DlmMetricsCollector(directory))
    return generate_latest(registry).decode()


def test_every_engines_counters_become_one_series_each(tmp_path):
    for engine, accepted in ((0, 11), (1, 13)):
        (tmp_path / f"engine-{engine}.json").write_text(json.dumps(counters(engine, accepted)))
    text = exposition(tmp_path)
    assert series(text, "dlmspec:accepted_tokens_total", engine="0", source="drafter") == [11]
    assert series(text, "dlmspec:accepted_tokens_total", engine="1", source="drafter") == [13]
    assert series(text, "dlmspec:draft_tokens_total", engine="1", source="copied") == [8]
    assert series(text, "dlmspec:drafted_request_steps_total", engine="0") == [10, 2]
    assert series(text, "dlmspec:undrafted_request_steps_total", engine="0") == [7]
    assert series(text, "dlmspec:drafter_failures_total", engine="1") == [1]
    assert series(text, "dlmspec:tracked_requests", engine="0") == [3]
    # Histogram buckets are cumulative, the last one everything.
    buckets = [series(text, "dlmspec:drafter_seconds_bucket", engine="0", le=le)[0]
               for le in ("0.001", "0.01", "+Inf")]  # fmt: skip
    assert buckets == [2, 7, 8]
    assert series(text, "dlmspec:drafter_seconds_count", engine="0") == [8]
    assert series(text, "dlmspec:drafter_seconds_sum", engine="0") == [0.2]


def test_the_publisher_writes_the_latest_counters_and_a_scrape_reads_them(tmp_path):
    state = counters(0, 1)
    publisher = MetricsPublisher(tmp_path / "engine-0.json", lambda: json.loads(json.dumps(state)))
    state["by_source"]["drafter"]["accepted_tokens"] = 9
    publisher.stop()  # a last write on the way out
    text = exposition(tmp_path)
    assert series(text, "dlmspec:accepted_tokens_total", source="drafter") == [9]
    assert [p.name for p in tmp_path.iterdir()] == ["engine-0.json"]  # no partial file left


def test_a_publisher_whose_directory_the_front_end_removed_stops_quietly(tmp_path, caplog):
    directory = tmp_path / "metrics"
    directory.mkdir()
    state = counters(0, 1)
    publisher = MetricsPublisher(directory / "engine-0.json", lambda: json.loads(json.dumps(state)))
    # Removing the directory while the first write is under way races rmtree itself ("directory
    # not empty"); after it, the publisher writes nothing until the counters change.
    deadline = time.monotonic() + 30
    while not (directory / "engine-0.json").exists():
        assert time.monotonic() < deadline, "the publisher never wrote its first snapshot"
        time.sleep(0.01)
    shutil.rmtree(directory)
    state["tracked_requests"] = 4  # a change, so the last write is tried
    with caplog.at_level(logging.ERROR, logger="dlmspec_vllm.integration.metrics"):
        publisher.stop()
    assert not publisher._thread.is_alive()
    assert caplog.records == []


def test_a_publisher_that_cannot_write_says_so(tmp_path, caplog):
    (tmp_path / "engine-0.tmp").mkdir()  # the partial file's name is taken: every write fails
    state = counters(0, 1)
    with caplog.at_level(logging.ERROR, logger="dlmspec_vllm.integration.metrics"):
        publisher = MetricsPublisher(tmp_path / "engine-0.json", lambda: dict(state))
        publisher.stop()
    assert "dlm metrics stopped" in caplog.text
