"""Small shared pieces of the model: parameter-free RMSNorm and rotary position embeddings.

Kept apart from gpt.py so every attention variant (attention.py, mla.py) can use them
without importing the GPT that imports them.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def norm(x: torch.Tensor) -> torch.Tensor:
    """RMSNorm with no learnable parameters (nanochat/modded-nanogpt style)."""
    return F.rms_norm(x, (x.size(-1),))


def rotary_table(seq_len: int, head_dim: int, base: float = 10000.0, device=None, sign: int = -1,
                 round_to: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables of shape (seq_len, head_dim // 2), fp32.

    sign -1 gives apply_rotary's rotation by -theta (nanochat's convention), +1 the textbook +theta
    (only sin changes sign). round_to=torch.bfloat16 rounds the values as nanochat 2025 stored them,
    so a model trained with those tables sees exactly the angles it was trained with."""
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim))
    t = torch.arange(seq_len, dtype=torch.float32, device=device)
    freqs = torch.outer(t, inv_freq)
    cos, sin = freqs.cos(), freqs.sin() * -sign
    if round_to is not None:
        cos, sin = cos.to(round_to).float(), sin.to(round_to).float()
    return cos, sin


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x (B, T, H, D) by per-position angles; cos/sin are (B or 1, T, 1, D/2).

    Uses the "split halves" convention (first half pairs with second half), as nanochat/Llama do.
    """
    d = x.shape[-1] // 2
    x1, x2 = x[..., :d], x[..., d:]
    y1 = x1 * cos + x2 * sin
    y2 = x1 * (-sin) + x2 * cos
    return torch.cat([y1, y2], dim=-1).to(x.dtype)
