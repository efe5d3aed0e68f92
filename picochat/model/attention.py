"""Causal self-attention: MHA and GQA in one class (n_kv_head < n_head gives GQA), and what every
attention variant shares: parameter-free RMSNorm, rotary embeddings, AttnContext, sdpa.

Attention is pluggable: gpt.Block picks this module or MLA (mla.py) from config.attention; mla.py
uses the shared pieces from here, and nothing here imports mla.py.
Every variant has the same call signature: forward(x, ctx) where ctx carries rotary angles,
the KV cache and the mask for this step.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from picochat.model.config import GPTConfig
from picochat.model.kv_cache import KVCache


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


VE_GATE_CHANNELS = 12  # the value-embedding gate reads only the first 12 channels of its input (nanochat)


@dataclass
class AttnContext:
    """What one forward step tells every attention layer."""
    cos: torch.Tensor                       # (B or 1, T, 1, rope_dim/2) rotary angles for these positions
    sin: torch.Tensor
    kv_cache: KVCache | None = None
    attn_mask: torch.Tensor | None = None   # (B, 1, T, S) bool, True = attend; None: plain causal


def window_mask(T: int, window: int, device) -> torch.Tensor:
    """(1, 1, T, T) causal mask that also hides keys more than `window` positions back."""
    return torch.ones(T, T, dtype=torch.bool, device=device).tril().triu(-window)[None, None]


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: AttnContext, enable_gqa: bool = False) -> torch.Tensor:
    """Scaled dot-product attention over (B, H, T, D) tensors, honouring the step's mask."""
    if ctx.attn_mask is not None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=ctx.attn_mask, enable_gqa=enable_gqa)
    # with a cache and no mask we decode one token over all cached keys: nothing to mask
    causal = q.size(2) == k.size(2) and q.size(2) > 1
    return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=enable_gqa)


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_head = config.n_head
        self.n_kv_head = config.n_kv_head
        self.head_dim = config.head_dim
        self.c_q = nn.Linear(config.n_embd, self.n_head * self.head_dim, bias=False)
        self.c_k = nn.Linear(config.n_embd, self.n_kv_head * self.head_dim, bias=False)
        self.c_v = nn.Linear(config.n_embd, self.n_kv_head * self.head_dim, bias=False)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=False)
        self.qk_scale = config.qk_scale
        # value embeddings (nanochat 2026): v += 3 sigmoid(W x[:12]) * ve, one gate per kv head
        if config.has_value_embed(layer_idx):
            self.ve_gate = nn.Linear(VE_GATE_CHANNELS, self.n_kv_head, bias=False)

    def forward(self, x: torch.Tensor, ctx: AttnContext, ve: torch.Tensor | None = None) -> torch.Tensor:
        B, T, C = x.shape
        q = self.c_q(x).view(B, T, self.n_head, self.head_dim)
        k = self.c_k(x).view(B, T, self.n_kv_head, self.head_dim)
        v = self.c_v(x).view(B, T, self.n_kv_head, self.head_dim)
        if ve is not None:  # gate range (0, 3): the layer can ignore the embedding or lean on it
            gate = 3 * torch.sigmoid(self.ve_gate(x[..., :VE_GATE_CHANNELS]))
            v = v + gate.unsqueeze(-1) * ve.view(B, T, self.n_kv_head, self.head_dim)
        q, k = apply_rotary(q, ctx.cos, ctx.sin), apply_rotary(k, ctx.cos, ctx.sin)
        q, k = norm(q), norm(k)  # QK-norm: keeps attention logits bounded, stabilises training
        if self.qk_scale != 1.0:  # sharper attention than 1/sqrt(d) alone (nanochat 2026 uses 1.2)
            q, k = q * self.qk_scale, k * self.qk_scale
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, T, D)
        if ctx.kv_cache is not None:
            k = ctx.kv_cache.update(self.layer_idx, "k", k, seq_dim=2)
            v = ctx.kv_cache.update(self.layer_idx, "v", v, seq_dim=2)
        y = sdpa(q, k, v, ctx, enable_gqa=self.n_kv_head != self.n_head)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.c_proj(y)

    def kv_values_per_token(self) -> int:
        """Numbers cached per token per layer (K and V for every kv head)."""
        return 2 * self.n_kv_head * self.head_dim
