"""Read and write a drafter checkpoint directory: its config.json, its safetensors files, and a
network's weights in its Hugging Face layout. Every drafter family and the registry (loading.py)
read checkpoints through this module, which imports none of them.

One loader for every family: the module tree is built on the meta device and the checkpoint's
tensors are assigned in place, so a 7B or 8B checkpoint is read once, straight into the wanted
device and dtype, and a config.json that does not match the weights fails with the names that
differ rather than with a shape error deep inside torch.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Collection, Mapping
from pathlib import Path
from typing import Any, TypeVar

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from dlmspec_vllm.drafters.transformer import CheckpointNetwork, RotaryEmbedding

NetworkT = TypeVar("NetworkT", bound=CheckpointNetwork)


class DrafterLoadError(ValueError):
    """A draft_model directory that cannot be used as a diffusion drafter, and why."""


def read_config(path: Path) -> dict[str, Any]:
    """The parsed config.json of a checkpoint directory."""
    config_file = path / "config.json"
    if not config_file.is_file():
        raise DrafterLoadError(
            f"draft_model path {path} has no config.json: point `draft_model` at a Hugging Face "
            "checkpoint directory (config.json + *.safetensors)"
        )
    try:
        config = json.loads(config_file.read_text())
    except json.JSONDecodeError as err:
        raise DrafterLoadError(
            f"draft_model config {config_file} is not valid JSON: {err}"
        ) from err
    if not isinstance(config, dict):
        raise DrafterLoadError(f"draft_model config {config_file} is not a JSON object")
    return config


def safetensors_files(path: Path) -> list[Path]:
    """Weight files of a checkpoint: the shards its index names, else model.safetensors."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text()).get("weight_map", {})
        shards = [path / name for name in sorted(set(weight_map.values()))]
        absent = [shard.name for shard in shards if not shard.is_file()]
        if not shards or absent:
            raise DrafterLoadError(
                f"draft_model {path}: model.safetensors.index.json names missing shards {absent}"
            )
        return shards
    single = path / "model.safetensors"
    if single.is_file():
        return [single]
    others = sorted(p.name for p in path.glob("*.bin")) + sorted(p.name for p in path.glob("*.pt"))
    hint = f" (found {', '.join(others)}: convert them to safetensors)" if others else ""
    raise DrafterLoadError(
        f"draft_model {path} has no weights: expected model.safetensors or "
        f"model.safetensors.index.json{hint}"
    )


def resolve_checkpoint_dir(draft_model: str | Path) -> Path:
    """The local directory of `draft_model`: a path as given, else a Hugging Face id found in
    (or, where the hub is reachable, downloaded into) the local Hugging Face cache."""
    path = Path(draft_model).expanduser()
    if path.is_dir():
        return path
    if (
        path.exists()
        or str(draft_model).startswith((".", "/", "~"))
        or str(draft_model).count("/") != 1
    ):
        raise DrafterLoadError(
            f"draft_model path {draft_model} does not exist (or is not a directory): set "
            "`draft_model` to a local checkpoint directory or a Hugging Face id"
        )
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        return Path(snapshot_download(str(draft_model)))
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError, ValueError) as err:
        raise DrafterLoadError(
            f"draft_model {draft_model!r} is neither a local directory nor a Hugging Face id "
            f"available here ({type(err).__name__}): download it first or give a local path"
        ) from None


def read_weights(path: Path, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint's safetensors files (sharded or not), on ``device``."""
    state: dict[str, torch.Tensor] = {}
    for shard in safetensors_files(path):
        state.update(load_file(shard, device=str(device)))
    return state


def read_named_tensors(path: Path, names: Collection[str]) -> dict[str, torch.Tensor]:
    """Those of ``names`` a checkpoint has, read alone (on the CPU) from its safetensors files:
    a drafter that shares a target's tensors reads them without the rest of the target."""
    found: dict[str, torch.Tensor] = {}
    for shard in safetensors_files(path):
        with safe_open(str(shard), "pt", device="cpu") as handle:
            for name in handle.keys():  # noqa: SIM118 (safe_open has no __iter__)
                if name in names:
                    found[name] = handle.get_tensor(name)
    return found


def load_network(
    build: Callable[[], NetworkT],
    path: str | Path,
    *,
    family: str,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    state: dict[str, torch.Tensor] | None = None,
) -> NetworkT:
    """``build()`` on the meta device, then ``path``'s weights assigned into it; in eval mode.
    state: the checkpoint's tensors, where the caller read them (read_weights) to take out
    tensors of its own first."""
    path = Path(path)
    if state is None:
        state = read_weights(path, device)
    with torch.device("meta"):
        model = build()
    tied = model.tied_parameter_names()
    state = {
        name: tensor.to(device=device, dtype=dtype)
        for name, tensor in state.items()
        if name not in tied
    }
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


def save_network(
    model: CheckpointNetwork,
    path: str | Path,
    config_json: dict[str, Any] | None = None,
    *,
    dtype: torch.dtype | None = None,
    extra_tensors: Mapping[str, torch.Tensor] | None = None,
) -> None:
    """Write config.json (``model.config.to_json_dict()`` unless given) + model.safetensors the
    way the family's released checkpoints are: the weights in ``dtype`` (default: as they are),
    and ``extra_tensors`` as given."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    if config_json is None:
        config_json = model.config.to_json_dict()
    (path / "config.json").write_text(json.dumps(config_json, indent=2) + "\n")
    tied = model.tied_parameter_names()
    state = {
        name: tensor.detach().to("cpu", dtype).contiguous()
        for name, tensor in model.state_dict().items()
        if name not in tied
    }
    state |= {name: t.detach().to("cpu").contiguous() for name, t in (extra_tensors or {}).items()}
    save_file(state, str(path / "model.safetensors"), metadata={"format": "pt"})
