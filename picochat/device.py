"""Which device and dtype to run on, autocast for training, and torch.distributed setup under torchrun.

Kept apart from common.py so that code which never touches a tensor (the HTTP-only safety pipeline,
argument parsing, file helpers) does not import torch.
"""
from __future__ import annotations

import contextlib
import os

import torch

from picochat.common import PicochatError, dist_info, DistInfo

def pick_device(requested: str = "auto") -> torch.device:
    if requested == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = torch.device(requested)
    except RuntimeError as e:
        raise PicochatError(f"unknown device {requested!r}: {e}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise PicochatError("--device cuda requested but CUDA is not available on this machine")
    return dev


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}  # common.DTYPE_NAMES, as torch


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """The inference dtype for --dtype NAME on `device`: auto = bf16 on a CUDA card with bf16, else
    fp32. Refuses what would fail: fp16 on CPU, bf16 on a card without it. bf16 on any CPU: without
    native bf16 (AVX2) one row decodes faster (half the bytes) and prompts and batches slower
    (measured in docs/inference.md), so it is the user's choice, not refused."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
    if name not in DTYPES:
        raise PicochatError(f"--dtype must be one of auto, {', '.join(DTYPES)}, got {name!r}")
    if name == "fp16" and device.type == "cpu":
        raise PicochatError("--dtype fp16 is not supported on CPU (no fp16 kernels for most ops): use fp32, or bf16 "
                            "on a CPU with native bfloat16")
    if name == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise PicochatError(f"--dtype bf16: {torch.cuda.get_device_name(device)} has no bfloat16 support; use fp16 or fp32")
    return DTYPES[name]


def autocast_ctx(device: torch.device):
    """bf16 autocast on CUDA (fast and stable); plain fp32 elsewhere (CPU bf16 matmuls are slow)."""
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def init_distributed(device: torch.device) -> DistInfo:
    """Initialise torch.distributed when launched by torchrun (gloo on CPU, nccl on CUDA)."""
    info = dist_info()
    if info.enabled and not torch.distributed.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(device)
        torch.distributed.init_process_group(backend=backend)
    return info
