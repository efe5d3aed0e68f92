"""Chat batches for midtraining (packed) and SFT (padded, assistant-only loss).

Midtraining continues pretraining on the chat format: rendered conversations, each starting with
BOS, are packed back to back into (B, T) rows by the same PackedLoader as pretraining, and every
token is a target. SFT keeps conversations whole: one conversation per row, right-padded, with
targets = -1 wherever the render mask is 0 (user turns, tool outputs, padding).

Both draw from a TaskMixture whose order is a function of the index alone, and use the same
slot scheme as pretraining (rank r, micro-step a -> slot r * grad_accum + a), so resume is exact
and torchrun ranks match single-process gradient accumulation.
"""
from __future__ import annotations

import torch

from picochat.data.loader import PackedLoader
from picochat.data.tasks.base import Task


def MidLoader(mixture: Task, tokenizer, batch_size: int, seq_len: int, rank: int = 0, world_size: int = 1,
              grad_accum: int = 1, state: dict | None = None, device="cpu") -> PackedLoader:
    def render(indices):
        return [tokenizer.render_conversation(mixture[i])[0] for i in indices]
    return PackedLoader(lambda: render, len(mixture), batch_size, seq_len, "mid", rank, world_size, grad_accum,
                        state, tokenizer_batch=32, device=device)


def sft_batch(conversations: list[dict], tokenizer, max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Render, truncate to max_len + 1 tokens, right-pad; targets are -1 where not supervised."""
    rows = [tokenizer.render_conversation(c, max_tokens=max_len + 1) for c in conversations]
    width = max(len(ids) for ids, _ in rows) - 1
    x = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
    y = torch.full((len(rows), width), -1, dtype=torch.long)
    for r, (ids, mask) in enumerate(rows):
        ids_t = torch.tensor(ids, dtype=torch.long)
        m = torch.tensor(mask[1:], dtype=torch.bool)
        n = len(ids) - 1
        x[r, :n] = ids_t[:-1]
        y[r, :n] = torch.where(m, ids_t[1:], torch.full_like(ids_t[1:], -1))
    return x, y


class SFTLoader:
    """Yields padded (x, y) batches of whole conversations; state = next index per slot."""

    def __init__(self, mixture: Task, tokenizer, batch_size: int, max_len: int, rank: int = 0, world_size: int = 1,
                 grad_accum: int = 1, state: dict | None = None, device="cpu"):
        self.mixture, self.tok = mixture, tokenizer
        self.B, self.max_len, self.grad_accum = batch_size, max_len, grad_accum
        self.device = torch.device(device)
        self.n_slots = world_size * grad_accum
        self.slots = [rank * grad_accum + a for a in range(grad_accum)]
        state = state or {}
        if state and state.get("n_slots") != self.n_slots:
            raise ValueError(f"loader state was saved with {state.get('n_slots')} slots, now {self.n_slots} "
                             f"(world_size x grad_accum must match to resume)")
        # slot s serves conversation rows s*B .. s*B+B-1 of every "global batch" of n_slots*B
        self.next = {s: int(state.get("slots", {}).get(str(s), s * batch_size)) for s in self.slots}
        self.micro = state.get("micro", 0)

    def __iter__(self):
        return self

    def __next__(self):
        slot = self.slots[self.micro % self.grad_accum]
        self.micro = (self.micro + 1) % self.grad_accum
        start = self.next[slot]
        convs = [self.mixture[(start + i) % len(self.mixture)] for i in range(self.B)]
        self.next[slot] = start + self.n_slots * self.B
        x, y = sft_batch(convs, self.tok, self.max_len)
        return x.to(self.device), y.to(self.device)

    def state_dict(self) -> dict:
        return {"split": "sft", "n_slots": self.n_slots, "micro": self.micro,
                "slots": {str(s): v for s, v in self.next.items()}}
