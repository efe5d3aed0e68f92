"""One decode step (B tokens in, B x V logits out) that can run without per-token launch overhead.

    eager         model.hidden over the KVCache as it is (the default on CPU: no compile time)
    compiled      the same step with static shapes (model.kv_cache.StaticStep) under torch.compile
    cuda-graphs   compiled with mode="reduce-overhead": captured once as a CUDA graph and replayed,
                  so a token costs one launch (the default on CUDA)

Why: eager decoding of a small model is Python and dispatch overhead, not arithmetic (a d4 step:
~150 small ops, 6.6 ms on 2 cores for 10 MFLOP). A graph can be replayed only if nothing but tensor
contents changes between steps: StaticStep writes each key/value at a position held in a tensor
and attends over the whole preallocated cache with a mask. A new batch size or cache length is a
new shape, compiled once more (so the engine keeps finished rows in a compiled batch).

The step is where a model is made ready for CPU inference (cpu.py: oneDNN-packed Linear layers and
the allocator), once, for every path that decodes (Engine, the server's scheduler); oneDNN's packed
path runs outside torch.compile only, so a compiled step keeps F.linear.
"""
from __future__ import annotations

import sys

import torch

from picochat.common import DECODE_STEPS as MODES, PicochatError
from picochat.device import resolve_dtype
from picochat.inference.cpu import prepare_cpu_inference
from picochat.model.kv_cache import KVCache, StaticStep


def resolve_mode(mode: str, device: torch.device) -> str:
    """'auto' -> cuda-graphs on CUDA, eager elsewhere; CUDA-only modes refused without CUDA."""
    if mode not in MODES:
        raise PicochatError(f"decode step must be one of {', '.join(MODES)}, got {mode!r}")
    if mode == "auto":
        return "cuda-graphs" if device.type == "cuda" else "eager"
    if mode == "cuda-graphs" and device.type != "cuda":
        raise PicochatError(f"--decode-step cuda-graphs needs a CUDA device, and this runs on {device.type}; "
                            "use compiled or eager")
    return mode


def resolve_flags(args, device: torch.device) -> torch.dtype:
    """Check --dtype and --decode-step before anything is loaded; the dtype to load the model in."""
    resolve_mode(args.decode_step, device)
    return resolve_dtype(args.dtype, device)


class DecodeStep:
    """step(tokens (B, 1), cache) -> logits (B, V) fp32, advancing the cache by one position."""

    def __init__(self, model, mode: str = "eager", cpu_tuning: bool = True):
        """cpu_tuning: on CPU, prepare_cpu_inference(model) (in place; False undoes it)."""
        self.model, self.mode = model, mode
        self._compiled_once = False
        # dynamic=None: torch.compile makes a dimension symbolic once it has seen it change, so
        # generations of other sizes reuse the compiled step (CUDA graphs are recorded per size)
        self._fn = None if mode == "eager" else torch.compile(
            self._static, mode="reduce-overhead" if mode == "cuda-graphs" else None, fullgraph=True, dynamic=None)
        if next(model.parameters()).device.type == "cpu":
            prepare_cpu_inference(model, enable=cpu_tuning and not self.static)

    @property
    def static(self) -> bool:  # keep the batch shape fixed: each new shape is a new compile
        return self._fn is not None

    def _static(self, tokens: torch.Tensor, pos: torch.Tensor, cache: KVCache) -> torch.Tensor:
        return self.model.logits(self.model.hidden(tokens, kv_cache=StaticStep(cache, pos))[:, -1])

    def __call__(self, tokens: torch.Tensor, cache: KVCache) -> torch.Tensor:
        if self._fn is None:
            return self.model.logits(self.model.hidden(tokens, kv_cache=cache)[:, -1])
        if cache.pos >= cache.max_len:
            raise ValueError(f"KV cache overflow: {cache.pos} + 1 > max_len {cache.max_len}")
        if self.mode == "cuda-graphs":
            self._mark_static(cache)
        pos = torch.tensor(cache.pos, device=tokens.device)
        try:
            logits = self._fn(tokens, pos, cache)
        except Exception as e:  # noqa: BLE001 - a compiler that fails must not take generation down with it
            if self._compiled_once:
                raise
            print(f"picochat: warning: the {self.mode} decode step failed to compile ({type(e).__name__}: "
                  f"{str(e).splitlines()[0][:160] if str(e) else ''}); decoding eagerly", file=sys.stderr)
            self._fn, self.mode = None, "eager"
            return self(tokens, cache)
        self._compiled_once = True
        cache.pos += 1
        if self.mode == "cuda-graphs":
            logits = logits.clone()  # the graph's output buffer is overwritten by the next replay
        return logits

    def _mark_static(self, cache: KVCache) -> None:
        # the cache buffers live across replays and are written in place by the graph (marking is idempotent)
        for layer in cache.layers.values():
            for buf, _ in layer.values():
                torch._dynamo.mark_static_address(buf)
