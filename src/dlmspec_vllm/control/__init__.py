"""Draft-length controllers: how many tokens each request drafts per step, and how many it sends.

fixed       always k (vLLM's behaviour, the baseline)
adl         DiffuSpec's adaptive draft length (EMAs of generated and accepted length)
failfast    FailFast: start short, extend while every drafted position is confident
cost_aware  ours: maximise expected tokens per second from learned acceptance and measured costs
"""

from dlmspec_vllm.control.adl import ADLController
from dlmspec_vllm.control.base import (
    ControllerStats,
    LengthController,
    StatefulController,
    StepTiming,
)
from dlmspec_vllm.control.cost_aware import CostAwareController
from dlmspec_vllm.control.cost_model import BatchCostModel, CostModel
from dlmspec_vllm.control.factory import CONTROLLERS, make_controller
from dlmspec_vllm.control.failfast import FailFastController
from dlmspec_vllm.control.fixed import FixedLengthController

__all__ = [
    "ADLController",
    "BatchCostModel",
    "CONTROLLERS",
    "ControllerStats",
    "CostAwareController",
    "CostModel",
    "FailFastController",
    "FixedLengthController",
    "LengthController",
    "StatefulController",
    "StepTiming",
    "make_controller",
]
