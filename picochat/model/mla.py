"""Multi-head Latent Attention (DeepSeek-V2, arXiv:2405.04434), with a latent KV cache.

Keys and values of all heads come from one normed low-rank latent per token, c_kv = norm(W_dkv x)
(k_nope_h = W_uk_h c_kv, v_h = W_uv_h c_kv), plus ONE small rotary key shared by all heads,
k_rope = rotary(norm(W_kr x)); queries come from x (or a low-rank c_q = norm(W_dq x)) and are
RMS-normed per head. Rotary is "decoupled": position lives only in k_rope and each query's rope
part, which is what makes absorption possible (RoPE between W_uk and the score would make W_uk
position dependent). The cache stores only c_kv and k_rope, never expanded keys and values. Two
ways to attend over it, same math:
- expand: rebuild K and V for every cached position and run ordinary attention (training and a
  prefill from an empty cache: compute bound, big matmuls win);
- absorb: fold W_uk into the query and W_uv into the output projection, so every head attends
  directly over [c_kv, k_rope] (every cached step after the first: ~5x fewer bytes read per token
  than MHA's K/V, no per-head keys materialised).
The expanded key W_uk c_kv is NOT normed: a norm after W_uk is nonlinear per head and would make
absorption impossible (Muon's orthogonalised updates keep W_uk's scale in check). docs/attention.md
has the details and the measurements.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from picochat.model.attention import AttnContext, apply_rotary, norm, sdpa
from picochat.model.config import GPTConfig

MODES = ("auto", "absorb", "expand")


class MultiHeadLatentAttention(nn.Module):
    # read as matrices by absorbed decoding (absorbed_output_weight, forward): no quantized stand-ins
    DENSE_WEIGHTS = ("c_uk", "c_uv", "c_proj")

    def __init__(self, config: GPTConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_head = H = config.n_head
        self.d_nope = self.d_v = config.head_dim      # as DeepSeek-V2: full-size nope and value heads
        self.d_rope = config.qk_rope_head_dim
        self.d_c = config.kv_lora_rank
        self.scale = 1.0 / math.sqrt(self.d_nope + self.d_rope)
        d_q = H * (self.d_nope + self.d_rope)
        if config.q_lora_rank:
            self.c_dq = nn.Linear(config.n_embd, config.q_lora_rank, bias=False)
            self.c_uq = nn.Linear(config.q_lora_rank, d_q, bias=False)
        else:
            self.c_q = nn.Linear(config.n_embd, d_q, bias=False)
        self.c_dkv = nn.Linear(config.n_embd, self.d_c + self.d_rope, bias=False)  # latent and rotary key in one matmul
        self.c_uk = nn.Linear(self.d_c, H * self.d_nope, bias=False)
        self.c_uv = nn.Linear(self.d_c, H * self.d_v, bias=False)
        self.c_proj = nn.Linear(H * self.d_v, config.n_embd, bias=False)
        # "auto": absorb on cached steps after the first, expand otherwise; see set_mla_mode
        self.mode = "auto" if config.mla_absorb else "expand"
        self._w_o_cache: tuple | None = None

    # ------------------------------------------------------------------ pieces

    def _query(self, x: torch.Tensor, ctx: AttnContext) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, T, C) -> normed q_nope (B, T, H, d_nope) and rotated q_rope (B, T, H, d_rope)."""
        B, T, _ = x.shape
        q = self.c_uq(norm(self.c_dq(x))) if hasattr(self, "c_dq") else self.c_q(x)
        q = norm(q.view(B, T, self.n_head, self.d_nope + self.d_rope))
        q_nope, q_rope = q.split([self.d_nope, self.d_rope], dim=-1)
        return q_nope, apply_rotary(q_rope, ctx.cos, ctx.sin)

    def _latent(self, x: torch.Tensor, ctx: AttnContext) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, T, C) -> c_kv (B, T, d_c) and k_rope (B, T, d_rope), appended to the cache if any;
        returns everything cached so far (B, S, ...)."""
        c_kv, k_rope = self.c_dkv(x).split([self.d_c, self.d_rope], dim=-1)
        c_kv = norm(c_kv)
        k_rope = apply_rotary(norm(k_rope)[:, :, None, :], ctx.cos, ctx.sin)[:, :, 0, :]
        if ctx.kv_cache is not None:
            c_kv = ctx.kv_cache.update(self.layer_idx, "c_kv", c_kv, seq_dim=1)
            k_rope = ctx.kv_cache.update(self.layer_idx, "k_rope", k_rope, seq_dim=1)
        return c_kv, k_rope

    def _use_absorb(self, ctx: AttnContext) -> bool:
        if self.mode != "auto":
            return self.mode == "absorb"
        # a prefill from an empty cache is compute bound and expanding is the cheaper way; once the
        # cache holds tokens, expanding it again every step is what absorption avoids
        return ctx.kv_cache is not None and ctx.kv_cache.decoding

    def absorbed_output_weight(self) -> torch.Tensor:
        """c_proj with W_uv folded in: (n_embd, H * d_c). Cached while the weights are unchanged
        (keyed on storage and version counters: an optimizer step or load_state_dict bumps them);
        recomputed on every call while autograd records, so training through it stays correct."""
        wp, wv = self.c_proj.weight, self.c_uv.weight
        H = self.n_head

        def fold():
            return torch.einsum("ehv,hvc->ehc", wp.view(-1, H, self.d_v), wv.view(H, self.d_v, self.d_c)).flatten(1)

        if torch.is_grad_enabled():
            return fold()
        key = (wp.data_ptr(), wp._version, wv.data_ptr(), wv._version, wp.dtype, wp.device)
        if self._w_o_cache is None or self._w_o_cache[0] != key:
            self._w_o_cache = (key, fold())
        return self._w_o_cache[1]

    # ------------------------------------------------------------------ forward

    def forward(self, x: torch.Tensor, ctx: AttnContext, ve: None = None) -> torch.Tensor:
        B, T, _ = x.shape
        H = self.n_head
        q_nope, q_rope = self._query(x, ctx)
        c_kv, k_rope = self._latent(x, ctx)
        S = c_kv.size(1)
        if not self._use_absorb(ctx):
            k_nope = self.c_uk(c_kv).view(B, S, H, self.d_nope)
            k = torch.cat([k_nope, k_rope[:, :, None, :].expand(B, S, H, self.d_rope)], dim=-1)
            v = self.c_uv(c_kv).view(B, S, H, self.d_v)
            q = torch.cat([q_nope, q_rope], dim=-1)
            y = sdpa(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), ctx)  # (B, H, T, d_v); scale 1/sqrt(d_qk)
            return self.c_proj(y.transpose(1, 2).reshape(B, T, H * self.d_v))
        # absorb: per-head latent queries; all H*T queries (row t*H + h) share one key/value "head":
        # the cache itself. Two bmm's over the cache views instead of SDPA over cat([c_kv, k_rope]):
        # the cat would copy the whole cache every layer and step (2.5x slower at context 4096 x batch 16,
        # d4: a one-off CPU micro-benchmark, 2026-11-25, docs/attention.md)
        w_uk = self.c_uk.weight.view(H, self.d_nope, self.d_c)
        q_lat = torch.einsum("bthn,hnc->bthc", q_nope * self.scale, w_uk).reshape(B, T * H, self.d_c)
        q_rope = (q_rope * self.scale).reshape(B, T * H, self.d_rope)
        scores = torch.baddbmm(torch.bmm(q_lat, c_kv.mT), q_rope, k_rope.mT)               # (B, T*H, S)
        mask = ctx.attn_mask[:, 0] if ctx.attn_mask is not None else None                  # (B, T, S) or None
        if mask is None and T > 1:  # plain causal over the T new tokens (no cache: S == T)
            mask = torch.ones(T, S, dtype=torch.bool, device=x.device).tril(S - T)[None]
        if mask is not None:
            scores.masked_fill_(~mask.repeat_interleave(H, dim=1), float("-inf"))        # head h of t gets row t
        probs = scores.softmax(dim=-1, dtype=torch.float32).to(c_kv.dtype)
        o_lat = torch.bmm(probs, c_kv)                                                       # (B, T*H, d_c)
        return F.linear(o_lat.view(B, T, H * self.d_c), self.absorbed_output_weight())

    # ------------------------------------------------------------------ accounting

    def kv_values_per_token(self) -> int:
        """Numbers cached per token per layer: the latent and the shared rotary key, nothing else."""
        return self.d_c + self.d_rope


def set_mla_mode(model: nn.Module, mode: str) -> None:
    """Choose how every MLA layer of `model` attends: "auto" (absorb on cached steps after the
    first, the default), "absorb" (always, even training and prefill), "expand" (never)."""
    if mode not in MODES:
        raise ValueError(f"mla mode must be one of {MODES}, got {mode!r}")
    for m in model.modules():
        if isinstance(m, MultiHeadLatentAttention):
            m.mode = mode
