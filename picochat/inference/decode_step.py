"""One decode step (B tokens in, B x V logits out) that can run without per-token launch overhead.

    eager         model.hidden over the KVCache as it is (the default on CPU: no compile time)
    compiled      the same step with static shapes (model.kv_cache.StaticStep) under torch.compile:
                  one fused graph; `--decode-step compiled` on CPU, where the compile costs minutes
    cuda-graphs   compiled with mode="reduce-overhead": the step is captured once as a CUDA graph
                  and replayed, so a token costs one launch (the default on CUDA)

Why a static step: eager decoding of a small model is Python and dispatch overhead, not arithmetic
(a d4 step: ~150 small ops, 6.6 ms on 2 cores for 10 MFLOP). A graph can only be captured and
replayed if nothing in it changes between steps but tensor contents: StaticStep writes each
token's key/value at a position held in a tensor and attends over the whole preallocated cache
with a mask, so step 1 and step 500 are the same graph. The cache buffers are marked as static
addresses, which lets the CUDA graph write them in place. A different batch size or cache length
is a new shape: compiled once more (the engine therefore keeps finished rows in a compiled batch
instead of compacting it).
"""
from __future__ import annotations

import sys

import torch

from picochat.device import DECODE_STEPS as MODES
from picochat.common import PicochatError
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
    from picochat.device import resolve_dtype
    resolve_mode(args.decode_step, device)
    return resolve_dtype(args.dtype, device)


class DecodeStep:
    """step(tokens (B, 1), cache) -> logits (B, V) fp32, advancing the cache by one position."""

    def __init__(self, model, mode: str = "eager", dynamic: bool | None = False):
        """dynamic=False: one compiled graph per batch size and cache length; None: torch.compile makes
        a dimension symbolic once it has seen it change, so new sizes need no new compile (Engine and
        the server use that; CUDA graphs are still recorded per size, which is cheap)."""
        self.model, self.mode = model, mode
        self._marked: set[int] = set()
        self._compiled_once = False
        if mode == "eager":
            self._fn = None
        else:
            self._fn = torch.compile(self._static, mode="reduce-overhead" if mode == "cuda-graphs" else None,
                                     fullgraph=True, dynamic=dynamic)

    @property
    def static(self) -> bool:
        """Whether the batch shape should stay fixed (each new shape is a new compile)."""
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
        """The cache buffers live across replays and are written in place by the graph."""
        for layer in cache.layers.values():
            for buf, _ in layer.values():
                if id(buf) not in self._marked:
                    torch._dynamo.mark_static_address(buf)
                    self._marked.add(id(buf))
