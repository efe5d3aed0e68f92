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
    # nanochat's 2026 design (its commit 92d63d4). Every field is off by default, which is the 2025
    # design that picochat has always trained, so older checkpoints load unchanged. `preset()` below
    # switches them all on; nanochat.py (the importer) sets them from a nanochat checkpoint.
    value_embeds: bool = False  # ResFormer value embeddings on alternating layers (last included), gated per kv head
    layer_scalars: bool = False  # learned per-layer resid/x0 lambdas: x = resid[i] * x + x0[i] * x0 before block i
    smear: bool = False         # mix a gated share of the previous token's embedding into each position
    backout: bool = False       # subtract a learned share of the mid-layer residual before the final norm
    window_pattern: str = ""    # sliding windows per layer, tiled ("SSSL"): S = short_window, L = sequence_len,
    short_window: int = 0       #   last layer always L; "" = full causal attention everywhere (no window)
    qk_scale: float = 1.0       # q and k are multiplied by this after QK-norm (nanochat 2026: 1.2, sharper attention)
    rope_sign: int = -1         # -1: rotate by -theta (nanochat's convention, both generations); +1: by +theta
    rope_table_dtype: str = "float32"  # nanochat 2025 rounds its rotary tables to bfloat16, even on CPU
    pad_vocab_to: int = 1       # embedding/head rows padded to a multiple of this (nanochat 2026: 64); logits cropped

    def __post_init__(self):
        self.validate()

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    def validate(self) -> None:
        if self.attention not in ATTENTION_TYPES:
            raise ValueError(f"attention must be one of {ATTENTION_TYPES}, got {self.attention!r}")
        for name in ("sequence_len", "vocab_size", "n_layer", "n_head", "n_kv_head", "n_embd", "pad_vocab_to"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        if self.n_head % self.n_kv_head:
            raise ValueError(f"n_head ({self.n_head}) must be divisible by n_kv_head ({self.n_kv_head})")
        if self.head_dim % 2:
            raise ValueError(f"head_dim ({self.head_dim}) must be even for rotary embeddings")
        if self.window_pattern and (set(self.window_pattern.upper()) - set("SL")):
            raise ValueError(f"window_pattern may only contain S and L, got {self.window_pattern!r}")
        if "S" in self.window_pattern.upper() and self.short_window < 1:
            raise ValueError(f"window_pattern {self.window_pattern!r} needs short_window >= 1, got {self.short_window}")
        if self.rope_sign not in (-1, 1):
            raise ValueError(f"rope_sign must be -1 or 1, got {self.rope_sign}")
        if self.rope_table_dtype not in ("float32", "bfloat16"):
            raise ValueError(f"rope_table_dtype must be float32 or bfloat16, got {self.rope_table_dtype!r}")
        if self.attention == "mla" and (self.value_embeds or self.qk_scale != 1.0):
            raise ValueError("value_embeds and qk_scale belong to MHA/GQA attention; MLA has neither")
        if self.attention == "mla":
            if self.kv_lora_rank < 1 or self.q_lora_rank < 0:
                raise ValueError(f"mla needs kv_lora_rank >= 1 and q_lora_rank >= 0, got {self.kv_lora_rank}, "
                                 f"{self.q_lora_rank}")
            if self.qk_rope_head_dim < 2 or self.qk_rope_head_dim % 2:
                raise ValueError(f"mla needs an even qk_rope_head_dim >= 2, got {self.qk_rope_head_dim}")

    @property
    def padded_vocab_size(self) -> int:
        return -(-self.vocab_size // self.pad_vocab_to) * self.pad_vocab_to

    def layer_windows(self) -> list[int | None]:
        """Per layer, how many earlier tokens a query may see besides itself (None = all): nanochat's
        rule, so an imported model attends exactly as it was trained. The L window is sequence_len,
        which only matters when generating past the training context (nanochat slides there too)."""
        if not self.window_pattern:
            return [None] * self.n_layer
        pattern = self.window_pattern.upper()
        sizes = {"S": self.short_window, "L": self.sequence_len}
        windows = [sizes[pattern[i % len(pattern)]] for i in range(self.n_layer)]
        windows[-1] = self.sequence_len
        return windows

    def has_value_embed(self, layer_idx: int) -> bool:
        """nanochat's placement: alternating layers, always including the last one."""
        return self.value_embeds and layer_idx % 2 == (self.n_layer - 1) % 2

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "GPTConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown config keys: {sorted(unknown)}")
        return cls(**d)


ARCHS = ("picochat", "nanochat-2026")


def nanochat_short_window(sequence_len: int) -> int:
    """nanochat 2026's short window: a quarter of the context, rounded up to FA3's 128-token tile."""
    return -(-sequence_len // 4 // 128) * 128


def arch_fields(arch: str, sequence_len: int) -> dict:
    """GPTConfig fields of an architecture preset: "picochat" (the 2025 nanochat design, the default)
    or "nanochat-2026" (value embeddings, lambdas, smear, backout, SSSL windows, rope base 1e5, ...)."""
    if arch == "picochat":
        return {}
    if arch == "nanochat-2026":
        return dict(value_embeds=True, layer_scalars=True, smear=True, backout=True, window_pattern="SSSL",
                    short_window=nanochat_short_window(sequence_len), qk_scale=1.2, rope_base=100000.0,
                    pad_vocab_to=64)
    raise ValueError(f"arch must be one of {ARCHS}, got {arch!r}")


def config_from_depth(depth: int, vocab_size: int, sequence_len: int = 1024, *, attention: str = "mha",
                      n_kv_head: int | None = None, aspect_ratio: int = 64, head_dim: int = 128,
                      kv_lora_rank: int | None = None, qk_rope_head_dim: int | None = None,
                      q_lora_rank: int = 0, arch: str = "picochat") -> GPTConfig:
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
        # latent n_embd/4 (the seed's d4 table); rotary key head_dim/2 but at most n_embd/8, so the
        # cache is <= 18.75% of MHA's bytes per token. A 64-dim rotary key is what put d8 within 2%
        # of MHA (docs/attention.md); at d4 the cap keeps the seed's 64 + 32.
        rope = max(8, min((n_embd // n_head) // 2, n_embd // 8)) // 2 * 2
        extra = dict(kv_lora_rank=kv_lora_rank or max(1, n_embd // 4), qk_rope_head_dim=qk_rope_head_dim or rope,
                     q_lora_rank=q_lora_rank)
    extra.update(arch_fields(arch, sequence_len))
    return GPTConfig(sequence_len=sequence_len, vocab_size=vocab_size, n_layer=depth, n_head=n_head,
                     n_kv_head=n_kv_head, n_embd=n_embd, attention=attention, **extra)
