"""What vLLM calls in every process (front end, engine core, workers) through the
`vllm.general_plugins` entry point."""

from __future__ import annotations


def register() -> None:
    from dlmspec_vllm import integration

    integration.install()
