"""What each rank was told: a small per-rank settings dict, exchanged once, its differences recorded.

``rank_config`` collects what must be the same on every rank of a data-parallel job: library
versions, device type and default dtype, TF32 / determinism / cuDNN flags, the environment
variables that steer collectives and kernels (``ENV_PREFIXES``, minus what legitimately differs
per rank: ``PER_RANK``), the optimizer's class and every param group's hyper-parameters (when
the optimizer is known), the model's parameter count and a hash of its parameters' names,
shapes, dtypes and ``requires_grad`` flags, and the sampler's settings (when a loader is known).
``exchange`` all-gathers it once (``all_gather_object``: at the step path's first exchange) and
returns the keys whose values differ (``metrics/config.py``), which the first row records.
"""
from __future__ import annotations

import hashlib
import os
import platform
import sys
from typing import Any, Callable

import numpy as np
import torch
import torch.distributed as dist

ENV_PREFIXES = ("NCCL_", "HCCL_", "CUBLAS_", "CUBLASLT_", "CUDNN_", "NVIDIA_TF32", "PYTORCH_", "TORCH_", "OMP_",
                "MKL_", "CUDA_LAUNCH_BLOCKING", "PYTHONHASHSEED", "ACCELERATE_MIXED_PRECISION")
PER_RANK = ("RANK", "LOCAL_RANK", "GROUP_RANK", "ROLE_RANK", "NODE_RANK", "VISIBLE_DEVICES", "HOSTNAME", "PORT",
            "ADDR", "TORCHELASTIC", "NCCL_SOCKET_IFNAME", "NCCL_IB_HCA", "HCCL_IF_IP", "RANK_TABLE", "DEVICE_ID")
LIBRARIES = ("numpy", "transformers", "accelerate", "lightning", "pytorch_lightning", "datasets", "torch_npu",
             "deepspeed", "apex")
OPTIM_KEYS = ("lr", "weight_decay", "momentum", "dampening", "nesterov", "betas", "eps", "amsgrad", "foreach",
              "fused", "maximize", "initial_lr", "alpha", "centered", "capturable", "differentiable")


def rank_config(model: torch.nn.Module | None = None, optimizer: Any = None, loader: Any = None) -> dict[str, Any]:
    """This rank's settings (module doc): a flat dict of JSON-able values."""
    out: dict[str, Any] = {"python": platform.python_version(), "torch": torch.__version__,
                           "cuda": torch.version.cuda, "default_dtype": str(torch.get_default_dtype()),
                           "deterministic": torch.are_deterministic_algorithms_enabled(),
                           "float32_matmul_precision": torch.get_float32_matmul_precision()}
    for name in LIBRARIES:
        module = sys.modules.get(name)
        if module is not None:
            out[f"version.{name}"] = str(getattr(module, "__version__", "?"))
    if torch.cuda.is_available():
        out.update({"cuda.matmul.allow_tf32": torch.backends.cuda.matmul.allow_tf32,
                    "cudnn.allow_tf32": torch.backends.cudnn.allow_tf32, "cudnn.version": torch.backends.cudnn.version(),
                    "cudnn.deterministic": torch.backends.cudnn.deterministic,
                    "cudnn.benchmark": torch.backends.cudnn.benchmark})
    out.update({f"env.{k}": v for k, v in sorted(os.environ.items()) if _steering(k)})
    if model is not None:
        out.update(_model(model))
    if optimizer is not None:
        out.update(_optimizer(optimizer))
    if loader is not None:
        out.update(_sampler(loader))
    return out


def _steering(name: str) -> bool:
    return name.startswith(ENV_PREFIXES) and not any(part in name for part in PER_RANK)


def _model(model: torch.nn.Module) -> dict[str, Any]:
    inner = getattr(model, "module", model)
    params = list(inner.named_parameters())
    spec = repr([(n, tuple(p.shape), str(p.dtype), p.requires_grad) for n, p in params])
    return {"model.parameters": sum(p.numel() for _, p in params),
            "model.trainable": sum(p.numel() for _, p in params if p.requires_grad),
            "model.shapes": hashlib.blake2b(spec.encode(), digest_size=8).hexdigest(),
            "model.device_type": params[0][1].device.type if params else None,
            "model.dtype": str(params[0][1].dtype) if params else None}


def _optimizer(optimizer: Any) -> dict[str, Any]:
    inner = getattr(optimizer, "optimizer", optimizer)  # accelerate's / Lightning's wrappers
    out: dict[str, Any] = {"optimizer": type(inner).__name__}
    for i, group in enumerate(getattr(inner, "param_groups", [])):
        out[f"optimizer.group{i}.params"] = sum(p.numel() for p in group.get("params", []))
        for key in OPTIM_KEYS:
            if key in group:
                out[f"optimizer.group{i}.{key}"] = _plain(group[key])
    return out


def _sampler(loader: Any) -> dict[str, Any]:
    sampler = getattr(loader, "sampler", None)
    batch_sampler = getattr(loader, "batch_sampler", None)
    sampler = getattr(batch_sampler, "sampler", sampler) if sampler is None else sampler
    out: dict[str, Any] = {"loader.batch_size": getattr(loader, "batch_size", None),
                           "loader.drop_last": getattr(loader, "drop_last", None),
                           "sampler": type(sampler).__name__ if sampler is not None else None}
    for key in ("num_replicas", "shuffle", "seed", "drop_last"):
        if hasattr(sampler, key):
            out[f"sampler.{key}"] = _plain(getattr(sampler, key))
    if hasattr(sampler, "rank") and dist.is_available() and dist.is_initialized():
        out["sampler.rank_is_own"] = getattr(sampler, "rank") == dist.get_rank()  # False: LOCAL_RANK passed?
    return out


def _plain(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.item() if value.numel() == 1 else value.tolist()
    if isinstance(value, (tuple, list)):
        return [_plain(v) for v in value]
    if isinstance(value, (np.generic,)):
        return value.item()
    return value if isinstance(value, (int, float, str, bool, type(None))) else repr(value)


def exchange(config: dict[str, Any], world_size: int, group: dist.ProcessGroup | None) -> list[dict[str, Any]]:
    """Every rank's config (one ``all_gather_object``; every rank must call it)."""
    gathered: list[Any] = [None] * world_size
    dist.all_gather_object(gathered, config, group=group)
    return [g if isinstance(g, dict) else {} for g in gathered]


ConfigSource = Callable[[], dict[str, Any]]
