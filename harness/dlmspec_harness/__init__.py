"""The development harness of dlmspec-vllm: what the tests, the benchmarks and the demo run.

It starts vLLM engines one per process (`offline_run`), serves the OpenAI server under bounded
load and checks its answers (`serving`), builds the tiny test checkpoints offline (`tiny_pair`)
and runs the demo from this checkout (`demo`). `make install` installs it editable beside the
product; it is never part of the product wheel, and nothing in `dlmspec_vllm` imports it.
"""
