"""8- and 4-bit weights for inference: `--quant int8 | int4` on every command that runs a model.

Decoding one token streams every weight once, so on a CPU its speed is bytes over memory
bandwidth: fewer bytes per weight is the only way past the fp32 roofline. Which kernel reads
those bytes fast on a CPU is not the obvious one (measured, docs/inference.md "Quantized
inference"; benchmarks/infer.py):

  int8  weights int8, one scale per output channel (symmetric, [-127, 127]); activations quantized
        per token and multiplied as int8 by FBGEMM's dynamic linear (torch.ops.quantized), near the
        int8 roofline. torch's weight-only int8 kernel (`_weight_int8pack_mm`) and torchao's eager
        int8 configs measured slower than fp32 here, so this is torch's own FBGEMM path.
  int4  weights 4-bit in groups of INT4_GROUP input channels (asymmetric: a scale and a minimum per
        group), bf16 activations, torch's `_weight_int4pack_mm_for_cpu`. The lm_head stays int8
        (the output layer is the most sensitive, as llama.cpp's Q4 mixes keep it in more bits).

FBGEMM's dynamic linear picks ONE activation scale for the whole input: a row's result would depend
on the other rows it is batched with, and batched generation must equal one-by-one generation.
`Int8Linear` therefore scales each row to max |x| = 1 first and appends one anchor row holding +1
and -1, so the input's range is exactly [-1, 1] whatever the batch: every row is quantized with
its own scale (per token) and its result is bit-identical alone or in any batch.

Off the CPU (CUDA, MPS) both modes keep the same int8/int4 weights and dequantize them inside the
matmul: the memory is saved everywhere, the speed-up is CPU-only until a GPU kernel is measured
(scripts/gpu_check.sh). Embedding tables are looked up, not streamed, and stay as loaded; MLA's
absorbed projections (read as matrices, mla.py) stay dense.
"""
from __future__ import annotations

import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F

from picochat.common import QUANT_MODES, PicochatError
from picochat.inference.cpu import prepare_cpu_inference

INT4_GROUP = 32           # input channels per int4 scale/minimum (32: the most accurate the CPU kernel takes)
MIN_QUANT_WEIGHTS = 4096  # smaller linears (smear and value-embedding gates) stay dense: bytes nobody would miss


def fbgemm_available() -> bool:
    return "fbgemm" in torch.backends.quantized.supported_engines or "x86" in torch.backends.quantized.supported_engines


class Int8Linear(nn.Module):
    """y = x W^T with W int8 per output channel; on CPU, x quantized per token (see the module docstring)."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        w = weight.detach().float()
        scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127
        q = torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8)
        self._packed = None
        if w.device.type == "cpu" and fbgemm_available():
            with warnings.catch_warnings():  # quantized tensors are deprecated as a user API; FBGEMM's prepack still takes one
                warnings.simplefilter("ignore", UserWarning)
                qw = torch._make_per_channel_quantized_tensor(q, scale.double(), torch.zeros_like(scale, dtype=torch.long), 0)
                self._packed = torch.ops.quantized.linear_prepack(qw, None)
            self.register_buffer("_anchor", torch.zeros(1, self.in_features), persistent=False)
            self._anchor[0, 0], self._anchor[0, -1] = 1.0, -1.0  # the input range is [-1, 1] in every batch
        else:
            self.register_buffer("q", q, persistent=False)
            self.register_buffer("scale", scale.to(weight.dtype), persistent=False)

    def nbytes(self) -> int:
        return self.out_features * self.in_features + 4 * self.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._packed is None:
            return F.linear(x, self.q.to(x.dtype)) * self.scale.to(x.dtype)
        shape, dtype = x.shape, x.dtype
        x = x.reshape(-1, self.in_features).float()
        s = x.abs().amax(dim=1, keepdim=True).clamp_(min=1e-30)
        # reduce_range=True: 7-bit activations, so AVX2's u8 x s8 pair sums cannot saturate int16
        y = torch.ops.quantized.linear_dynamic(torch.cat([x / s, self._anchor]), self._packed, True)[:-1]
        return (y * s).to(dtype).reshape(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 per channel"


class Int4Linear(nn.Module):
    """y = x W^T with W 4-bit in groups of `group` input channels: w = q * scale + minimum, q in [0, 15]."""

    def __init__(self, weight: torch.Tensor, group: int = INT4_GROUP):
        super().__init__()
        self.out_features, self.in_features = N, K = weight.shape
        self.group = group
        w = weight.detach().float().view(N, K // group, group)
        lo, hi = w.amin(dim=-1), w.amax(dim=-1)
        scale = ((hi - lo) / 15).clamp(min=1e-12)
        q = torch.round((w - lo[..., None]) / scale[..., None]).clamp_(0, 15).to(torch.uint8).view(N, K)
        if w.device.type == "cpu":
            # the kernel's dequantization is (q - 8) * scale + zero, so zero = minimum + 8 * scale
            self.register_buffer("packed", torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32), 1),
                                 persistent=False)
            sz = torch.stack([scale, lo + 8 * scale], dim=-1).transpose(0, 1).contiguous()  # (K/group, N, 2)
            self.register_buffer("scales_zeros", sz.to(torch.bfloat16), persistent=False)
        else:
            self.register_buffer("q", q, persistent=False)  # one byte per weight: halves again with a GPU kernel
            self.register_buffer("scale", scale, persistent=False)
            self.register_buffer("lo", lo, persistent=False)

    def nbytes(self) -> int:
        return self.out_features * self.in_features // 2 + 4 * self.out_features * self.in_features // self.group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not hasattr(self, "packed"):
            w = self.q.view(self.out_features, -1, self.group).to(self.scale.dtype) * self.scale[..., None] + self.lo[..., None]
            return F.linear(x, w.view(self.out_features, self.in_features).to(x.dtype))
        shape = x.shape
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x.reshape(-1, self.in_features).to(torch.bfloat16),
                                                       self.packed, self.group, self.scales_zeros)
        return y.to(x.dtype).reshape(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int4 groups of {self.group}"


def check_quant(mode: str) -> str:
    if mode not in QUANT_MODES:
        raise PicochatError(f"--quant must be one of {', '.join(QUANT_MODES)}, got {mode!r}")
    return mode


def _targets(model: nn.Module):
    """(parent, name, linear) for every linear worth quantizing: big enough, and not one a layer
    reads as a matrix (a module lists those in DENSE_WEIGHTS, e.g. MLA's absorbed projections)."""
    for parent in model.modules():
        dense = getattr(parent, "DENSE_WEIGHTS", ())
        for name, child in parent.named_children():
            if type(child) is nn.Linear and name not in dense and child.weight.numel() >= MIN_QUANT_WEIGHTS:
                yield parent, name, child


def quantize(model: nn.Module, mode: str) -> nn.Module:
    """Replace the model's linears by int8/int4 ones, in place, one at a time (each dense weight is
    freed as its quantized copy is made, so memory peaks at the loaded model plus one layer).
    For inference only: the quantized model has no gradients and cannot be saved as a checkpoint."""
    if check_quant(mode) == "none":
        return model
    targets = list(_targets(model))
    if mode == "int4":
        bad = [f"{type(p).__name__}.{n} {tuple(c.weight.shape)}" for p, n, c in targets
               if c.in_features % INT4_GROUP and n != "lm_head"]
        if bad:
            raise PicochatError(f"--quant int4 needs every linear's input width to be a multiple of {INT4_GROUP} "
                                f"(its group size); this model has {', '.join(bad[:3])}: use --quant int8")
    for parent, name, lin in targets:
        # the output layer is the most sensitive to rounding: int8 even in int4 mode
        new = Int8Linear(lin.weight) if mode == "int8" or name == "lm_head" else Int4Linear(lin.weight)
        setattr(parent, name, new)
        lin.weight = None  # let the dense copy go now, not when the loop ends
    model.quant = mode
    return model


def weight_bytes(model: nn.Module) -> int:
    """Bytes of weights as held for inference: quantized linears at their packed size, the rest as stored."""
    quant = sum(m.nbytes() for m in model.modules() if isinstance(m, (Int8Linear, Int4Linear)))
    dense = sum(p.numel() * p.element_size() for p in model.parameters())
    return quant + dense


def load_for_inference(tag: str, device, dtype=None, quant: str = "none", step: int | None = None):
    """load_model(tag) in `dtype`, then quantized as `quant` says and, on CPU, made ready to run once
    (cpu.py: float32 weights held once, packed; nothing left viewing the memory-mapped file, whose
    pages loading and quantizing have all read): (model, checkpoint)."""
    from picochat.checkpoint import load_model
    check_quant(quant)
    model, ckpt = load_model(tag, device=device, dtype=dtype, step=step)
    model = quantize(model, quant)
    if next(model.parameters()).device.type == "cpu":
        prepare_cpu_inference(model, release_dense=True)
    return model, ckpt
