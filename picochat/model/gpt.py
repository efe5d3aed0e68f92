"""The GPT: token embedding -> n_layer x (attention + relu² MLP) -> untied lm_head.

Choices (following nanochat / modded-nanogpt):
- rotary position embeddings (no learned positions), QK-norm inside attention
- relu² MLP, parameter-free RMSNorm, no biases anywhere
- untied embedding and lm_head; logits soft-capped with softcap * tanh(x / softcap)
- GQA through n_kv_head; the attention module itself is chosen by config (attention.py)
- optionally nanochat's 2026 additions (config.py; all off by default): value embeddings, per-layer
  resid/x0 lambdas, smear (a gated share of the previous token's embedding), backout (subtract a
  share of the mid-layer residual), sliding windows per layer, q/k scale, padded vocab

One forward serves training (targets -> loss), evaluation (logits) and inference with a
KV cache (prefill T tokens, decode 1 token; left-padded batches via the cache's `pad`).
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from picochat.model.attention import AttnContext, CausalSelfAttention, norm, rotary_table, window_mask
from picochat.model.config import GPTConfig
from picochat.model.kv_cache import KVCache
from picochat.model.mla import MultiHeadLatentAttention


SMEAR_CHANNELS = 24         # the smear gate reads the first 24 channels of the embedding (nanochat)
SMEAR_CACHE_KEY = "smear"   # the KV cache entry that keeps each position's embedding for smear


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
        # MHA and GQA are one class (n_kv_head decides); config.validate() allows no other attention
        attention = MultiHeadLatentAttention if config.attention == "mla" else CausalSelfAttention
        self.attn = attention(config, layer_idx)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, ctx: AttnContext, ve: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.attn(norm(x), ctx, ve)
        x = x + self.mlp(norm(x))
        return x


# ---------------------------------------------------------------------- nanochat 2026 features
# One function per feature, the one place to read it: GPT.__init__ calls it with init=False to create
# its parameters (named as in nanochat's state_dict, so imported weights load as they are) and
# init_weights with init=True to set nanochat's starting values (after the generic init, in this
# order: the random draws follow it). Its docstring says where it acts.

def layer_scalars(m: "GPT", init: bool) -> None:
    """Per-layer resid/x0 lambdas: before block i, x = resid_lambdas[i] * x + x0_lambdas[i] * x0 (x0:
    the normed embedding; GPT.hidden). Start: a stronger residual and more x0 in early layers."""
    L = m.config.n_layer
    if not init:
        m.resid_lambdas, m.x0_lambdas = nn.Parameter(torch.ones(L)), nn.Parameter(torch.zeros(L))
        return
    n = max(L - 1, 1)
    m.resid_lambdas.copy_(1.15 - 0.10 * torch.arange(L) / n)
    m.x0_lambdas.copy_(0.20 - 0.15 * torch.arange(L) / n)


def smear(m: "GPT", init: bool) -> None:
    """A gated share of the previous token's embedding: x[t] += smear_lambda * sigmoid(smear_gate(
    x[t][:24])) * x[t-1], before any block (GPT._smear). Start: off (lambda 0), gate slightly open."""
    if not init:
        m.smear_gate = nn.Linear(SMEAR_CHANNELS, 1, bias=False)
        m.smear_lambda = nn.Parameter(torch.zeros(1))
        return
    nn.init.uniform_(m.smear_gate.weight, 0.0, 0.02)
    nn.init.zeros_(m.smear_lambda)


def backout(m: "GPT", init: bool) -> None:
    """Take back part of the mid-layer residual, x -= backout_lambda * x_mid after the last block
    (GPT.hidden): low-level features the head needn't see. Start: 0.2."""
    if not init:
        m.backout_lambda = nn.Parameter(torch.zeros(1))
        return
    nn.init.constant_(m.backout_lambda, 0.2)


def value_embeds(m: "GPT", init: bool) -> None:
    """Per-layer value embeddings on the layers config.has_value_embed picks: attention adds
    3 * sigmoid(ve_gate(x[:12])) * value_embeds[i](idx) to its values (attention.py; the gate lives
    there). Start: uniform with the std of 1/sqrt(n_embd), like c_v; gates slightly open."""
    c = m.config
    if not init:
        m.value_embeds = nn.ModuleDict({str(i): nn.Embedding(c.padded_vocab_size, c.n_kv_head * c.head_dim)
                                        for i in range(c.n_layer) if c.has_value_embed(i)})
        return
    s = 3 ** 0.5 * c.n_embd ** -0.5
    for ve in m.value_embeds.values():
        nn.init.uniform_(ve.weight, -s, s)
    for block in m.transformer.h:
        if hasattr(block.attn, "ve_gate"):
            nn.init.uniform_(block.attn.ve_gate.weight, 0.0, 0.02)


# config flag -> feature, in nanochat's order (parameter registration and random draws follow it);
# sliding windows, q/k scale and the padded vocab need no parameters (config.py, attention.py)
FEATURES_2026 = dict(layer_scalars=layer_scalars, smear=smear, backout=backout, value_embeds=value_embeds)


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        V = config.padded_vocab_size  # rows past vocab_size are never looked up; their logits are cropped
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(V, config.n_embd),
            h=nn.ModuleList([Block(config, i) for i in range(config.n_layer)]),
        ))
        self.lm_head = nn.Linear(config.n_embd, V, bias=False)
        for flag, feature in FEATURES_2026.items():  # nanochat 2026 extras (below), each where the config asks
            if getattr(config, flag):
                feature(self, init=False)
        self.windows = config.layer_windows()
        self.grad_checkpoint = False  # per-block activation recomputation (trades compute for memory)
        self.register_buffer("cos", torch.empty(0), persistent=False)
        self.register_buffer("sin", torch.empty(0), persistent=False)
        self.reset_rotary()

    def reset_rotary(self, device=None) -> None:
        """(Re)build the rotary tables. They cover 10x the training context so generation can run
        past it, and are non-persistent buffers: derived from config, never saved in checkpoints."""
        c = self.config
        rope_dim = c.qk_rope_head_dim if c.attention == "mla" else c.head_dim
        self.cos, self.sin = rotary_table(c.sequence_len * 10, rope_dim, c.rope_base, device=device, sign=c.rope_sign,
                                          round_to=torch.bfloat16 if c.rope_table_dtype == "bfloat16" else None)

    # ------------------------------------------------------------------ init

    @torch.no_grad()
    def init_weights(self) -> None:
        """Embeddings ~ N(0, 1); linear layers with a fan-in scaled normal; output projections
        (attention c_proj, MLP c_proj, lm_head) start at zero so every block starts as identity;
        then each 2026 feature's own starting values."""
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
        for flag, feature in FEATURES_2026.items():
            if getattr(self.config, flag):
                feature(self, init=True)

    # ------------------------------------------------------------------ accounting

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def attention_params(self) -> int:
        return sum(p.numel() for b in self.transformer.h for p in b.attn.parameters())

    def kv_values_per_token(self) -> int:
        """Numbers the KV cache stores per token, summed over layers."""
        return sum(b.attn.kv_values_per_token() for b in self.transformer.h)

    def kv_bytes_per_token(self) -> int:
        """KV cache bytes per token per row: the cache holds the activations' dtype, the embedding's
        (a quantized linear has no float weight to ask)."""
        return self.kv_values_per_token() * self.transformer.wte.weight.element_size()

    def flops_per_token(self) -> float:
        """Training FLOPs per token: 6 * (non-embedding params) + attention score/value matmuls."""
        nparams = self.num_params() - self.transformer.wte.weight.numel()
        if self.config.value_embeds:  # lookups, like wte
            nparams -= sum(p.numel() for p in self.value_embeds.parameters())
        c = self.config
        qk_dim = c.head_dim + (c.qk_rope_head_dim if c.attention == "mla" else 0)  # MLA adds the rotary part
        # keys each query sees, per layer: the whole context, or at most window + 1 with sliding windows
        context = sum(c.sequence_len if w is None else min(w + 1, c.sequence_len) for w in self.windows)
        attn = 6 * c.n_head * (qk_dim + c.head_dim) * context
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
        c = self.config
        if kv_cache is None:
            if T > self.cos.size(0):
                raise ValueError(f"sequence of {T} tokens exceeds the rotary table ({self.cos.size(0)})")
            cos, sin = self.cos[None, :T, None, :], self.sin[None, :T, None, :]
            pos = None
        else:
            pos = kv_cache.positions(T)                                 # (B, T)
            cos, sin = self.cos[pos][:, :, None, :], self.sin[pos][:, :, None, :]

        def context(window: int | None) -> AttnContext:
            if kv_cache is not None:
                return AttnContext(cos=cos, sin=sin, kv_cache=kv_cache, attn_mask=kv_cache.attn_mask(T, window))
            if window is None or window >= T - 1:
                return AttnContext(cos=cos, sin=sin)
            return AttnContext(cos=cos, sin=sin, attn_mask=window_mask(T, window, idx.device))

        x = norm(self.transformer.wte(idx))
        if c.smear:
            x = self._smear(x, kv_cache, pos)
        contexts = {w: context(w) for w in dict.fromkeys(self.windows)}  # one per distinct window
        x0, x_mid = x, None
        for i, block in enumerate(self.transformer.h):
            if c.layer_scalars:
                x = self.resid_lambdas[i] * x + self.x0_lambdas[i] * x0
            ve = self.value_embeds[str(i)](idx) if c.has_value_embed(i) else None
            ctx = contexts[self.windows[i]]
            if self.grad_checkpoint and self.training and torch.is_grad_enabled():
                x = checkpoint(block, x, ctx, ve, use_reentrant=False)
            else:
                x = block(x, ctx, ve)
            if c.backout and i == c.n_layer // 2:
                x_mid = x
        if x_mid is not None:  # take back part of the mid-layer residual: low-level features the head needn't see
            x = x - self.backout_lambda * x_mid
        if kv_cache is not None:
            kv_cache.advance(T)
        return norm(x)

    def _smear(self, x: torch.Tensor, kv_cache: KVCache | None, pos: torch.Tensor | None) -> torch.Tensor:
        """x[t] += lambda * sigmoid(W x[t][:24]) * x[t-1] (embeddings, before any block).

        With a cache, decoding needs the previous token's embedding: the cache keeps every
        position's embedding like one more layer, so rollback, row selection, merging and left
        padding treat it exactly as they treat keys and values. A row's first real token has no
        predecessor (the pad token before it is not one), as when it runs alone."""
        T = x.size(1)
        if kv_cache is None:
            prev, pos = F.pad(x[:, :-1], (0, 0, 1, 0)), torch.arange(T, device=x.device)[None]
        else:
            prev = kv_cache.previous(kv_cache.update(SMEAR_CACHE_KEY, "x", x, seq_dim=1), 1, T)
        gate = self.smear_lambda * torch.sigmoid(self.smear_gate(x[..., :SMEAR_CHANNELS]))
        return x + (gate * (pos > 0)[:, :, None]) * prev

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Hidden states (..., C) -> soft-capped fp32 logits (..., V)."""
        logits = self.lm_head(x)
        if self.config.padded_vocab_size != self.config.vocab_size:
            logits = logits[..., :self.config.vocab_size]
        logits = logits.float()
        if self.config.softcap:
            logits = self.config.softcap * torch.tanh(logits / self.config.softcap)
        return logits
