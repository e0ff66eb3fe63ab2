"""Device and backend resolution: cpu→gloo, cuda→nccl, npu→hccl; ``auto`` picks what is present.

torch_npu is imported only when an NPU is asked for (or probed by ``auto``), so CPU and GPU users
never need it installed.
"""
from __future__ import annotations

import importlib
import os

import torch

BACKEND_FOR = {"cpu": "gloo", "cuda": "nccl", "npu": "hccl"}


class DeviceError(RuntimeError):
    """The scenario asks for a device or backend this machine does not have."""


def npu_available() -> bool:
    try:
        importlib.import_module("torch_npu")
    except ImportError:
        return False
    return bool(getattr(torch, "npu", None)) and torch.npu.is_available()


def resolve_device_type(requested: str) -> str:
    """Turn ``auto|cpu|cuda|npu`` into a device type present here, or raise DeviceError."""
    if requested == "auto":
        if torch.cuda.is_available():
            return "cuda"
        return "npu" if npu_available() else "cpu"
    if requested == "cuda" and not torch.cuda.is_available():
        raise DeviceError("device 'cuda' was asked for but torch.cuda.is_available() is False "
                          f"(torch {torch.__version__}; a CPU-only build, or no visible GPU)")
    if requested == "npu" and not npu_available():
        raise DeviceError("device 'npu' was asked for but torch_npu is not importable or sees no NPU "
                          "(pip install 'testbed[npu]' on a machine with the CANN toolkit)")
    if requested not in BACKEND_FOR:
        raise DeviceError(f"unknown device {requested!r}; expected one of auto, cpu, cuda, npu")
    return requested


def resolve_backend(requested: str, device_type: str) -> str:
    """``auto`` → the device's native backend; gloo is allowed on any device (CPU-side collectives)."""
    if requested == "auto":
        return BACKEND_FOR[device_type]
    if requested != "gloo" and requested != BACKEND_FOR[device_type]:
        usable = ", ".join(repr(b) for b in dict.fromkeys((BACKEND_FOR[device_type], "gloo")))
        raise DeviceError(f"backend {requested!r} does not work with device {device_type!r}; "
                          f"use {usable} or 'auto'")
    return requested


def device_count(device_type: str) -> int:
    """How many devices of this type are visible (CPU: unlimited ranks share it)."""
    if device_type == "cpu":
        return 2**31
    return (torch.cuda if device_type == "cuda" else torch.npu).device_count()


def local_device(device_type: str, local_rank: int) -> torch.device:
    """This rank's device: ``cuda:LOCAL_RANK`` / ``npu:LOCAL_RANK``, set as current; CPU as is."""
    if device_type == "cpu":
        return torch.device("cpu")
    module = torch.cuda if device_type == "cuda" else torch.npu
    count = module.device_count()
    if local_rank >= count:
        raise DeviceError(f"LOCAL_RANK {local_rank} but only {count} {device_type} device(s) are visible")
    module.set_device(local_rank)
    return torch.device(device_type, local_rank)


def local_rank_from_env(default: int) -> int:
    return int(os.environ.get("LOCAL_RANK", default))
