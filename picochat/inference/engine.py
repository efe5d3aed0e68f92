"""Inference engine: prefill once, then decode token by token with a KV cache.

Prompts of different lengths are left-padded with BOS to a common length; the cache's `pad`
gives each row its own rotary positions and a mask over its padding, so every row computes
what it would alone. The cache is allocated once per call for the longest sequence needed.
"""
from __future__ import annotations

from collections.abc import Iterator

import torch

from picochat.inference.sampling import sample_next, validate_sampling
from picochat.model.kv_cache import KVCache


class Engine:
    def __init__(self, model, tokenizer=None, device: torch.device | str | None = None):
        self.model = model
        self.tokenizer = tokenizer
        self.device = torch.device(device) if device is not None else next(model.parameters()).device

    @torch.no_grad()
    def generate_stream(self, prompts: list[list[int]], max_new_tokens: int, temperature: float = 1.0,
                        top_k: int | None = None, top_p: float | None = None, seed: int | None = None,
                        stop_tokens: set[int] | None = None) -> Iterator[list[int | None]]:
        """Yield, per decode step, one new token per row (None for rows that already finished)."""
        validate_sampling(temperature, top_k, top_p)
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ValueError("every prompt needs at least one token")
        B = len(prompts)
        L = max(len(p) for p in prompts)
        pad_id = self.tokenizer.pad_token_id if self.tokenizer is not None else 0
        pad = [L - len(p) for p in prompts]
        ids = torch.tensor([[pad_id] * n + p for n, p in zip(pad, prompts)], dtype=torch.long, device=self.device)
        cache = KVCache(B, L + max_new_tokens, device=self.device, pad=pad)
        gen = None
        if seed is not None:
            gen = torch.Generator(device=self.device).manual_seed(seed)
        done = torch.zeros(B, dtype=torch.bool, device=self.device)
        logits = self.model(ids, kv_cache=cache)[:, -1, :]
        stop = torch.tensor(sorted(stop_tokens or []), dtype=torch.long, device=self.device)
        for _ in range(max_new_tokens):
            nxt = sample_next(logits, temperature, top_k, top_p, gen)
            yield [None if d else int(t) for t, d in zip(nxt.tolist(), done.tolist())]
            done |= torch.isin(nxt, stop)
            if bool(done.all()):
                return
            logits = self.model(nxt[:, None], kv_cache=cache)[:, -1, :]

    def generate(self, prompts: list[list[int]], max_new_tokens: int, **kw) -> list[list[int]]:
        out: list[list[int]] = [[] for _ in prompts]
        for step in self.generate_stream(prompts, max_new_tokens, **kw):
            for row, tok in enumerate(step):
                if tok is not None:
                    out[row].append(tok)
        return out
