"""The GPT: token embedding -> n_layer x (attention + relu² MLP) -> untied lm_head.

Choices (following nanochat / modded-nanogpt):
- rotary position embeddings (no learned positions), QK-norm inside attention
- relu² MLP, parameter-free RMSNorm, no biases anywhere
- untied embedding and lm_head; logits soft-capped with softcap * tanh(x / softcap)
- GQA through n_kv_head; the attention module itself is chosen by config (attention.py)

One forward serves training (targets -> loss), evaluation (logits) and inference with a
KV cache (prefill T tokens, decode 1 token; left-padded batches via the cache's `pad`).
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from picochat.model.attention import AttnContext, build_attention
from picochat.model.config import GPTConfig
from picochat.model.kv_cache import KVCache
from picochat.model.layers import norm, rotary_table


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=False)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=False)

    def forward(self, x):
        return self.c_proj(F.relu(self.c_fc(x)).square())


class Block(nn.Module):
    def __init__(self, config: GPTConfig, layer_idx: int):
        super().__init__()
        self.attn = build_attention(config, layer_idx)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, ctx: AttnContext) -> torch.Tensor:
        x = x + self.attn(norm(x), ctx)
        x = x + self.mlp(norm(x))
        return x


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            h=nn.ModuleList([Block(config, i) for i in range(config.n_layer)]),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.grad_checkpoint = False  # per-block activation recomputation (trades compute for memory)
        self.register_buffer("cos", torch.empty(0), persistent=False)
        self.register_buffer("sin", torch.empty(0), persistent=False)
        self.reset_rotary()

    def reset_rotary(self, device=None) -> None:
        """(Re)build the rotary tables. They cover 10x the training context so generation can run
        past it, and are non-persistent buffers: derived from config, never saved in checkpoints."""
        c = self.config
        rope_dim = c.qk_rope_head_dim if c.attention == "mla" else c.head_dim
        self.cos, self.sin = rotary_table(c.sequence_len * 10, rope_dim, c.rope_base, device=device)

    # ------------------------------------------------------------------ init

    @torch.no_grad()
    def init_weights(self) -> None:
        """Embeddings ~ N(0, 1); linear layers with a fan-in scaled normal; output projections
        (attention c_proj, MLP c_proj, lm_head) start at zero so every block starts as identity."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                fan_out, fan_in = module.weight.shape
                std = 1.0 / math.sqrt(fan_in) * min(1.0, math.sqrt(fan_out / fan_in))
                nn.init.normal_(module.weight, mean=0.0, std=std)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, mean=0.0, std=1.0)
        nn.init.zeros_(self.lm_head.weight)
        for block in self.transformer.h:
            nn.init.zeros_(block.mlp.c_proj.weight)
            nn.init.zeros_(block.attn.c_proj.weight)

    # ------------------------------------------------------------------ accounting

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def attention_params(self) -> int:
        return sum(p.numel() for b in self.transformer.h for p in b.attn.parameters())

    def kv_values_per_token(self) -> int:
        """Numbers the KV cache stores per token, summed over layers."""
        return sum(b.attn.kv_values_per_token() for b in self.transformer.h)

    def flops_per_token(self) -> float:
        """Training FLOPs per token: 6 * (non-embedding params) + attention score/value matmuls."""
        nparams = self.num_params() - self.transformer.wte.weight.numel()
        c = self.config
        qk_dim = c.head_dim + (c.qk_rope_head_dim if c.attention == "mla" else 0)  # MLA adds the rotary part
        attn = 6 * c.n_layer * c.n_head * (qk_dim + c.head_dim) * c.sequence_len
        return 6 * nparams + attn

    # ------------------------------------------------------------------ forward

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, kv_cache: KVCache | None = None,
                loss_reduction: str = "mean"):
        """idx (B, T) -> logits (B, T, V) fp32, or the cross-entropy loss when targets are given
        (targets == -1 are ignored: padding and unsupervised chat tokens)."""
        logits = self.logits(self.hidden(idx, kv_cache))
        if targets is None:
            return logits
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1,
                               reduction=loss_reduction)

    def hidden(self, idx: torch.Tensor, kv_cache: KVCache | None = None) -> torch.Tensor:
        """idx (B, T) -> final normed hidden states (B, T, C). Split from the head so inference can
        project only the positions it samples from (a prefill needs the last one, not all T)."""
        B, T = idx.shape
        if kv_cache is None:
            if T > self.cos.size(0):
                raise ValueError(f"sequence of {T} tokens exceeds the rotary table ({self.cos.size(0)})")
            cos, sin = self.cos[None, :T, None, :], self.sin[None, :T, None, :]
            ctx = AttnContext(cos=cos, sin=sin)
        else:
            pos = kv_cache.positions(T)                                 # (B, T)
            cos, sin = self.cos[pos][:, :, None, :], self.sin[pos][:, :, None, :]
            ctx = AttnContext(cos=cos, sin=sin, kv_cache=kv_cache, attn_mask=kv_cache.attn_mask(T), is_causal=False)
        x = norm(self.transformer.wte(idx))
        for block in self.transformer.h:
            if self.grad_checkpoint and self.training and torch.is_grad_enabled():
                x = checkpoint(block, x, ctx, use_reentrant=False)
            else:
                x = block(x, ctx)
        if kv_cache is not None:
            kv_cache.advance(T)
        return norm(x)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Hidden states (..., C) -> soft-capped fp32 logits (..., V)."""
        logits = self.lm_head(x).float()
        if self.config.softcap:
            logits = self.config.softcap * torch.tanh(logits / self.config.softcap)
        return logits
