"""The one sampling function: temperature, top-k, top-p (nucleus), per row of a batch.

`probs_from_logits` turns logits into the distribution actually sampled from; speculative
decoding uses it for both the draft (q) and the target (p), so "same distribution as the target"
means the same transform. Temperature 0 means greedy (a one-hot distribution on the argmax).
"""
from __future__ import annotations

import math

import torch


def validate_sampling(temperature: float, top_k: int | None, top_p: float | None) -> None:
    if temperature is None or not math.isfinite(temperature) or temperature < 0:
        raise ValueError(f"temperature must be a finite number >= 0, got {temperature}")
    if top_k is not None and (int(top_k) != top_k or top_k < 0):
        raise ValueError(f"top_k must be an integer >= 0 (0 = disabled), got {top_k}")
    if top_p is not None and not (0 < top_p <= 1):
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")


def _rows(value, B: int, default, dtype, device) -> torch.Tensor:
    if value is None:
        value = default
    if isinstance(value, torch.Tensor):
        return value.to(device=device, dtype=dtype).expand(B)
    if isinstance(value, (list, tuple)):
        return torch.tensor([default if v is None else v for v in value], dtype=dtype, device=device)
    return torch.full((B,), value, dtype=dtype, device=device)


def probs_from_logits(logits: torch.Tensor, temperature=1.0, top_k=None, top_p=None) -> torch.Tensor:
    """logits (B, V) -> probabilities (B, V). Each of temperature/top_k/top_p may be a scalar,
    a per-row list, or a (B,) tensor; top_k 0/None and top_p 1/None disable those filters."""
    logits = logits.float()
    B, V = logits.shape
    t = _rows(temperature, B, 1.0, torch.float32, logits.device)
    k = _rows(top_k, B, 0, torch.long, logits.device)
    p = _rows(top_p, B, 1.0, torch.float32, logits.device)
    greedy = t <= 0
    scaled = logits / torch.where(greedy, torch.ones_like(t), t)[:, None]
    if bool(((k > 0) & (k < V)).any() or (p < 1).any()):
        sorted_logits, order = scaled.sort(dim=-1, descending=True)
        rank = torch.arange(V, device=logits.device)[None, :]
        remove = (k[:, None] > 0) & (rank >= k[:, None])
        sorted_probs = torch.softmax(sorted_logits.masked_fill(remove, float("-inf")), dim=-1)
        # nucleus: keep the smallest prefix whose mass reaches p (a token stays if the mass
        # strictly before it is still < p, so the first token is always kept)
        mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
        remove |= mass_before >= p[:, None]
        sorted_logits = sorted_logits.masked_fill(remove, float("-inf"))
        scaled = torch.full_like(scaled, float("-inf")).scatter(1, order, sorted_logits)
    probs = torch.softmax(scaled, dim=-1)
    if bool(greedy.any()):
        onehot = torch.zeros_like(probs).scatter_(1, logits.argmax(dim=-1, keepdim=True), 1.0)
        probs = torch.where(greedy[:, None], onehot, probs)
    return probs


def sample_from_probs(probs: torch.Tensor, generator: torch.Generator | list | None = None) -> torch.Tensor:
    """(B, V) probabilities -> (B,) token ids. `generator` may be one generator or one per row
    (per-row generators make a row's samples independent of what else is in the batch)."""
    if isinstance(generator, (list, tuple)):
        return torch.cat([torch.multinomial(probs[i:i + 1], 1, generator=g) for i, g in enumerate(generator)]).view(-1)
    return torch.multinomial(probs, 1, generator=generator).view(-1)


def sample_next(logits: torch.Tensor, temperature=1.0, top_k=None, top_p=None, generator=None) -> torch.Tensor:
    """logits (B, V) -> (B,) next token ids."""
    if isinstance(temperature, (int, float)) and temperature == 0:
        return logits.argmax(dim=-1)  # fast path: pure greedy needs no sort and no RNG
    return sample_from_probs(probs_from_logits(logits, temperature, top_k, top_p), generator)
