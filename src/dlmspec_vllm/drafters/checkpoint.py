"""Read and write a drafter network's weights in its Hugging Face layout (safetensors).

One loader for every family: the module tree is built on the meta device and the checkpoint's
tensors are assigned in place, so a 7B or 8B checkpoint is read once, straight into the wanted
device and dtype, and a config.json that does not match the weights fails with the names that
differ rather than with a shape error deep inside torch.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import torch
from safetensors.torch import load_file, save_file

from dlmspec_vllm.drafters.loading import DrafterLoadError, safetensors_files
from dlmspec_vllm.drafters.transformer import DiffusionNetwork, RotaryEmbedding

NetworkT = TypeVar("NetworkT", bound=DiffusionNetwork)


def load_network(
    build: Callable[[], NetworkT],
    path: str | Path,
    *,
    family: str,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> NetworkT:
    """``build()`` on the meta device, then ``path``'s weights assigned into it; in eval mode."""
    path = Path(path)
    state: dict[str, torch.Tensor] = {}
    for shard in safetensors_files(path):
        state.update(load_file(shard, device=str(device)))
    with torch.device("meta"):
        model = build()
    tied = model.tied_parameter_names()
    state = {name: tensor.to(dtype) for name, tensor in state.items() if name not in tied}
    expected = set(model.state_dict()) - tied
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise DrafterLoadError(
            f"{family} weights in {path} do not match its config.json: "
            f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}"
        )
    try:
        model.load_state_dict(state, strict=False, assign=True)
    except RuntimeError as err:  # shape mismatches
        raise DrafterLoadError(
            f"{family} weights in {path} do not match its config.json: {err}"
        ) from err
    model.tie_weights()
    # RoPE buffers are not in the checkpoint: compute them where the weights now live.
    for module in model.modules():
        if isinstance(module, RotaryEmbedding):
            module.reset(device)
    return model.eval()


def save_network(model: DiffusionNetwork, path: str | Path, config_json: dict[str, Any]) -> None:
    """Write config.json + model.safetensors the way the family's released checkpoints are."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config_json, indent=2) + "\n")
    tied = model.tied_parameter_names()
    state = {
        name: tensor.detach().contiguous()
        for name, tensor in model.state_dict().items()
        if name not in tied
    }
    save_file(state, str(path / "model.safetensors"), metadata={"format": "pt"})
