"""Making CPU decoding fast (measured in docs/inference.md, "CPU tuning"):

1. Matmuls: MKL's sgemm is slow for the few rows decoding produces on larger weights; oneDNN on a
   weight reordered once into its blocked layout is 1.3-3.5x faster there but costs ~30 us more
   per call. `pack_linears` switches every Linear with at least PACK_MIN_WEIGHTS weights to a
   PackedLinear (same parameters and state_dict) that uses oneDNN from ALWAYS_WEIGHTS weights or
   2 rows, F.linear otherwise (benchmarks/cpu_linear.py measures the rule).
2. Allocator: glibc hands freed megabytes (batch x vocab sampling temporaries) back to the kernel
   and page-faults them in on the next step; `retain_freed_memory()` raises its thresholds.

The packed copy follows the weight (rebuilt when its storage or version changes), so a model can
go on training after an Engine was built on it; it costs one more copy of those weights. A model
loaded only to run (load_for_inference) does not pay it: `prepare_cpu_inference(release_dense=True)`
keeps the packed copy alone for the layers that always use it (a d20 in fp32: 1.9 GB held, not 3.9).
"""
from __future__ import annotations

import ctypes
import os
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F

PACK_MIN_WEIGHTS = 128 * 1024    # smaller weights stay on MKL: oneDNN's per-call cost outweighs its gain
ALWAYS_WEIGHTS = 512 * 1024      # from here oneDNN wins even for a single row

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameter numbers
_malloc_tuned: bool | None = None


def onednn_available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")


class PackedLinear(nn.Linear):
    """nn.Linear whose no-grad float32 CPU forward runs oneDNN on a prepacked weight when the
    call is big enough to gain from it (min_rows rows or more)."""

    min_rows: int = 1
    _packed: torch.Tensor | None = None
    _packed_key: tuple | None = None

    def _use_onednn(self, x: torch.Tensor) -> bool:
        w = self.weight
        return (x.numel() >= self.min_rows * self.in_features and x.dtype == torch.float32
                and w.dtype == torch.float32 and x.device.type == "cpu" and w.device.type == "cpu"
                and not torch.is_grad_enabled() and not torch.is_autocast_enabled("cpu")
                and not torch.compiler.is_compiling())

    def packed_weight(self) -> torch.Tensor:
        w = self.weight
        if w.is_mkldnn:  # the dense copy was released: the weight is the packed one
            return w
        # (an inference tensor, made under torch.inference_mode, has no version counter; it cannot
        # be updated in place outside inference mode, so its storage identifies it)
        key = (w.data_ptr(), None if w.is_inference() else w._version, tuple(w.shape))
        if self._packed_key != key:
            # blocked layout for no particular row count: measured fastest across 1-256 rows
            self._packed = torch.ops.mkldnn._reorder_linear_weight(w.detach(), None)
            self._packed_key = key
        return self._packed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._use_onednn(x):
            return torch.ops.mkldnn._linear_pointwise.default(x, self.packed_weight(), self.bias, "none", [], "")
        if x.dtype == torch.bfloat16 and x.numel() == self.in_features and x.device.type == "cpu" \
                and not torch.is_grad_enabled() and not torch.compiler.is_compiling():
            # one bf16 row (a decode step): ATen's own kernel streams the weight ~1.7x faster than oneDNN's
            # bf16 matmul does (docs/inference.md); a process-wide switch, so not for concurrent threads
            enabled = torch._C._get_mkldnn_enabled()
            torch._C._set_mkldnn_enabled(False)
            try:
                return F.linear(x, self.weight, self.bias)
            finally:
                torch._C._set_mkldnn_enabled(enabled)
        w = self.weight  # (after release_dense, a call oneDNN does not take rebuilds the dense weight)
        return F.linear(x, w.to_dense() if w.is_mkldnn else w, self.bias)

    def release_dense(self) -> None:
        """Keep the packed weight alone (as the parameter `weight`): for a model that only runs."""
        if not self.weight.is_mkldnn:
            self.weight = nn.Parameter(self.packed_weight(), requires_grad=False)
            self._packed = self._packed_key = None

    def __getstate__(self):
        # the packed tensor is an opaque oneDNN buffer that cannot be copied or pickled;
        # a copy simply packs again on first use
        return {k: v for k, v in self.__dict__.items() if k not in ("_packed", "_packed_key")}


def pack_linears(model: nn.Module, release_dense: bool = False) -> nn.Module:
    """In place and idempotent; a no-op where oneDNN is not built in. release_dense: float32 layers
    that always run on oneDNN keep only their packed weight, except those a module reads as a
    matrix (its DENSE_WEIGHTS, e.g. MLA's absorbed projections)."""
    if not onednn_available():
        return model
    for parent in model.modules():
        for name, mod in parent.named_children():
            if type(mod) is nn.Linear and mod.weight.numel() >= PACK_MIN_WEIGHTS:
                mod.__class__ = PackedLinear
                mod.min_rows = 1 if mod.weight.numel() >= ALWAYS_WEIGHTS else 2
            if (release_dense and type(mod) is PackedLinear and mod.min_rows == 1 and mod.weight.dtype == torch.float32
                    and mod.weight.device.type == "cpu" and name not in getattr(parent, "DENSE_WEIGHTS", ())):
                mod.release_dense()
    return model


def unpack_linears(model: nn.Module) -> nn.Module:
    for mod in model.modules():
        if type(mod) is PackedLinear:
            if mod.weight.is_mkldnn:  # released: rebuild the dense weight from the packed one
                mod.weight = nn.Parameter(mod.weight.to_dense(), requires_grad=False)
            for name in ("_packed", "_packed_key", "min_rows"):
                mod.__dict__.pop(name, None)
            mod.__class__ = nn.Linear
    return model


def retain_freed_memory(mmap_threshold: int = 32 << 20, trim_threshold: int = 256 << 20) -> bool:
    """Keep freed heap memory for reuse (glibc mallopt; process-wide, once); returns whether the
    thresholds are raised. Skipped off glibc, or when the user set them or preloads an allocator."""
    global _malloc_tuned
    if _malloc_tuned is None:
        _malloc_tuned = False
        user_set = any(k in os.environ for k in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")) \
            or "malloc" in os.environ.get("LD_PRELOAD", "")
        if sys.platform.startswith("linux") and not user_set:
            try:
                libc = ctypes.CDLL(None)
                libc.gnu_get_libc_version  # noqa: B018 -- glibc only; raises AttributeError elsewhere
                _malloc_tuned = bool(libc.mallopt(_M_MMAP_THRESHOLD, mmap_threshold)) and \
                    bool(libc.mallopt(_M_TRIM_THRESHOLD, trim_threshold))
            except (OSError, AttributeError):
                pass
    return _malloc_tuned


def release_freed_memory() -> None:
    """Hand heap memory freed so far back to the OS (glibc's malloc_trim; a no-op elsewhere): after
    quantizing replaced a model's fp32 weights, the freed megabytes would otherwise stay resident."""
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(None).malloc_trim(0)
        except (OSError, AttributeError):
            pass


def own_memory(model: nn.Module) -> None:
    """Copy the CPU tensors still viewing the memory-mapped checkpoint out of it, then hand freed heap
    back: after quantizing or packing has read every page of the mapping (load_model assigns the file's
    tensors), the mapping is released with its last view instead of staying resident beside the copies."""
    for t in list(model.parameters()) + list(model.buffers()):
        if t.device.type == "cpu" and not t.is_mkldnn:
            t.data = t.data.clone()
    release_freed_memory()


def prepare_cpu_inference(model: nn.Module, enable: bool = True, release_dense: bool = False) -> nn.Module:
    """Both of the above; enable=False unpacks the layers instead (the allocator stays as it is).
    release_dense (a model that only runs): see pack_linears."""
    if not enable:
        return unpack_linears(model)
    retain_freed_memory()
    pack_linears(model, release_dense)
    if release_dense:
        own_memory(model)
    return model
