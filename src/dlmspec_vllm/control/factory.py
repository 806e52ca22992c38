"""Build a controller from its setting name, so configuration code needs no class imports."""

from __future__ import annotations

from typing import Any

from dlmspec_vllm.control.adl import ADLController
from dlmspec_vllm.control.base import LengthController
from dlmspec_vllm.control.cost_aware import CostAwareController
from dlmspec_vllm.control.failfast import FailFastController
from dlmspec_vllm.control.fixed import FixedLengthController

CONTROLLERS: dict[str, type[LengthController]] = {
    cls.name: cls
    for cls in (FixedLengthController, ADLController, FailFastController, CostAwareController)
}


def make_controller(name: str, max_length: int, **kwargs: Any) -> LengthController:
    """Controller `name` ("fixed", "adl", "failfast", "cost_aware") for an engine whose
    num_speculative_tokens is max_length; kwargs are that controller's keyword settings."""
    cls = CONTROLLERS.get(name)
    if cls is None:
        raise ValueError(f"name must be one of {sorted(CONTROLLERS)}, got {name!r}")
    return cls(max_length, **kwargs)
