"""Chat batches for midtraining (packed) and SFT (padded or packed, assistant-only loss).

Midtraining packs rendered conversations (each starting with BOS) back to back into (B, T) rows with
pretraining's PackedLoader; every token is a target. SFT keeps conversations whole: one per row,
right-padded, targets -1 wherever the render mask is 0 (user turns, tool outputs, padding); or, with
`pack`, a step's conversations placed whole into as few rows of that width as hold them. Both
draw from a TaskMixture whose order is a function of the index alone and use pretraining's slot
scheme, so resume is exact and torchrun ranks match single-process accumulation. With `workers`
(workers.py) mid tokenizes there and SFT renders whole batches there. `pad_to` fixes SFT's row width
(compiled/CUDA-graph training wants one static shape; the extra columns are padding with target -1,
so the loss is unchanged).
"""
from __future__ import annotations

import numpy as np
import torch

from picochat.data.loader import DEFAULT_PREFETCH, PackedLoader, SlotLoader
from picochat.tasks.base import Task


def MidLoader(mixture: Task, tokenizer, batch_size: int, seq_len: int, rank: int = 0, world_size: int = 1,
              grad_accum: int = 1, state: dict | None = None, device="cpu", workers: int = 0,
              tokenizer_batch: int = 32, prefetch: int = DEFAULT_PREFETCH) -> PackedLoader:
    def render(indices):
        return [tokenizer.render_conversation(mixture[i])[0] for i in indices]
    return PackedLoader(lambda: render, len(mixture), batch_size, seq_len, "mid", rank, world_size, grad_accum,
                        state, tokenizer_batch=tokenizer_batch, device=device, workers=workers, prefetch=prefetch)


def best_fit(rendered: list[tuple[list[int], list[int]]], capacity: int) -> list[tuple[list[int], list[int]]]:
    """Whole conversations into as few rows of `capacity` tokens as best-fit decreasing finds: each,
    longest first, goes to the fullest row it fits in. A row's later conversations can attend to its
    earlier ones (each starts with BOS), as in midtraining and nanochat's SFT."""
    rows: list[tuple[list[int], list[int]]] = []
    for ids, mask in sorted(rendered, key=lambda r: -len(r[0])):
        fits = [r for r in rows if len(r[0]) + len(ids) <= capacity]
        if fits:
            row = max(fits, key=lambda r: len(r[0]))
            row[0].extend(ids), row[1].extend(mask)
        else:
            rows.append((list(ids), list(mask)))
    return rows


def sft_arrays(conversations: list[dict], tokenizer, max_len: int, pad_to: int | None = None, pack: bool = False):
    """Render, truncate to max_len + 1 tokens; one conversation per row right-padded to the longest
    (or to pad_to >= max_len), or with `pack` as many whole conversations per row of that width as fit
    (the same supervised tokens in fewer rows: on short chats about half the compute). Targets are -1
    where not supervised. numpy, no torch: it runs in forked workers."""
    rows = [tokenizer.render_conversation(c, max_tokens=max_len + 1) for c in conversations]
    width = pad_to or max(len(ids) for ids, _ in rows) - 1
    if pack:
        rows = best_fit(rows, width + 1)
    x = np.full((len(rows), width), tokenizer.pad_token_id, dtype=np.int64)
    y = np.full((len(rows), width), -1, dtype=np.int64)
    for r, (ids, mask) in enumerate(rows):
        ids = np.asarray(ids, dtype=np.int64)
        x[r, :len(ids) - 1] = ids[:-1]
        y[r, :len(ids) - 1] = np.where(np.asarray(mask[1:], dtype=bool), ids[1:], -1)
    return x, y


def sft_batch(conversations: list[dict], tokenizer, max_len: int, pad_to: int | None = None,
              pack: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    return tuple(torch.from_numpy(a) for a in sft_arrays(conversations, tokenizer, max_len, pad_to, pack))


class SFTLoader(SlotLoader):
    """Yields Batches of padded whole conversations; state = next conversation index per slot."""

    def __init__(self, mixture: Task, tokenizer, batch_size: int, max_len: int, rank: int = 0, world_size: int = 1,
                 grad_accum: int = 1, state: dict | None = None, device="cpu", workers: int = 0,
                 pad_to: int | None = None, prefetch: int = DEFAULT_PREFETCH, pack: bool = False):
        if pad_to is not None and pad_to < max_len:
            raise ValueError(f"pad_to ({pad_to}) must be >= max_len ({max_len})")
        super().__init__("sft", rank, world_size, grad_accum, state, device)
        self.mixture, self.tok = mixture, tokenizer
        self.B, self.max_len, self.pad_to, self.pack = batch_size, max_len, pad_to, pack
        # slot s serves conversation rows s*B .. s*B+B-1 of every "global batch" of n_slots*B
        self.next = {s: int(self.saved.get(str(s), s * batch_size)) for s in self.slots}
        if workers:  # optional speed-up: whole batches rendered in forked processes (workers.py)
            from picochat.data.workers import Background, WorkerPool
            pool = WorkerPool(self._render, workers, name="sft")
            self.background = Background(self, pool, lambda stop: self._render_ahead(pool, stop), prefetch)

    def _advance(self) -> int:
        """Claim the next micro-step's batch: returns its first conversation index."""
        slot = self.slots[self._next_micro()]
        start = self.next[slot]
        self.next[slot] = start + self.n_slots * self.B
        return start

    def _render(self, start: int):
        convs = [self.mixture[(start + i) % len(self.mixture)] for i in range(self.B)]
        return sft_arrays(convs, self.tok, self.max_len, self.pad_to, self.pack)

    def _produce(self):
        return tuple(torch.from_numpy(a) for a in self._render(self._advance()))

    def _render_ahead(self, pool, stop):
        """Prefetch thread: batches are independent, so keep ~2 requests per worker in flight."""
        states = []
        for _ in range(2 * pool.n):
            pool.submit(self._advance())
            states.append(self.live_state())
        while True:
            x, y = (self._pinned(torch.from_numpy(a)) for a in pool.get(stop=stop))
            pool.submit(self._advance())
            states.append(self.live_state())
            yield (x, y), states.pop(0)

    def _positions(self) -> dict:
        return {str(s): v for s, v in self.next.items()}

