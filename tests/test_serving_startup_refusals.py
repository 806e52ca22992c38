"""Bad `--speculative-config` settings for method `dlm` stop vLLM's OpenAI server at start-up,
with an error that names the setting as the last lines of its output (issue #7)."""

from __future__ import annotations

import pytest

from dlmspec_harness.serving import OpenAIServer

pytestmark = pytest.mark.vllm

BAD_SPECULATIVE_CONFIGS = {
    # name: (the dlm settings besides method and draft_model, or raw text; what the error names)
    "k-past-128": ({"num_speculative_tokens": 129}, "num_speculative_tokens"),
    "unknown-field": ({"num_speculative_tokens": 4, "controler": "adl"}, "controler"),
    "unknown-controller-option": (
        {"num_speculative_tokens": 4, "controller": {"name": "adl", "kmin": 2}},
        "kmin",
    ),
    "not-json": ("{'method': 'dlm'", "speculative"),
}


def test_bad_speculative_configs_stop_the_server_naming_the_setting(tiny_pair, tmp_path):
    servers = {}
    for name, (spec, _) in BAD_SPECULATIVE_CONFIGS.items():  # all at once: each takes 20-60 s
        if isinstance(spec, dict):
            spec, extra = {"method": "dlm", "draft_model": str(tiny_pair.drafter_dir), **spec}, []
        else:
            spec, extra = None, ["--speculative-config", spec]
        servers[name] = OpenAIServer(
            tiny_pair.target_dir,
            log_path=tmp_path / f"{name}.log",
            speculative_config=spec,
            max_model_len=256,
            extra_args=extra,
        )
    failures = {}
    for name, server in servers.items():
        try:
            returncode = server.wait_exit(timeout=300)
        finally:
            server.stop()
        named = BAD_SPECULATIVE_CONFIGS[name][1]
        tail = server.log().strip().splitlines()[-3:]
        if returncode == 0 or not any(named in line for line in tail):
            failures[name] = (returncode, tail)
    assert failures == {}
