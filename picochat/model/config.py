"""GPTConfig and the depth dial.

One integer, `depth`, sets the whole model shape (as in nanochat): width = depth * aspect_ratio,
heads of ~128 dims. Everything else in the model reads this dataclass and nothing else, so a
checkpoint's config.json fully describes how to rebuild it.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

ATTENTION_TYPES = ("mha", "gqa", "mla")


@dataclass
class GPTConfig:
    sequence_len: int = 1024
    vocab_size: int = 65536
    n_layer: int = 12
    n_head: int = 6
    n_kv_head: int = 6          # < n_head gives GQA; must divide n_head
    n_embd: int = 768
    attention: str = "mha"      # "mha" | "gqa" | "mla"; mha and gqa share one module (n_kv_head decides)
    softcap: float = 15.0       # logits = softcap * tanh(logits / softcap); 0 disables
    rope_base: float = 10000.0
    # Multi-head Latent Attention (used only when attention == "mla")
    kv_lora_rank: int = 0       # latent dimension of the joint K/V compression
    q_lora_rank: int = 0        # 0 = no query compression
    qk_rope_head_dim: int = 0   # decoupled rotary part of each head (shared key across heads)
    mla_absorb: bool = True     # decode over the latent cache with W_uk/W_uv folded in (mla.py); False = expand

    def __post_init__(self):
        self.validate()

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    def validate(self) -> None:
        if self.attention not in ATTENTION_TYPES:
            raise ValueError(f"attention must be one of {ATTENTION_TYPES}, got {self.attention!r}")
        for name in ("sequence_len", "vocab_size", "n_layer", "n_head", "n_kv_head", "n_embd"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        if self.n_head % self.n_kv_head:
            raise ValueError(f"n_head ({self.n_head}) must be divisible by n_kv_head ({self.n_kv_head})")
        if self.head_dim % 2:
            raise ValueError(f"head_dim ({self.head_dim}) must be even for rotary embeddings")
        if self.attention == "mla":
            if self.kv_lora_rank < 1 or self.q_lora_rank < 0:
                raise ValueError(f"mla needs kv_lora_rank >= 1 and q_lora_rank >= 0, got {self.kv_lora_rank}, "
                                 f"{self.q_lora_rank}")
            if self.qk_rope_head_dim < 2 or self.qk_rope_head_dim % 2:
                raise ValueError(f"mla needs an even qk_rope_head_dim >= 2, got {self.qk_rope_head_dim}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "GPTConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown config keys: {sorted(unknown)}")
        return cls(**d)


def config_from_depth(depth: int, vocab_size: int, sequence_len: int = 1024, *, attention: str = "mha",
                      n_kv_head: int | None = None, aspect_ratio: int = 64, head_dim: int = 128,
                      kv_lora_rank: int | None = None, qk_rope_head_dim: int | None = None,
                      q_lora_rank: int = 0) -> GPTConfig:
    """The depth dial: depth 4 -> 256 wide, 2 heads; depth 20 -> 1280 wide, 10 heads."""
    if depth < 1:
        raise ValueError(f"depth must be >= 1, got {depth}")
    n_embd = depth * aspect_ratio
    n_head = max(1, math.ceil(n_embd / head_dim))
    while n_embd % n_head:  # keep head_dim integral for odd widths
        n_head += 1
    if attention == "gqa" and n_kv_head is None:
        n_kv_head = max(1, n_head // 2)
    n_kv_head = n_head if n_kv_head is None else n_kv_head
    extra = {}
    if attention == "mla":
        # latent n_embd/4; rotary key head_dim/4 but at most n_embd/8, so the latent cache stays
        # <= 18.75% of MHA's bytes per token even with one head (docs/attention.md)
        rope = max(8, min((n_embd // n_head) // 4, n_embd // 8)) // 2 * 2
        extra = dict(kv_lora_rank=kv_lora_rank or max(1, n_embd // 4), qk_rope_head_dim=qk_rope_head_dim or rope,
                     q_lora_rank=q_lora_rank)
    return GPTConfig(sequence_len=sequence_len, vocab_size=vocab_size, n_layer=depth, n_head=n_head,
                     n_kv_head=n_kv_head, n_embd=n_embd, attention=attention, **extra)
