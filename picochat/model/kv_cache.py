"""KV cache for inference: preallocated once, left-padded batches, rollback for speculation.

The cache does not know what an attention layer stores. Each layer writes named tensors
(MHA/GQA: "k" and "v" of shape (B, H_kv, T, D); MLA: the latent "c_kv" and the shared rotary key)
and gets back views over everything cached so far. Buffers are allocated on first write at
`max_len` along the sequence dim, so a whole generation allocates exactly once.

Left padding: row b of a batch starts with `pad[b]` pad tokens. The model derives from `pad`
(a) rotary positions that start at 0 at each row's first real token and (b) a key mask so no
real token attends to padding. `pos` is the number of cached positions (same for all rows);
`shift_right` grows a row's padding so rows of a speculative batch re-align after accepting
different numbers of tokens.
"""
from __future__ import annotations

import copy

import torch


class KVCache:
    def __init__(self, batch_size: int, max_len: int, device: torch.device | str = "cpu",
                 pad: torch.Tensor | list[int] | None = None):
        self.batch_size = batch_size
        self.max_len = max_len
        self.device = torch.device(device)
        self.pos = 0
        self.layers: dict[int, dict[str, tuple[torch.Tensor, int]]] = {}
        if pad is None:
            pad = torch.zeros(batch_size, dtype=torch.long)
        self.pad = torch.as_tensor(pad, dtype=torch.long, device=self.device)
        if self.pad.shape != (batch_size,):
            raise ValueError(f"pad must have shape ({batch_size},), got {tuple(self.pad.shape)}")
        self._pad_changed()

    def _pad_changed(self) -> None:
        # derived once per change of `pad`, not per decode step (the decode loop is overhead-bound)
        self.has_padding = bool((self.pad > 0).any())
        self._key_mask = None  # (B, 1, 1, max_len) bool, built on first padded decode step

    def update(self, layer_idx: int, name: str, x: torch.Tensor, seq_dim: int) -> torch.Tensor:
        """Write x (T new positions along seq_dim) at [pos, pos+T); return the view [0, pos+T)."""
        T = x.size(seq_dim)
        if self.pos + T > self.max_len:
            raise ValueError(f"KV cache overflow: {self.pos} + {T} > max_len {self.max_len}")
        layer = self.layers.setdefault(layer_idx, {})
        if name not in layer:
            shape = list(x.shape)
            shape[seq_dim] = self.max_len
            buf = torch.zeros(shape, dtype=x.dtype, device=x.device)
            layer[name] = (buf, seq_dim)
        buf, seq_dim = layer[name]
        buf.narrow(seq_dim, self.pos, T).copy_(x)
        return buf.narrow(seq_dim, 0, self.pos + T)

    def advance(self, T: int) -> None:
        """Called by the model once all layers have written their T new positions."""
        self.pos += T

    def truncate(self, pos: int) -> None:
        """Roll back to `pos` cached positions (speculative decoding rejects). Data past pos is
        simply overwritten later; no copy needed."""
        if not 0 <= pos <= self.pos:
            raise ValueError(f"cannot truncate to {pos}: cache holds {self.pos} positions")
        self.pos = pos

    def select_rows(self, rows: torch.Tensor | list[int]) -> None:
        """Keep only `rows` of the batch (finished rows stop costing compute)."""
        rows = torch.as_tensor(rows, dtype=torch.long, device=self.device)
        for layer in self.layers.values():
            for name, (buf, seq_dim) in layer.items():
                layer[name] = (buf.index_select(0, rows.to(buf.device)), seq_dim)
        self.pad = self.pad.index_select(0, rows)
        self.batch_size = len(rows)
        self._pad_changed()

    def merge(self, other: "KVCache", max_len: int) -> None:
        """Append `other`'s rows to this batch (continuous batching: requests join a running decode).

        Both batches are right-aligned at a common end (the shorter one's rows grow their left
        padding, as in shift_right), leading columns that are padding in every row are dropped,
        and all buffers are reallocated at `max_len` (at least the merged length). An empty
        cache (batch_size 0) simply adopts `other`. Costs one copy of both caches, made one buffer
        at a time, each old buffer freed as soon as it is copied: memory peaks at the merged cache
        plus one buffer, not at both caches and the merged one (`other` is emptied)."""
        mine = self.batch_size > 0
        end = max(self.pos, other.pos) if mine else other.pos
        parts = ([copy.copy(self)] if mine else []) + [other]
        pads = torch.cat([c.pad.to(self.device) + (end - c.pos) for c in parts])
        drop = int(pads.min()) if len(pads) else 0  # leading columns that are padding in every row
        self.layers, self.pos, self.batch_size = {}, end - drop, len(pads)
        self.max_len = max(max_len, self.pos)
        self.pad = pads - drop
        self._pad_changed()
        starts = torch.tensor([0] + [c.batch_size for c in parts]).cumsum(0).tolist()
        keys = dict.fromkeys((i, name) for c in parts for i, names in c.layers.items() for name in names)
        for i, name in keys:
            for c, a, b in zip(parts, starts, starts[1:]):
                if name in c.layers.get(i, {}):
                    self._copy_in(torch.arange(a, b, device=self.device), c, only=(i, name))
                    del c.layers[i][name]

    def place(self, rows: torch.Tensor | list[int], other: "KVCache") -> None:
        """Copy everything `other` has cached into rows `rows` of this cache, right-aligned to end
        at this cache's `pos` (batched prefill in length-sorted chunks: each chunk is padded only to
        its own longest prompt, and the columns before it are these rows' left padding here).
        Allocates this cache's buffers on first use; `pad` must already describe the result."""
        if other.pos > self.pos:
            raise ValueError(f"cannot place {other.pos} positions before position {self.pos}")
        self._copy_in(torch.as_tensor(rows, dtype=torch.long, device=self.device), other)

    def _copy_in(self, rows: torch.Tensor, other: "KVCache", only: tuple | None = None) -> None:
        """Copy the last min(other.pos, pos) positions of `other` into rows `rows`, ending at `pos`;
        buffers this cache does not have yet are allocated (zeros, batch_size x max_len).
        only=(layer, name): that one buffer."""
        n = min(other.pos, self.pos)
        for layer_idx, names in other.layers.items():
            layer = self.layers.setdefault(layer_idx, {})
            for name, (src, seq_dim) in names.items():
                if only is not None and only != (layer_idx, name):
                    continue
                if name not in layer:
                    shape = list(src.shape)
                    shape[0], shape[seq_dim] = self.batch_size, self.max_len
                    layer[name] = (torch.zeros(shape, dtype=src.dtype, device=src.device), seq_dim)
                buf, _ = layer[name]
                dst = buf.narrow(seq_dim, self.pos - n, n)
                dst.index_copy_(0, rows.to(buf.device), src.narrow(seq_dim, other.pos - n, n))

    def shift_right(self, shift: torch.Tensor | list[int]) -> None:
        """Move row b's cached positions right by shift[b] and grow its left padding by as much.

        Batched speculative decoding accepts a different number of tokens per row; shifting the
        rows that accepted fewer re-aligns every row's end at one common `pos`. Rotary angles are
        baked into the cached keys, and a row's positions count from its (now later) first real
        token, so nothing is recomputed. Costs one copy of the cache."""
        shift = torch.as_tensor(shift, dtype=torch.long, device=self.device)
        if not bool((shift > 0).any()):
            return
        for layer in self.layers.values():
            for name, (buf, seq_dim) in layer.items():
                src = (torch.arange(self.max_len, device=buf.device)[None, :] - shift.to(buf.device)[:, None]).clamp_(min=0)
                view = [1] * buf.dim()
                view[0], view[seq_dim] = self.batch_size, self.max_len
                layer[name] = (buf.gather(seq_dim, src.view(view).expand_as(buf)), seq_dim)
        self.pad = self.pad + shift
        self._pad_changed()

    @property
    def decoding(self) -> bool:
        """Whether positions are cached before this step's tokens (MLA absorbs then)."""
        return self.pos > 0

    def previous(self, seen: torch.Tensor, seq_dim: int, T: int) -> torch.Tensor:
        """The position before each of the T new ones in `seen` (a view update returned), zeros
        before the first (smear's previous embedding)."""
        if self.pos:
            return seen.narrow(seq_dim, self.pos - 1, T)
        return torch.cat([torch.zeros_like(seen.narrow(seq_dim, 0, 1)), seen.narrow(seq_dim, 0, T - 1)], seq_dim)

    def positions(self, T: int) -> torch.Tensor:
        """Rotary position ids (B, T) for the next T tokens: counted from each row's first real token."""
        abs_pos = torch.arange(self.pos, self.pos + T, device=self.device)
        return (abs_pos[None, :] - self.pad[:, None]).clamp_(min=0)

    def attn_mask(self, T: int, window: int | None = None) -> torch.Tensor | None:
        """Boolean (B, 1, T, pos+T) mask, True = may attend; None when plain causal/full suffices.
        With `window`, a query also may not see keys more than `window` positions back (sliding
        window attention); distances within a row survive padding, shifts and merges unchanged."""
        S = self.pos + T
        windowed = window is not None and S - 1 > window
        if T == 1 and not windowed:
            if not self.has_padding:
                return None  # one query over all cached keys: no mask needed
            # one real query: it may see every key but padding; slice a mask built once
            if self._key_mask is None:
                k = torch.arange(self.max_len, device=self.device)
                self._key_mask = (k[None, :] >= self.pad[:, None])[:, None, None, :]
            return self._key_mask[..., :S]
        q = torch.arange(self.pos, S, device=self.device)[:, None]          # (T, 1)
        k = torch.arange(S, device=self.device)[None, :]                    # (1, S)
        causal = k <= q                                                      # (T, S)
        if windowed:
            causal &= q - k <= window
        valid = k >= self.pad[:, None, None]                                 # (B, 1, S)
        # a padding query would see no key at all (softmax of all -inf = NaN, and 0 * NaN poisons
        # real rows later); let every query see itself so padding stays finite and harmless
        mask = (causal[None] & valid) | (k == q)[None]
        return mask[:, None]                                                 # (B, 1, T, S)

    def nbytes(self) -> int:
        return sum(buf.numel() * buf.element_size() for layer in self.layers.values() for buf, _ in layer.values())

    def bytes_per_token(self) -> float:
        """Cache bytes per position per batch row (all layers)."""
        return self.nbytes() / max(1, self.max_len * self.batch_size)


class StaticStep:
    """A KVCache seen by ONE decode token with static shapes, for torch.compile / CUDA graphs; the
    same interface as KVCache (positions, attn_mask, update, previous, advance, decoding), so the
    model never asks which one it got.

    Everything that changes from step to step is a tensor: the position `pos` (0-dim) is where
    every row writes its new key/value (index_copy_ into the preallocated buffers) and what the mask
    compares against; attention runs over all max_len slots with a mask that hides slots past
    `pos`, each row's left padding and anything outside a sliding window. No Python number moves,
    so one compiled graph (or one CUDA graph) serves every step. The caller advances `cache.pos`.
    Requires every buffer to exist already (a prefill allocates them)."""

    decoding = True  # a decode step follows a prefill

    def __init__(self, cache: KVCache, pos: torch.Tensor):
        self.cache, self.pos_t, self.pad = cache, pos, cache.pad
        self.keys = torch.arange(cache.max_len, device=pos.device)

    def positions(self, T: int) -> torch.Tensor:
        return (self.pos_t - self.pad)[:, None].clamp(min=0)

    def attn_mask(self, T: int, window: int | None = None) -> torch.Tensor:
        k = self.keys[None, :]
        mask = (k >= self.pad[:, None]) & (k <= self.pos_t)
        if window is not None:
            mask &= self.pos_t - k <= window
        return mask[:, None, None, :]                                        # (B, 1, 1, max_len)

    def update(self, layer_idx, name: str, x: torch.Tensor, seq_dim: int) -> torch.Tensor:
        buf = self.cache.layers[layer_idx][name][0]
        buf.index_copy_(seq_dim, self.pos_t.view(1), x.to(buf.dtype))
        return buf

    def previous(self, seen: torch.Tensor, seq_dim: int, T: int = 1) -> torch.Tensor:
        """The slot before `pos` of a buffer returned by update (smear's previous embedding)."""
        return seen.index_select(seq_dim, (self.pos_t - 1).view(1))

    def advance(self, T: int) -> None:
        pass
