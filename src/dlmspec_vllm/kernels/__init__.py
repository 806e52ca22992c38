"""Triton kernels for the hot lattice steps; each has its torch twin in ``lattice/``.

Importing this package does not import Triton: the kernel modules (``prune``, ``path_search``)
do, and ``lattice`` imports them only when handed CUDA tensors, so CPU-only installs without
Triton work. Launchers also accept CPU tensors when ``TRITON_INTERPRET=1`` was set before the
kernel module was imported (Triton decides interpretation when a kernel is defined), which is
how the tests compare kernels with their twins on machines without a GPU.
"""

from __future__ import annotations

import os

import torch


def check_launch_device(*tensors: torch.Tensor) -> None:
    """Refuse tensors a Triton launch cannot read: CUDA, or CPU under the interpreter."""
    interpret = os.environ.get("TRITON_INTERPRET") == "1"
    devices = {t.device for t in tensors}
    if len(devices) != 1:
        raise ValueError(f"all tensors must be on one device, got {sorted(map(str, devices))}")
    (device,) = devices
    if device.type != "cuda" and not (interpret and device.type == "cpu"):
        raise ValueError(
            f"Triton kernels need CUDA tensors (or CPU tensors with TRITON_INTERPRET=1), got "
            f"{device}; use the torch twin in dlmspec_vllm.lattice instead"
        )
